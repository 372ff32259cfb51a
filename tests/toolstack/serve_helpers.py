"""Helpers of the ``gntdma serve`` tests: a server subprocess and its exports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def serve_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    env["TMPDIR"] = str(tmp)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def starved_config(tmp: Path, name: str = "starved", size: str = "32M",
                   frames: int = 1, memory: int = 32) -> Path:
    """One guest, one disk, a one-frame grant table (504 references): loads defer."""
    cfg = tmp / f"{name}.cfg"
    cfg.write_text(f'name = "{name}"\nmemory = {memory}\nmax_grant_frames = {frames}\n'
                   f"disk = [ 'format=raw, vdev=xvda, access=rw, size={size}, "
                   f"target={tmp / (name + '-xvda.img')}' ]\n")
    return cfg


@dataclass
class Served:
    proc: subprocess.Popen[str]
    socket: Path
    report_path: Path
    lines: list[str] = field(default_factory=list)
    uris: list[str] = field(default_factory=list)
    status: int | None = None
    stderr: str = ""

    def uri(self, export: str = "") -> str:
        return f"nbd+unix:///{export}?socket={self.socket}"

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60.0) -> dict[str, Any]:
        """End the server with ``sig``: its JSON report (``status`` is its exit status)."""
        if self.status is None:
            self.proc.send_signal(sig)
            self.status = self.proc.wait(timeout=timeout)
            assert self.proc.stderr is not None
            self.stderr = self.proc.stderr.read()
        return json.loads(self.report_path.read_text()) if self.report_path.exists() else {}


@contextmanager
def serving(tmp: Path, *configs: Path, extra: tuple[str, ...] = ()) -> Iterator[Served]:
    """``gntdma serve CONFIGS --nbd tmp/nbd.sock --json tmp/serve.json``, up and ready."""
    sock = tmp / "nbd.sock"
    report = tmp / "serve.json"
    cmd = [sys.executable, "-c", "import sys; from gntdma.cli import main; sys.exit(main())",
           "serve", *map(str, configs), "--nbd", str(sock), "--json", str(report), *extra]
    proc = subprocess.Popen(cmd, cwd=tmp, env=serve_env(tmp), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    s = Served(proc, sock, report)
    ready = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            s.lines.append(line.rstrip("\n"))
            if line.startswith("export: "):
                s.uris.append(line.split(" ", 1)[1].strip())
            if line.startswith("serving until"):
                ready.set()
        ready.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 60
        while not ready.is_set() and time.monotonic() < deadline:
            ready.wait(0.1)
        assert proc.poll() is None, f"serve ended: {proc.returncode} {s.lines}"
        yield s
    finally:
        if s.status is None:
            s.stop()
        t.join(timeout=10)


def run(*cmd: str, timeout: float = 300, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a client; fail with its output if it fails."""
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)
    assert p.returncode == 0, f"{' '.join(cmd)}: status {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p
