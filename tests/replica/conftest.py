"""Fixtures for replica tests: a real server process and devices in separate homes."""

from __future__ import annotations

from pathlib import Path

import pytest

from cache.session import login, signup


@pytest.fixture(autouse=True)
def _fast_kdf(monkeypatch):
    monkeypatch.setenv("LOFT_TEST_FAST_KDF", "1")


class Devices:
    """Homes of one account's devices: `await devices.add()` signs up (first) or logs in."""

    def __init__(self, root: Path, url: str) -> None:
        self.root, self.url = root, url
        self.homes: list[Path] = []
        self.user = "alice"

    async def add(self, name: str | None = None) -> Path:
        home = self.root / f"device{len(self.homes)}"
        name = name or f"dev{len(self.homes)}"
        if not self.homes:
            await signup(home, self.url, self.user, "correct horse", name)
        else:
            await login(home, self.url, self.user, "correct horse", name)
        self.homes.append(home)
        return home


@pytest.fixture
async def devices(server, tmp_path) -> Devices:
    return Devices(tmp_path, server.url)
