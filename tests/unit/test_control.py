"""The command's side of the control socket: whatever a mount does, `request_sync`
answers or says no mount answered; it never raises or hangs past its timeout."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from loft.control import ANSWER_GRACE, SOCKET, request_sync


def _serve_once(home: Path, behave) -> threading.Thread:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(home / SOCKET))
    listener.listen()

    def run() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                conn.makefile("rb").readline()
                behave(conn)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_request_sync_without_a_mount_is_none(tmp_path):
    assert request_sync(tmp_path, 1.0) is None


def test_request_sync_passes_the_answer(tmp_path):
    _serve_once(tmp_path, lambda conn: conn.sendall(b"{\"ok\": true}\n"))
    assert request_sync(tmp_path, 5.0) == {"ok": True}


def test_request_sync_mount_gone_or_garbled_is_none(tmp_path):
    for behave in (lambda conn: None, lambda conn: conn.sendall(b'{"ok": tr'),
                   lambda conn: conn.sendall(b"[1, 2]\n")):
        thread = _serve_once(tmp_path, behave)
        assert request_sync(tmp_path, 5.0) is None
        thread.join(5)
        (tmp_path / SOCKET).unlink()


def test_request_sync_gives_up_on_a_mount_that_never_answers(tmp_path):
    release = threading.Event()
    thread = _serve_once(tmp_path, lambda conn: release.wait(30))
    started = time.monotonic()
    assert request_sync(tmp_path, 0.5) == {"ok": False}
    assert time.monotonic() - started < 0.5 + ANSWER_GRACE + 2
    release.set()
    thread.join(5)
