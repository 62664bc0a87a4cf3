from __future__ import annotations

import pytest

from tests.api import Api
from tests.serverproc import ServerProcess


@pytest.fixture
def server(tmp_path, request):
    """A running `loft serve`; its log must stay free of errors unless the test asks
    for `allow_error_logs`."""
    proc = ServerProcess(tmp_path / "server").start()
    try:
        yield proc
    finally:
        proc.stop()
    problems = proc.log_problems()
    if problems and "allow_error_logs" not in request.fixturenames:
        pytest.fail("server logged errors:\n" + "\n".join(problems))


@pytest.fixture
def api(server):
    with Api(server.url) as client:
        yield client
