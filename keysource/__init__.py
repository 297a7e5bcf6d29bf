"""Where QKD keys come from: ETSI GS QKD 014 client, KME simulator, static source."""

from __future__ import annotations
