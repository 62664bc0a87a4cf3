"""`loft serve`: the app on hypercorn's trio worker, in the foreground, until SIGINT or
SIGTERM. Prints one line `listening on http://HOST:PORT` once it accepts connections
(with --port 0 the kernel picks the port, which is how tests find a free one)."""

from __future__ import annotations

import logging
import signal
import sys
from functools import partial

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from hypercorn.trio import tcp_server as hypercorn_tcp_server

from server.app import App, ServerConfig

log = logging.getLogger(__name__)


def serve(
    config: ServerConfig,
    host: str = "127.0.0.1",
    port: int = 8080,
    certfile: str | None = None,
    keyfile: str | None = None,
) -> None:
    trio.run(_serve, config, host, port, certfile, keyfile)


async def _serve(
    config: ServerConfig, host: str, port: int, certfile: str | None, keyfile: str | None
) -> None:
    # hypercorn reads sockets 64 KiB at a time; a 4 MiB chunk body then takes 64 trips
    # through its read-and-parse loop on the one trio thread (41% of it in a profile).
    # 1 MiB reads: 4 MiB puts 290-408 -> 468-509 MB/s here, commits unchanged.
    hypercorn_tcp_server.MAX_RECV = 1 << 20
    hc = HypercornConfig()
    hc.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    hc.backlog = 4096
    hc.keep_alive_max_requests = 1_000_000
    hc.graceful_timeout = 2.0
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    if certfile:
        hc.certfile, hc.keyfile = certfile, keyfile
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_wait_for_signal, stop)
        binds = await nursery.start(
            partial(hypercorn_serve, App(config), hc, shutdown_trigger=stop.wait, mode="asgi")
        )
        print(f"listening on {binds[0]}", flush=True)
        log.info("serving %s from %s", binds[0], config.data_dir)
        await stop.wait()
    log.info("stopped")


async def _wait_for_signal(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("got %s, stopping", signal.Signals(signum).name)
            stop.set()
            return


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=level,
        force=True,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
