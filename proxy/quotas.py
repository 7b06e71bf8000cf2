"""Per-key quotas: tokens per UTC day and requests per minute. Pure: fed the time and
the tokens spent, it says whether a request may go upstream.

Tokens per day: every usage record adds its prompt and completion tokens to its key's
count for the day it ended; at start the count is read back from the database, so a
restart does not give a key a fresh day. A request is refused once the day's count has
reached the limit; the request that crosses it is not cut short (its size is only
known at its end), so a key may end a day somewhat over.

Requests per minute: a sliding window, the times of the key's last admitted requests
(at most the limit of them), so a burst at the end of one minute counts against the
first seconds of the next.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

DAY = 86400.0
MINUTE = 60.0

Kind = Literal["tokens_per_day", "requests_per_minute"]


@dataclass(frozen=True, slots=True)
class Quota:
    tokens_per_day: int | None = None
    requests_per_minute: int | None = None


@dataclass(frozen=True, slots=True)
class Refusal:
    kind: Kind
    limit: int
    reset_at: float  # unix seconds when the request would be admitted again

    def retry_after(self, now: float) -> float:
        return max(1.0, self.reset_at - now)


def day_start(now: float) -> float:
    """The start of the UTC day of ``now``."""
    return now - now % DAY


class QuotaBook:
    def __init__(self, quotas: Mapping[str, Quota]) -> None:
        self.quotas = dict(quotas)
        # Per owner: the day (its start) the count is for, and the tokens spent in it.
        self._tokens: dict[str, tuple[float, int]] = {}
        self._recent: dict[str, deque[float]] = {}

    def seed(self, day: float, spent: Mapping[str, int]) -> None:
        """The tokens each owner spent since ``day`` began, as storage holds them."""
        for owner, tokens in spent.items():
            self._tokens[owner] = (day, tokens)

    def spent_today(self, owner: str, now: float) -> int:
        day, tokens = self._tokens.get(owner, (0.0, 0))
        return tokens if day == day_start(now) else 0

    def spend(self, owner: str, ts: float, tokens: int) -> None:
        """Count ``tokens`` of a request that ended at ``ts``."""
        if tokens <= 0 or owner not in self.quotas:
            return
        day = day_start(ts)
        counted_day, counted = self._tokens.get(owner, (day, 0))
        if counted_day == day:
            self._tokens[owner] = (day, counted + tokens)
        elif counted_day < day:
            self._tokens[owner] = (day, tokens)
        # A record of a day already over (it ended before midnight, landed after): that
        # day's count no longer matters.

    def admit(self, owner: str, now: float) -> Refusal | None:
        """None, and the request is counted, when the owner's quotas let it through;
        else what refused it."""
        quota = self.quotas.get(owner)
        if quota is None:
            return None
        limit = quota.tokens_per_day
        if limit is not None and self.spent_today(owner, now) >= limit:
            return Refusal("tokens_per_day", limit, day_start(now) + DAY)
        rpm = quota.requests_per_minute
        if rpm is not None:
            recent = self._recent.get(owner)
            if recent is None:
                recent = self._recent[owner] = deque()
            while recent and recent[0] <= now - MINUTE:
                recent.popleft()
            if len(recent) >= rpm:
                return Refusal("requests_per_minute", rpm, recent[0] + MINUTE)
            recent.append(now)
        return None
