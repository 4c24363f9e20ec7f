"""Token usage and cost accounting, with a hard budget (``--max_cost``).

Prices are USD per million tokens (input, output) of OpenAI's public list prices; the Batch
API costs half. Unknown models cost 0 unless ``--price_in/--price_out`` are given, and the
run says so once, so that a budget is never silently meaningless.

The budget is checked *before* a request is sent, against what is already spent plus the
worst case of every request in flight (prompt estimate + ``max_tokens``), so the run stops
cleanly before, not after, going over.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from .errors import BudgetExceeded

log = logging.getLogger(__name__)

# USD per 1M tokens: (input, output). Longest matching prefix wins.
PRICES_PER_MTOK: dict[str, tuple[float, float]] = {
    "gpt-4-32k": (60.0, 120.0),
    "gpt-4-turbo": (10.0, 30.0),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.0),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4": (30.0, 60.0),
    "gpt-3.5-turbo": (0.50, 1.50),
}
BATCH_DISCOUNT = 0.5


@dataclass(frozen=True)
class Price:
    input_per_mtok: float
    output_per_mtok: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / 1e6


def price_for(model: str, override: Price | None = None) -> Price | None:
    """The list price of ``model`` (or ``override``); None when unknown."""
    if override is not None:
        return override
    for prefix in sorted(PRICES_PER_MTOK, key=len, reverse=True):
        if model.startswith(prefix):
            return Price(*PRICES_PER_MTOK[prefix])
    return None


def estimate_tokens(text: str) -> int:
    """A cheap upper-ish estimate of prompt tokens (about 4 characters per token for English)."""
    return len(text) // 3 + 1


@dataclass
class CostMeter:
    """Counts tokens, requests and USD for one run; enforces ``max_cost``. Thread- and task-safe."""

    max_cost: float | None = None
    price_override: Price | None = None
    discount: float = 1.0
    spent: float = 0.0
    reserved: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    billed_requests: int = 0
    retries: int = 0
    _warned: set = field(default_factory=set, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _price(self, model: str) -> Price:
        p = price_for(model, self.price_override)
        if p is None:
            if model not in self._warned:
                self._warned.add(model)
                log.warning("no price known for model %r: its cost counts as 0 "
                            "(pass --price_in/--price_out to budget it)", model)
            return Price(0.0, 0.0)
        return p

    def worst_case(self, model: str, prompt_tokens: int, max_tokens: int) -> float:
        return self._price(model).cost(prompt_tokens, max_tokens) * self.discount

    def reserve(self, amount: float) -> None:
        """Reserve ``amount`` USD for a request about to be sent, or raise ``BudgetExceeded``."""
        with self._lock:
            if self.max_cost is not None and self.spent + self.reserved + amount > self.max_cost:
                raise BudgetExceeded(
                    f"budget of ${self.max_cost:.4f} reached (spent ${self.spent:.4f}, "
                    f"in flight ${self.reserved:.4f}); stopped cleanly: rerun with a higher --max_cost to continue")
            self.reserved += amount

    def release(self, amount: float) -> None:
        with self._lock:
            self.reserved = max(0.0, self.reserved - amount)

    def add_usage(self, model: str, prompt_tokens: int, completion_tokens: int) -> float:
        """Record one billed response; returns its cost."""
        cost = self._price(model).cost(prompt_tokens, completion_tokens) * self.discount
        with self._lock:
            self.spent += cost
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            self.billed_requests += 1
        return cost

    def summary(self) -> dict:
        return {"cost_usd": round(self.spent, 6), "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "billed_requests": self.billed_requests,
                "retries": self.retries}
