"""gntdma.abi.netif against Xen 4.17's ``/usr/include/xen/io/netif.h``, byte for byte.

A C probe compiled against the header reports the size of every netif struct,
the offset and size of every member the Python ``FIELDS`` name (and the header
has no member the Python leaves out), the signedness of every integer, the
bytes of a C object initialised with the values of a Python sample, and the
value of every constant. A second C program drives the tx and rx rings with
``io/ring.h``'s macros (``DEFINE_RING_TYPES(netif_tx, ...)``) while the Python
rings do the same: the pages and the notify answers must be identical.
"""

from __future__ import annotations

import enum
from pathlib import Path

import pytest
from cprobe_abi import (
    CFLAGS,
    XEN_INCLUDE,
    Probe,
    ProbeResult,
    header_defines,
    header_members,
    preprocess,
    require_toolchain,
    run,
    run_native,
)

from gntdma.abi import netif
from gntdma.abi._wire import WireStruct
from gntdma.abi.netif import (
    NETIF_RX_ENTRY_SIZE,
    NETIF_TX_ENTRY_SIZE,
    NETTXF,
    XEN_NETIF_GSO_TYPE_TCPV6,
    NetifExtraInfo,
    NetifRxRequest,
    NetifRxResponse,
    NetifTxRequest,
    NetifTxResponse,
)
from gntdma.abi.ring import BackRing, FrontRing, sring_init

STRUCTS: list[type[WireStruct]] = [NetifTxRequest, NetifTxResponse, NetifRxRequest,
                                   NetifRxResponse, NetifExtraInfo]
PRELUDE = "#include <xen/io/netif.h>\n"
#: netif.h macros (by prefix) that gntdma.abi.netif must define.
PREFIXES = ("NETTXF_", "NETRXF_", "NETIF_RSP_", "XEN_NETIF_EXTRA_", "XEN_NETIF_GSO_",
            "XEN_NETIF_NR_SLOTS_MIN", "XEN_NETIF_MAX_TX_SIZE")
#: Constants that are not header macros, and the C expression they must equal.
NOT_IN_HEADERS = {
    "NETIF_TX_ENTRY_SIZE": "sizeof(union netif_tx_sring_entry)",
    "NETIF_RX_ENTRY_SIZE": "sizeof(union netif_rx_sring_entry)",
    "NETIF_TX_RING_SIZE": "__CONST_RING_SIZE(netif_tx, 4096)",
    "NETIF_RX_RING_SIZE": "__CONST_RING_SIZE(netif_rx, 4096)",
}


def _sample(cls: type[WireStruct]) -> WireStruct:
    if cls is NetifExtraInfo:
        return NetifExtraInfo(type=0x81, flags=0x82, u=bytes(range(0xA1, 0xA7)))
    vals = {"I": 0x81020304, "H": 0x8506, "h": -0x1F0}
    return cls._from_values(tuple(vals[c] + i for i, c in enumerate(cls.LAYOUT.codes)))


def _c_init(obj: WireStruct) -> str:
    cls = type(obj)
    if isinstance(obj, NetifExtraInfo):
        return ", ".join([f".type = {obj.type}", f".flags = {obj.flags}"]
                         + [f".u.mcast.addr[{i}] = {b}" for i, b in enumerate(obj.u)])
    return ", ".join(f".{m} = {getattr(obj, n)}" for n, m in zip(cls.LAYOUT.names,
                                                                 cls.LAYOUT.members,
                                                                 strict=True))


def _int_constants() -> dict[str, int]:
    return {n: int(getattr(netif, n)) for n in netif.__all__
            if isinstance(getattr(netif, n), int)}


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> tuple[ProbeResult, str]:
    work: Path = tmp_path_factory.mktemp("netifprobe")
    p = Probe(prelude=PRELUDE)
    for cls in STRUCTS:
        t = cls.CTYPE
        p.values.append((f"sizeof {cls.__name__}", f"sizeof({t})"))
        for member, _, _ in cls.FIELDS:
            p.values.append((f"off {cls.__name__} {member}", f"offsetof({t}, {member})"))
            p.values.append((f"size {cls.__name__} {member}", f"sizeof((({t} *)0)->{member})"))
        for name, member in zip(cls.LAYOUT.names, cls.LAYOUT.members, strict=True):
            if member:
                p.values.append((f"signed {cls.__name__} {name}",
                                 f"((__typeof__((({t} *)0)->{member}))-1 < 0)"))
        p.objects.append((cls.__name__, t, _c_init(_sample(cls))))
    for name in _int_constants():
        p.values.append((f"const {name}", NOT_IN_HEADERS.get(name, name)))
    src = work / "hdr.c"
    pre = preprocess(work)
    src.write_text(PRELUDE)
    pre += run([require_toolchain(), *CFLAGS, "-include", "stdint.h", "-include", "xen/xen.h",
                "-E", "-P", str(src)])
    return run_native(p, work), pre


