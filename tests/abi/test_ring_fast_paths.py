"""gntdma.abi.ring: the u32 view of the header and the per-slot views give exactly
what struct and offsets give.

A ring in one buffer reads and writes its four indices through a ``memoryview``
cast to u32 (on a little-endian host, the byte order of ``xen/io/ring.h``'s
shared indices on x86 and Arm) and its slots through a view of each slot; a ring
on separate pages, or a big-endian host, takes the struct and offset path. Both
must leave the same bytes in the shared area and return the same values for
every operation, hostile indices and the wrap at 2**32 included.
"""

from __future__ import annotations

import random
import sys

import pytest

from gntdma.abi.ring import BackRing, FrontRing, RingProtocolError, sring_init

M32 = 0xFFFFFFFF


def _rings(start: int, generic: bool) -> tuple[bytearray, FrontRing, BackRing]:
    buf = bytearray(4096)
    sring_init(buf)
    for off in (0, 8):  # both producers at start (FRONT/BACK_RING_ATTACH)
        buf[off:off + 4] = start.to_bytes(4, "little")
    front, back = FrontRing(buf, 112, start=start), BackRing(buf, 112, start=start)
    if generic:
        for r in (front, back):
            r._idx = None  # what a big-endian host takes
            r._slots = None  # what a ring on separate pages takes
    return buf, front, back


def _script(seed: int, generic: bool) -> tuple[list[object], bytes]:
    rng = random.Random(seed)
    buf, f, b = _rings(rng.choice([0, M32 - 20, rng.getrandbits(32)]), generic)
    out: list[object] = []
    for _ in range(400):
        op = rng.randrange(9)
        try:
            if op == 0 and not f.full():
                f.put_request(rng.randbytes(rng.randint(1, 112)))
            elif op == 1:
                out.append(f.push_requests())
            elif op == 2:
                n = b.unconsumed_requests()
                out.append(n)
                for _ in range(rng.randint(0, n)):
                    out.append(b.get_request())
                    b.put_response(rng.randbytes(rng.randint(1, 112)))
            elif op == 3:
                out.append(b.push_responses())
            elif op == 4:
                n = f.unconsumed_responses()
                out.append(n)
                for _ in range(rng.randint(0, n)):
                    out.append(f.get_response())
            elif op == 5:
                out.append(f.final_check_for_responses())
            elif op == 6:
                out.append(b.final_check_for_requests())
            elif op == 7:
                out.append((f.full(), f.free_requests(), f.header()))
            elif op == 8 and rng.random() < 0.1:  # a hostile producer index
                off = rng.choice([0, 8])
                buf[off:off + 4] = rng.getrandbits(32).to_bytes(4, "little")
        except (RingProtocolError, OverflowError, IndexError) as e:
            out.append(type(e).__name__)
    return out, bytes(buf)


@pytest.mark.parametrize("seed", range(40))
def test_fast_slot_and_index_access_match_the_struct_path(seed: int) -> None:
    fast = _script(seed, generic=False)
    assert fast == _script(seed, generic=True)
    assert any(isinstance(x, bytes) for x in fast[0])  # slots were read


def test_a_ring_in_one_buffer_takes_the_fast_path() -> None:
    _buf, front, back = _rings(0, generic=False)
    assert front._slots is not None and len(front._slots) == front.nr_ents
    assert back._idx is not None or sys.byteorder == "big"
