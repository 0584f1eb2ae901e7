"""Fixtures for usbd-objstore's tests: a real S3 server (usbd.objstore.testing.SeaweedS3)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from usbd.objstore.testing import SeaweedS3

#: The bucket the ``seaweed`` server is started with (``seaweed.bucket``).
BUCKET = "usbd-test"


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """One started ``weed mini`` per test module (about a second to start), with the bucket
    ``seaweed.bucket``; a test that needs a bucket to itself creates one. A test may stop or
    kill it: the next test that uses it gets it started again, on the same endpoint and data."""
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"), bucket=BUCKET)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _seaweed_running(request: pytest.FixtureRequest) -> None:
    """Start the module's server again if an earlier test left it stopped (a failed outage
    test, say), so that one failure does not fail every test after it. Touches only the tests
    that use ``seaweed``."""
    if "seaweed" in request.fixturenames:
        server = request.getfixturevalue("seaweed")
        # A module may define a ``seaweed`` of its own: leave anything else alone.
        if isinstance(server, SeaweedS3) and not server.running:
            server.start()
