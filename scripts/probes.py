"""What the benchmarks share: CPU time from /proc (and a warning when the machine is
busy), nearest-rank percentiles, and the `Target` a figure is judged against. Used by
scripts/bench_*.py (run as scripts, so this folder is on their import path)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads); 0 once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def machine_cpu() -> float:
    """CPU seconds all processors have spent busy since boot; 0 where /proc is absent."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0
    # user nice system idle iowait irq softirq steal ...: idle and iowait are not busy.
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / TICK


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


@dataclass(frozen=True)
class Target:
    """`at_least` (figure >= value) or at most (figure < value)."""

    value: float
    text: str
    at_least: bool = True

    def met(self, figure: float) -> bool:
        return figure >= self.value if self.at_least else figure < self.value


def warn_if_busy() -> None:
    """Says so when other processes are using the CPUs the benchmark needs."""
    before, started = machine_cpu(), time.perf_counter()
    time.sleep(0.5)
    busy = (machine_cpu() - before) / (time.perf_counter() - started)
    if busy > 0.1:
        print(
            f"warning: other processes keep {100 * busy:.0f}% of one CPU busy "
            f"({os.cpu_count()} CPUs here); the figures below will be low and noisy",
            flush=True,
        )
