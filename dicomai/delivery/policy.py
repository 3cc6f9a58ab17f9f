"""Retry policy: exponential backoff with a ceiling and a bounded number of attempts."""

from __future__ import annotations

from dicomai.config import DeliverySettings


def backoff_seconds(attempts: int, settings: DeliverySettings) -> float:
    """Seconds to wait after the `attempts`-th failed attempt (1-based)."""
    delay = settings.backoff_initial_seconds * (2 ** max(attempts - 1, 0))
    return min(delay, settings.backoff_max_seconds)


def gives_up(attempts: int, settings: DeliverySettings) -> bool:
    return attempts >= settings.max_attempts
