"""Where QKD keys come from: ETSI GS QKD 014 client, Cisco SKIP client, KME simulator, static.

The gateway uses one interface, :class:`keysource.base.KeySource`, built from its settings by
:func:`from_settings`. docs/keysource.md describes the sources and the simulator.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from keysource.base import KeySource, KeySourceCounters, KeyStatus, QkdKey

if TYPE_CHECKING:
    from gateway.config import QkdSection

__all__ = ["KeySource", "KeySourceCounters", "KeyStatus", "QkdKey", "from_settings"]


def from_settings(qkd: QkdSection) -> KeySource:
    """The key source the settings ask for: ``etsi014`` / ``skip`` -> client, ``static`` -> file."""
    from gateway.config import QkdSourceKind  # noqa: PLC0415 -- lazy: importing keysource stays light

    if qkd.source is QkdSourceKind.ETSI014:
        from keysource.etsi014 import Etsi014Client  # noqa: PLC0415 -- aiohttp only when used

        return Etsi014Client.from_settings(qkd)
    if qkd.source is QkdSourceKind.SKIP:
        from keysource.skip import SkipClient  # noqa: PLC0415 -- aiohttp only when used

        return SkipClient.from_settings(qkd)
    from keysource.static import StaticKeySource  # noqa: PLC0415

    if qkd.static_file is None:
        raise ValueError("qkd.static_file is required for the static source")
    return StaticKeySource.from_file(qkd.static_file, qkd.sae_id, qkd.key_size_bits)
