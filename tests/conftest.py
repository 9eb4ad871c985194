"""Test-wide hooks, and the Redis fixtures (the web fixtures live in ``tests/web/``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator, Iterator

import pytest

from tests.redis_support import fresh_prefix, require_redis


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    """Show a failure that trio wrapped in a one-leaf ExceptionGroup as the plain exception.

    pytest-trio 0.8.0 runs tests under trio's strict exception groups, so a failing assert shows up
    as ``ExceptionGroup: Exceptions from Trio nursery`` and ``xfail(raises=...)`` does not match
    (python-trio/pytest-trio#142). Groups with several leaves are left alone.
    """
    try:
        return (yield)
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        if len(leaves) == 1:
            raise leaves[0] from None
        raise


@pytest.fixture
def redis_server() -> None:
    """The test Redis answers, or the test skips (fails in CI): tests/redis_support.py."""
    require_redis()  # here, outside Trio: a skip raised in an async fixture loses its reason


@pytest.fixture
async def redis_prefix(redis_server: None) -> AsyncIterator[str]:
    """A prefix of the test's own on the test Redis, its keys deleted afterwards."""
    async with fresh_prefix() as prefix:
        yield prefix
