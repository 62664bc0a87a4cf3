"""Benchmark of the server: a real `loft serve` process on 127.0.0.1, driven over HTTP.

Measures (with the target next to each figure the project has set one for):
- single-operation commits per second (one mkdir per commit) from several concurrent
  clients, each on its own connection; the best client count is kept;
- 100-operation commits per second (and operations per second);
- 4 MiB chunk puts in MB/s from a few concurrent uploaders (random bodies with the
  transport digest header);
- one framed batch put of 1,000 x 4 KiB chunks: time and chunks per second;
- long-poll wake latency (commit sent → a waiting POST /v1/changes answered) while 1,000
  idle long-polls on another account's space are held open by this process.

Every detail line carries the CPU the server process, this (client) process and all other
processes used over the measured span, as a share of one core: on a 2-core machine they
compete, and this is how to tell which side is the bottleneck and whether other work on
the machine skewed a figure.

Usage: python scripts/bench_server.py [--quick]
MB/s are 10^6 bytes per second. The server runs in a temporary folder, removed after.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import blake3  # noqa: E402
import httpx  # noqa: E402
import trio  # noqa: E402
from probes import TICK, Target, machine_cpu, percentile, process_cpu, warn_if_busy  # noqa: E402

from loft.protocol import DIGEST_HEADER, FRAME_HEAD, ROOT_NODE  # noqa: E402
from tests.api import Api, User, mkdir, new_id  # noqa: E402
from tests.serverproc import ServerProcess  # noqa: E402

MiB = 1024 * 1024
CHUNK_BYTES = 4 * MiB
SMALL_CHUNK_BYTES = 4 * 1024
BATCH_CHUNKS = 1000
BATCH_OPS = 100
MEASURED_POLLERS = 4
#: Pause after every measured poller is waiting again, so its request has reached the
#: server and parked before the next commit (otherwise the wake is not what we measure).
POLL_SETTLE = 0.05
WAKE_TIMEOUT = 10.0


# ------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Row:
    name: str
    figure: str
    target: Target | None = None
    value: float = math.nan

    @property
    def verdict(self) -> str:
        if self.target is None:
            return "-"
        return "PASS" if self.target.met(self.value) else "MISS"


@dataclass(frozen=True)
class Span:
    """Wall time of a measured span and the CPU spent in it by the server, by this
    process, and by everything else on the machine (other work skews the figures)."""

    seconds: float
    server_cpu: float
    client_cpu: float
    other_cpu: float

    def cpu_note(self) -> str:
        def pct(cpu: float) -> str:
            return f"{100 * cpu / self.seconds:.0f}%"

        return (
            f"CPU: server {pct(self.server_cpu)}, client {pct(self.client_cpu)}, "
            f"other processes {pct(self.other_cpu)}"
        )


class Meter:
    """Measures a span: wall clock, the server's CPU, ours and the whole machine's."""

    def __init__(self, server_pid: int) -> None:
        self.pid = server_pid
        self._start = (0.0, 0.0, 0.0, 0.0)

    def _now(self) -> tuple[float, float, float, float]:
        return (
            time.perf_counter(),
            process_cpu(self.pid),
            time.process_time(),
            machine_cpu(),
        )

    def start(self) -> None:
        self._start = self._now()

    def stop(self) -> Span:
        wall, server, client, machine = (
            e - s for e, s in zip(self._now(), self._start, strict=True)
        )
        return Span(wall, server, client, max(0.0, machine - server - client))







def _open_sockets(pid: int) -> int:
    """How many sockets a process holds open."""
    count = 0
    fd_dir = f"/proc/{pid}/fd"
    for name in os.listdir(fd_dir):
        try:
            if os.readlink(f"{fd_dir}/{name}").startswith("socket:"):
                count += 1
        except OSError:
            pass
    return count




def _clients(n: int) -> str:
    return f"{n} client" if n == 1 else f"{n} clients"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _detail(text: str) -> None:
    print(f"  {text}", flush=True)


# ------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    commit_clients: tuple[int, ...]
    batch_clients: tuple[int, ...]
    commit_seconds: float
    uploaders: tuple[int, ...]
    chunks_per_run: int
    batch_runs: int
    idle_polls: int
    wake_rounds: int

    @classmethod
    def of(cls, args: argparse.Namespace) -> Settings:
        return cls(
            commit_clients=tuple(args.clients),
            batch_clients=(1, 4),
            commit_seconds=2.0 if args.quick else 5.0,
            uploaders=tuple(args.uploaders),
            chunks_per_run=48 if args.quick else 128,
            batch_runs=3 if args.quick else 5,
            idle_polls=args.idle_polls,
            wake_rounds=args.rounds or (50 if args.quick else 100),
        )


@dataclass
class Bench:
    url: str
    server_pid: int
    user: User
    idle_user: User
    settings: Settings
    rows: list[Row] = field(default_factory=list)

    def meter(self) -> Meter:
        return Meter(self.server_pid)

    def client(self, user: User, connections: int) -> httpx.AsyncClient:
        """An HTTP client for `user` that opens up to `connections` connections (httpx's
        default of 100 would queue the 1,000 long-polls)."""
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        return httpx.AsyncClient(
            base_url=self.url,
            headers=user.headers,
            limits=limits,
            timeout=httpx.Timeout(90.0, pool=60.0),
        )


def _check(response: httpx.Response, status: int = 200) -> httpx.Response:
    if response.status_code != status:
        raise RuntimeError(
            f"{response.request.method} {response.request.url.path}: "
            f"{response.status_code} {response.text[:500]}"
        )
    return response


# ------------------------------------------------------------------------- commits


async def _commit_load(
    bench: Bench, clients: int, ops_per_commit: int, seconds: float, tag: str
) -> tuple[int, Span, list[float]]:
    """Commits of `ops_per_commit` mkdirs from `clients` concurrent connections for about
    `seconds`; returns (commits done, span, per-commit latencies)."""
    space = bench.user.home
    path = f"/v1/spaces/{space}/commit"
    done = 0
    latencies: list[float] = []
    go = trio.Event()
    stop = False
    ready = 0
    all_ready = trio.Event()

    def body(worker: int, seq: int) -> dict[str, Any]:
        ops = [mkdir(ROOT_NODE, f"{tag}-{worker}-{seq}-{k}") for k in range(ops_per_commit)]
        return {"commit_id": new_id(), "ops": ops}

    async def worker(http: httpx.AsyncClient, index: int) -> None:
        nonlocal done, ready
        seq = 0
        # One commit before the clock starts opens this worker's connection.
        _check(await http.post(path, json=body(index, seq)))
        ready += 1
        if ready == clients:
            all_ready.set()
        await go.wait()
        while not stop:
            seq += 1
            payload = body(index, seq)
            sent = time.perf_counter()
            _check(await http.post(path, json=payload))
            latencies.append(time.perf_counter() - sent)
            done += 1

    meter = bench.meter()
    async with bench.client(bench.user, clients) as http, trio.open_nursery() as nursery:
        for i in range(clients):
            nursery.start_soon(worker, http, i)
        await all_ready.wait()
        meter.start()
        go.set()
        await trio.sleep(seconds)
        stop = True
    return done, meter.stop(), latencies


async def bench_commits(bench: Bench) -> None:
    s = bench.settings
    print("\nsingle-operation commits (one mkdir each)", flush=True)
    best: tuple[float, int] = (0.0, 0)
    for clients in s.commit_clients:
        done, span, lat = await _commit_load(bench, clients, 1, s.commit_seconds, f"c{clients}")
        rate = done / span.seconds
        best = max(best, (rate, clients))
        _detail(
            f"{_clients(clients)}: {done:,} commits in {span.seconds:.2f} s = {rate:,.0f}/s; "
            f"latency p50 {_ms(percentile(lat, 50))}, p99 {_ms(percentile(lat, 99))}; "
            f"{span.cpu_note()}"
        )
    bench.rows.append(
        Row(
            f"single-op commits/s (best: {_clients(best[1])})",
            f"{best[0]:,.1f}/s",
            Target(500, ">= 500/s"),
            best[0],
        )
    )

    print(f"\n{BATCH_OPS}-operation commits ({BATCH_OPS} mkdirs each)", flush=True)
    best = (0.0, 0)
    for clients in s.batch_clients:
        done, span, lat = await _commit_load(
            bench, clients, BATCH_OPS, s.commit_seconds, f"b{clients}"
        )
        rate = done / span.seconds
        best = max(best, (rate, clients))
        _detail(
            f"{_clients(clients)}: {done:,} commits in {span.seconds:.2f} s = {rate:,.1f}/s "
            f"= {rate * BATCH_OPS:,.0f} ops/s; latency p50 {_ms(percentile(lat, 50))}; "
            f"{span.cpu_note()}"
        )
    bench.rows.append(
        Row(
            f"{BATCH_OPS}-op commits/s (best: {_clients(best[1])})",
            f"{best[0]:,.1f}/s = {best[0] * BATCH_OPS:,.0f} ops/s",
        )
    )


# ------------------------------------------------------------------------- chunks


def _chunk_bodies(count: int, salt: int) -> list[tuple[str, bytes]]:
    """`count` distinct random 4 MiB bodies with their BLAKE3 hex (used as id and digest).
    They share one random buffer and differ in a 16-byte prefix: the server neither
    compresses nor deduplicates across ids, so this costs nothing in realism."""
    base = os.urandom(CHUNK_BYTES)
    out = []
    for i in range(count):
        body = (salt * 1_000_000 + i).to_bytes(16, "big") + base[16:]
        out.append((blake3.blake3(body).hexdigest(), body))
    return out


async def bench_chunk_put(bench: Bench) -> None:
    s = bench.settings
    space = bench.user.home
    print(f"\nchunk put, {CHUNK_BYTES // MiB} MiB random bodies", flush=True)
    best: tuple[float, int] = (0.0, 0)
    for salt, uploaders in enumerate(s.uploaders, start=1):
        bodies = _chunk_bodies(s.chunks_per_run, salt)
        queue = iter(bodies)

        async def upload(http: httpx.AsyncClient, queue: Iterator[tuple[str, bytes]]) -> None:
            for chunk_id, body in queue:
                _check(
                    await http.put(
                        f"/v1/spaces/{space}/chunks/{chunk_id}",
                        content=body,
                        headers={DIGEST_HEADER: chunk_id},
                    ),
                    201,
                )

        meter = bench.meter()
        async with bench.client(bench.user, uploaders) as http:
            meter.start()
            async with trio.open_nursery() as nursery:
                for _ in range(uploaders):
                    nursery.start_soon(upload, http, queue)
            span = meter.stop()
        total = sum(len(b) for _, b in bodies)
        rate = total / span.seconds / 1e6
        best = max(best, (rate, uploaders))
        _detail(
            f"{uploaders} uploaders: {len(bodies)} chunks, {total / 1e6:,.0f} MB in "
            f"{span.seconds:.2f} s = {rate:,.0f} MB/s; {span.cpu_note()}"
        )
        del bodies, queue
    bench.rows.append(
        Row(
            f"4 MiB chunk put (best: {best[1]} uploaders)",
            f"{best[0]:,.1f} MB/s",
            Target(300, ">= 300 MB/s"),
            best[0],
        )
    )


def _batch_body(count: int) -> bytes:
    """A framed batch-put body of `count` random 4 KiB chunks (see server.chunks)."""
    body = bytearray()
    for _ in range(count):
        data = os.urandom(SMALL_CHUNK_BYTES)
        digest = blake3.blake3(data).digest()
        body += FRAME_HEAD.pack(digest, len(data)) + digest + data
    return bytes(body)


async def bench_batch_put(bench: Bench) -> None:
    s = bench.settings
    space = bench.user.home
    print(
        f"\nbatch put, {BATCH_CHUNKS:,} x {SMALL_CHUNK_BYTES // 1024} KiB in one request",
        flush=True,
    )
    spans: list[Span] = []
    async with bench.client(bench.user, 1) as http:
        _check(await http.get("/v1/health"))
        for _ in range(s.batch_runs):
            body = _batch_body(BATCH_CHUNKS)
            meter = bench.meter()
            meter.start()
            r = _check(await http.post(f"/v1/spaces/{space}/chunks/batch", content=body), 201)
            spans.append(meter.stop())
            if r.json()["stored"] != BATCH_CHUNKS:
                raise RuntimeError(f"batch put stored {r.json()['stored']}")
    for span in spans:
        _detail(
            f"{_ms(span.seconds)} = {BATCH_CHUNKS / span.seconds:,.0f} chunks/s; {span.cpu_note()}"
        )
    median = sorted(spans, key=lambda sp: sp.seconds)[len(spans) // 2].seconds
    bench.rows.append(
        Row(
            f"batch put {BATCH_CHUNKS:,} x 4 KiB (median of {len(spans)})",
            f"{_ms(median)} = {BATCH_CHUNKS / median:,.0f} chunks/s",
        )
    )


# ------------------------------------------------------------------------- long-poll


async def _head(http: httpx.AsyncClient, space: str) -> int:
    return int(_check(await http.get(f"/v1/spaces/{space}")).json()["head"])


async def _wait_server_quiet(pid: int) -> None:
    """Waits until the server has used at most one clock tick of CPU in 100 ms: it has
    dealt with every request sent so far."""
    while True:
        before = process_cpu(pid)
        await trio.sleep(0.1)
        if process_cpu(pid) - before <= 1 / TICK:
            return


class _Armed:
    """Counts measured pollers that are waiting again; `every` is set once all are."""

    def __init__(self, pollers: int) -> None:
        self.pollers = pollers
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.every = trio.Event()

    def arm(self) -> None:
        self.count += 1
        if self.count == self.pollers:
            self.every.set()


async def bench_wake(bench: Bench) -> None:
    s = bench.settings
    space, idle_space = bench.user.home, bench.idle_user.home
    print(
        f"\nlong-poll wake latency: {s.idle_polls:,} idle long-polls held open, "
        f"{MEASURED_POLLERS} measured pollers, {s.wake_rounds} commits",
        flush=True,
    )
    idle_returns = 0
    armed = _Armed(MEASURED_POLLERS)
    arrivals_send, arrivals = trio.open_memory_channel[tuple[int, float]](MEASURED_POLLERS)

    async def idle_poller(http: httpx.AsyncClient, cursor: int) -> None:
        nonlocal idle_returns
        while True:
            r = await http.post("/v1/changes", json={"cursors": {idle_space: cursor}, "wait": 60})
            cursor = _check(r).json()["spaces"][idle_space]["cursor"]
            idle_returns += 1

    async def measured_poller(http: httpx.AsyncClient, index: int, cursor: int) -> None:
        while True:
            armed.arm()
            r = await http.post("/v1/changes", json={"cursors": {space: cursor}, "wait": 60})
            arrived = trio.current_time()
            new = _check(r).json()["spaces"][space]["cursor"]
            if new != cursor:
                cursor = new
                await arrivals_send.send((index, arrived))

    async with (
        bench.client(bench.idle_user, s.idle_polls + 8) as idle_http,
        bench.client(bench.user, MEASURED_POLLERS) as poll_http,
        bench.client(bench.user, 1) as commit_http,
        trio.open_nursery() as nursery,
    ):
        idle_head = await _head(idle_http, idle_space)
        started = trio.current_time()
        for _ in range(s.idle_polls):
            nursery.start_soon(idle_poller, idle_http, idle_head)
        deadline = trio.current_time() + 30
        while (held := _open_sockets(bench.server_pid)) < s.idle_polls:
            if trio.current_time() > deadline:
                raise RuntimeError(f"only {held} connections reached the server")
            await trio.sleep(0.05)
        with trio.fail_after(30):
            await _wait_server_quiet(bench.server_pid)
        opened = trio.current_time() - started
        held = _open_sockets(bench.server_pid)
        _detail(
            f"{s.idle_polls:,} idle long-polls open and parked in {opened:.1f} s "
            f"(server holds {held:,} sockets)"
        )

        cursor = await _head(commit_http, space)
        for i in range(MEASURED_POLLERS):
            nursery.start_soon(measured_poller, poll_http, i, cursor)
        samples: list[float] = []
        commit_rtts: list[float] = []
        meter = bench.meter()
        meter.start()
        for round_no in range(s.wake_rounds):
            await armed.every.wait()
            await trio.sleep(POLL_SETTLE)
            armed.reset()
            sent = trio.current_time()
            _check(
                await commit_http.post(
                    f"/v1/spaces/{space}/commit",
                    json={"commit_id": new_id(), "ops": [mkdir(ROOT_NODE, f"w-{round_no}")]},
                )
            )
            commit_rtts.append(trio.current_time() - sent)
            with trio.fail_after(WAKE_TIMEOUT):
                for _ in range(MEASURED_POLLERS):
                    _, arrived = await arrivals.receive()
                    samples.append(arrived - sent)
        span = meter.stop()
        still_held = _open_sockets(bench.server_pid)
        nursery.cancel_scope.cancel()

    p50, p99 = percentile(samples, 50), percentile(samples, 99)
    _detail(
        f"{len(samples)} wakes: p50 {_ms(p50)}, p99 {_ms(p99)}, max {_ms(max(samples))}; "
        f"commit round trip p50 {_ms(percentile(commit_rtts, 50))}"
    )
    _detail(
        f"idle long-polls that returned meanwhile: {idle_returns}; server sockets at the end "
        f"{still_held:,}; {span.cpu_note()} (includes {POLL_SETTLE * 1000:.0f} ms pauses)"
    )
    bench.rows.append(Row(f"long-poll wake p50 ({s.idle_polls:,} idle polls open)", _ms(p50)))
    bench.rows.append(
        Row(
            f"long-poll wake p99 ({len(samples)} wakes)",
            _ms(p99),
            Target(0.2, "< 200 ms", at_least=False),
            p99,
        )
    )


# ------------------------------------------------------------------------- main


async def run(bench: Bench, parts: Sequence[Callable[[Bench], Any]]) -> None:
    for part in parts:
        await part(bench)


def print_table(rows: Sequence[Row]) -> None:
    headers = ("measurement", "figure", "target", "result")
    cells = [(r.name, r.figure, r.target.text if r.target else "-", r.verdict) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    line = "  ".join(f"{{:{w}}}" for w in widths)
    print()
    print(line.format(*headers))
    print(line.format(*("-" * w for w in widths)))
    for c in cells:
        print(line.format(*c))


def _raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    if new < wanted:
        print(f"warning: open-file limit is {new}, fewer than the {wanted} wanted", flush=True)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (about 30 s)")
    parser.add_argument(
        "--clients", type=_ints, default=[4, 8], help="concurrent committers to try (4,8)"
    )
    parser.add_argument(
        "--uploaders", type=_ints, default=[2, 4], help="concurrent chunk uploaders (2,4)"
    )
    parser.add_argument(
        "--idle-polls", type=int, default=1000, help="idle long-polls held open (1000)"
    )
    parser.add_argument("--rounds", type=int, default=0, help="wake measurements (50 / 100)")
    args = parser.parse_args(argv)
    settings = Settings.of(args)
    # Both this process and the server (which inherits the limit) hold every long-poll.
    _raise_fd_limit(2 * settings.idle_polls + 1024)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="loft-bench-") as tmp:
        server = ServerProcess(Path(tmp) / "server")
        rows: list[Row] = []
        interrupted = False
        try:
            _run_all(server, settings, rows)
        except BaseException as exc:
            if not _interrupted(exc):
                raise
            interrupted = True
        finally:
            _stop(server, report_early_exit=not interrupted)
        if interrupted:
            print("\ninterrupted", file=sys.stderr, flush=True)
            return 130
        print_table(rows)
        print(f"\n({time.perf_counter() - started:.1f} s, {os.cpu_count()} CPUs)", flush=True)
        problems = server.log_problems()
        if problems:
            print("\nserver log problems:", *problems[:20], sep="\n  ", flush=True)
            return 1
    return 0


def _run_all(server: ServerProcess, settings: Settings, rows: list[Row]) -> None:
    """Starts the server, makes the two accounts and runs every part, adding its rows."""
    server.start()
    assert server.proc is not None
    print(f"server {server.url} (pid {server.proc.pid}), data in {server.data_dir}", flush=True)
    warn_if_busy()
    with Api(server.url) as api:
        bench = Bench(server.url, server.proc.pid, api.signup(), api.signup(), settings, rows)
    trio.run(run, bench, (bench_commits, bench_chunk_put, bench_batch_put, bench_wake))


def _stop(server: ServerProcess, report_early_exit: bool) -> None:
    """Stops the server; says so, with the end of its log, if it had exited by itself."""
    status = server.proc.poll() if server.proc is not None else None
    server.stop()
    if status is not None and report_early_exit:
        tail = server.log_path.read_text(errors="replace").splitlines()[-20:]
        print(f"\nthe server exited early (status {status}); its log ends:", file=sys.stderr)
        print(*tail, sep="\n", file=sys.stderr, flush=True)


def _interrupted(exc: BaseException) -> bool:
    """Whether `exc` is, or carries, a KeyboardInterrupt (trio nurseries wrap errors)."""
    if isinstance(exc, KeyboardInterrupt):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(KeyboardInterrupt) is not None
    return False


if __name__ == "__main__":
    sys.exit(main())
