"""Shared fixtures: a fault-injecting server on loopback, payloads, the CLI."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from surefetch.testing import FaultServer


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer() as srv:
        yield srv


@pytest.fixture
def other_server() -> Iterator[FaultServer]:
    """A second server: another origin, for cross-host redirects."""
    with FaultServer() as srv:
        yield srv
