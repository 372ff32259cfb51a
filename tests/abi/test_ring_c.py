"""gntdma.abi.ring against Xen's own io/ring.h macros, byte for byte.

A C program built against ``/usr/include/xen/io/ring.h`` and ``io/blkif.h``
(``DEFINE_RING_TYPES(blkif, ...)``) and the Python ring run the same script of
ring operations on a page filled with garbage: init, put requests with known
contents (read/write and discard, written with the header's structs), push with
the notify check, backend consume, responses, final checks. Each step prints its
result (notify flags, free counts, what was consumed) and the barriers it
executed (``xen_wmb``/``xen_rmb``/``xen_mb`` are defined to log ``W``/``R``/``M``);
at the end both dump the private indices and the whole ring area. The outputs
must be identical. Scripts start at indices near 2**32 so that they wrap, and
Hypothesis generates further legal scripts.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import pytest
from cprobe_abi import CFLAGS, require_toolchain, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gntdma.abi.blkif import (
    BLKIF_ABI_X86_64,
    BLKIF_OP_DISCARD,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    BlkifAnyRequest,
    BlkifRequest,
    BlkifRequestDiscard,
    BlkifRequestSegment,
    BlkifResponse,
)
from gntdma.abi.ring import (
    SRING_HEADER_SIZE,
    BackRing,
    FrontRing,
    RingArea,
    SringHeader,
    sring_init,
)

ENTRY = BLKIF_ABI_X86_64.entry_size
M32 = 0xFFFFFFFF

C_PROGRAM = r"""
#include <stdint.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char trace[64];
static int ntrace;
#define xen_mb()  (trace[ntrace++] = 'M')
#define xen_rmb() (trace[ntrace++] = 'R')
#define xen_wmb() (trace[ntrace++] = 'W')

#include <xen/xen.h>
#include <xen/io/ring.h>
#include <xen/io/blkif.h>

static unsigned char page[16 * 4096] __attribute__((aligned(4096)));

static void put_request(blkif_front_ring_t *fr, unsigned long long k)
{
    if (k % 7 == 6) {
        blkif_request_discard_t d;
        memset(&d, 0, sizeof d);
        d.operation = BLKIF_OP_DISCARD;
        d.flag = k & 1;
        d.handle = 0x51 + (k & 0xff);
        d.id = 0x1000000000ULL + k * 0x10001ULL;
        d.sector_number = k * 8 + 3;
        d.nr_sectors = k * 3 + 1;
        *(blkif_request_discard_t *)RING_GET_REQUEST(fr, fr->req_prod_pvt) = d;
    } else {
        blkif_request_t r;
        memset(&r, 0, sizeof r);
        r.operation = k % 2;
        r.nr_segments = 1 + k % 11;
        r.handle = 0x51 + (k & 0xff);
        r.id = 0x1000000000ULL + k * 0x10001ULL;
        r.sector_number = k * 8 + 3;
        for (int i = 0; i < r.nr_segments; i++) {
            r.seg[i].gref = 1000 + k * 16 + i;
            r.seg[i].first_sect = i % 8;
            r.seg[i].last_sect = 7;
        }
        *RING_GET_REQUEST(fr, fr->req_prod_pvt) = r;
    }
    fr->req_prod_pvt++;
}

