"""Real mosquitto brokers for tests: a pytest fixture and the plain context manager.

The launcher itself lives in :mod:`gateway.bridge.mosquitto` (the demo uses it too).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from gateway.bridge.mosquitto import Mosquitto, MosquittoMissing, find_mosquitto

__all__ = ["Mosquitto", "mosquitto", "mosquitto_factory", "require_mosquitto"]


def require_mosquitto() -> None:
    """Skip the calling test if mosquitto is not installed."""
    try:
        find_mosquitto()
    except MosquittoMissing as exc:
        pytest.skip(str(exc))


@pytest.fixture
def mosquitto_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., Mosquitto]]:
    """Start any number of brokers (``factory(persistence=True, ...)``); all stopped after."""
    require_mosquitto()
    brokers: list[Mosquitto] = []

    def make(**kwargs: object) -> Mosquitto:
        b = Mosquitto(tmp_path_factory.mktemp("mosquitto"), **kwargs)  # type: ignore[arg-type]
        brokers.append(b)
        return b.start()

    yield make
    for b in brokers:
        b.close()


@pytest.fixture
def mosquitto(mosquitto_factory: Callable[..., Mosquitto]) -> Mosquitto:
    """One running broker on 127.0.0.1 with a free port."""
    return mosquitto_factory()
