"""Documentation cites only files that exist in the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([*ROOT.glob("docs/*.md"), ROOT / "README.md", ROOT / "deploy/README.md"])
# A repository path in backticks or a Markdown link: dir/name.ext or name.ext with a known ext.
PATH = re.compile(
    r"(?:`|\]\()((?:\.\./|\./)?[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.@-]+)*"
    r"\.(?:py|md|toml|ya?ml|json|sh|service|conf|c|pml|pv|txt))(?:#[\w-]*)?[`)]"
)
TOP = {"gateway", "keysource", "tests", "deploy", "docs", "bench", "formal", "scripts", ".ci"}


def cited(doc: Path) -> list[str]:
    out = []
    for m in PATH.finditer(doc.read_text()):
        ref = m.group(1)
        first = ref.lstrip("./").split("/")[0]
        if "/" in ref.lstrip("./") and first not in TOP and not ref.startswith(".."):
            continue  # e.g. gw-pki/site-a.crt: a file the operator creates, not ours
        if "/" not in ref and not ref.endswith(".md") and ref != "config.example.toml":
            continue  # a bare file name in prose (site-a.toml is written by init-demo)
        out.append(ref)
    return out


def exists(doc: Path, ref: str) -> bool:
    candidates = [(doc.parent / ref), (ROOT / ref.lstrip("./"))]
    return any(c.exists() for c in candidates)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_cited_files_exist(doc: Path) -> None:
    missing = [ref for ref in cited(doc) if not exists(doc, ref)]
    assert not missing, f"{doc.relative_to(ROOT)} cites files that do not exist: {missing}"
