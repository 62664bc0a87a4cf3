"""Suite-wide rules: a test fails on an unexpected warning (pytest's filterwarnings =
error) or on an error-level log line, unless it asks for `allow_error_logs`."""

from __future__ import annotations

import logging

import pytest

from tests.serverproc import ServerProcess


class _ErrorCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def allow_error_logs() -> None:
    """Marks a test that provokes error-level log lines on purpose."""


@pytest.fixture(autouse=True)
def _fail_on_error_logs(request: pytest.FixtureRequest):
    collector = _ErrorCollector()
    root = logging.getLogger()
    root.addHandler(collector)
    try:
        yield
    finally:
        root.removeHandler(collector)
    if collector.records and "allow_error_logs" not in request.fixturenames:
        lines = "\n".join(f"{r.name}: {r.getMessage()}" for r in collector.records)
        pytest.fail(f"unexpected error-level log lines:\n{lines}")


@pytest.fixture
def server(tmp_path, request):
    """A running `loft serve` on a free 127.0.0.1 port, stopped after the test; its log
    must stay free of errors unless the test asks for `allow_error_logs`."""
    proc = ServerProcess(tmp_path / "server").start()
    try:
        yield proc
    finally:
        proc.stop()
    problems = proc.log_problems()
    if problems and "allow_error_logs" not in request.fixturenames:
        pytest.fail("server logged errors:\n" + "\n".join(problems))
