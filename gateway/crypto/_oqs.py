"""ML-KEM / ML-DSA (and algorithms OpenSSL lacks) from liboqs-python. Optional: extra [oqs]."""

from __future__ import annotations

from gateway.errors import ProviderUnavailable


class OqsProvider:
    name = "oqs"

    def __init__(self) -> None:
        raise ProviderUnavailable("the oqs provider is not implemented yet")
