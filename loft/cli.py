"""The `loft` command: the composition root that wires the subsystems together.

Each subcommand parses, calls into server/, cache/ or fs/, and prints. Errors a user can
act on are one line and exit 1 (click's ClickException); bad usage exits 2.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click


def _size(text: str) -> int:
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    text = text.strip().lower().removesuffix("b").removesuffix("i")
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "")
    try:
        return int(float(number) * units[unit])
    except ValueError:
        raise click.BadParameter(f"not a size: {text!r} (examples: 500M, 20G)") from None


class SizeType(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx):  # type: ignore[override]
        return value if isinstance(value, int) else _size(value)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _home() -> Path:
    """The device's state folder: LOFT_HOME, else the platform's user data folder.
    Always absolute: the mount process leaves the working directory behind."""
    env = os.environ.get("LOFT_HOME")
    if env:
        return Path(env).expanduser().absolute()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return (Path(base) / "loft").absolute()


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turns the errors a user can act on into one line and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except Exception as exc:
            message = _user_message(exc)
            if message is None:
                raise
            raise click.ClickException(message) from None

    return wrapper


def _user_message(exc: Exception) -> str | None:
    """The one line for an error a user can act on; None for any other. (The client's
    modules load here, on error only: a command that needs none of them stays quick.)"""
    from backend.base import (
        BadCredentials,
        Forbidden,
        NotFound,
        Unauthorized,
        Unreachable,
        UserExists,
    )
    from cache.errors import ReplicaError
    from cache.keys import WrongPassword
    from cache.session import NotLoggedIn

    if isinstance(exc, NotLoggedIn):
        return "not logged in: run `loft login SERVER_URL USER` (or `loft signup`)"
    if isinstance(exc, (WrongPassword, BadCredentials)):
        return "wrong user name or password"
    if isinstance(exc, Unauthorized):
        return "this device's token is no longer valid (revoked?): run `loft login`"
    if isinstance(exc, Unreachable):
        return f"cannot reach the server: {exc}"
    if isinstance(exc, (UserExists, NotFound, Forbidden)):
        return exc.message
    if isinstance(exc, ReplicaError):
        return str(exc) or type(exc).__name__
    return None


def _run(async_fn: Callable[..., Any], *args: Any) -> Any:
    import trio

    return trio.run(async_fn, *args)


def _password(password_file: Path | None, confirm: bool) -> str:
    if password_file is not None:
        text = password_file.read_text().splitlines()
        if not text or not text[0]:
            raise click.ClickException(f"{password_file} is empty")
        return text[0]
    return click.prompt("Password", hide_input=True, confirmation_prompt=confirm)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Loft: a cloud drive you mount as a folder.

    LOFT_HOME selects this device's state folder (default ~/.local/share/loft).
    """
    import logging

    # commands speak through their output; retries and the like stay quiet here
    logging.basicConfig(level=logging.ERROR, format="loft: %(message)s")


# ---------------------------------------------------------------------------- server


@main.command()
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path),
              help="Folder for the metadata database and the blobs.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535),
              help="Port to bind (0: any free port; the chosen one is printed).")
@click.option("--quota", default="1T", show_default=True, type=SizeType(),
              help="Default quota of new accounts.")
@click.option("--gc-grace", default=6 * 3600.0, show_default=True, type=float,
              help="Seconds an unreferenced chunk is kept before collection.")
@click.option("--gc-interval", default=600.0, show_default=True, type=float,
              help="Seconds between garbage collection passes.")
@click.option("--certfile", type=click.Path(exists=True), help="TLS certificate.")
@click.option("--keyfile", type=click.Path(exists=True), help="TLS private key.")
def serve(data_dir: Path, host: str, port: int, quota: int, gc_grace: float,
          gc_interval: float, certfile: str | None, keyfile: str | None) -> None:
    """Run the Loft server in the foreground (SIGINT/SIGTERM stop it)."""
    from server.app import ServerConfig
    from server.main import serve as run
    from server.main import setup_logging

    setup_logging()
    run(ServerConfig(data_dir=data_dir, default_quota=quota, gc_grace=gc_grace,
                     gc_interval=gc_interval), host, port, certfile, keyfile)


# ---------------------------------------------------------------------------- account


def _device_name() -> str:
    import socket

    return socket.gethostname() or "device"


def _refuse_if_logged_in(home: Path) -> None:
    if (home / "device.json").exists():
        config = json.loads((home / "device.json").read_text())
        raise click.ClickException(
            f"{home} is already logged in as {config['user']} on {config['server']}: "
            "run `loft logout` first, or set LOFT_HOME to another folder")


