"""The Redis fixture: a database of our own (13) on the machine's Redis or one we start; the keys the
sidecar wrote are removed after each test. Never FLUSHALL, never stop the machine's Redis."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sidecar.testing import delete_sidecar_keys, redis_url_for_tests


@pytest.fixture
def redis_url() -> Iterator[str]:
    url = redis_url_for_tests()
    delete_sidecar_keys(url)
    yield url
    delete_sidecar_keys(url)
