"""`loft mount` and `loft unmount`: checks, the background process, the main loop.

`mount` checks what it can in the calling process (one-line MountErrors), then, unless
in the foreground, forks before trio or pyfuse3 start anything: the child detaches
(setsid, stdio to LOFT_HOME/mount.log), mounts, and reports "ready" or the error
through a pipe; the parent returns once it has the answer.

The serving process holds an exclusive lock on LOFT_HOME/mount.lock (one mount per
device folder) and writes its pid to LOFT_HOME/mount.pid. Inside one trio run: the
session (replica and its services), `pyfuse3.main()` and the kernel notifier share a
nursery; SIGINT/SIGTERM/SIGHUP reach a trio task that calls `pyfuse3.terminate()`.
When the loop ends (signal or `fusermount3 -u`), the mount is closed, then the session
gets a few seconds to upload what is queued; the rest stays in the journal and the
next mount resumes it.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DRAIN_SECONDS = 10.0
#: The kernel's read-ahead for the mount: a FUSE request carries at most 1 MiB anyway.
READ_AHEAD_KB = 1024
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass
class MountOptions:
    cache_size: int
    allow_other: bool = False
    read_only: bool = False
    foreground: bool = False


class MountError(Exception):
    """The mount cannot start; the message is one line for the user."""


# ---------------------------------------------------------------------- checks


def _fusermount() -> str:
    path = shutil.which("fusermount3")
    if path is None:
        raise MountError("fusermount3 not found: install the fuse3 package")
    return path


def _check_fuse() -> None:
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse is missing: install the fuse3 package")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK) and os.geteuid() != 0:
        _fusermount()  # unprivileged mounts go through the setuid helper


def _check_mountpoint(mountpoint: Path) -> None:
    try:
        st = mountpoint.stat()
    except FileNotFoundError:
        raise MountError(f"{mountpoint} does not exist") from None
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise MountError(f"{mountpoint}: {exc.strerror}") from None
        # a mount whose process died: clear it and carry on
        log.info("clearing the stale mount at %s", mountpoint)
        subprocess.run(
            [_fusermount(), "-u", "-z", str(mountpoint)], capture_output=True, check=False
        )
        try:
            st = mountpoint.stat()
        except OSError as exc2:
            raise MountError(f"{mountpoint}: {exc2.strerror} (a stale mount?)") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"{mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise MountError(f"{mountpoint} is already a mount point")
    if any(mountpoint.iterdir()):
        raise MountError(f"{mountpoint} is not empty")


def _check_logged_in(home: Path) -> None:
    from cache.session import NotLoggedIn, load

    try:
        load(home)
    except NotLoggedIn:
        raise MountError("not logged in, run loft login") from None


def _lock(home: Path) -> int:
    """Takes the device folder's mount lock; the fd holds it until the process ends."""
    fd = os.open(home / "mount.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid = _read_pid(home)
        raise MountError(
            f"this device is already mounted{f' (pid {pid})' if pid else ''}"
        ) from None
    return fd


def _read_pid(home: Path) -> int | None:
    try:
        return int((home / "mount.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def check(home: Path, mountpoint: Path) -> None:
    """Raises MountError if a mount of `home` at `mountpoint` cannot start."""
    _check_fuse()
    _check_logged_in(home)
    _check_mountpoint(mountpoint)
    os.close(_lock(home))


# ---------------------------------------------------------------------- entry points


def mount(home: Path, mountpoint: Path, options: MountOptions) -> None:
    """Mounts the device at `home` on `mountpoint`. In the foreground, returns when
    unmounted; otherwise returns once the mount is ready (serving from a background
    process). Raises MountError."""
    mountpoint = mountpoint.expanduser().absolute()
    check(home, mountpoint)
    if options.foreground:
        _setup_logging(None)
        _serve_process(home, mountpoint, options, lambda message: None)
        return
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        code = 1
        try:
            os.setsid()
            _detach(home)
            code = _serve_process(home, mountpoint, options, _reporter(write_end))
        except BaseException:
            log.exception("the mount process failed")
        finally:
            logging.shutdown()
            os._exit(code)
    os.close(write_end)
    answer = _read_answer(read_end)
    if answer == "ready":
        return
    if answer.startswith("error: "):
        raise MountError(answer.removeprefix("error: "))
    raise MountError(f"the mount process ended before mounting; see {home / 'mount.log'}")


def unmount(mountpoint: Path) -> None:
    """Unmounts a Loft mount (the serving process then uploads what it can and exits).
    Raises MountError."""
    mountpoint = mountpoint.expanduser().absolute()
    if not os.path.ismount(mountpoint):
        try:
            mountpoint.stat()
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise MountError(f"{mountpoint} is not mounted") from None
        else:
            raise MountError(f"{mountpoint} is not mounted")
    result = subprocess.run(
        [_fusermount(), "-u", str(mountpoint)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()
        raise MountError(message[-1] if message else f"cannot unmount {mountpoint}")


# ---------------------------------------------------------------------- the process


def _read_answer(fd: int) -> str:
    data = b""
    try:
        while b"\n" not in data:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    return data.decode(errors="replace").split("\n", 1)[0].strip()


def _reporter(fd: int) -> Callable[[str], None]:
    """Writes one line to the parent, once; closes the pipe."""
    state = {"fd": fd}

    def report(message: str) -> None:
        if state["fd"] < 0:
            return
        try:
            os.write(state["fd"], message.replace("\n", " ").encode() + b"\n")
        except OSError:
            pass
        os.close(state["fd"])
        state["fd"] = -1

    return report


def _detach(home: Path) -> None:
    log_path = home / "mount.log"
    out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(null)
    os.close(out)
    os.chdir("/")
    _setup_logging(log_path)


def _setup_logging(path: Path | None) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler: logging.Handler = (
        logging.FileHandler(path) if path is not None else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def _serve_process(
    home: Path, mountpoint: Path, options: MountOptions, report: Callable[[str], None]
) -> int:
    import trio

    try:
        lock = _lock(home)
    except MountError as exc:
        report(f"error: {exc}")
        if options.foreground:
            raise
        return 1
    pid_file = home / "mount.pid"
    pid_file.write_text(f"{os.getpid()}\n")
    try:
        trio.run(_serve, home, mountpoint, options, report)
    except MountError as exc:
        report(f"error: {exc}")
        if options.foreground:
            raise
        log.warning("mount failed: %s", exc)
        return 1
    finally:
        pid_file.unlink(missing_ok=True)
        os.close(lock)
    return 0


def _fuse_options(options: MountOptions) -> set[str]:
    opts = {"fsname=loft", "subtype=loft", "default_permissions"}
    if options.allow_other:
        opts.add("allow_other")
    if options.read_only:
        opts.add("ro")
    return opts


async def _serve(
    home: Path, mountpoint: Path, options: MountOptions, report: Callable[[str], None]
) -> None:
    import pyfuse3
    import trio

    from cache.session import Session
    from fs.core import Core
    from fs.notify import KernelNotifier
    from fs.operations import Operations
    from loft import control

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with Session.open(
            home,
            cache_size=options.cache_size,
            read_only=options.read_only,
            mountpoint=mountpoint,
        ) as session:
            replica = session.replica
            core = Core(replica, home)
            notifier = KernelNotifier(core)
            try:
                operations = Operations(core)
                pyfuse3.init(operations, str(mountpoint), _fuse_options(options))
            except RuntimeError as exc:
                raise MountError(f"cannot mount at {mountpoint}: {exc}") from None
            replica.listeners.extend([core.remote_change, notifier.listen])
            log.info("mounted %s at %s", home, mountpoint)
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(notifier.run)
                    nursery.start_soon(_stop_on_signal, signals)
                    nursery.start_soon(_widen_read_ahead, operations.initialized, mountpoint)
                    await nursery.start(control.serve, home, session)
                    # what exists now (modules, models, the session) lives as long as the
                    # mount: keep it out of the collector's full passes, which a burst of
                    # long-lived objects (a listing of thousands of entries) triggers
                    gc.collect()
                    gc.freeze()
                    report("ready")
                    await pyfuse3.main()
                    nursery.cancel_scope.cancel()
            finally:
                replica.listeners.remove(notifier.listen)
                replica.listeners.remove(core.remote_change)
                pyfuse3.close(unmount=True)
                log.info("unmounted %s", mountpoint)
            await _drain(session)


async def _widen_read_ahead(initialized, mountpoint: Path) -> None:
    """Raises the kernel's read-ahead for this mount from 128 KiB to READ_AHEAD_KB.

    The kernel reads a FUSE file in requests no larger than its read-ahead window, and
    each request is a round trip through this process: at 128 KiB, re-reading a cached
    256 MiB file ran at 415 MB/s, at 1 MiB at 830 MB/s. The FUSE handshake can only
    lower the window (so this waits until it is done), and sysfs, where it can be
    raised, needs root; otherwise the default stays. The mount's device number comes
    from /proc/self/mountinfo: a stat of the mountpoint here would wait on this very
    process."""
    await initialized.wait()
    _set_read_ahead(mountpoint)


def _set_read_ahead(mountpoint: Path) -> None:
    device = None
    # the kernel lists the mountpoint with symlinks resolved (not the mountpoint itself:
    # resolving that would stat it)
    where = str(Path(os.path.realpath(mountpoint.parent)) / mountpoint.name)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])
                if point == where:
                    device = fields[2]  # the last mount there is ours
        if device is not None:
            Path(f"/sys/class/bdi/{device}/read_ahead_kb").write_text(f"{READ_AHEAD_KB}\n")
    except OSError as exc:
        log.debug("read-ahead of %s stays at the default: %s", mountpoint, exc)


async def _stop_on_signal(signals) -> None:
    import pyfuse3

    async for signum in signals:
        log.info("signal %s: unmounting", signal.Signals(signum).name)
        pyfuse3.terminate()
        return


async def _drain(session) -> None:
    """Gives queued uploads a few seconds after unmount; what is left stays queued."""
    import trio

    replica = session.replica
    replica.journal_all()
    if replica.read_only or not replica.net.online or replica.idle():
        return
    with trio.move_on_after(DRAIN_SECONDS):
        await replica.wait_idle()
    if not replica.idle():
        log.info("unmounted with changes still queued; the next mount uploads them")