@pytest.mark.parametrize("cls", STRUCTS, ids=lambda c: c.__name__)
def test_netif_struct_layout_equals_the_header(probe: tuple[ProbeResult, str],
                                               cls: type[WireStruct]) -> None:
    """netif.h: sizes, offsets, member lists, signedness and packed bytes."""
    res, pre = probe
    v = res.values
    assert v[f"sizeof {cls.__name__}"] == cls.STRUCT.size
    for member, off, size in cls.FIELDS:
        assert (v[f"off {cls.__name__} {member}"], v[f"size {cls.__name__} {member}"]) == (
            off, size), member
    assert {m for m, _, _ in cls.FIELDS} == header_members(pre, cls.CTYPE)
    for name, code, member in zip(cls.LAYOUT.names, cls.LAYOUT.codes, cls.LAYOUT.members,
                                  strict=True):
        if member:
            assert bool(v[f"signed {cls.__name__} {name}"]) == code.islower(), name
    s = _sample(cls)
    assert s.pack().hex() == res.objects[cls.__name__].hex()
    assert cls.unpack(res.objects[cls.__name__]) == s


def test_netif_constants_equal_the_header(probe: tuple[ProbeResult, str]) -> None:
    res, _ = probe
    want = _int_constants()
    assert {n: res.values[f"const {n}"] for n in want} == want
    assert want["NETIF_TX_RING_SIZE"] == want["NETIF_RX_RING_SIZE"] == 256
    missing = header_defines(XEN_INCLUDE / "io/netif.h", PREFIXES) - set(netif.__all__)
    assert missing == set()


def test_netif_enums_are_the_module_constants() -> None:
    prefix = {"NETTXF": "NETTXF_", "NETRXF": "NETRXF_", "NetifExtraType": "XEN_NETIF_EXTRA_TYPE_",
              "NetifGsoType": "XEN_NETIF_GSO_TYPE_", "NetifRsp": "NETIF_RSP_"}
    for cls_name, pre in prefix.items():
        cls = getattr(netif, cls_name)
        assert issubclass(cls, enum.Enum)
        for name, member in cls.__members__.items():
            assert getattr(netif, pre + name) is member


def test_gso_extra_views() -> None:
    e = NetifExtraInfo.gso(1448, XEN_NETIF_GSO_TYPE_TCPV6, flags=1, features=0x55)
    assert e.pack() == bytes([1, 1]) + (1448).to_bytes(2, "little") + bytes([2, 0, 0x55, 0])
    assert (e.gso_size, e.gso_type, e.gso_features) == (1448, 2, 0x55)
    assert NetifExtraInfo.unpack(e.pack()) == e


# --- the rings --------------------------------------------------------------------

RING_C = r"""
#include <stdint.h>
#include <stdio.h>
#include <string.h>
static char trace[64]; static int ntrace;
#define xen_mb()  (trace[ntrace++] = 'M')
#define xen_rmb() (trace[ntrace++] = 'R')
#define xen_wmb() (trace[ntrace++] = 'W')
#include <xen/xen.h>
#include <xen/io/ring.h>
#include <xen/io/netif.h>
static unsigned char txp[4096], rxp[4096];
static void dump(const unsigned char *p)
{ for (int i = 0; i < 4096; i++) printf("%02x", p[i]); printf("\n"); }
int main(void) {
    netif_tx_sring_t *ts = (void *)txp; netif_rx_sring_t *rs = (void *)rxp;
    netif_tx_front_ring_t tf; netif_tx_back_ring_t tb;
    netif_rx_front_ring_t rf; netif_rx_back_ring_t rb;
    int notify, more;
    memset(txp, 0xEE, sizeof txp); memset(rxp, 0xEE, sizeof rxp);
    SHARED_RING_INIT(ts); FRONT_RING_INIT(&tf, ts, 4096); BACK_RING_INIT(&tb, ts, 4096);
    SHARED_RING_INIT(rs); FRONT_RING_INIT(&rf, rs, 4096); BACK_RING_INIT(&rb, rs, 4096);
    for (int round = 0; round < 300; round++) {
        int n = 1 + round % 5;
        ntrace = 0;
        for (int i = 0; i < n; i++) {
            netif_tx_request_t *t = RING_GET_REQUEST(&tf, tf.req_prod_pvt);
            t->gref = 1000 + round * 8 + i; t->offset = (round * 97 + i) % 4096;
            t->flags = i + 1 < n ? NETTXF_more_data : 0; t->id = (round * 5 + i) & 0xffff;
            t->size = 14 + round + i;
            if (i == 0 && round % 3 == 0) {
                t->flags |= NETTXF_extra_info;
                tf.req_prod_pvt++;
                netif_extra_info_t *e = (void *)RING_GET_REQUEST(&tf, tf.req_prod_pvt);
                memset(e, 0, sizeof *e);
                e->type = XEN_NETIF_EXTRA_TYPE_GSO; e->u.gso.size = 1448;
                e->u.gso.type = XEN_NETIF_GSO_TYPE_TCPV4;
            }
            tf.req_prod_pvt++;
            netif_rx_request_t *r = RING_GET_REQUEST(&rf, rf.req_prod_pvt);
            r->id = (round + i) & 0xff; r->gref = 5000 + round + i; rf.req_prod_pvt++;
        }
        RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&tf, notify); printf("%d", notify);
        RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&rf, notify); printf("%d", notify);
        RING_FINAL_CHECK_FOR_REQUESTS(&tb, more); printf("%d", more != 0);
        while (tb.req_cons != ts->req_prod) {
            netif_tx_request_t t; RING_COPY_REQUEST(&tb, tb.req_cons, &t); tb.req_cons++;
            netif_tx_response_t *p = RING_GET_RESPONSE(&tb, tb.rsp_prod_pvt); tb.rsp_prod_pvt++;
            p->id = t.id; p->status = t.size % 3 == 0 ? NETIF_RSP_ERROR : NETIF_RSP_OKAY;
        }
        while (rb.req_cons != rs->req_prod) {
            netif_rx_request_t r; RING_COPY_REQUEST(&rb, rb.req_cons, &r); rb.req_cons++;
            netif_rx_response_t *p = RING_GET_RESPONSE(&rb, rb.rsp_prod_pvt); rb.rsp_prod_pvt++;
            p->id = r.id; p->offset = 0; p->flags = NETRXF_data_validated;
            p->status = (r.gref % 1500) + 1;
        }
        RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&tb, notify); printf("%d", notify);
        RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&rb, notify); printf("%d", notify);
        tf.rsp_cons = ts->rsp_prod; rf.rsp_cons = rs->rsp_prod;
        RING_FINAL_CHECK_FOR_RESPONSES(&tf, more); printf("%d", more != 0);
        printf(" %.*s\n", ntrace, trace);
    }
    dump(txp); dump(rxp);
    return 0;
}
"""


