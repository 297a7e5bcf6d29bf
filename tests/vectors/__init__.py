"""Test vectors, one JSON file per primitive, each stating its source.

Every file is ``{"source": "...", "notes": "...", "vectors": [...]}``; byte strings are
lowercase hex. ``source`` names the RFC section, the specification, or for recorded vectors
"recorded, seed = ..." with the implementation that produced them (pyca
``load_vectors_from_file`` is the model).

Recorded files are rewritten by their generators: ``python -m tests.vectors.make_key_schedule``
(key_schedule.json) and ``python -m tests.vectors.make_transcripts`` (transcripts.json, every
frame of whole sessions; its format is docs/protocol.md section 12).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

VECTOR_DIR = Path(__file__).resolve().parent


def load_vectors(name: str) -> list[dict[str, Any]]:
    """Load ``tests/vectors/<name>.json`` and return its vectors (the file must name a source)."""
    data = json.loads((VECTOR_DIR / f"{name}.json").read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not data.get("source") or not data.get("vectors"):
        raise ValueError(f"{name}.json must have a non-empty 'source' and 'vectors'")
    vectors: list[dict[str, Any]] = data["vectors"]
    return vectors


def unhex(value: str) -> bytes:
    return bytes.fromhex(value)
