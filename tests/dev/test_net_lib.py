"""Helpers for the netfront/netback tests (no tests here)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from gntdma.dev.netfront import netfront_info
from gntdma.sched import ThreadState
from gntdma.sys import (
    M_NOWAIT,
    M_PKTHDR,
    MJUMPAGESIZE,
    MT_DATA,
    m_append,
    m_copydata,
    m_freem,
    m_getjcl,
    m_length,
    mbuf,
)
from gntdma.toolstack.host import Host


def on_thread(host: Host, fn: Callable[[], object], name: str = "t") -> object:
    t = host.sched.spawn(fn, name=name)
    host.sched.run(until=lambda: t.state is ThreadState.DONE)
    if t.exc is not None:
        raise t.exc
    return t.result


def frame(dst: bytes, src: bytes, payload: bytes, ethertype: bytes = b"\x88\xb5") -> bytes:
    return dst + src + ethertype + payload


def to_mbuf(sc: netfront_info, data: bytes, *, csum_flags: int = 0, tso_segsz: int = 0,
            lead: int = 0) -> mbuf:
    """A chain of page clusters holding ``data``, starting ``lead`` bytes into the first."""
    m = m_getjcl(sc.kern, M_NOWAIT, MT_DATA, M_PKTHDR, MJUMPAGESIZE)
    assert m is not None
    m.m_data += lead
    assert m_append(m, len(data), data) == 1
    m.m_pkthdr.len = len(data)
    m.m_pkthdr.csum_flags = csum_flags
    m.m_pkthdr.tso_segsz = tso_segsz
    return m


@dataclass
class Sink:
    """An ``if_input`` that records frames (bytes, csum_flags, tso_segsz) and frees them."""

    got: list[tuple[bytes, int, int]] = field(default_factory=list)

    def __call__(self, m: mbuf) -> None:
        self.got.append((m_copydata(m, 0, m_length(m)), m.m_pkthdr.csum_flags,
                         m.m_pkthdr.tso_segsz))
        m_freem(m)
