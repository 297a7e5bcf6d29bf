"""The ETSI 014 answer decoders: every kind of bad answer, and hypothesis: anything -> a value
or KmeBadAnswer, never another exception."""

from __future__ import annotations

import base64
import contextlib
import json
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import KmeBadAnswer
from keysource.base import KeyStatus
from keysource.wire import (
    STATUS_FIELDS,
    encode_key_container,
    encode_status,
    parse_error_message,
    parse_key_container,
    parse_status,
)

K = bytes(range(32))
ID1, ID2 = str(uuid.uuid4()), str(uuid.uuid4())


def dump(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def container(*items: dict[str, Any]) -> bytes:
    return dump({"keys": list(items)})


def item(kid: str = ID1, key: bytes = K) -> dict[str, Any]:
    return {"key_ID": kid, "key": base64.b64encode(key).decode()}


def test_good_container_round_trip_and_canonical_ids() -> None:
    body = dump(encode_key_container([(ID1.upper(), K), (ID2, K[::-1])]))
    keys = parse_key_container(body, 256, number=2)
    assert [k.key_id for k in keys] == [ID1, ID2]
    assert keys[0].key.expose_secret_bytes() == K
    got = parse_key_container(body, 256, expected_ids=[ID2, ID1])
    assert [k.key_id for k in got] == [ID2, ID1]


def test_extensions_are_allowed() -> None:
    body = dump(
        {
            "keys": [{**item(), "key_ID_extension": {}, "key_extension": 1}],
            "key_container_extension": {},
        }
    )
    assert len(parse_key_container(body, 256, number=1)) == 1


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"\xff\xfe", "not UTF-8 JSON"),
        (b"{", "not UTF-8 JSON"),
        (b"[]", "not a JSON object"),
        (dump({}), "'keys' is missing"),
        (dump({"keys": {}}), "'keys' is missing"),
        (dump({"keys": [1]}), "not an object"),
        (dump({"keys": [{"key_ID": ID1}]}), "lacks key_ID or key"),
        (container(item(kid="1234")), "not a UUID"),
        (container(item(kid="{" + ID1 + "}")), "not a UUID"),
        (container(item(kid=ID1.replace("-", ""))), "not a UUID"),
        (container({"key_ID": ID1, "key": "***"}), "not valid base64"),
        (container({"key_ID": ID1, "key": base64.b64encode(K).decode()[:-1]}), "not valid base64"),
        (container({"key_ID": ID1, "key": 5}), "not a string"),
        (container(item(key=K[:31])), "248 bits, 256 bits were requested"),
        (container(item(key=K + b"x")), "264 bits"),
        (container(item(), item()), "appears twice"),
        (container(item(), item(kid=ID2)), "2 keys, 1 were requested"),
        (container(), "0 keys, 1 were requested"),
    ],
)
def test_bad_containers(body: bytes, match: str) -> None:
    with pytest.raises(KmeBadAnswer, match=match):
        parse_key_container(body, 256, number=1)


@pytest.mark.parametrize(
    ("answer_ids", "asked"),
    [([ID1], [ID1, ID2]), ([ID1, ID2], [ID1]), ([ID2], [ID1])],
)
def test_dec_answer_must_hold_exactly_the_requested_ids(
    answer_ids: list[str], asked: list[str]
) -> None:
    body = container(*(item(kid=i) for i in answer_ids))
    with pytest.raises(KmeBadAnswer, match="IDs differ"):
        parse_key_container(body, 256, expected_ids=asked)


STATUS = KeyStatus("KME-A", "KME-B", "sae-a", "sae-b", 256, 10, 100, 16, 1024, 64, 0, {"x": 1})


def test_status_round_trip() -> None:
    assert parse_status(dump(encode_status(STATUS))) == STATUS


@pytest.mark.parametrize("field", STATUS_FIELDS)
def test_status_missing_field(field: str) -> None:
    obj = encode_status(STATUS)
    del obj[field]
    with pytest.raises(KmeBadAnswer, match=field):
        parse_status(dump(obj))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("key_size", "256"),
        ("key_size", -1),
        ("key_size", True),
        ("source_KME_ID", 1),
        ("status_extension", [1]),
    ],
)
def test_status_wrong_types(field: str, value: object) -> None:
    obj = encode_status(STATUS)
    obj[field] = value
    with pytest.raises(KmeBadAnswer, match=field):
        parse_status(dump(obj))


def test_error_message_is_short_and_printable() -> None:
    assert parse_error_message(dump({"message": "a\nb" + "x" * 500})) == "a?b" + "x" * 197
    assert parse_error_message(b"garbage") == ""
    assert parse_error_message(dump({"message": 3})) == ""


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)
key_items = st.fixed_dictionaries(
    {},
    optional={
        "key_ID": st.one_of(st.uuids().map(str), st.text(max_size=40), st.integers()),
        "key": st.one_of(
            st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()), st.text(max_size=60)
        ),
        "key_extension": json_values,
    },
)
containers = st.fixed_dictionaries({"keys": st.lists(key_items, max_size=4)}) | json_values


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | containers.map(lambda o: json.dumps(o).encode()))
def test_any_answer_gives_keys_or_bad_answer(body: bytes) -> None:
    for kwargs in ({"number": 1}, {"expected_ids": [ID1]}, {}):
        try:
            keys = parse_key_container(body, 256, **kwargs)  # type: ignore[arg-type]
        except KmeBadAnswer:
            continue
        assert all(len(k.key) == 32 for k in keys)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200) | json_values.map(lambda o: json.dumps(o).encode()))
def test_any_status_gives_status_or_bad_answer(body: bytes) -> None:
    with contextlib.suppress(KmeBadAnswer):
        parse_status(body)
    parse_error_message(body)