def _account_command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """SERVER_URL USER [--password-file F] [--device NAME], as signup and login take."""
    for decorator in reversed([
        main.command(),
        click.argument("server_url"),
        click.argument("user"),
        click.option("--password-file",
                     type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="Read the password from the first line of this file."),
        click.option("--device", "device_name",
                     help="A name for this device (default: hostname)."),
        _friendly,
    ]):
        fn = decorator(fn)
    return fn


def _enter(server_url: str, user: str, password_file: Path | None, device_name: str | None,
           *, new_account: bool) -> Any:
    from cache.session import login as do_login
    from cache.session import signup as do_signup

    home = _home()
    _refuse_if_logged_in(home)
    password = _password(password_file, confirm=new_account)
    action = do_signup if new_account else do_login
    return _run(action, home, server_url, user, password, device_name or _device_name())


@_account_command
def signup(server_url: str, user: str, password_file: Path | None,
           device_name: str | None) -> None:
    """Create an account on SERVER_URL and log this device in."""
    config = _enter(server_url, user, password_file, device_name, new_account=True)
    click.echo(f"signed up as {config.user}; this device is {config.device_name!r}")


@_account_command
def login(server_url: str, user: str, password_file: Path | None,
          device_name: str | None) -> None:
    """Log this device in to an existing account (the password is all it needs)."""
    config = _enter(server_url, user, password_file, device_name, new_account=False)
    click.echo(f"logged in as {config.user}; this device is {config.device_name!r}")


@main.command()
@_friendly
def logout() -> None:
    """Revoke this device's token and delete its local state."""
    import shutil

    from backend.base import Unreachable
    from backend.http import HttpBackend
    from cache.session import load
    from cache.status import read_state

    home = _home()
    config, token, _ = load(home)
    if read_state(home) is not None:
        raise click.ClickException("the drive is mounted: run `loft unmount` first")

    async def revoke() -> None:
        backend = HttpBackend(config.server, token)
        try:
            await backend.logout()
        finally:
            await backend.aclose()

    try:
        _run(revoke)
    except Unreachable:
        click.echo("warning: the server is unreachable; the token stays valid there until "
                   "revoked from another device (`loft revoke`)", err=True)
    for name in ("token", "keys", "device.json", "state.json"):
        (home / name).unlink(missing_ok=True)
    shutil.rmtree(home / "store", ignore_errors=True)
    click.echo(f"logged out; removed the local state in {home}")


# ---------------------------------------------------------------------------- mount


@main.command()
@click.argument("mountpoint", type=click.Path(path_type=Path))
@click.option("--cache-size", default="10G", show_default=True, type=SizeType(),
              help="Cap on locally cached file data.")
@click.option("--allow-other", is_flag=True, help="Let other users access the mount.")
@click.option("--read-only", is_flag=True, help="Mount read-only.")
@click.option("--foreground", is_flag=True, help="Stay in the foreground (log to stderr).")
def mount(mountpoint: Path, cache_size: int, allow_other: bool, read_only: bool,
          foreground: bool) -> None:
    """Mount the workspace at MOUNTPOINT (returns once it is ready)."""
    from fs.mount import MountError, MountOptions
    from fs.mount import mount as run_mount

    options = MountOptions(cache_size=cache_size, allow_other=allow_other,
                           read_only=read_only, foreground=foreground)
    try:
        run_mount(_home(), mountpoint, options)
    except MountError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.argument("mountpoint", type=click.Path(path_type=Path))
def unmount(mountpoint: Path) -> None:
    """Unmount the drive at MOUNTPOINT (queued uploads resume at the next mount)."""
    from fs.mount import MountError
    from fs.mount import unmount as run_unmount

    try:
        run_unmount(mountpoint)
    except MountError as exc:
        raise click.ClickException(str(exc)) from None


# ---------------------------------------------------------------------------- status


def _workspace_path(path: str, mountpoint: str | None) -> str:
    """PATH as a path inside the workspace: relative to the mountpoint when it lies
    under it, else taken as a workspace path itself."""
    if mountpoint:
        absolute = Path(os.path.abspath(path))
        try:
            return str(absolute.relative_to(mountpoint))
        except ValueError:
            pass
    return path.strip("/")


def _resolve(t: Any, space: str, path: str) -> Any:
    from cache.pins import resolve

    return resolve(t, space, path)


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "never"


