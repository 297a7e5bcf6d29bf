"""Integration tests: real mosquitto, KME simulator and gateway processes (loopback or netns).

Fixtures come from :mod:`tests.support.sites`. When a test fails, the tails of every log of
every still-open :class:`~tests.support.sites.TwoSites` are added to its report.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

from tests.support.sites import netns_sites, open_sites, two_sites

__all__ = ["netns_sites", "two_sites"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[Any]
) -> Generator[None, Any, None]:
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and call.when in ("setup", "call"):
        for i, s in enumerate(open_sites()):
            rep.sections.append((f"qgw logs, setup {i}", s.report()))
