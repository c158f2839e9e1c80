"""The server's own rules for the chunks that answer a read (spec "Structured replies": the chunks of a read
lie within the request, do not overlap, and cover it exactly once the reply is done; a simple reply is the
request's bytes in order), checked against a model, with the bytes a client receives for each reply that may
be sent.

The client checks the same rules on what it receives (tests/test_client_checks.py); these are the server's,
which must refuse to send what breaks them (LocalProtocolError: the application broke the protocol), so that
an application's bug never reaches a client as a wrong reply.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nbdproto as n
from tests.test_pair import Pair

START = 4096  # a read that does not start at 0, so that an offset relative to it and one to the export differ
COOKIE = 5


@dataclass(frozen=True)
class Claim:
    """One chunk the application sends: ``size`` bytes at ``START + at``, data (bytes of ``fill``) or a hole."""

    at: int
    size: int
    hole: bool
    done: bool
    fill: int = 0xAB

    def __post_init__(self) -> None:
        if not self.hole and self.size < 0:
            raise ValueError("data has no negative length")

    def event(self) -> n.ReadData | n.ReadHole:
        if self.hole:
            return n.ReadHole(COOKIE, START + self.at, self.size, done=self.done)
        return n.ReadData(COOKIE, START + self.at, bytes([self.fill]) * self.size, done=self.done)


def reading(mode: str, length: int, flags: int = 0) -> Pair:
    """A connected pair whose server has received a read of ``length`` bytes at START (cookie COOKIE)."""
    p = Pair()
    p.connect(mode)
    p.client.send(n.ReadRequest(COOKIE, START, length, n.CommandFlags(flags)))
    p.server.receive_data(b"".join(bytes(piece) for piece in p.client.data_to_send()))
    assert p.server.next_event() == n.ReadRequest(COOKIE, START, length, n.CommandFlags(flags))
    return p


def refusal(mode: str, length: int, sent: list[Claim], claim: Claim) -> str | None:
    """What the server must say when ``claim`` follows ``sent`` (each accepted): None if it may be sent."""
    covered = sum(c.size for c in sent)
    if not sent and not claim.hole and claim.at == 0 and claim.size == length:
        return None  # the whole read in one chunk
    where = f"{START + claim.at}+{claim.size}"
    if claim.size <= 0 or claim.at < 0 or claim.at + claim.size > length:
        return f"read chunk {where} is empty or outside request {START}+{length}"
    if claim.done and covered + claim.size != length:
        return f"read {COOKIE:#x} marked done with {covered + claim.size} of {length} bytes answered"
    if mode == "simple":
        return (
            None
            if claim.at == covered
            else f"simple read reply chunk at {START + claim.at}, expected {START + covered}"
        )
    for c in sent:
        if claim.at < c.at + c.size and c.at < claim.at + claim.size:
            return f"read chunk {where} overlaps chunk {START + c.at}+{c.size}"
    return None


def received(p: Pair) -> bytes | None:
    """The client's side: the read's bytes once its reply is complete, None while it is not."""
    p.client.receive_data(b"".join(bytes(piece) for piece in p.server.data_to_send()))
    got = p.events()
    if not got:
        return None
    (reply,) = got
    assert isinstance(reply, n.ReadReply) and reply.cookie == COOKIE
    return bytes(reply.data)


MODES = ["simple", "structured", "extended"]
claims = st.one_of(
    st.builds(Claim, st.integers(-3, 40), st.integers(0, 24), st.just(False), st.booleans(), st.integers(1, 255)),
    st.builds(Claim, st.integers(-3, 40), st.integers(-1, 24), st.just(True), st.booleans()),
)


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=250, deadline=None)
@given(length=st.integers(1, 36), sequence=st.lists(claims, max_size=12))
def test_read_chunks_the_server_sends_match_a_model(mode: str, length: int, sequence: list[Claim]) -> None:
    """Each chunk is sent exactly when the model allows it, refused with the model's reason otherwise (which
    ends the connection: nothing more is sent), and the client receives the bytes the chunks say once they
    cover the read."""
    p = reading(mode, length)
    sent: list[Claim] = []
    expected = bytearray(length)
    for claim in sequence:
        reason = refusal(mode, length, sent, claim)
        if reason is not None:
            with pytest.raises(n.LocalProtocolError) as refused:
                p.server.send(claim.event())
            assert str(refused.value) == reason
            assert p.server.phase is n.Phase.ERROR
            return
        p.server.send(claim.event())
        sent.append(claim)
        if not claim.hole:
            expected[claim.at : claim.at + claim.size] = bytes([claim.fill]) * claim.size
        done = sum(c.size for c in sent) == length
        assert p.server.in_flight == (0 if done else 1)
        got = received(p)
        if done:
            assert got == bytes(expected)
            with pytest.raises(n.LocalProtocolError) as refused:
                p.server.send(n.ReadHole(COOKIE, START, 1))
            assert str(refused.value) == f"read reply for cookie {COOKIE:#x}, which is no request"
            return
        assert got is None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("hole", [False, True])
@pytest.mark.parametrize(
    ("at", "size"), [(512, 1024), (1, 1024), (1023, 2), (-512, 1024), (-1, 1), (1024, 1), (0, 1025), (0, 0)]
)
def test_a_chunk_outside_its_read_is_never_sent(mode: str, hole: bool, at: int, size: int) -> None:
    """A read of 4096+1024 (the chunk 4608+1024 went out for it when only the client checked): every chunk
    that is empty or reaches outside the request, as the first chunk or after a valid one, is refused and
    nothing of it is sent."""
    for before in ([], [Claim(0, 1, hole=False, done=False)]):
        p = reading(mode, 1024)
        for claim in before:
            p.server.send(claim.event())
        already = b"".join(bytes(piece) for piece in p.server.data_to_send())
        with pytest.raises(n.LocalProtocolError, match=rf"read chunk {START + at}\+{size} is empty or outside "):
            p.server.send(Claim(at, size, hole, done=True).event())
        assert p.server.data_to_send() == []
        assert already or not before


@pytest.mark.parametrize("mode", MODES)
def test_a_hole_of_negative_length_is_refused(mode: str) -> None:
    p = reading(mode, 1024)
    with pytest.raises(n.LocalProtocolError, match=r"read chunk 4096\+-1 is empty or outside request 4096\+1024"):
        p.server.send(n.ReadHole(COOKIE, START, -1))


@pytest.mark.parametrize("mode", ["structured", "extended"])
def test_df_reads_take_one_chunk_data_or_hole(mode: str) -> None:
    """DF (spec "Command flags": the reply MUST NOT be fragmented): the whole read in one chunk, data or hole;
    any first chunk that does not cover it is refused."""
    for whole in (Claim(0, 64, hole=False, done=True), Claim(0, 64, hole=True, done=True)):
        p = reading(mode, 64, n.CommandFlags.DF)
        p.server.send(whole.event())
        assert received(p) == (bytes(64) if whole.hole else b"\xab" * 64)
    for part in (Claim(0, 32, hole=False, done=False), Claim(32, 32, hole=True, done=False)):
        p = reading(mode, 64, n.CommandFlags.DF)
        with pytest.raises(n.LocalProtocolError) as refused:
            p.server.send(part.event())
        assert str(refused.value) == f"read {COOKIE:#x} has DF set: answer it in one chunk"


@pytest.mark.parametrize("mode", MODES)
def test_a_read_answered_then_ends_in_flight(mode: str) -> None:
    """The request is answered exactly when its bytes are covered, by one chunk or by many."""
    p = reading(mode, 8)
    for at in range(0, 8, 2):
        assert p.server.in_flight == 1
        p.server.send(Claim(at, 2, hole=at == 2, done=False, fill=at + 1).event())
    assert p.server.in_flight == 0
    assert received(p) == b"\x01\x01\x00\x00\x05\x05\x07\x07"


@pytest.mark.parametrize("mode", MODES)
def test_a_whole_chunk_after_a_part_is_an_overlap_not_a_new_answer(mode: str) -> None:
    p = reading(mode, 64)
    p.server.send(Claim(0, 16, hole=False, done=False).event())
    with pytest.raises(n.LocalProtocolError) as refused:
        p.server.send(Claim(0, 64, hole=False, done=False).event())
    expected = "simple read reply chunk at 4096, expected 4112" if mode == "simple" else "overlaps chunk 4096+16"
    assert str(refused.value).endswith(expected)


def test_replies_that_do_not_fit_the_request_in_words() -> None:
    p = reading("structured", 64)
    with pytest.raises(n.LocalProtocolError) as refused:
        p.server.send(n.SuccessReply(COOKIE))
    assert str(refused.value) == f"SuccessReply cannot answer ReadRequest {COOKIE:#x}: send data"
    p = Pair()
    p.connect("structured")
    p.client.send(n.FlushRequest(9))
    p.server.receive_data(b"".join(bytes(piece) for piece in p.client.data_to_send()))
    assert isinstance(p.server.next_event(), n.FlushRequest)
    with pytest.raises(n.LocalProtocolError) as refused:
        p.server.send(n.ReadData(9, 0, b"x"))
    assert str(refused.value) == "read reply for cookie 0x9, which is FlushRequest"
    with pytest.raises(n.LocalProtocolError) as refused:
        p.server.send(n.SuccessReply(10))
    assert str(refused.value) == "the connection already failed"