@main.command()
@click.argument("path", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_friendly
def status(path: str | None, as_json: bool) -> None:
    """Connection, pending uploads, conflicts and cache use; or one file's state."""
    from cache.session import load
    from cache.status import file_state, read_state
    from cache.status import status as compute
    from cache.store import Store

    home = _home()
    config, _, _ = load(home)
    if path is not None:
        state = read_state(home) or {}
        rel = _workspace_path(path, state.get("mountpoint"))
        store = Store(home / "store", readonly=True)
        try:
            with store.read() as t:
                node = _resolve(t, config.home_space, rel)
                unjournaled = {tuple(k) for k in state.get("unjournaled", [])}
                pending = any(p.node == node.id for _, p in t.journal()) or (
                    (node.space, node.id) in unjournaled)
                kind, cached = file_state(t, node, pending)
        finally:
            store.close()
        info = {"path": rel, "state": kind, "size": node.size, "cached_bytes": cached,
                "version": node.version}
        if as_json:
            click.echo(json.dumps(info))
        else:
            click.echo(f"{rel}: {kind}, {human(node.size)}, {human(cached)} cached, "
                       f"version {node.version}")
        return
    result = compute(home, config)
    if as_json:
        click.echo(json.dumps(result.to_json()))
        return
    if not result.running:
        connection = "not mounted"
    elif result.online:
        connection = f"online since {_when(result.since)}"
    else:
        connection = f"OFFLINE since {_when(result.since)}: {result.reason}"
    cap = f" of {human(result.cache_cap)}" if result.cache_cap else ""
    click.echo(f"{config.user} on {config.server} (device {config.device_name!r})")
    if result.mountpoint:
        click.echo(f"mounted at   {result.mountpoint}")
    click.echo(f"connection   {connection}")
    click.echo(f"pending      {result.pending.files} files, {human(result.pending.bytes)}, "
               f"{result.pending.operations} operations")
    click.echo(f"conflicts    {result.conflicts}")
    click.echo(f"cache        {human(result.cache_used)}{cap}, "
               f"{human(result.pinned_bytes)} pinned")
    click.echo(f"last sync    {_when(result.last_sync)}")


@main.command()
@click.option("--wait", is_flag=True, help="Wait until everything is synced.")
@click.option("--timeout", type=float, default=None, help="Give up after S seconds.")
@_friendly
def sync(wait: bool, timeout: float | None) -> None:
    """Upload pending changes and catch up with the server.

    With --wait, exit 0 once every local change is on the server and this device has
    every change the server had when the command started; on timeout, exit 1 and say
    what is still pending.
    """
    from loft.control import request_sync

    home = _home()
    # a running mount answers on its control socket, without loading the client here
    answer = request_sync(home, timeout) if wait else None
    if answer is not None:
        if answer.get("error"):
            raise click.ClickException(answer["error"])
        ok = answer["ok"]
    else:
        from cache.session import Session, load
        from cache.status import read_state

        load(home)
        if not wait:
            click.echo("changes upload in the background while the drive is mounted; "
                       "use --wait to wait for them")
            return
        if read_state(home) is not None:
            ok = _run(_wait_for_mount_sync, home, timeout)
        else:
            async def run() -> bool:
                import trio

                async with Session.open(home) as session:
                    with trio.move_on_after(timeout if timeout is not None else float("inf")):
                        await session.sync()
                        return True
                return False

            ok = _run(run)
    if not ok:
        from cache.session import load as load_config
        from cache.status import status as compute

        pending = compute(home, load_config(home)[0]).pending
        raise click.ClickException(
            f"timed out: {pending.files} files ({human(pending.bytes)}) and "
            f"{pending.operations} operations still pending")
    click.echo("in sync")


async def _wait_for_mount_sync(home: Path, seconds: float | None) -> bool:
    """Polls the store of a running mount until nothing is pending and its cursors
    have reached the server's heads as of the start."""
    import trio

    from backend.http import HttpBackend
    from cache.session import load
    from cache.status import pending_of, read_state
    from cache.store import Store

    config, token, _ = load(home)
    backend = HttpBackend(config.server, token)
    try:
        heads = {s.id: s.head for s in await backend.spaces()}
        with trio.move_on_after(seconds if seconds is not None else float("inf")):
            while True:
                state = read_state(home) or {}
                store = Store(home / "store", readonly=True)
                try:
                    with store.read() as t:
                        pending = pending_of(t, [tuple(k) for k in state.get("unjournaled", [])])
                        inflight = t.meta("inflight")
                        cursors = {s: t.meta_int(f"cursor:{s}", -1) for s in t.spaces()}
                finally:
                    store.close()
                idle = not pending.operations and not pending.files and inflight is None
                if idle and all(cursors.get(s, -1) >= h for s, h in heads.items()):
                    return True
                await trio.sleep(0.1)
        return False
    finally:
        await backend.aclose()


# ---------------------------------------------------------------------------- pins


@main.command()
@click.argument("path")
@_friendly
def pin(path: str) -> None:
    """Download PATH (a file or a folder) and keep it available offline."""
    _run(_pin, path, True)


@main.command()
@click.argument("path")
@_friendly
def unpin(path: str) -> None:
    """Let PATH's data be evicted from the cache again."""
    _run(_pin, path, False)


async def _pin(path: str, pinning: bool) -> None:
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from backend.wrappers import stack
    from cache.keys import SpaceKeys
    from cache.pins import set_pinned
    from cache.session import load
    from cache.status import read_state
    from cache.store import Store

    home = _home()
    config, token, keyring = load(home)
    codec = SpaceKeys.from_space_key(keyring.spaces[config.home_space]).codec()
    rel = _workspace_path(path, (read_state(home) or {}).get("mountpoint"))
    store = Store(home / "store")
    backend = stack(config.server, token)
    columns = (*Progress.get_default_columns()[:2], BarColumn(), DownloadColumn(),
               TransferSpeedColumn())
    try:
        with Progress(*columns, disable=not sys.stderr.isatty()) as progress:
            task = progress.add_task(f"pinning /{rel}", total=None)
            files, size = await set_pinned(
                store, backend, codec, config.home_space, rel, pinning,
                on_total=lambda n: progress.update(task, total=n),
                on_progress=lambda n: progress.advance(task, n))
    finally:
        await backend.aclose()
        store.close()
    verb = "pinned" if pinning else "unpinned"
    click.echo(f"{verb} {files} files ({human(size)}) under /{rel}")


# ---------------------------------------------------------------------------- versions


@main.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_friendly
def versions(path: str, as_json: bool) -> None:
    """List the versions of a file."""
    node, config, token = _node_of(path)
    result = _run(_with_backend, config, token,
                  lambda b: b.versions(config.home_space, node.id))
    if as_json:
        click.echo(result.model_dump_json())
        return
    for v in result.versions:
        mark = "*" if v.current else " "
        click.echo(f"{mark} {v.version:>8}  {_when(v.time)}  {human(v.size):>10}")


@main.command()
@click.argument("path")
@click.argument("version", type=int)
@_friendly
def restore(path: str, version: int) -> None:
    """Make VERSION of PATH its current content again (a new version)."""
    import uuid

    from backend.base import CommitConflict
    from loft.protocol import CommitRequest, RestoreOp

    node, config, token = _node_of(path)
    request = CommitRequest(commit_id=str(uuid.uuid4()),
                            ops=[RestoreOp(node=node.id, version=version)])
    try:
        result = _run(_with_backend, config, token,
                      lambda b: b.commit(config.home_space, request))
    except CommitConflict as exc:
        raise click.ClickException(f"cannot restore: {exc.results[0].message}") from None
    click.echo(f"restored version {version} of {path} as version {result.last_seq}")


def _node_of(path: str) -> tuple[Any, Any, str]:
    from cache.session import load
    from cache.status import read_state
    from cache.store import Store

    home = _home()
    config, token, _ = load(home)
    rel = _workspace_path(path, (read_state(home) or {}).get("mountpoint"))
    store = Store(home / "store", readonly=True)
    try:
        with store.read() as t:
            return _resolve(t, config.home_space, rel), config, token
    finally:
        store.close()


async def _with_backend(config: Any, token: str, call: Callable[[Any], Any]) -> Any:
    from backend.wrappers import stack

    backend = stack(config.server, token)
    try:
        return await call(backend)
    finally:
        await backend.aclose()


# ---------------------------------------------------------------------------- devices


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_friendly
def devices(as_json: bool) -> None:
    """List this account's devices."""
    from cache.session import load

    config, token, _ = load(_home())
    result = _run(_with_backend, config, token, lambda b: b.devices())
    if as_json:
        click.echo(json.dumps([d.model_dump() for d in result]))
        return
    for d in result:
        state = "revoked" if d.revoked else ("this device" if d.current else "active")
        click.echo(f"{d.id}  {d.name:<20} {state:<12} last seen {_when(d.last_seen)}")


@main.command()
@click.argument("device")
@_friendly
def revoke(device: str) -> None:
    """Revoke DEVICE (its id, or its name if unique); its token stops working at once."""
    from cache.session import load

    config, token, _ = load(_home())
    known = _run(_with_backend, config, token, lambda b: b.devices())
    matches = [d for d in known if d.id == device or (d.name == device and not d.revoked)]
    if len(matches) != 1:
        what = "no such device" if not matches else "several devices have that name; use its id"
        raise click.ClickException(f"{what}: {device}")
    _run(_with_backend, config, token, lambda b: b.revoke(matches[0].id))
    click.echo(f"revoked {matches[0].name} ({matches[0].id})")
