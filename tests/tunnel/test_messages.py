"""Tunnel stream messages (gateway/tunnel/messages.py): round trips, exact bytes, and the
decoder on any input (a DecodeError, never another exception)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import DecodeError
from gateway.tunnel import messages as m

SID = st.integers(0, 2**32 - 1)
WIN = st.integers(0, m.MAX_WINDOW)
NAME = st.from_regex(m.NAME_RE, fullmatch=True)

MESSAGES = st.one_of(
    st.builds(m.Open, SID, WIN, NAME),
    st.builds(m.OpenOk, SID, WIN),
    st.builds(m.Refused, SID, st.integers(0, 255)),
    st.builds(m.Data, SID, st.binary(min_size=1, max_size=2000)),
    st.builds(m.Fin, SID),
    st.builds(m.Reset, SID, st.integers(0, 255)),
    st.builds(m.Window, SID, st.integers(1, m.MAX_WINDOW)),
)


@given(MESSAGES)
def test_round_trip(msg: m.Message) -> None:
    raw = m.encode(msg)
    assert m.is_tunnel_payload(raw)
    assert m.decode(raw) == msg


@given(st.binary(max_size=300))
def test_decoder_any_bytes_gives_message_or_decode_error(raw: bytes) -> None:
    try:
        msg = m.decode(raw)
    except DecodeError:
        return
    assert m.encode(msg) == raw  # whatever decodes is canonical


def test_exact_bytes() -> None:
    assert m.encode_open(2, 0x40000, "mqtt").hex() == "10000000020004000004" + b"mqtt".hex()
    assert m.encode_open_ok(2, 0x40000).hex() == "110000000200040000"
    assert m.encode_refused(3, m.RefuseReason.UNKNOWN_TUNNEL).hex() == "120000000301"
    assert m.encode_data(4, b"hi").hex() == "13000000046869"
    assert m.encode_fin(4).hex() == "1400000004"
    assert m.encode_reset(4, m.ResetReason.PROTOCOL_ERROR).hex() == "150000000401"
    assert m.encode_window(4, 65536).hex() == "160000000400010000"


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x13\x00\x00\x00\x01",  # DATA without data
        b"\x16\x00\x00\x00\x01\x00\x00\x00\x00",  # WINDOW of 0
        b"\x16\x00\x00\x00\x01\x80\x00\x00\x00",  # WINDOW over 2^31-1
        b"\x10\x00\x00\x00\x01\x00\x00\x00\x10\x02a",  # OPEN name shorter than its length
        b"\x10\x00\x00\x00\x01\x00\x00\x00\x10\x01/",  # OPEN name outside [A-Za-z0-9._-]
        b"\x14\x00\x00\x00\x01\x00",  # FIN with a trailing byte
        b"\x1f\x00\x00\x00\x01",  # unassigned kind
        m.encode_data(1, b"x" * (m.MAX_DATA + 1)),  # over one record
    ],
)
def test_malformed_is_decode_error(raw: bytes) -> None:
    with pytest.raises(DecodeError):
        m.decode(raw)


def test_max_data_fits_one_record() -> None:
    from gateway.core.labels import MAX_RECORD_PLAINTEXT

    assert len(m.encode_data(1, b"x" * m.MAX_DATA)) == MAX_RECORD_PLAINTEXT


def test_data_repr_does_not_show_the_tunnelled_bytes() -> None:
    from gateway.tunnel.messages import Data

    assert "s3cret" not in repr(Data(1, b"s3cret-payload"))
