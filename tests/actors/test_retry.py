"""RetryPolicy and is_retryable: pure functions, no clock needed."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio

from actors.errors import NotStartedError, PermanentProviderError, TransientProviderError
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


def test_free_retries_back_off_like_attempts_and_honour_retry_after() -> None:
    policy = RetryPolicy(base_delay_s=0.5, max_delay_s=8, free_retries=30)
    exc = NotStartedError("created nothing")

    delays = [policy.free_retry_delay(n, 0.0, exc, uniform=upper_jitter) for n in range(1, 7)]

    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    throttled = NotStartedError("429", retry_after_s=30)
    assert policy.free_retry_delay(1, 0.0, throttled, uniform=upper_jitter) == 30.0


def test_free_retries_end_after_their_count() -> None:
    policy = RetryPolicy(free_retries=3)
    exc = NotStartedError("429")

    assert policy.free_retry_delay(3, 0.0, exc, uniform=upper_jitter) is not None
    assert policy.free_retry_delay(4, 0.0, exc, uniform=upper_jitter) is None


def test_no_free_retry_begins_past_the_window() -> None:
    policy = RetryPolicy(base_delay_s=1, max_delay_s=8, free_retry_window_s=10)
    exc = NotStartedError("429")

    assert policy.free_retry_delay(2, 8.0, exc, uniform=upper_jitter) == 2.0  # begins at 10 s
    assert policy.free_retry_delay(2, 8.5, exc, uniform=upper_jitter) is None  # would at 10.5 s


def test_the_defaults_bound_free_retries() -> None:
    policy = RetryPolicy()

    assert (policy.free_retries, policy.free_retry_window_s) == (30, 300.0)


@pytest.mark.parametrize(
    ("exc", "retryable"),
    [
        (TransientProviderError("502 from upstream"), True),
        (TransientProviderError("429", retry_after_s=3), True),
        (NotStartedError("429", retry_after_s=3), True),
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
        lambda: RetryPolicy(free_retries=-1),
        lambda: RetryPolicy(free_retry_window_s=-1.0),
    ],
    ids=["no-attempt", "negative-base", "negative-max", "negative-free", "negative-window"],
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
