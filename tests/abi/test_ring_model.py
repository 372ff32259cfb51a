"""gntdma.abi.ring: a front and a back ring on one buffer against a FIFO model,
hostile producer indices, and misuse by our own side."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from gntdma.abi.ring import (
    SRING_HEADER_SIZE,
    BackRing,
    FrontRing,
    RingProtocolError,
    SringHeader,
    ring_nr_ents,
    sring_init,
)
from gntdma.errors import GntdmaError

M32 = 0xFFFFFFFF


def _set_header(buf: bytearray, **fields: int) -> None:
    h = SringHeader.unpack_from(buf, 0)
    SringHeader(**{"req_prod": h.req_prod, "req_event": h.req_event, "rsp_prod": h.rsp_prod,
                   "rsp_event": h.rsp_event, **fields}).pack_into(buf, 0)


class RingPair(RuleBasedStateMachine):
    """Both ends on one page; the model is four FIFOs and two "asleep" flags.

    Besides the counts and the bytes, the machine checks the reason the notify
    hold-off exists: an end that went to sleep after a final check that found
    nothing must be notified by the next push that gives it work (no lost
    wakeup).
    """

    @initialize(pages=st.sampled_from([1, 2, 3]), entry=st.sampled_from([8, 12, 112, 200]),
                start=st.one_of(st.integers(0, M32), st.integers(M32 - 300, M32)))
    def setup(self, pages: int, entry: int, start: int) -> None:
        self.buf = bytearray(pages * 4096)
        sring_init(self.buf)
        _set_header(self.buf, req_prod=start, rsp_prod=start, req_event=(start + 1) & M32,
                    rsp_event=(start + 1) & M32)
        # the front sees the ring as a list of pages, the back as one area
        view = memoryview(self.buf)
        self.front = FrontRing([view[i * 4096:(i + 1) * 4096] for i in range(pages)], entry,
                               start=start)
        self.back = BackRing(memoryview(self.buf), entry, start=start)
        self.size = ring_nr_ents(pages * 4096, entry)
        self.entry = entry
        self.unpushed: deque[bytes] = deque()  # put, not pushed
        self.pushed: deque[bytes] = deque()  # visible to the back, not consumed
        self.consumed: deque[bytes] = deque()  # consumed, not answered
        self.answered: deque[bytes] = deque()  # responses put, not pushed
        self.responses: deque[bytes] = deque()  # visible to the front, not consumed
        self.back_asleep = False
        self.front_asleep = False
        self.counter = 0

    def _payload(self, n: int) -> bytes:
        self.counter += 1
        return (self.counter.to_bytes(4, "little") * (n // 4 + 1))[:n]

    def outstanding(self) -> int:
        return (len(self.unpushed) + len(self.pushed) + len(self.consumed) + len(self.answered)
                + len(self.responses))

    @rule(n=st.integers(1, 300), length=st.integers(1, 200))
    def put_requests(self, n: int, length: int) -> None:
        length = min(length, self.entry)
        for _ in range(n):
            if self.front.full():
                assert self.outstanding() == self.size
                with pytest.raises(OverflowError):
                    self.front.put_request(b"x")
                return
            data = self._payload(length)
            self.front.put_request(data)
            self.unpushed.append(data)

    @rule()
    def push_requests(self) -> None:
        gives_work = len(self.unpushed) > 0
        notify = self.front.push_requests()
        self.pushed.extend(self.unpushed)
        self.unpushed.clear()
        if self.back_asleep and gives_work:
            assert notify, "lost wakeup: the backend sleeps and was not notified"
        if notify:
            self.back_asleep = False

    @rule(n=st.integers(0, 600))
    def consume_requests(self, n: int) -> None:
        avail = self.back.unconsumed_requests()
        assert avail == len(self.pushed)
        for _ in range(min(n, avail)):
            got = self.back.get_request()
            want = self.pushed.popleft()
            assert len(got) == self.entry and got[:len(want)] == want
            self.consumed.append(want)
        if n >= avail:
            with pytest.raises(IndexError):
                self.back.get_request()
        self.back_asleep = False

    @rule(n=st.integers(1, 600))
    def put_responses(self, n: int) -> None:
        for _ in range(n):
            if not self.consumed:
                with pytest.raises(OverflowError):
                    self.back.put_response(b"r")
                return
            req = self.consumed.popleft()
            rsp = b"R" + req[:self.entry - 1]
            self.back.put_response(rsp)
            self.answered.append(rsp)

    @rule()
    def push_responses(self) -> None:
        gives_work = len(self.answered) > 0
        notify = self.back.push_responses()
        self.responses.extend(self.answered)
        self.answered.clear()
        if self.front_asleep and gives_work:
            assert notify, "lost wakeup: the frontend sleeps and was not notified"
        if notify:
            self.front_asleep = False

    @rule(n=st.integers(0, 600))
    def consume_responses(self, n: int) -> None:
        avail = self.front.unconsumed_responses()
        assert avail == len(self.responses)
        for _ in range(min(n, avail)):
            got = self.front.get_response()
            want = self.responses.popleft()
            assert got[:len(want)] == want
        self.front_asleep = False

    @rule()
    def back_final_check(self) -> None:
        more = self.back.final_check_for_requests()
        assert more == (len(self.pushed) > 0)
        if not more:
            self.back_asleep = True

    @rule()
    def front_final_check(self) -> None:
        more = self.front.final_check_for_responses()
        assert more == (len(self.responses) > 0)
        if not more:
            self.front_asleep = True

    @invariant()
    def counts(self) -> None:
        if not hasattr(self, "front"):
            return
        assert 0 <= self.front.free_requests() <= self.size
        assert self.front.free_requests() == self.size - self.outstanding()
        assert self.front.full() == (self.outstanding() == self.size)
        h = self.front.header()
        assert (h.req_prod - self.back.req_cons) & M32 == len(self.pushed)
        assert (self.back.rsp_prod_pvt - h.rsp_prod) & M32 == len(self.answered)
        assert (h.rsp_prod - self.front.rsp_cons) & M32 == len(self.responses)
        assert (self.front.req_prod_pvt - h.req_prod) & M32 == len(self.unpushed)


TestRingPair = RingPair.TestCase
TestRingPair.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


# --- hostile peers ----------------------------------------------------------------


def _pair(start: int = 0, entry: int = 112) -> tuple[bytearray, FrontRing, BackRing]:
    buf = bytearray(4096)
    sring_init(buf)
    _set_header(buf, req_prod=start, rsp_prod=start, req_event=(start + 1) & M32,
                rsp_event=(start + 1) & M32)
    return buf, FrontRing(buf, entry, start=start), BackRing(buf, entry, start=start)


@pytest.mark.parametrize("start", [0, 5, M32 - 3, M32])
def test_hostile_req_prod_overflowing_the_ring_raises(start: int) -> None:
    buf, _, back = _pair(start)
    _set_header(buf, req_prod=(start + 33) & M32)  # 33 requests in a 32-slot ring
    with pytest.raises(RingProtocolError, match="more than 32"):
        back.unconsumed_requests()
    with pytest.raises(RingProtocolError):
        back.final_check_for_requests()
    _set_header(buf, req_prod=(start + 32) & M32)  # exactly full is legal
    assert back.unconsumed_requests() == 32


def test_hostile_req_prod_counts_requests_not_yet_answered() -> None:
    buf, front, back = _pair(M32 - 10)
    for _ in range(32):
        front.put_request(b"q")
    front.push_requests()
    assert back.unconsumed_requests() == 32
    for _ in range(32):
        back.get_request()
    # nothing answered yet: one more request would overwrite an unanswered slot
    _set_header(buf, req_prod=(front.req_prod_pvt + 1) & M32)
    with pytest.raises(RingProtocolError):
        back.unconsumed_requests()


def test_hostile_req_prod_going_backwards_raises() -> None:
    buf, front, back = _pair(M32 - 1)
    for _ in range(4):
        front.put_request(b"q")
    front.push_requests()
    assert back.unconsumed_requests() == 4
    for _ in range(4):
        back.get_request()
    # still within the unanswered window: only the second check sees it
    _set_header(buf, req_prod=(back.req_cons - 1) & M32)
    with pytest.raises(RingProtocolError, match="went back"):
        back.unconsumed_requests()
    for _ in range(4):
        back.put_response(b"r")
    back.push_responses()
    # behind what was answered: RING_REQUEST_PROD_OVERFLOW sees it
    with pytest.raises(RingProtocolError, match="more than 32"):
        back.unconsumed_requests()


def test_hostile_rsp_prod_raises() -> None:
    buf, front, _ = _pair(M32 - 2)
    for _ in range(3):
        front.put_request(b"q")
    front.push_requests()
    _set_header(buf, rsp_prod=(front.rsp_cons + 4) & M32)  # 4 answers to 3 requests
    with pytest.raises(RingProtocolError, match="never made"):
        front.unconsumed_responses()
    with pytest.raises(RingProtocolError):
        front.final_check_for_responses()
    _set_header(buf, rsp_prod=(front.rsp_cons + 40) & M32)  # more than the ring holds
    with pytest.raises(RingProtocolError, match="ring of 32"):
        front.unconsumed_responses()
    _set_header(buf, rsp_prod=(front.rsp_cons - 1) & M32)  # backwards
    with pytest.raises(RingProtocolError):
        front.unconsumed_responses()
    _set_header(buf, rsp_prod=(front.rsp_cons + 3) & M32)
    assert front.unconsumed_responses() == 3


def test_ring_protocol_error_is_a_gntdma_error() -> None:
    assert issubclass(RingProtocolError, GntdmaError)


def test_slots_are_copied_out() -> None:
    buf, front, back = _pair()
    front.put_request(b"A" * 112)
    front.push_requests()
    back.unconsumed_requests()
    got = back.get_request()
    buf[SRING_HEADER_SIZE:SRING_HEADER_SIZE + 112] = b"B" * 112  # the peer rewrites the slot
    assert got == b"A" * 112


def test_put_writes_only_the_given_bytes() -> None:
    buf, front, _ = _pair()
    buf[SRING_HEADER_SIZE:SRING_HEADER_SIZE + 112] = b"\xee" * 112
    front.put_request(b"\x01\x02")
    assert buf[SRING_HEADER_SIZE:SRING_HEADER_SIZE + 4] == b"\x01\x02\xee\xee"


# --- misuse and geometry ----------------------------------------------------------


def test_misuse_raises() -> None:
    _, front, back = _pair(entry=16)
    with pytest.raises(ValueError, match="16-byte slots"):
        front.put_request(b"x" * 17)
    with pytest.raises(IndexError):
        back.get_request()
    with pytest.raises(IndexError):
        front.get_response()
    with pytest.raises(OverflowError):
        back.put_response(b"r")
    front.put_request(b"x")
    front.push_requests()
    with pytest.raises(IndexError):  # not seen through unconsumed_requests yet
        back.get_request()
    assert back.unconsumed_requests() == 1
    back.get_request()
    back.put_response(b"r")
    with pytest.raises(OverflowError):
        back.put_response(b"r")
    with pytest.raises(ValueError, match="writable"):
        FrontRing(memoryview(bytes(4096)), 16)
    with pytest.raises(ValueError, match="4096-byte buffer"):
        BackRing(bytearray(4096), 16, area_size=8192)
    with pytest.raises(ValueError, match="4096 bytes"):
        BackRing([bytearray(4096), bytearray(100)], 16)
    with pytest.raises(ValueError, match="4096 bytes"):
        BackRing([], 16)


def test_ring_sizes() -> None:
    assert ring_nr_ents(4096, 112) == 32
    assert ring_nr_ents(4096, 108) == 32
    assert [ring_nr_ents(p * 4096, 112) for p in (1, 2, 4, 8, 16)] == [32, 64, 128, 256, 512]
    assert ring_nr_ents(4096, 12) == 256  # netif tx
    assert ring_nr_ents(4096, 8) == 256  # netif rx (504 fit, rounded down)
    assert ring_nr_ents(4096, 16) == 128  # netif ctrl
    assert ring_nr_ents(64 + 3 * 7, 7) == 2  # 3 fit: rounded down to a power of two
    for bad in ((64, 8), (64 + 7, 8), (4096, 0), (4096, -1)):
        with pytest.raises(ValueError):
            ring_nr_ents(*bad)


def test_sring_init() -> None:
    buf = bytearray(b"\xee" * 4096)
    sring_init(buf)
    assert buf[:16] == bytes.fromhex("00000000 01000000 00000000 01000000".replace(" ", ""))
    assert buf[16:64] == bytes(48)
    assert buf[64:] == b"\xee" * (4096 - 64)  # slots untouched
    assert SringHeader.unpack_from(buf) == SringHeader(req_event=1, rsp_event=1)


def test_barriers_are_called_where_ring_h_places_them() -> None:
    calls: list[str] = []
    buf = bytearray(4096)
    sring_init(buf)
    kw = {"wmb": lambda: calls.append("wmb"), "rmb": lambda: calls.append("rmb"),
          "mb": lambda: calls.append("mb")}
    front = FrontRing(buf, 16, **kw)
    back = BackRing(buf, 16, **kw)
    front.put_request(b"q")
    assert calls == []
    assert front.push_requests() is True  # req_event 1 lies in (0, 1]
    assert calls == ["wmb", "mb"]
    calls.clear()
    assert back.unconsumed_requests() == 1
    assert calls == ["rmb"]
    back.get_request()
    calls.clear()
    assert back.final_check_for_requests() is False
    assert calls == ["mb"]
    assert back.header().req_event == 2
    calls.clear()
    assert front.final_check_for_responses() is False
    assert calls == ["mb"] and front.header().rsp_event == 1
    calls.clear()
    back.put_response(b"r")
    assert calls == []
    assert back.push_responses() is True  # rsp_event 1 lies in (0, 1]
    assert calls == ["wmb", "mb"]
    calls.clear()
    assert front.final_check_for_responses() is True  # work visible: no event write, no mb
    assert calls == [] and front.header().rsp_event == 1
    assert front.unconsumed_responses() == 1 and calls == ["rmb"]


@given(st.integers(0, M32))
def test_notify_iff_event_in_published_range(start: int) -> None:
    buf, front, _ = _pair(start, entry=16)
    # the backend asks to be woken at the 3rd request from now
    _set_header(buf, req_event=(start + 3) & M32)
    front.put_request(b"1")
    front.put_request(b"2")
    assert front.push_requests() is False
    front.put_request(b"3")
    assert front.push_requests() is True
    front.put_request(b"4")
    assert front.push_requests() is False
