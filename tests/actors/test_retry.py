"""RetryPolicy and is_retryable: pure functions, no clock needed."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio

from actors.errors import PermanentProviderError, TransientProviderError
from actors.retry import RetryPolicy, is_retryable
from actors.worker import describe_failure
from tests.fakes import upper_jitter


def test_backoff_cap_doubles_then_stays_at_max() -> None:
    policy = RetryPolicy(attempts=8, base_delay_s=0.5, max_delay_s=8)

    assert [policy.backoff_cap(n) for n in range(1, 8)] == [0.5, 1, 2, 4, 8, 8, 8]


def test_delay_draws_from_zero_to_the_cap() -> None:
    policy = RetryPolicy(base_delay_s=1, max_delay_s=10)
    drawn: list[tuple[float, float]] = []

    def uniform(low: float, high: float) -> float:
        drawn.append((low, high))
        return (low + high) / 2

    delay = policy.delay(3, TransientProviderError("busy"), uniform=uniform)

    assert drawn == [(0.0, 4.0)]
    assert delay == 2.0


def test_upper_jitter_makes_the_delay_equal_the_cap() -> None:
    policy = RetryPolicy(base_delay_s=0.5, max_delay_s=3)

    delays = [policy.delay(n, trio.TooSlowError(), uniform=upper_jitter) for n in range(1, 5)]

    assert delays == [0.5, 1.0, 2.0, 3.0]


def test_retry_after_hint_longer_than_the_backoff_wins() -> None:
    policy = RetryPolicy(base_delay_s=0.5, max_delay_s=8)
    exc = TransientProviderError("rate limited", retry_after_s=30)

    assert policy.delay(1, exc, uniform=upper_jitter) == 30.0


def test_retry_after_hint_shorter_than_the_backoff_is_ignored() -> None:
    policy = RetryPolicy(base_delay_s=4, max_delay_s=8)
    exc = TransientProviderError("rate limited", retry_after_s=1.5)

    assert policy.delay(1, exc, uniform=upper_jitter) == 4.0


def test_hint_applies_even_when_jitter_picks_zero() -> None:
    policy = RetryPolicy(base_delay_s=4, max_delay_s=8)
    exc = TransientProviderError("rate limited", retry_after_s=1.5)

    assert policy.delay(2, exc, uniform=lambda low, high: low) == 1.5


def test_zero_base_delay_means_no_backoff() -> None:
    policy = RetryPolicy(base_delay_s=0, max_delay_s=8)

    assert policy.delay(5, TransientProviderError("x"), uniform=upper_jitter) == 0.0


@pytest.mark.parametrize(
    ("exc", "retryable"),
    [
        (TransientProviderError("502 from upstream"), True),
        (TransientProviderError("429", retry_after_s=3), True),
        (trio.TooSlowError(), True),
        (PermanentProviderError("prompt rejected"), False),
        (ValueError("bug"), False),
        (TimeoutError(), False),
    ],
)
def test_only_transient_errors_and_timeouts_are_retryable(
    exc: BaseException, retryable: bool
) -> None:
    assert is_retryable(exc) is retryable


@pytest.mark.parametrize(
    "make",
    [
        lambda: RetryPolicy(attempts=0),
        lambda: RetryPolicy(base_delay_s=-1.0),
        lambda: RetryPolicy(max_delay_s=-0.5),
    ],
    ids=["no-attempt", "negative-base", "negative-max"],
)
def test_policy_rejects_impossible_settings(make: Callable[[], RetryPolicy]) -> None:
    with pytest.raises(ValueError, match="must be >= "):
        make()


def test_timeout_is_described_with_the_attempt_timeout() -> None:
    assert describe_failure(trio.TooSlowError(), 2.5) == (
        "the provider did not answer within 2.5 s"
    )


def test_failure_without_a_message_is_described_by_its_type() -> None:
    assert describe_failure(TransientProviderError(""), 1) == "TransientProviderError"
