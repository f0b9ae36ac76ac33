"""Retry delays: how long an errored state waits before its retry may be claimed."""

from __future__ import annotations

import random
from fractions import Fraction

from state_manager.domain.models import RetryPolicy, RetryStrategy

_default_rng = random.Random()

_EXPONENTIAL = {
    RetryStrategy.EXPONENTIAL,
    RetryStrategy.EXPONENTIAL_FULL_JITTER,
    RetryStrategy.EXPONENTIAL_EQUAL_JITTER,
}
_LINEAR = {
    RetryStrategy.LINEAR,
    RetryStrategy.LINEAR_FULL_JITTER,
    RetryStrategy.LINEAR_EQUAL_JITTER,
}
_FULL_JITTER = {
    RetryStrategy.EXPONENTIAL_FULL_JITTER,
    RetryStrategy.LINEAR_FULL_JITTER,
    RetryStrategy.FIXED_FULL_JITTER,
}
_EQUAL_JITTER = {
    RetryStrategy.EXPONENTIAL_EQUAL_JITTER,
    RetryStrategy.LINEAR_EQUAL_JITTER,
    RetryStrategy.FIXED_EQUAL_JITTER,
}


def base_delay_ms(policy: RetryPolicy, attempt: int) -> int:
    """The un-jittered, uncapped delay of retry number ``attempt`` (exact integer)."""
    if attempt < 1:
        raise ValueError(f"Retry attempt must be at least 1, got {attempt}")
    if policy.strategy in _EXPONENTIAL:
        return policy.backoff_factor * int(policy.exponent ** (attempt - 1))
    if policy.strategy in _LINEAR:
        return policy.backoff_factor * attempt
    return policy.backoff_factor


def _jitter(low: int | Fraction, width: int | Fraction, rng: random.Random) -> int:
    """``trunc(low + U(0, width))``; exact rational arithmetic when floats would overflow."""
    try:
        return int(float(low) + rng.uniform(0, float(width)))
    except OverflowError:
        return int(low + width * Fraction(rng.random()))


def delay_ms(policy: RetryPolicy, attempt: int, rng: random.Random | None = None) -> int:
    """Delay in milliseconds before retry number ``attempt`` (1 = first retry).

    Full jitter draws from ``[0, base)``, equal jitter from ``[base/2, base)``; the
    policy's ``max_delay`` caps the result after jitter.
    """
    base = base_delay_ms(policy, attempt)
    rng = rng if rng is not None else _default_rng
    if policy.strategy in _FULL_JITTER:
        delay = _jitter(0, base, rng)
    elif policy.strategy in _EQUAL_JITTER:
        half = Fraction(base, 2)
        delay = _jitter(half, half, rng)
    else:
        delay = base
    if policy.max_delay is not None:
        delay = min(delay, policy.max_delay)
    return delay
