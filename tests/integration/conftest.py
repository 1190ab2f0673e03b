"""Integration fixtures: a real clipserve server on port 0 over the tiny exported model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import ServerThread


@pytest.fixture(scope="session")
def clip_server(tiny_repository: Path) -> Iterator[ServerThread]:
    """One server for the session (tests that stop or overload a server start their own)."""
    server = ServerThread(tiny_repository).start()
    server.repository = tiny_repository  # type: ignore[attr-defined]
    yield server
    server.stop(grace_s=5)
