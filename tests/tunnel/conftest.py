"""Tunnel tests: the end-to-end ones use real processes; a failure reports their log tails."""

from __future__ import annotations

from tests.integration.conftest import pytest_runtest_makereport

__all__ = ["pytest_runtest_makereport"]
