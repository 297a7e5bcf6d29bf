"""ETSI GS QKD 014 v1.1.1 JSON objects: strict decoders (client side) and encoders (simulator).

Every decoder takes the raw answer bytes and returns a value or raises ``KmeBadAnswer``; no
other exception escapes (tests/keysource/test_wire.py checks that with hypothesis). Error
messages name the field and never contain key bytes.

Objects (clause 6 of the standard):

- Status (Table 9): source_KME_ID, target_KME_ID, master_SAE_ID, slave_SAE_ID, key_size,
  stored_key_count, max_key_count, max_key_per_request, max_key_size, min_key_size,
  max_SAE_ID_count, optional status_extension.
- Key container (Table 11): ``{"keys": [{"key_ID": uuid, "key": base64, ...}], ...}``; optional
  ``key_ID_extension``, ``key_extension``, ``key_container_extension`` are allowed and ignored.
- Key IDs (Table 12): ``{"key_IDs": [{"key_ID": uuid}, ...]}``.
- Error (Table 13): ``{"message": str, "details": [object, ...]}``.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from typing import Any

from gateway.errors import KmeBadAnswer
from gateway.secret import SecretBytes
from keysource.base import KeyStatus, QkdKey, canonical_key_id

MAX_ANSWER_BYTES = 4 << 20  # far above max_key_per_request * max_key_size of any real KME

STATUS_STR_FIELDS = ("source_KME_ID", "target_KME_ID", "master_SAE_ID", "slave_SAE_ID")
STATUS_INT_FIELDS = (
    "key_size",
    "stored_key_count",
    "max_key_count",
    "max_key_per_request",
    "max_key_size",
    "min_key_size",
    "max_SAE_ID_count",
)
STATUS_FIELDS = (*STATUS_STR_FIELDS, *STATUS_INT_FIELDS)

# The standard's own messages (ETSI GS QKD 014 clause 6 examples).
MSG_KEYS_NOT_FOUND = "One or more keys specified are not found on KME"
MSG_SIZE_MULTIPLE_OF_8 = "size shall be a multiple of 8"


def _load_object(body: bytes, what: str) -> dict[str, Any]:
    if len(body) > MAX_ANSWER_BYTES:
        raise KmeBadAnswer(f"{what}: answer larger than {MAX_ANSWER_BYTES} bytes")
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise KmeBadAnswer(f"{what}: answer is not UTF-8 JSON") from exc
    if not isinstance(obj, dict):
        raise KmeBadAnswer(f"{what}: answer is not a JSON object")
    return obj


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_status(body: bytes) -> KeyStatus:
    """Decode a Status object; every Table 9 field except status_extension is required."""
    obj = _load_object(body, "status")
    missing = [f for f in STATUS_FIELDS if f not in obj]
    if missing:
        raise KmeBadAnswer(f"status: missing field(s) {', '.join(missing)}")
    for f in STATUS_STR_FIELDS:
        if not isinstance(obj[f], str):
            raise KmeBadAnswer(f"status: {f} is not a string")
    for f in STATUS_INT_FIELDS:
        if not _is_int(obj[f]) or obj[f] < 0:
            raise KmeBadAnswer(f"status: {f} is not a non-negative integer")
    ext = obj.get("status_extension")
    if ext is not None and not isinstance(ext, dict):
        raise KmeBadAnswer("status: status_extension is not an object")
    return KeyStatus(
        source_KME_ID=obj["source_KME_ID"],
        target_KME_ID=obj["target_KME_ID"],
        master_SAE_ID=obj["master_SAE_ID"],
        slave_SAE_ID=obj["slave_SAE_ID"],
        key_size=obj["key_size"],
        stored_key_count=obj["stored_key_count"],
        max_key_count=obj["max_key_count"],
        max_key_per_request=obj["max_key_per_request"],
        max_key_size=obj["max_key_size"],
        min_key_size=obj["min_key_size"],
        max_SAE_ID_count=obj["max_SAE_ID_count"],
        status_extension=ext,
    )


def _decode_key(value: object, size_bits: int, index: int) -> bytes:
    if not isinstance(value, str):
        raise KmeBadAnswer(f"keys[{index}].key is not a string")
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError) as exc:
        raise KmeBadAnswer(f"keys[{index}].key is not valid base64") from exc
    if len(raw) * 8 != size_bits:
        raise KmeBadAnswer(
            f"keys[{index}].key is {len(raw) * 8} bits, {size_bits} bits were requested"
        )
    return raw


def parse_key_container(
    body: bytes,
    size_bits: int,
    number: int | None = None,
    expected_ids: Sequence[str] | None = None,
) -> list[QkdKey]:
    """Decode a Key container and check it is exactly what was asked.

    ``number``: enc_keys asked for this many keys. ``expected_ids``: dec_keys asked for these
    IDs (canonical form); the answer must contain each exactly once and nothing else. The keys
    are returned in the order of ``expected_ids`` when given, else in the answer's order.
    """
    obj = _load_object(body, "key container")
    keys = obj.get("keys")
    if not isinstance(keys, list):
        raise KmeBadAnswer("key container: 'keys' is missing or not a list")
    out: dict[str, QkdKey] = {}
    for i, item in enumerate(keys):
        if not isinstance(item, dict):
            raise KmeBadAnswer(f"keys[{i}] is not an object")
        if "key_ID" not in item or "key" not in item:
            raise KmeBadAnswer(f"keys[{i}] lacks key_ID or key")
        kid = canonical_key_id(item["key_ID"])
        if kid is None:
            raise KmeBadAnswer(f"keys[{i}].key_ID is not a UUID")
        if kid in out:
            raise KmeBadAnswer(f"keys[{i}].key_ID {kid} appears twice")
        out[kid] = QkdKey(kid, SecretBytes(_decode_key(item["key"], size_bits, i)))
    if number is not None and len(out) != number:
        raise KmeBadAnswer(f"key container: {len(out)} keys, {number} were requested")
    if expected_ids is not None:
        wanted = list(expected_ids)
        if set(out) != set(wanted) or len(out) != len(wanted):
            missing = sorted(set(wanted) - set(out))
            extra = sorted(set(out) - set(wanted))
            raise KmeBadAnswer(
                f"key container: IDs differ from the request (missing {missing}, extra {extra})"
            )
        return [out[k] for k in wanted]
    return list(out.values())


def parse_error_message(body: bytes) -> str:
    """The ``message`` of an Error object, shortened and printable; '' when there is none."""
    try:
        obj = json.loads(body[:65536].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return ""
    msg = obj.get("message") if isinstance(obj, dict) else None
    if not isinstance(msg, str):
        return ""
    return "".join(c if c.isprintable() else "?" for c in msg[:200])


# --- encoders (simulator side) --------------------------------------------------------------


def encode_key_container(keys: Sequence[tuple[str, bytes]]) -> dict[str, Any]:
    return {"keys": [{"key_ID": kid, "key": base64.b64encode(k).decode()} for kid, k in keys]}


def encode_status(st: KeyStatus) -> dict[str, Any]:
    out: dict[str, Any] = {f: getattr(st, f) for f in STATUS_FIELDS}
    if st.status_extension is not None:
        out["status_extension"] = st.status_extension
    return out


def encode_error(message: str, details: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {"message": message}
    if details:
        out["details"] = list(details)
    return out
