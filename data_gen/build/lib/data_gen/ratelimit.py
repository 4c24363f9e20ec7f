"""Client-side rate limiting by requests and tokens per minute.

Staying under the provider's limits is cheaper than being told off: every 429 costs a
round trip and a wait. Two token buckets (requests, tokens) refill continuously; a request
waits until both hold enough. A 429 that says how long to wait pauses *all* requests for
that long (``pause``), since the limit is shared by the whole account, not one request.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field


@dataclass
class _Bucket:
    per_minute: float
    burst_seconds: float
    level: float = field(init=False)
    last: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.level = self.capacity

    @property
    def rate(self) -> float:
        return self.per_minute / 60.0

    @property
    def capacity(self) -> float:
        return max(1.0, self.rate * self.burst_seconds)

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.last) * self.rate)
        self.last = now

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` is available (amount is capped at the capacity)."""
        amount = min(amount, self.capacity)
        return max(0.0, (amount - self.level) / self.rate)


class RateLimiter:
    """Requests-per-minute and tokens-per-minute limits shared by all concurrent requests.

    ``burst_seconds`` is how much unused allowance may pile up: small, so that the client
    sends at a steady pace instead of in bursts the server would reject.
    """

    def __init__(self, rpm: float | None = None, tpm: float | None = None, burst_seconds: float = 0.1):
        self._req = _Bucket(rpm, burst_seconds) if rpm else None
        self._tok = _Bucket(tpm, burst_seconds * 10) if tpm else None
        self._lock = asyncio.Lock()
        self._pause_until = 0.0

    def pause(self, seconds: float) -> None:
        """Hold back every request for ``seconds`` (the server asked us to, e.g. via Retry-After)."""
        self._pause_until = max(self._pause_until, time.monotonic() + seconds)

    async def acquire(self, tokens: float = 0.0) -> None:
        """Wait until one request of about ``tokens`` tokens may be sent, then account for it."""
        async with self._lock:  # FIFO: waiters are served in arrival order
            while True:
                now = time.monotonic()
                wait = self._pause_until - now
                for bucket, amount in ((self._req, 1.0), (self._tok, tokens)):
                    if bucket is not None:
                        bucket.refill(now)
                        wait = max(wait, bucket.wait_for(amount))
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
            if self._req is not None:
                self._req.level -= 1.0
            if self._tok is not None:
                self._tok.level -= min(tokens, self._tok.capacity)

    def refund_tokens(self, estimated: float, actual: float) -> None:
        """Give back the part of a token estimate that the request did not use."""
        if self._tok is not None and actual < estimated:
            self._tok.level = min(self._tok.capacity, self._tok.level + (estimated - actual))
