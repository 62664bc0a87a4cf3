"""The `loft` command as a user runs it: real processes against a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from cache.session import Session
from loft.protocol import ROOT_NODE as ROOT

STATUS_KEYS = {"user": str, "server": str, "device": str, "running": bool,
               "mountpoint": (str, type(None)), "online": (bool, type(None)),
               "since": (float, type(None)), "reason": str,
               "last_sync": (float, type(None)), "pending": dict, "conflicts": int,
               "cache_used": int, "cache_cap": (int, type(None)), "pinned_bytes": int}


class Loft:
    """Runs `loft` with one LOFT_HOME."""

    def __init__(self, home: Path, tmp: Path) -> None:
        self.home = home
        self.password = tmp / "password"
        self.password.write_text("correct horse\n")

    def __call__(self, *args: str, input: str | None = None,
                 timeout: float = 60) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "LOFT_HOME": str(self.home), "LOFT_TEST_FAST_KDF": "1"}
        return subprocess.run([sys.executable, "-m", "loft", *args], env=env, input=input,
                              capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def loft(tmp_path):
    return Loft(tmp_path / "laptop", tmp_path)


@pytest.fixture
def signed_up(loft, server):
    r = loft("signup", server.url, "alice", "--password-file", str(loft.password),
             "--device", "laptop")
    assert r.returncode == 0, r.stderr
    return loft


def put_file(home: Path, name: str, data: bytes) -> None:
    async def run() -> None:
        async with Session.open(home) as s:
            node = s.replica.create(s.replica.home, ROOT, name)
            await s.replica.write(s.replica.home, node.id, 0, data)
            s.replica.flush(s.replica.home, node.id)
            await s.sync()

    trio.run(run)


def test_cli_help_for_every_command():
    commands = ["serve", "signup", "login", "logout", "mount", "unmount", "status", "sync",
                "pin", "unpin", "versions", "restore", "devices", "revoke"]
    for command in commands:
        r = subprocess.run([sys.executable, "-m", "loft", command, "--help"],
                           capture_output=True, text=True)
        assert r.returncode == 0 and "Usage: " in r.stdout, command


def test_cli_bad_usage_exits_2(loft):
    assert loft("no-such-command").returncode == 2
    assert loft("signup").returncode == 2
    assert loft("sync", "--timeout", "soon").returncode == 2


def test_cli_not_logged_in_is_one_clear_line(loft):
    for args in (["status"], ["devices"], ["sync", "--wait"], ["versions", "x"]):
        r = loft(*args)
        assert r.returncode == 1
        assert r.stderr.strip() == \
            "Error: not logged in: run `loft login SERVER_URL USER` (or `loft signup`)"


def test_cli_signup_login_wrong_password_and_taken_name(signed_up, server, tmp_path):
    again = signed_up("signup", server.url, "alice", "--password-file", str(signed_up.password))
    assert again.returncode == 1 and "already logged in" in again.stderr
    desk = Loft(tmp_path / "desk", tmp_path)
    taken = desk("signup", server.url, "alice", "--password-file", str(desk.password))
    assert taken.returncode == 1 and "taken" in taken.stderr
    wrong = tmp_path / "wrong"
    wrong.write_text("nope\n")
    r = desk("login", server.url, "alice", "--password-file", str(wrong))
    assert r.returncode == 1 and r.stderr.strip() == "Error: wrong user name or password"
    r = desk("login", server.url, "alice", input="correct horse\n")  # prompted, no echo
    assert r.returncode == 0, r.stderr
    assert "correct horse" not in r.stdout


def test_cli_server_unreachable(signed_up, server):
    server.stop()
    r = signed_up("devices")
    assert r.returncode == 1 and r.stderr.startswith("Error: cannot reach the server")
    server.start()


def test_cli_status_json_schema_and_file_state(signed_up):
    put_file(signed_up.home, "report.txt", b"quarterly numbers")
    r = signed_up("status", "--json")
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    assert set(status) == set(STATUS_KEYS)
    for key, kind in STATUS_KEYS.items():
        assert isinstance(status[key], kind), key
    assert status["pending"] == {"operations": 0, "files": 0, "bytes": 0}
    assert status["last_sync"] is not None
    r = signed_up("status", "report.txt", "--json")
    info = json.loads(r.stdout)
    # saved whole on this device: its pages stay as its local copy
    assert info["size"] == 17 and info["state"] == "cached"
    assert signed_up("status", "missing.txt").returncode == 1
    human = signed_up("status")
    assert human.returncode == 0 and "pending      0 files" in human.stdout


def test_cli_sync_wait_does_not_succeed_while_anything_is_pending(signed_up, server):
    async def queue_offline() -> None:
        async with Session.open(signed_up.home) as s:
            node = s.replica.create(s.replica.home, ROOT, "offline.txt")
            await s.replica.write(s.replica.home, node.id, 0, b"written offline")
            s.replica.flush(s.replica.home, node.id)

    server.stop()
    trio.run(queue_offline)
    r = signed_up("sync", "--wait", "--timeout", "2")
    assert r.returncode == 1 and "still pending" in r.stderr
    pending = json.loads(signed_up("status", "--json").stdout)["pending"]
    assert pending["operations"] >= 1 and pending["files"] == 1
    server.start()
    r = signed_up("sync", "--wait", "--timeout", "30")
    assert r.returncode == 0, r.stderr
    assert json.loads(signed_up("status", "--json").stdout)["pending"]["operations"] == 0


def test_cli_pin_unpin_versions_restore(signed_up, server, tmp_path):
    put_file(signed_up.home, "doc.txt", b"first draft")
    desk = Loft(tmp_path / "desk", tmp_path)
    assert desk("login", server.url, "alice", "--password-file", str(desk.password)).returncode == 0

    async def edit() -> None:
        async with Session.open(desk.home) as s:
            await s.sync()
            node = s.replica.resolve("doc.txt")
            await s.replica.truncate(s.replica.home, node.id, 0)
            await s.replica.write(s.replica.home, node.id, 0, b"second draft")
            s.replica.flush(s.replica.home, node.id)
            await s.sync()

    trio.run(edit)
    assert desk("sync", "--wait", "--timeout", "30").returncode == 0
    r = desk("pin", "/")
    assert r.returncode == 0, r.stderr
    assert json.loads(desk("status", "doc.txt", "--json").stdout)["state"] == "cached"
    assert json.loads(desk("status", "--json").stdout)["pinned_bytes"] > 0
    assert desk("unpin", "/").returncode == 0
    assert json.loads(desk("status", "--json").stdout)["pinned_bytes"] == 0
    history = json.loads(desk("versions", "doc.txt", "--json").stdout)["versions"]
    assert history[0]["current"] and history[0]["size"] == len(b"second draft")
    # (the laptop may have committed its create before its content: then 3 versions)
    first = next(v["version"] for v in history if v["size"] == len(b"first draft"))
    r = desk("restore", "doc.txt", str(first))
    assert r.returncode == 0, r.stderr
    assert desk("sync", "--wait", "--timeout", "30").returncode == 0

    async def read_back() -> bytes:
        async with Session.open(desk.home) as s:
            await s.sync()
            node = s.replica.resolve("doc.txt")
            return await s.replica.read(s.replica.home, node.id, 0, 100)

    assert trio.run(read_back) == b"first draft"
    assert desk("versions", "nope.txt").returncode == 1


def test_cli_devices_revoke_logout(signed_up, server, tmp_path):
    desk = Loft(tmp_path / "desk", tmp_path)
    assert desk("login", server.url, "alice", "--password-file", str(desk.password),
                "--device", "desk").returncode == 0
    listing = json.loads(signed_up("devices", "--json").stdout)
    assert sorted(d["name"] for d in listing) == ["desk", "laptop"]
    assert signed_up("revoke", "desk").returncode == 0
    r = desk("devices")
    assert r.returncode == 1 and "no longer valid" in r.stderr
    assert signed_up("revoke", "nobody").returncode == 1
    r = signed_up("logout")
    assert r.returncode == 0, r.stderr
    assert not (signed_up.home / "token").exists()
    assert signed_up("status").returncode == 1
