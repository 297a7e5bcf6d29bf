from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.bridge import codec
from gateway.bridge.transport import BridgeMessage, MessageProps
from gateway.errors import DecodeError, LocalProtocolError

text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40
)
topic = text.filter(lambda s: s != "" and "+" not in s and "#" not in s)

props = st.builds(
    MessageProps,
    user_properties=st.lists(st.tuples(text, text), max_size=5).map(tuple),
    content_type=st.none() | text,
    response_topic=st.none() | topic,
    correlation_data=st.none() | st.binary(max_size=64),
    message_expiry_interval=st.none() | st.integers(0, 2**32 - 1),
    payload_format_indicator=st.none() | st.sampled_from([0, 1]),
)
messages = st.builds(
    BridgeMessage,
    topic=topic,
    payload=st.binary(max_size=2048),
    qos=st.sampled_from([0, 1]),
    retain=st.booleans(),
    properties=props,
    origin=topic,
)


@given(messages)
def test_round_trip(msg: BridgeMessage) -> None:
    assert codec.decode(codec.encode(msg)) == msg


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_any_bytes_decode_or_decode_error(data: bytes) -> None:
    try:
        msg = codec.decode(data)
    except DecodeError:
        return
    assert codec.encode(msg) == data  # whatever parses is canonical


@given(messages, st.data())
def test_mutated_encoding_decodes_or_raises_decode_error(
    msg: BridgeMessage, data: st.DataObject
) -> None:
    raw = bytearray(codec.encode(msg))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    with contextlib.suppress(DecodeError):
        codec.decode(bytes(raw[:cut]))


@given(messages)
def test_every_truncation_is_a_decode_error(msg: BridgeMessage) -> None:
    raw = codec.encode(msg)
    for cut in range(len(raw)):
        with pytest.raises(DecodeError):
            codec.decode(raw[:cut])


def _msg(**kw: object) -> BridgeMessage:
    base: dict[str, object] = {
        "topic": "a/b",
        "payload": b"p",
        "qos": 1,
        "retain": False,
        "properties": MessageProps(),
        "origin": "site-a",
    }
    base.update(kw)
    return BridgeMessage(**base)  # type: ignore[arg-type]


def test_payload_limit_enforced_both_ways() -> None:
    raw = codec.encode(_msg(payload=b"x" * 100))
    assert codec.decode(raw, max_payload=100).payload == b"x" * 100
    with pytest.raises(DecodeError, match="exceeds"):
        codec.decode(raw, max_payload=99)
    with pytest.raises(LocalProtocolError):
        codec.encode(_msg(payload=b"x" * 100), max_payload=99)


def test_huge_declared_length_does_not_allocate() -> None:
    raw = codec.encode(_msg(payload=b""))
    forged = raw[:-4] + struct.pack("!I", 2**32 - 1)
    with pytest.raises(DecodeError):
        codec.decode(forged)


@pytest.mark.parametrize(
    "kw",
    [
        {"topic": ""},
        {"topic": "a/+"},
        {"topic": "a/#"},
        {"topic": "a\x00b"},
        {"origin": ""},
        {"origin": "x" * 256},
        {"qos": 2},
        {"properties": MessageProps(payload_format_indicator=2)},
        {"properties": MessageProps(user_properties=(("k", "v"),) * 1025)},
        {"properties": MessageProps(correlation_data=b"x" * 65536)},
    ],
)
def test_encode_refuses_invalid(kw: dict[str, object]) -> None:
    with pytest.raises(LocalProtocolError):
        codec.encode(_msg(**kw))


def test_trailing_bytes_and_bad_version_and_reserved_flag() -> None:
    raw = codec.encode(_msg())
    with pytest.raises(DecodeError, match="trailing"):
        codec.decode(raw + b"\x00")
    with pytest.raises(DecodeError, match="version"):
        codec.decode(b"\x02" + raw[1:])
    with pytest.raises(DecodeError, match="reserved"):
        codec.decode(raw[:1] + bytes([raw[1] | 0x80]) + raw[2:])
    with pytest.raises(DecodeError, match="bytes"):
        codec.decode("not bytes")  # type: ignore[arg-type]


plain = st.builds(
    BridgeMessage,
    topic=topic,
    payload=st.binary(max_size=64),
    qos=st.sampled_from([0, 1]),
    retain=st.booleans(),
    properties=st.just(MessageProps()),
    origin=topic,
)


@settings(max_examples=300)
@given(plain, st.data())
def test_fast_path_for_messages_without_properties_agrees_with_the_full_parser(
    msg: BridgeMessage, data: st.DataObject
) -> None:
    """decode() reads property-less messages in a few slices; whatever that path accepts the
    full parser accepts identically (mutated bytes included), and it never raises."""
    raw = bytearray(codec.encode(msg))
    if data.draw(st.booleans()):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    fast = codec._decode_plain(bytes(raw), codec.MAX_PAYLOAD_BYTES)
    if fast is not None:
        assert fast == codec._decode_full(bytes(raw), codec.MAX_PAYLOAD_BYTES)
        assert codec.encode(fast) == bytes(raw)
    else:  # then the full parser decides (and raises DecodeError for anything malformed)
        with contextlib.suppress(DecodeError):
            codec._decode_full(bytes(raw), codec.MAX_PAYLOAD_BYTES)