int main(int argc, char **argv)
{
    unsigned pages = atoi(argv[1]);
    RING_IDX start = strtoul(argv[2], NULL, 0);
    blkif_sring_t *s = (blkif_sring_t *)page;
    blkif_front_ring_t fr;
    blkif_back_ring_t br;
    unsigned long long k = 0, fifo_id[4096];
    unsigned char fifo_op[4096];
    unsigned head = 0, tail = 0;
    char cmd[32];
    int more, notify;

    memset(page, 0xEE, sizeof page);
    SHARED_RING_INIT(s);
    s->req_prod = s->rsp_prod = start;
    s->req_event = s->rsp_event = start + 1;
    FRONT_RING_ATTACH(&fr, s, start, pages * 4096);
    BACK_RING_ATTACH(&br, s, start, pages * 4096);
    printf("size %u\n", RING_SIZE(&fr));

    while (scanf("%31s", cmd) == 1) {
        unsigned n = atoi(cmd + 1), avail, take, i;
        RING_IDX rp;
        ntrace = 0;
        switch (cmd[0]) {
        case 'q':
            for (i = 0; i < n; i++)
                put_request(&fr, k++);
            printf("q %u", RING_FREE_REQUESTS(&fr));
            break;
        case 'P':
            RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&fr, notify);
            printf("P %d", notify);
            break;
        case 'c':
            rp = s->req_prod;
            xen_rmb();
            avail = rp - br.req_cons;
            take = n < avail ? n : avail;
            printf("c %u", avail);
            for (i = 0; i < take; i++) {
                blkif_request_t req;
                RING_COPY_REQUEST(&br, br.req_cons, &req);
                br.req_cons++;
                fifo_id[tail % 4096] = req.id;
                fifo_op[tail % 4096] = req.operation;
                tail++;
                printf(" %llx", (unsigned long long)req.id);
            }
            break;
        case 'r':
            for (i = 0; i < n; i++) {
                blkif_response_t rsp;
                memset(&rsp, 0, sizeof rsp);
                rsp.id = fifo_id[head % 4096];
                rsp.operation = fifo_op[head % 4096];
                rsp.status = rsp.id % 3 == 0 ? BLKIF_RSP_ERROR : BLKIF_RSP_OKAY;
                head++;
                *RING_GET_RESPONSE(&br, br.rsp_prod_pvt) = rsp;
                br.rsp_prod_pvt++;
            }
            printf("r");
            break;
        case 'R':
            RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&br, notify);
            printf("R %d", notify);
            break;
        case 'a':
            rp = s->rsp_prod;
            xen_rmb();
            avail = rp - fr.rsp_cons;
            take = n < avail ? n : avail;
            printf("a %u", avail);
            for (i = 0; i < take; i++) {
                blkif_response_t rsp;
                RING_COPY_RESPONSE(&fr, fr.rsp_cons, &rsp);
                fr.rsp_cons++;
                printf(" %llx:%u:%d", (unsigned long long)rsp.id, rsp.operation, rsp.status);
            }
            break;
        case 'F':
            RING_FINAL_CHECK_FOR_RESPONSES(&fr, more);
            printf("F %d", more != 0);
            break;
        case 'B':
            RING_FINAL_CHECK_FOR_REQUESTS(&br, more);
            printf("B %d", more != 0);
            break;
        case 'f':
            printf("f %u %d", RING_FREE_REQUESTS(&fr), RING_FULL(&fr));
            break;
        default:
            fprintf(stderr, "bad command %s\n", cmd);
            return 2;
        }
        printf(" [%.*s]\n", ntrace, trace);
    }
    printf("idx %u %u %u %u\n", fr.req_prod_pvt, fr.rsp_cons, br.rsp_prod_pvt, br.req_cons);
    printf("page ");
    for (unsigned i = 0; i < pages * 4096; i++)
        printf("%02x", page[i]);
    printf("\n");
    return 0;
}
"""


@pytest.fixture(scope="module")
def c_ring(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gcc = require_toolchain()
    work = tmp_path_factory.mktemp("ringc")
    (work / "ring.c").write_text(C_PROGRAM)
    run([gcc, *CFLAGS, "-o", str(work / "ring"), str(work / "ring.c")])
    return work / "ring"


def run_c(exe: Path, pages: int, start: int, script: str) -> list[str]:
    return run([str(exe), str(pages), str(start)], stdin=script).splitlines()


def make_request(k: int) -> BlkifAnyRequest:
    """Request number ``k`` of a script, as the C program builds it."""
    rid = 0x1000000000 + k * 0x10001
    if k % 7 == 6:
        return BlkifRequestDiscard(operation=BLKIF_OP_DISCARD, flag=k & 1, handle=0x51 + (k & 0xFF),
                                   id=rid, sector_number=k * 8 + 3, nr_sectors=k * 3 + 1)
    nseg = 1 + k % 11
    return BlkifRequest(operation=k % 2, nr_segments=nseg, handle=0x51 + (k & 0xFF), id=rid,
                        sector_number=k * 8 + 3,
                        seg=tuple(BlkifRequestSegment(gref=1000 + k * 16 + i, first_sect=i % 8,
                                                      last_sect=7) for i in range(nseg)))


def run_python(pages: int, start: int, script: str, split: bool = False) -> list[str]:
    """The same script on gntdma.abi.ring.

    ``split``: the ring is given as separate page buffers (as the pages of a
    multi-page ring are in a domain's memory) instead of one contiguous area.
    """
    trace: list[str] = []
    area = pages * 4096
    page = bytearray(b"\xee" * (16 * 4096))
    sring_init(page)
    SringHeader(req_prod=start, req_event=(start + 1) & M32, rsp_prod=start,
                rsp_event=(start + 1) & M32).pack_into(page, 0)
    barriers = {"wmb": lambda: trace.append("W"), "rmb": lambda: trace.append("R"),
                "mb": lambda: trace.append("M")}
    if split:  # each page its own buffer; slots straddle the page boundaries
        pieces = [bytearray(page[i * 4096:(i + 1) * 4096]) for i in range(pages)]
        views: RingArea = [memoryview(p) for p in pieces]
        fr = FrontRing(views, ENTRY, start=start, **barriers)
        br = BackRing(views, ENTRY, start=start, **barriers)
    else:
        view = memoryview(page)
        fr = FrontRing(view, ENTRY, start=start, area_size=area, **barriers)
        br = BackRing(view, ENTRY, start=start, area_size=area, **barriers)
    out = [f"size {fr.nr_ents}"]
    k = 0
    fifo: deque[tuple[int, int]] = deque()
    for cmd in script.split():
        trace.clear()
        op, n = cmd[0], int(cmd[1:] or 0)
        if op == "q":
            for _ in range(n):
                fr.put_request(BLKIF_ABI_X86_64.pack_request(make_request(k)))
                k += 1
            line = f"q {fr.free_requests()}"
        elif op == "P":
            line = f"P {int(fr.push_requests())}"
        elif op == "c":
            avail = br.unconsumed_requests()
            line = f"c {avail}"
            for _ in range(min(n, avail)):
                req = BLKIF_ABI_X86_64.unpack_request(br.get_request())
                fifo.append((req.id, req.operation))
                line += f" {req.id:x}"
        elif op == "r":
            for _ in range(n):
                rid, rop = fifo.popleft()
                status = BLKIF_RSP_ERROR if rid % 3 == 0 else BLKIF_RSP_OKAY
                br.put_response(BLKIF_ABI_X86_64.pack_response(
                    BlkifResponse(id=rid, operation=rop, status=status)))
            line = "r"
        elif op == "R":
            line = f"R {int(br.push_responses())}"
        elif op == "a":
            avail = fr.unconsumed_responses()
            line = f"a {avail}"
            for _ in range(min(n, avail)):
                rsp = BLKIF_ABI_X86_64.unpack_response(fr.get_response())
                line += f" {rsp.id:x}:{rsp.operation}:{rsp.status}"
        elif op == "F":
            line = f"F {int(fr.final_check_for_responses())}"
        elif op == "B":
            line = f"B {int(br.final_check_for_requests())}"
        elif op == "f":
            line = f"f {fr.free_requests()} {int(fr.full())}"
        else:
            raise AssertionError(cmd)
        out.append(f"{line} [{''.join(trace)}]")
    out.append(f"idx {fr.req_prod_pvt} {fr.rsp_cons} {br.rsp_prod_pvt} {br.req_cons}")
    if split:
        page[:area] = b"".join(pieces)
    out.append("page " + page[:area].hex())
    return out


SCRIPTS = [
    # one request, one response, both final checks
    (1, 0, "f q1 P c1 B r1 R a1 F B f"),
    # batching: the second push does not notify until the backend re-arms req_event
    (1, 0, "q5 P q3 P c8 B q2 P c9 r8 R a3 R F a9 F r2 R F a2 F B"),
    # fill the ring completely, drain it, across the 2**32 wrap
    (1, 0xFFFFFFF0, "q32 f P c32 r32 R a32 F B f q32 P c16 r16 R a16 F c16 r16 R a16 F B"),
    # partial batches through the wrap; consumer lags behind the producer
    (1, 0xFFFFFFFE, "q3 P c1 B q4 P c9 r2 R r3 R F a1 F a9 F q30 f P B c30 r30 R a30 F B"),
    # multi-page rings (128 and 512 slots) starting just before the wrap
    (4, 0xFFFFFF80, "q100 P c60 r60 R a60 F q88 P B c128 r128 R a128 F B f"),
    (16, 0xFFFFFE00 + 7, "q300 P c300 B r299 R a512 F r1 R F a1 F q512 f P c512 r512 R a512"),
    # responses pushed one at a time: notify only when the frontend asked
    (2, 0x7FFFFFFF, "q6 P c6 r1 R F r1 R a9 F r1 R r1 R a9 F r2 R a2 F B"),
]


@pytest.mark.parametrize("split", [False, True], ids=["contiguous", "page-list"])
@pytest.mark.parametrize(("pages", "start", "script"), SCRIPTS)
def test_scripts_match_ring_h(c_ring: Path, pages: int, start: int, script: str,
                              split: bool) -> None:
    c_out = run_c(c_ring, pages, start, script)
    py_out = run_python(pages, start, script, split)
    assert py_out[:-1] == c_out[:-1]  # every step, its barriers, the final indices
    assert py_out[-1] == c_out[-1]  # the whole ring area, byte for byte


def test_the_scripts_exercise_notify_both_ways(c_ring: Path) -> None:
    lines = [ln for p, s, sc in SCRIPTS for ln in run_c(c_ring, p, s, sc)]
    pushes = [ln.split()[:2] for ln in lines if ln[0] in "PR"]
    assert ["P", "1"] in pushes and ["P", "0"] in pushes
    assert ["R", "1"] in pushes and ["R", "0"] in pushes
    checks = [ln.split()[:2] for ln in lines if ln[0] in "FB"]
    assert ["F", "1"] in checks and ["F", "0"] in checks
    assert ["B", "1"] in checks and ["B", "0"] in checks
    sizes = {int(ln.split()[1]) for ln in lines if ln.startswith("size")}
    assert sizes == {32, 64, 128, 512}


@st.composite
def scripts(draw: st.DrawFn) -> tuple[int, int, str]:
    """A legal random script: never overfill, never answer what was not consumed."""
    pages = draw(st.sampled_from([1, 2, 4]))
    size = BLKIF_ABI_X86_64.ring_size(pages)
    start = draw(st.one_of(st.integers(0, M32), st.integers(M32 - 600, M32)))
    made = pushed = consumed = answered = rsp_pushed = taken = 0
    cmds: list[str] = []
    for _ in range(draw(st.integers(1, 40))):
        choice = draw(st.sampled_from("qPcrRaFBf"))
        if choice == "q":
            free = size - (made - taken)
            if free == 0:
                continue
            n = draw(st.integers(1, free))
            made += n
            cmds.append(f"q{n}")
        elif choice == "P":
            pushed = made
            cmds.append("P")
        elif choice == "c":
            n = draw(st.integers(0, size))
            consumed += min(n, pushed - consumed)
            cmds.append(f"c{n}")
        elif choice == "r":
            if consumed == answered:
                continue
            n = draw(st.integers(1, consumed - answered))
            answered += n
            cmds.append(f"r{n}")
        elif choice == "R":
            rsp_pushed = answered
            cmds.append("R")
        elif choice == "a":
            n = draw(st.integers(0, size))
            taken += min(n, rsp_pushed - taken)
            cmds.append(f"a{n}")
        else:
            cmds.append(choice)
    return pages, start, " ".join(cmds)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=scripts(), split=st.booleans())
def test_random_scripts_match_ring_h(c_ring: Path, case: tuple[int, int, str],
                                     split: bool) -> None:
    pages, start, script = case
    assert run_python(pages, start, script, split) == run_c(c_ring, pages, start, script)


def test_header_offsets_used_by_the_scripts() -> None:
    assert SRING_HEADER_SIZE == 64 and ENTRY == 112
