from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quart_claude import RetryPolicy, UpstreamError

pytestmark = pytest.mark.core

delays = st.floats(min_value=0, max_value=100, allow_nan=False)


@given(
    base=delays,
    cap=delays,
    retry=st.integers(min_value=1, max_value=10_000),
    rand=st.floats(min_value=0, max_value=0.9999999),
)
def test_backoff_is_bounded_and_capped(base: float, cap: float, retry: int, rand: float) -> None:
    policy = RetryPolicy(max_retries=10_000, base_delay=base, max_delay=cap)
    wait = policy.backoff(retry, lambda: rand)
    ceiling = min(base * 2.0 ** min(retry - 1, 64), cap)
    assert 0.75 * ceiling - 1e-9 <= wait <= ceiling + 1e-9


@given(retry=st.integers(min_value=1, max_value=20))
def test_backoff_grows_until_the_cap(retry: int) -> None:
    policy = RetryPolicy(max_retries=100, base_delay=0.5, max_delay=8)
    top = lambda: 0.0  # noqa: E731 - the jitter at its largest
    assert policy.backoff(retry, top) == min(0.5 * 2 ** (retry - 1), 8)
    assert policy.backoff(retry + 1, top) >= policy.backoff(retry, top)


@given(
    retry_after=st.floats(min_value=0.001, max_value=1000, allow_nan=False),
    retry=st.integers(min_value=1, max_value=3),
)
def test_retry_after_wins_when_larger_and_fails_fast_beyond_the_cap(
    retry_after: float, retry: int
) -> None:
    policy = RetryPolicy(max_retries=3, base_delay=1, max_delay=30)
    error = UpstreamError("rate_limit", retry_after=retry_after)
    wait = policy.delay(error, retry, lambda: 0.5)
    if retry_after > 30:
        assert wait is None
    else:
        assert wait == max(retry_after, policy.backoff(retry, lambda: 0.5))


@given(retry=st.integers(min_value=1, max_value=10))
def test_retries_stop_after_max_and_never_for_non_retryable(retry: int) -> None:
    policy = RetryPolicy(max_retries=2, base_delay=0.1, max_delay=1)
    assert (policy.delay(UpstreamError("overloaded"), retry) is None) == (retry > 2)
    assert policy.delay(UpstreamError("auth_error"), retry) is None
