"""The `loft` command: the composition root that wires the subsystems together."""

from __future__ import annotations

from pathlib import Path

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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Loft: a cloud drive you mount as a folder."""


@main.command()
@click.option(
    "--data",
    "data_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder for the metadata database and the blobs.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option(
    "--port",
    default=8080,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port to bind (0: any free port; the chosen one is printed).",
)
@click.option(
    "--quota",
    default="1T",
    show_default=True,
    type=SizeType(),
    help="Default quota of new accounts.",
)
@click.option(
    "--gc-grace",
    default=6 * 3600.0,
    show_default=True,
    type=float,
    help="Seconds an unreferenced chunk is kept before collection.",
)
@click.option(
    "--gc-interval",
    default=600.0,
    show_default=True,
    type=float,
    help="Seconds between garbage collection passes.",
)
@click.option("--certfile", type=click.Path(exists=True), help="TLS certificate.")
@click.option("--keyfile", type=click.Path(exists=True), help="TLS private key.")
def serve(
    data_dir: Path,
    host: str,
    port: int,
    quota: int,
    gc_grace: float,
    gc_interval: float,
    certfile: str | None,
    keyfile: str | None,
) -> None:
    """Run the Loft server in the foreground (SIGINT/SIGTERM stop it)."""
    from server.app import ServerConfig
    from server.main import serve as run
    from server.main import setup_logging

    setup_logging()
    run(
        ServerConfig(
            data_dir=data_dir, default_quota=quota, gc_grace=gc_grace, gc_interval=gc_interval
        ),
        host,
        port,
        certfile,
        keyfile,
    )


def _home() -> Path:
    """The device's state folder: LOFT_HOME, else the platform's user data folder."""
    import os

    env = os.environ.get("LOFT_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "loft"


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
