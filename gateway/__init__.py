"""qgw: hybrid post-quantum + QKD secure messaging gateway.

Layout (see docs/architecture in README):

- ``gateway.crypto``  -- the only module that touches cryptographic primitives.
- ``gateway.core``    -- the sans-I/O protocol core (handshake, key schedule, records, rekey).
- ``gateway.config``  -- the typed settings model (TOML + environment).
- ``gateway.cli``     -- the ``qgw`` command line.
"""

from __future__ import annotations

__version__ = "0.1.0"
