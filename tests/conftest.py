"""Suite-wide rules: a test fails on an unexpected warning (pytest's filterwarnings =
error) or on an error-level log line, unless it asks for `allow_error_logs`."""

from __future__ import annotations

import logging

import pytest


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
