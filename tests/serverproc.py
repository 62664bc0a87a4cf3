"""A real `loft serve` process on 127.0.0.1 with a kernel-chosen free port, for tests.

`ServerProcess.start()` waits for the `listening on` line; `stop()` sends SIGTERM and
waits; `kill()` sends SIGKILL. The server's log is kept in a file in its data folder;
`log_problems()` returns its ERROR lines and tracebacks, which fail a test by default.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

LOFT = [sys.executable, "-m", "loft"]


class ServerProcess:
    def __init__(self, data_dir: Path, *extra: str) -> None:
        self.data_dir = data_dir
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        #: 0 until the first start; later starts bind the same port again
        self.port = 0
        self.log_path = data_dir.parent / f"{data_dir.name}-server.log"

    def start(self, timeout: float = 20.0) -> ServerProcess:
        assert self.proc is None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [*LOFT, "serve", "--data", str(self.data_dir), "--port", str(self.port), *self.extra],
            stdout=subprocess.PIPE,
            stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        match = re.search(r"listening on (http://\S+)", line)
        if not match or time.monotonic() > deadline:
            self.kill()
            raise RuntimeError(f"server did not start: {line!r}\n{self.log_path.read_text()}")
        self.url = match.group(1)
        self.port = int(self.url.rsplit(":", 1)[1])
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError("server did not stop on SIGTERM") from None
        self._reap()

    def kill(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reap()

    def _reap(self) -> None:
        assert self.proc is not None
        if self.proc.stdout:
            self.proc.stdout.close()
        self.proc = None

    def restart(self) -> ServerProcess:
        self.stop()
        return self.start()

    def log_problems(self) -> list[str]:
        if not self.log_path.exists():
            return []
        return [
            line
            for line in self.log_path.read_text(errors="replace").splitlines()
            if " ERROR " in line or "Traceback" in line or " CRITICAL " in line
        ]
