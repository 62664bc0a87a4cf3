"""The running mount's control socket: `loft sync --wait` asks the mount itself.

The mount listens on LOFT_HOME/control.sock (a Unix socket in the device folder, which
only its owner can enter). A request is one line of JSON, and so is its answer:

    {"op": "sync", "timeout": 30.0}   ->   {"ok": true}     (false: timed out)

"sync" answers once every local change is on the server and the mirror has every
change the server had when the request arrived (`Session.sync_to_heads`), waiting
through server outages until the request's timeout.

Why a socket: without one, the command had to load the client stack (trio, httpx,
pydantic, LMDB: ~350 ms of imports), ask the server for its heads and poll the store,
which made every "until stored" wait at least ~450 ms. The client side here uses the
standard library only; `loft sync --wait` on an idle mount now takes well under that.

A socket path longer than the kernel's limit (about 107 bytes) cannot be bound: the
mount then runs without one, and the command falls back to polling.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

log = logging.getLogger(__name__)

SOCKET = "control.sock"
MAX_REQUEST = 4096
#: How much longer than its timeout the command waits for a mount's answer.
ANSWER_GRACE = 5.0


def request_sync(home: Path, timeout: float | None) -> dict | None:
    """Asks the mount of `home` to sync; returns its answer ({"ok": true} once synced;
    false on timeout, with "error" if the sync failed), or None if no mount answers
    (none running, or one without a socket)."""
    path = home / SOCKET
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.connect(os.fspath(path))
        except OSError:
            return None
        # the mount answers by its own deadline; this one is for a mount that hangs
        sock.settimeout(None if timeout is None else timeout + ANSWER_GRACE)
        try:
            sock.sendall(json.dumps({"op": "sync", "timeout": timeout}).encode() + b"\n")
            answer = sock.makefile("rb").readline()
        except TimeoutError:
            return {"ok": False}
        except OSError:
            return None  # the mount went away while we waited
        try:
            message = json.loads(answer)
        except ValueError:
            return None  # cut short: the mount went away
        return message if isinstance(message, dict) and "ok" in message else None
    finally:
        sock.close()


async def serve(home: Path, session, task_status=None) -> None:
    """Answers requests on LOFT_HOME/control.sock until cancelled."""
    import trio

    path = home / SOCKET
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        path.unlink(missing_ok=True)  # left by a mount that crashed (the lock is ours)
        await listener.bind(os.fspath(path))
        listener.listen()
    except OSError as exc:
        listener.close()
        log.warning("no control socket at %s (%s): `loft sync --wait` will poll", path, exc)
        if task_status is not None:
            task_status.started()
        return
    try:
        async with trio.open_nursery() as nursery:
            if task_status is not None:
                task_status.started()
            await trio.serve_listeners(
                lambda stream: _answer(stream, session),
                [trio.SocketListener(listener)],
                handler_nursery=nursery,
            )
    finally:
        path.unlink(missing_ok=True)


async def _answer(stream, session) -> None:
    import trio

    try:
        async with stream:
            answer = await _handle(stream, session)
            if answer is not None:
                await stream.send_all(json.dumps(answer).encode() + b"\n")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the command went away (interrupted): nothing to answer
    except Exception:  # no request may take the mount down
        log.exception("control socket request failed")


async def _handle(stream, session) -> dict | None:
    import trio

    request = b""
    while not request.endswith(b"\n") and len(request) < MAX_REQUEST:
        data = await stream.receive_some(MAX_REQUEST)
        if not data:
            return None
        request += data
    try:
        message = json.loads(request)
        if message.get("op") != "sync":
            raise ValueError(f"unknown op {message.get('op')!r}")
        timeout = message.get("timeout")
        timeout = float("inf") if timeout is None else float(timeout)
    except (ValueError, AttributeError, TypeError, OverflowError, RecursionError) as exc:
        return {"ok": False, "error": f"bad request: {exc}"}
    try:
        with trio.move_on_after(timeout):
            await session.sync_to_heads()
            return {"ok": True}
    except Exception as exc:  # the mount must outlive any one request
        log.info("sync for the control socket failed: %s", exc)
        return {"ok": False, "error": str(exc)}
    return {"ok": False}
