"""xenstored benchmark: many clients creating sibling nodes, each in a transaction.

Run: .venv/bin/python benchmarks/xenstored_txn.py [--clients N] [--nodes M]

Starts ``python -m gntdma.xenstored`` on a private Unix socket, then N client
threads (default 50), each creating M nodes (default 400) under one common
directory, every creation in its own transaction (TRANSACTION_START, WRITE,
TRANSACTION_END "T"), redone from the start on EAGAIN as libxenstore users
do. Creating a child reads its parent, so concurrent creations conflict (as
in C xenstored); the run ends when all N x M nodes exist. It prints the time,
the creations per second and how many commits were refused with EAGAIN. A
figure, not a test: the tree grows to N x M nodes and a transaction must cost
what it touches, not the size of the tree.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

from bench_args import positive_int

HDR = struct.Struct("=IIII")
XS_TRANSACTION_START, XS_TRANSACTION_END, XS_WRITE, XS_ERROR, XS_DIRECTORY_PART = 6, 7, 11, 16, 22
TOP = "/bench"


class Client:
    """A minimal blocking xs_wire client (one request in flight)."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.req = 0

    def _recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("daemon closed the connection")
            data += chunk
        return data

    def call(self, type_: int, payload: bytes, tx: int = 0) -> tuple[bool, bytes]:
        """(ok, reply payload); an XS_ERROR reply is (False, errno name)."""
        self.req += 1
        self.sock.sendall(HDR.pack(type_, self.req, tx, len(payload)) + payload)
        rtype, _, _, length = HDR.unpack(self._recv(HDR.size))
        body = self._recv(length)
        return rtype != XS_ERROR, body.rstrip(b"\0")

    def close(self) -> None:
        self.sock.close()


def count_children(c: Client, path: str) -> int:
    """The number of children of ``path``, read with DIRECTORY_PART."""
    names: list[bytes] = []
    offset = 0
    while True:
        ok, reply = c.call(XS_DIRECTORY_PART, f"{path}\0{offset}\0".encode())
        if not ok:
            return 0
        part = reply.split(b"\0")[1:]  # after the generation
        if not part or part == [b""]:
            return len(names)
        names += part
        offset += sum(len(n) + 1 for n in part)


def worker(path: str, index: int, nodes: int, eagain: list[int], errors: list[str]) -> None:
    c = Client(path)
    retries = 0
    try:
        for k in range(nodes):
            while True:
                ok, tx_text = c.call(XS_TRANSACTION_START, b"\0")
                if not ok:
                    errors.append(f"client {index}: TRANSACTION_START {tx_text!r}")
                    return
                tx = int(tx_text)
                ok, err = c.call(XS_WRITE, f"{TOP}/c{index}-{k}\0".encode() + b"v", tx)
                if not ok:
                    errors.append(f"client {index}: WRITE {err!r}")
                    c.call(XS_TRANSACTION_END, b"F\0", tx)
                    return
                ok, err = c.call(XS_TRANSACTION_END, b"T\0", tx)
                if ok:
                    break
                if err != b"EAGAIN":
                    errors.append(f"client {index}: TRANSACTION_END {err!r}")
                    return
                retries += 1
    finally:
        eagain[index] = retries
        c.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=positive_int, default=50)
    parser.add_argument("--nodes", type=positive_int, default=400, help="creations per client")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gntxsb") as tmp:
        sock = os.path.join(tmp, "socket")
        daemon = subprocess.Popen([sys.executable, "-m", "gntdma.xenstored", "--socket", sock],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert daemon.stdout is not None
            ready, _, _ = select.select([daemon.stdout], [], [], 30)
            if not ready or daemon.stdout.readline().strip() != sock:
                print("xenstored did not start", file=sys.stderr)
                return 1
            eagain = [0] * args.clients
            errors: list[str] = []
            threads = [threading.Thread(target=worker, args=(sock, i, args.nodes, eagain, errors))
                       for i in range(args.clients)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - t0
            check = Client(sock)
            created = count_children(check, TOP)
            check.close()
        finally:
            daemon.terminate()
            daemon.wait(30)
    total = args.clients * args.nodes
    print(f"{args.clients} clients x {args.nodes} sibling creations in transactions: "
          f"{created}/{total} nodes in {elapsed:.1f} s "
          f"({created / elapsed:.0f} creations/s), {sum(eagain)} EAGAIN retries")
    for e in errors[:5]:
        print(e, file=sys.stderr)
    return 0 if created == total and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
