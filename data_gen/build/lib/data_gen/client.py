"""The client layer every command shares: one chat completion, done carefully.

``LLMClient.chat`` wraps the official ``openai`` AsyncOpenAI client (its own retries are
switched off so that retries are counted, bounded and budgeted here) and adds:

* client-side rate limiting (``ratelimit.RateLimiter``) by requests and tokens per minute;
* retries with exponential backoff and full jitter that honour ``retry-after-ms`` /
  ``Retry-After``, bounded both in attempts and in total waiting time;
* a per-request timeout;
* usage and cost accounting with a hard budget (``accounting.CostMeter``);
* malformed completions (no choices, no content) treated as retryable failures.

The API key is handed to the openai client and never logged, printed or stored:
``ClientConfig`` hides it from its repr.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import random
import time
import uuid
from dataclasses import dataclass, field

import openai

from .accounting import CostMeter, estimate_tokens
from .errors import BudgetExceeded, FatalAPIError
from .ratelimit import RateLimiter

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Data-Gen-Request-Id"  # lets a server (or a test) see which request it bills
RUN_ID_HEADER = "X-Data-Gen-Run"


@dataclass(frozen=True)
class ClientConfig:
    """How to reach the endpoint and how hard to push it."""

    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    concurrency: int = 16
    rpm: float | None = None
    tpm: float | None = None
    timeout: float = 120.0
    max_attempts: int = 6
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    max_total_wait: float = 600.0

    def resolved_key(self) -> str:
        key = self.api_key or os.environ.get("OPENAI_API_KEY")
        if not key:
            raise FatalAPIError("no API key: set OPENAI_API_KEY or pass --api_key")
        return key

    def resolved_base_url(self) -> str | None:
        return self.base_url or os.environ.get("OPENAI_BASE_URL") or None


@dataclass(frozen=True)
class Completion:
    """What a command needs from one chat completion."""

    content: str
    finish_reason: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    attempts: int = 1
    cost: float = 0.0

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "cost_usd": round(self.cost, 8)}


class MalformedCompletion(Exception):
    """A 200 response without a usable message: retried like a server error."""


class RequestFailed(Exception):
    """The request could not be completed (not retryable, or retries exhausted)."""


def completion_from_dict(body: dict) -> Completion:
    """Build a ``Completion`` from a chat.completion JSON body (used for Batch API results)."""
    choices = body.get("choices") or []
    if not choices or not isinstance(choices[0].get("message"), dict) or choices[0]["message"].get("content") is None:
        raise MalformedCompletion("completion has no message content")
    usage = body.get("usage") or {}
    return Completion(content=choices[0]["message"]["content"],
                      finish_reason=choices[0].get("finish_reason") or "unknown",
                      model=body.get("model", ""), prompt_tokens=int(usage.get("prompt_tokens", 0)),
                      completion_tokens=int(usage.get("completion_tokens", 0)))


def retry_after_seconds(error: Exception) -> float | None:
    """The wait a 429/503 asks for, from ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP date)."""
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000.0
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if ra:
        try:
            return float(ra)
        except ValueError:
            parsed = email.utils.parsedate_to_datetime(ra) if ra else None
            if parsed is not None:
                return max(0.0, parsed.timestamp() - time.time())
    return None


def _retryable(error: Exception) -> bool:
    if isinstance(error, (openai.APITimeoutError, openai.APIConnectionError, MalformedCompletion,
                          openai.APIResponseValidationError, openai.RateLimitError,
                          openai.InternalServerError)):
        return True
    return isinstance(error, openai.APIStatusError) and error.status_code in (408, 409, 425)


def _fatal(error: Exception) -> bool:
    return isinstance(error, (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError))


class LLMClient:
    """Rate-limited, retrying, budgeted chat completions against one OpenAI-compatible endpoint."""

    def __init__(self, config: ClientConfig, meter: CostMeter | None = None):
        self.config = config
        self.meter = meter or CostMeter()
        self.limiter = RateLimiter(config.rpm, config.tpm)
        self.run_id = uuid.uuid4().hex[:12]
        self._client = openai.AsyncOpenAI(
            api_key=config.resolved_key(), base_url=config.resolved_base_url(),
            timeout=config.timeout, max_retries=0,
            default_headers={RUN_ID_HEADER: self.run_id})

    async def close(self) -> None:
        await self._client.close()

    def _backoff(self, attempt: int) -> float:
        cap = min(self.config.backoff_max, self.config.backoff_base * 2 ** (attempt - 1))
        return random.uniform(cap / 2, cap)

    async def chat(self, request_id: str, body: dict) -> Completion:
        """One chat completion for ``body`` (the kwargs of ``chat.completions.create``).

        Raises ``BudgetExceeded`` before sending if the budget would be exceeded,
        ``FatalAPIError`` for errors no retry can fix, ``RequestFailed`` otherwise.
        """
        prompt_est = sum(estimate_tokens(str(m.get("content", ""))) for m in body.get("messages", []))
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 1024)
        waited = 0.0
        for attempt in range(1, self.config.max_attempts + 1):
            reserve = self.meter.worst_case(body["model"], prompt_est, max_tokens)
            self.meter.reserve(reserve)  # raises BudgetExceeded: nothing is sent
            try:
                await self.limiter.acquire(prompt_est + max_tokens)
                completion = await self._once(request_id, body)
            except (BudgetExceeded, asyncio.CancelledError):
                raise
            except Exception as e:  # noqa: BLE001 - classified right below
                if _fatal(e):
                    raise FatalAPIError(f"{type(e).__name__}: {_describe(e)}") from None
                if not _retryable(e) or attempt == self.config.max_attempts:
                    raise RequestFailed(f"{type(e).__name__} after {attempt} attempt(s): {_describe(e)}") from None
                wait = retry_after_seconds(e)
                if wait is not None and isinstance(e, openai.RateLimitError):
                    self.limiter.pause(wait)
                wait = self._backoff(attempt) if wait is None else wait + random.uniform(0, wait * 0.1)
                if waited + wait > self.config.max_total_wait:
                    raise RequestFailed(f"{type(e).__name__}: retry wait budget of "
                                        f"{self.config.max_total_wait:.0f}s used up") from None
                waited += wait
                self.meter.retries += 1
                log.debug("request %s attempt %d failed (%s); retrying in %.2fs", request_id, attempt,
                          type(e).__name__, wait)
                await asyncio.sleep(wait)
                continue
            finally:
                self.meter.release(reserve)
            self.limiter.refund_tokens(prompt_est + max_tokens,
                                       completion.prompt_tokens + completion.completion_tokens)
            cost = self.meter.add_usage(completion.model or body["model"], completion.prompt_tokens,
                                        completion.completion_tokens)
            return Completion(**{**completion.__dict__, "attempts": attempt, "cost": cost})
        raise AssertionError("unreachable")

    async def _once(self, request_id: str, body: dict) -> Completion:
        resp = await self._client.chat.completions.create(
            **body, extra_headers={REQUEST_ID_HEADER: request_id})
        if not getattr(resp, "choices", None):
            raise MalformedCompletion("completion has no choices")
        choice = resp.choices[0]
        if choice.message is None or choice.message.content is None:
            raise MalformedCompletion("completion has no message content")
        usage = resp.usage
        return Completion(content=choice.message.content, finish_reason=choice.finish_reason or "unknown",
                          model=resp.model or body["model"],
                          prompt_tokens=usage.prompt_tokens if usage else 0,
                          completion_tokens=usage.completion_tokens if usage else 0)


def _describe(error: Exception) -> str:
    """A one-line description of an API error (the openai client never puts the key in it)."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:300]
