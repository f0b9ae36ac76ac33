import random
from collections.abc import Callable

import pytest
from state_manager.domain.models import RetryPolicy, RetryStrategy
from state_manager.domain.retry import base_delay_ms, delay_ms

S = RetryStrategy


def policy(strategy: RetryStrategy = S.EXPONENTIAL, **kwargs: int) -> RetryPolicy:
    return RetryPolicy(strategy=strategy, **kwargs)


def delays(p: RetryPolicy, attempts: range) -> list[int]:
    return [delay_ms(p, n) for n in attempts]


def test_default_policy_vectors() -> None:
    assert delays(RetryPolicy(), range(1, 4)) == [2000, 4000, 8000]


def test_exponential_with_cap_vectors() -> None:
    assert delays(policy(max_delay=10000), range(1, 6)) == [2000, 4000, 8000, 10000, 10000]


def test_exponential_other_exponent() -> None:
    assert delays(policy(backoff_factor=100, exponent=3), range(1, 5)) == [100, 300, 900, 2700]


def test_linear_vectors() -> None:
    assert delays(policy(S.LINEAR, backoff_factor=2000), range(1, 4)) == [2000, 4000, 6000]


def test_linear_ignores_exponent() -> None:
    assert delays(policy(S.LINEAR, backoff_factor=5, exponent=9), range(1, 4)) == [5, 10, 15]


def test_fixed_vectors() -> None:
    assert delays(policy(S.FIXED, backoff_factor=2000), range(1, 6)) == [2000] * 5


def test_fixed_cap() -> None:
    assert delay_ms(policy(S.FIXED, backoff_factor=2000, max_delay=1500), 1) == 1500


def test_exponential_powers_are_exact() -> None:
    p = policy(backoff_factor=3, exponent=7)
    assert delay_ms(p, 60) == 3 * 7**59
    assert base_delay_ms(p, 60) == 3 * 7**59


@pytest.mark.parametrize("strategy", list(RetryStrategy))
def test_attempt_must_be_positive(strategy: RetryStrategy) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        delay_ms(policy(strategy), 0)
    with pytest.raises(ValueError):
        delay_ms(policy(strategy), -3)


BASES: dict[RetryStrategy, Callable[[int], int]] = {
    S.EXPONENTIAL_FULL_JITTER: lambda n: 1000 * 3 ** (n - 1),
    S.EXPONENTIAL_EQUAL_JITTER: lambda n: 1000 * 3 ** (n - 1),
    S.LINEAR_FULL_JITTER: lambda n: 1000 * n,
    S.LINEAR_EQUAL_JITTER: lambda n: 1000 * n,
    S.FIXED_FULL_JITTER: lambda n: 1000,
    S.FIXED_EQUAL_JITTER: lambda n: 1000,
}


@pytest.mark.parametrize("strategy", list(BASES))
def test_jitter_within_bounds(strategy: RetryStrategy) -> None:
    p = policy(strategy, backoff_factor=1000, exponent=3)
    rng = random.Random(1234)
    for n in (1, 2, 3, 4):
        base = BASES[strategy](n)
        low = 0 if "FULL" in strategy else base // 2
        draws = [delay_ms(p, n, rng) for _ in range(2000)]
        assert all(low <= d <= base for d in draws)
        # The draws spread over the interval rather than sitting on one value.
        assert min(draws) < low + (base - low) * 0.1
        assert max(draws) > low + (base - low) * 0.9


@pytest.mark.parametrize("strategy", list(BASES))
def test_jitter_is_reproducible_with_seed(strategy: RetryStrategy) -> None:
    p = policy(strategy)
    first = [delay_ms(p, 3, random.Random(7)) for _ in range(3)]
    assert len(set(first)) == 1
    rng = random.Random(7)
    assert len({delay_ms(p, 3, rng) for _ in range(20)}) > 1


def test_full_jitter_uses_uniform_draw() -> None:
    p = policy(S.LINEAR_FULL_JITTER, backoff_factor=1000)
    expected = int(random.Random(42).uniform(0, 3000))
    assert delay_ms(p, 3, random.Random(42)) == expected


def test_equal_jitter_uses_half_plus_uniform_draw() -> None:
    p = policy(S.FIXED_EQUAL_JITTER, backoff_factor=1001)
    expected = int(1001 / 2 + random.Random(42).uniform(0, 1001 / 2))
    assert delay_ms(p, 1, random.Random(42)) == expected


@pytest.mark.parametrize("strategy", list(BASES))
def test_cap_applies_after_jitter(strategy: RetryStrategy) -> None:
    p = policy(strategy, backoff_factor=1000, exponent=2, max_delay=700)
    rng = random.Random(5)
    draws = [delay_ms(p, 3, rng) for _ in range(500)]
    assert max(draws) == 700
    if "FULL" in strategy:
        assert min(draws) < 700


def test_jitter_without_rng_uses_default_generator() -> None:
    p = policy(S.FIXED_FULL_JITTER, backoff_factor=10**9)
    assert len({delay_ms(p, 1) for _ in range(10)}) > 1


def test_huge_jittered_delay_does_not_overflow() -> None:
    p = policy(S.EXPONENTIAL_FULL_JITTER, backoff_factor=2000, exponent=2)
    base = 2000 * 2**1999
    value = delay_ms(p, 2000, random.Random(3))
    assert 0 <= value < base
    assert value > base // 10**6
    equal = delay_ms(policy(S.EXPONENTIAL_EQUAL_JITTER), 2000, random.Random(3))
    assert base // 2 <= equal <= base
    capped = delay_ms(policy(S.EXPONENTIAL_EQUAL_JITTER, max_delay=60000), 2000)
    assert capped == 60000