def _python_rings() -> list[str]:
    trace: list[str] = []
    bar = {"wmb": lambda: trace.append("W"), "rmb": lambda: trace.append("R"),
           "mb": lambda: trace.append("M")}
    txp, rxp = bytearray(b"\xee" * 4096), bytearray(b"\xee" * 4096)
    sring_init(txp)
    sring_init(rxp)
    tf, tb = FrontRing(txp, NETIF_TX_ENTRY_SIZE, **bar), BackRing(txp, NETIF_TX_ENTRY_SIZE, **bar)
    rf, rb = FrontRing(rxp, NETIF_RX_ENTRY_SIZE, **bar), BackRing(rxp, NETIF_RX_ENTRY_SIZE, **bar)
    out = []
    for rnd in range(300):
        n = 1 + rnd % 5
        trace.clear()
        for i in range(n):
            flags = NETTXF.more_data if i + 1 < n else 0
            extra = i == 0 and rnd % 3 == 0
            if extra:
                flags |= NETTXF.extra_info
            tf.put_request(NetifTxRequest(gref=1000 + rnd * 8 + i, offset=(rnd * 97 + i) % 4096,
                                          flags=flags, id=(rnd * 5 + i) & 0xFFFF,
                                          size=14 + rnd + i).pack())
            if extra:
                tf.put_request(NetifExtraInfo.gso(1448, 1).pack())
            rf.put_request(NetifRxRequest(id=(rnd + i) & 0xFF, gref=5000 + rnd + i).pack())
        line = f"{int(tf.push_requests())}{int(rf.push_requests())}"
        line += str(int(tb.final_check_for_requests()))
        for _ in range(tb.unconsumed_requests()):
            t = NetifTxRequest.unpack(tb.get_request())
            tb.put_response(NetifTxResponse(t.id, -1 if t.size % 3 == 0 else 0).pack())
        for _ in range(rb.unconsumed_requests()):
            r = NetifRxRequest.unpack(rb.get_request())
            rb.put_response(NetifRxResponse(r.id, 0, 1, r.gref % 1500 + 1).pack())
        line += f"{int(tb.push_responses())}{int(rb.push_responses())}"
        for ring in (tf, rf):
            for _ in range(ring.unconsumed_responses()):
                ring.get_response()
        # C's loop reads rsp_prod with no barrier; drop the Python consumers' R marks
        trace[:] = [c for c in trace if c != "R"]
        line += f"{int(tf.final_check_for_responses())} {''.join(trace)}"
        out.append(line)
    return [*out, txp.hex(), rxp.hex()]


def test_netif_rings_equal_ring_h(tmp_path: Path) -> None:
    """io/ring.h + netif.h (DEFINE_RING_TYPES(netif_tx/netif_rx)): the same pages."""
    gcc = require_toolchain()
    (tmp_path / "r.c").write_text(RING_C)
    run([gcc, *CFLAGS, "-o", str(tmp_path / "r"), str(tmp_path / "r.c")])
    c_out = run([str(tmp_path / "r")]).splitlines()
    py_out = _python_rings()
    assert len(c_out) == len(py_out)
    assert c_out[:-2] == py_out[:-2]
    assert c_out[-2:] == py_out[-2:]
