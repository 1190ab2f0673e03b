"""Integration fixtures: a real clipserve server on port 0 over the tiny exported model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from clipserve.clients import ClipClient
from tests.integration.harness import ServerThread


@pytest.fixture(scope="session")
def clip_server(tiny_repository: Path) -> Iterator[ServerThread]:
    """One server for the session (tests that stop or overload a server start their own)."""
    server = ServerThread(tiny_repository).start()
    server.repository = tiny_repository  # type: ignore[attr-defined]
    yield server
    server.stop(grace_s=5)


@pytest.fixture(scope="module")
def address(clip_server: ServerThread) -> str:
    """The session server's host:port."""
    return str(clip_server.address)


@pytest.fixture(scope="module")
def client(address: str) -> Iterator[ClipClient]:
    """A Python client of the session server (modules with another client override it)."""
    with ClipClient(address, timeout=60.0) as c:
        yield c
