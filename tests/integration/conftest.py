from __future__ import annotations

import pytest

from tests.api import Api


@pytest.fixture
def api(server):
    with Api(server.url) as client:
        yield client
