from __future__ import annotations

from tests.support.netns import netns_pair

__all__ = ["netns_pair"]  # re-exported as a fixture for tests/ops
