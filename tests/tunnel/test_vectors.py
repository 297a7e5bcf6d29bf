"""The tunnel stream vectors: tests/tunnel/vectors.json == the encoders == docs/protocol.md."""

from __future__ import annotations

import json
from pathlib import Path

from gateway.tunnel import messages as m

HERE = Path(__file__).resolve().parent
DOC = (HERE.parents[1] / "docs" / "protocol.md").read_text()
VECTORS = json.loads((HERE / "vectors.json").read_text())["vectors"]

EXPECTED = {
    "OPEN": m.Open(2, 1 << 20, "mqtt-bridge"),
    "OPEN_OK": m.OpenOk(2, 1 << 20),
    "REFUSED": m.Refused(4, m.RefuseReason.UNKNOWN_TUNNEL),
    "DATA": m.Data(2, b"hello"),
    "FIN": m.Fin(3),
    "RESET": m.Reset(2, m.ResetReason.PROTOCOL_ERROR),
    "WINDOW": m.Window(2, 262144),
}


def test_every_message_type_has_a_vector() -> None:
    assert {v["name"] for v in VECTORS} == {k.name for k in m.Kind}


def test_vectors_match_encoder_decoder_and_spec() -> None:
    section = DOC.split("## Tunnel streams", 1)[1].split("\n## ", 1)[0]
    for v in VECTORS:
        raw = bytes.fromhex(v["hex"])
        msg = EXPECTED[v["name"]]
        assert m.encode(msg) == raw, v["name"]
        assert m.decode(raw) == msg, v["name"]
        line = next(ln for ln in section.splitlines() if ln.startswith(v["name"] + " "))
        assert line.split()[-1] == v["hex"], v["name"]
