"""Serve a trained model over an OpenAI-compatible HTTP API (FastAPI under uvicorn, KV-cache decoding,
concurrent requests batched, tokens streamed as they are decoded):

    python -m alpacare_jax.infer.serve --model=HF_DIR_OR_WORKDIR [--host=127.0.0.1] [--port=8000]

Endpoints: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`, `GET /health`, so the
official `openai` client (`base_url="http://HOST:PORT/v1"`) and other OpenAI tools work unchanged.

* Chat: the model was tuned on single Alpaca instructions, so the last message, which must come from
  the user, becomes the instruction of the training prompt (no input); system and developer messages
  are ignored (the Alpaca preamble plays their part); earlier user or assistant turns are refused
  (400), since silently dropping them would answer a different question.
* Completions: the prompt (a string, or token ids) is continued as given (BOS prepended to a string,
  no template). `echo` returns the prompt before the answer; `logprobs: N` returns each token's
  log-probability and the N most likely tokens at its position (OpenAI's `tokens`, `token_logprobs`,
  `top_logprobs`, `text_offset`), for the prompt too with `echo`, from the model's own distribution
  (before temperature or filters); `max_tokens: 0` with `echo` scores the prompt alone, which is how
  log-likelihood tools (lm-evaluation-harness's `local-completions`) use it.
* Honoured: `max_tokens` / `max_completion_tokens` (default: up to `--max_tokens`, within the context and
  `--max_tokens_limit`), `temperature` (default 0: greedy, as in evaluation; OpenAI's default is 1),
  `top_p`, `top_k` (an extension, as in vLLM), `seed`, `stop` (a string or up to 4: the text is cut
  before the first one, `finish_reason` "stop"). `n` must be 1. `usage` counts prompt tokens and the
  tokens generated (EOS included).
* `stream: true` answers with server-sent events as OpenAI does: the text arrives chunk by chunk as it
  is decoded (every `--chunk_tokens` tokens), then `data: [DONE]`; `stream_options.include_usage` adds
  the usage chunk. The streamed text equals the whole answer's.
* API key: when the variable ALPACARE_SERVE_API_KEY is set, every `/v1/...` request must send
  `Authorization: Bearer <key>` (the `openai` client's `api_key`); others get 401 before their body is
  read. Unset: no check, so keep the default `--host=127.0.0.1` then. The key is never logged.
* Limits, each refused with an OpenAI-style error (`{"error": {message, type, param, code}}`) before the
  work it would cost: bodies over `--max_body_bytes` (413, before reading them), a body or request
  head not received within `--read_timeout` seconds (408: a slow or stalled client holds only its own
  connection), prompts over `--max_prompt_chars` characters (before tokenizing) or over the context,
  `max_tokens` over the limit; malformed HTTP (a bad `Content-Length`) gets a 400.

Decoding is continuous batching on one worker thread (JAX runs one program at a time): `--max_batch`
slots over one preallocated KV cache; between two chunks of `--chunk_tokens` steps, arrived requests are
prefilled into free slots while the others keep decoding, and a request that finishes, hits a stop
string or loses its client frees its slot for the next chunk. Each slot has its own sampling settings,
seed and `max_tokens` (per-row traced values: no new compilation for a new temperature, seed or length),
and every program (each prefill length bucket, each attention window) is compiled at start-up, so neither
new settings nor how many requests are in flight compile anything while serving.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import hmac
import json
import logging
import os
import queue
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Literal

import h11
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from openai.types import Completion as CompletionBody
from openai.types import CompletionChoice, CompletionUsage, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice as ChatChoice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from openai.types.completion_choice import Logprobs
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from alpacare_jax.data.prompts import prompt_ids
from alpacare_jax.infer.completion import ContextError, fit_to_context
from alpacare_jax.model import SamplingConfig
from alpacare_jax.model.decode import DecodeSlots, SlotRequest
from alpacare_jax.model.score import MAX_TOP_LOGPROBS, TokenScores, score_tokens

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 512
API_KEY_ENV = "ALPACARE_SERVE_API_KEY"


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask of the server; see the module docstring."""

    max_tokens: int = DEFAULT_MAX_TOKENS  # new tokens when a request does not say
    max_tokens_limit: int | None = None  # the most a request may ask for (None: the context)
    max_body_bytes: int = 1 << 20
    max_prompt_chars: int | None = None  # None: 32 characters per context position
    read_timeout: float = 10.0  # seconds to receive a request's head, then its body


class RequestError(ValueError):
    """A request the server refuses; becomes an OpenAI-style error body with `status`."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ---- the decoding engine --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Tokens:
    """New text tokens of a job (EOS never included)."""

    ids: list[int]


@dataclasses.dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop": the model emitted EOS; "length": max_tokens reached (or stopped early)
    completion_tokens: int  # EOS included
    scores: TokenScores | None  # of prompt + completion, when the job asked for log-probabilities


@dataclasses.dataclass(frozen=True)
class Failed:
    message: str


Event = Tokens | Finished | Failed


@dataclasses.dataclass(eq=False)
class Job:
    """One request's work. The engine reports through `emit` (from its thread); `cancelled` (set by the
    request's side when its client is gone or a stop string was found) stops its decoding early."""

    prompt: list[int]
    sampling: SamplingConfig | None  # None: nothing to generate (an `echo` request scoring its prompt)
    emit: Callable[[Event], None]
    logprobs: bool = False
    cancelled: bool = False
    generated: list[int] = dataclasses.field(default_factory=list)


class Engine:
    """Owns the model; one worker thread runs continuous batching over `max_batch` decode slots.

    Between two chunks of `chunk_tokens` decoding steps, waiting requests are prefilled into the free
    slots (as many as fit one prefill of `prefill_tokens`) while the busy slots keep their place; a
    slot whose request finished, hit a stop string or lost its client is free for the next chunk. JAX
    runs one program at a time, on this thread. Every program is compiled when the engine starts.
    """

    def __init__(self, loaded, *, max_batch: int = 8, chunk_tokens: int = 8, prefill_tokens: int = 512):
        self.loaded = loaded
        config = loaded.model.config
        self.eos_ids = tuple(dict.fromkeys((*config.eos_token_ids, loaded.tokenizer.eos_id)))
        self.slots = DecodeSlots(loaded.model, num_slots=max_batch, max_length=self.context, eos_ids=self.eos_ids,
                                 chunk_tokens=chunk_tokens, prefill_tokens=prefill_tokens)
        self.slots.warm_up()
        self._queue: queue.Queue[Job] = queue.Queue()
        self._waiting: collections.deque[Job] = collections.deque()  # taken from the queue, not yet in a slot
        self._busy: dict[int, Job] = {}  # slot -> the job decoding there
        self._thread = threading.Thread(target=self._run, name="decode", daemon=True)
        self._thread.start()

    @property
    def context(self) -> int:
        return self.loaded.model.config.max_position_embeddings

    @property
    def vocab_size(self) -> int:
        return self.loaded.model.config.vocab_size

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    def run_sync(self, prompt: list[int], sampling: SamplingConfig) -> list[int]:
        """The tokens (EOS included) of one job, waiting for them: the start-up check."""
        done = threading.Event()
        job = Job(prompt, sampling, emit=lambda event: isinstance(event, (Finished, Failed)) and done.set())
        self.submit(job)
        done.wait()
        return job.generated

    def _run(self) -> None:
        while True:
            inserting: list[Job] = []
            try:
                inserting = self._admit()
                self._advance()
            except Exception as e:  # noqa: BLE001 (the requests concerned report it; the worker lives on)
                log.exception("decoding failed")
                for job in [*inserting, *self._busy.values()]:
                    job.emit(Failed(f"{type(e).__name__}: {e}"))
                self._busy.clear()
                self.slots.reset()  # a failed program may have consumed the (donated) state

    def _admit(self) -> list[Job]:
        """Moves arrived jobs into free slots (waiting for one when nothing is decoding); returns those
        being inserted."""
        if not self._busy and not self._waiting:
            self._waiting.append(self._queue.get())
        while True:
            try:
                self._waiting.append(self._queue.get_nowait())
            except queue.Empty:
                break
        free, jobs = self.slots.free_slots(), []
        while self._waiting and len(jobs) < len(free):
            job = self._waiting[0]
            if job.cancelled:  # its client left while it waited
                self._waiting.popleft()
            elif job.sampling is None:  # nothing to generate: an `echo` request scoring its prompt
                self._finish(self._waiting.popleft())
            elif self.slots.fits([*(j.prompt for j in jobs), job.prompt]):
                jobs.append(self._waiting.popleft())
            else:
                break
        if not jobs:
            return []
        requests = [SlotRequest(slot, job.prompt, job.sampling) for slot, job in zip(free, jobs)]
        first = self.slots.insert(requests)
        for request, job, token in zip(requests, jobs, first):
            self._busy[request.slot] = job
            self._deliver(request.slot, [token], self.slots.done[request.slot])
        return jobs

    def _advance(self) -> None:
        """One chunk of steps for the busy slots, after ending those whose request was cancelled."""
        cancelled = [slot for slot, job in self._busy.items() if job.cancelled]
        if cancelled:
            self.slots.stop(cancelled)
            for slot in cancelled:
                self._finish(self._busy.pop(slot))
        if not self._busy:
            return
        chunk = self.slots.advance()
        for slot in list(self._busy):
            self._deliver(slot, chunk.tokens[slot], chunk.done[slot])

    def _deliver(self, slot: int, tokens: list[int], done: bool) -> None:
        job = self._busy[slot]
        job.generated.extend(tokens)
        text = [t for t in tokens if t not in self.eos_ids]
        if text:
            job.emit(Tokens(text))
        if done:  # reported at once, and the slot takes the next request
            self._finish(self._busy.pop(slot))

    def _finish(self, job: Job) -> None:
        scores = None
        if job.logprobs:  # one at a time: scoring holds [length, vocab] log-probabilities per row
            text = [t for t in job.generated if t not in self.eos_ids]
            scores = score_tokens(self.loaded.model, [job.prompt + text])[0]
        stopped = bool(job.generated) and job.generated[-1] in self.eos_ids
        job.emit(Finished("stop" if stopped else "length", len(job.generated), scores))


def _event_queue() -> tuple[asyncio.Queue, Callable[[Event], None]]:
    """A queue on the running event loop and the thread-safe function the engine puts events with."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def emit(event: Event) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass

    return events, emit


# ---- text: incremental detokenizing, stop strings, token pieces ------------------------------------------

def apply_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` cut before the earliest stop string, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


class TextStream:
    """The text of a growing list of tokens, handed out as deltas whose concatenation is the final text.

    Held back until known for sure: an incomplete character (bytes of it still to come), a tail that may
    begin a stop string, and, with `strip` (chat answers are stripped), trailing whitespace.
    """

    def __init__(self, tokenizer, stops: list[str], *, strip: bool):
        self.tokenizer, self.stops, self.strip = tokenizer, stops, strip
        self.tokens: list[int] = []
        self.sent = ""
        self.stopped = False

    def _visible(self, final: bool) -> str:
        text, self.stopped = apply_stop(self.tokenizer.decode(self.tokens), self.stops)
        if self.strip:
            text = text.lstrip()
        if not (final or self.stopped):
            text = text.rstrip("\ufffd")
            held = max((n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
            text = text[: len(text) - held]
            if self.strip:
                text = text.rstrip()
        elif self.strip:
            text = text.rstrip()
        return text

    def _delta(self, final: bool) -> str:
        visible = self._visible(final)
        if not visible.startswith(self.sent):  # decoding changed earlier text: wait for the final text
            return ""
        delta, self.sent = visible[len(self.sent):], visible
        return delta

    def push(self, tokens: list[int]) -> str:
        self.tokens.extend(tokens)
        return self._delta(final=False)

    def finish(self) -> str:
        return self._delta(final=True)


def token_pieces(tokenizer, tokens: list[int]) -> list[str]:
    """Each token's share of the decoded text: what decoding through it adds to decoding the ones before.

    A token ending inside a character adds nothing; the one completing it adds the whole character.
    """
    pieces, previous = [], ""
    for i in range(len(tokens)):
        text = tokenizer.decode(tokens[: i + 1])
        if text.endswith("\ufffd") and i + 1 < len(tokens):
            pieces.append("")
            continue
        pieces.append(text[len(previous):] if text.startswith(previous) else text)
        previous = text
    return pieces


# ---- request bodies -------------------------------------------------------------------------------------

def _utf8(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode text ({e.reason} at position {e.start})") from None
    return text


Text = Annotated[str, AfterValidator(_utf8)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields this server has no use for (user, ...)


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class ChatMessage(_Body):
    role: str
    content: Text | list[TextPart] | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class _Request(_Body):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(0.0, ge=0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(0, ge=0)
    seed: int | None = None
    stop: Text | list[Annotated[Text, Field(min_length=1)]] | None = Field(None, min_length=1)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise RequestError("stop takes at most 4 strings", param="stop")
        return stops


class CompletionRequest(_Request):
    prompt: Text | list[Text] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False


def _text_content(content: str | list[TextPart] | None, where: str) -> str:
    if content is None:
        raise RequestError(f"{where}: content is missing", param="messages")
    return content if isinstance(content, str) else "".join(part.text for part in content)


def chat_instruction(messages: list[ChatMessage]) -> str:
    """The instruction a chat request asks: its last (user) message; see the module docstring."""
    turns = [(m.role, _text_content(m.content, f"messages[{i}]")) for i, m in enumerate(messages)
             if m.role not in ("system", "developer")]
    if len(turns) != 1 or turns[0][0] != "user":
        raise RequestError("this model answers one instruction at a time: send a single user message "
                           "(system messages are ignored)", param="messages")
    return turns[0][1]


# ---- turning requests into jobs and results into OpenAI responses ----------------------------------------

@dataclasses.dataclass
class _Prepared:
    """A validated request: its prompt tokens and job settings, ready to submit."""

    prompt: list[int]
    sampling: SamplingConfig | None
    stops: list[str]


class Server:
    """Validates OpenAI request bodies, runs them on the engine and shapes OpenAI responses."""

    def __init__(self, engine: Engine, limits: Limits = Limits()):
        self.engine = engine
        self.limits = limits
        self.max_prompt_chars = limits.max_prompt_chars or 32 * engine.context
        self.created = int(time.time())

    @property
    def name(self) -> str:
        return self.engine.loaded.name

    @property
    def tokenizer(self):
        return self.engine.loaded.tokenizer

    def models(self) -> dict:
        model = Model(id=self.name, object="model", created=self.created, owned_by="alpacare-jax")
        return {"object": "list", "data": [model.model_dump(mode="json")]}

    def _head(self, prefix: str) -> dict:
        return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": self.name}

    def _check_text(self, text: str, param: str) -> None:
        if len(text) > self.max_prompt_chars:
            raise RequestError(f"{param} has {len(text)} characters; this server takes at most "
                               f"{self.max_prompt_chars}", param=param, code="context_length_exceeded")

    def _prepare(self, request: _Request, prompt: list[int], requested: int | None, *,
                 allow_zero: bool = False) -> _Prepared:
        if request.model not in (None, self.name):
            raise RequestError(f"model {request.model!r} not found; this server serves {self.name!r}",
                               status=404, param="model", code="model_not_found")
        if request.n != 1:
            raise RequestError("only n=1 is supported", param="n")
        if request.top_k > self.engine.vocab_size:
            raise RequestError(f"top_k must be at most the vocabulary size ({self.engine.vocab_size})",
                               param="top_k")
        stops = request.stops()
        limit = min(self.limits.max_tokens_limit or self.engine.context, self.engine.context)
        if requested is None:
            requested = max(1, min(self.limits.max_tokens, limit, self.engine.context - len(prompt)))
        if requested == 0 and not allow_zero:
            raise RequestError("max_tokens must be at least 1 (0 only with echo)", param="max_tokens")
        if requested > limit:
            raise RequestError(f"max_tokens is {requested}; this server allows at most {limit}",
                               param="max_tokens")
        try:
            fit_to_context(prompt, requested, self.engine.context, truncate=False)
        except ContextError as e:
            raise RequestError(str(e), param="max_tokens", code="context_length_exceeded") from None
        sampling = None
        if requested:
            sampling = SamplingConfig(max_new_tokens=requested, temperature=request.temperature, top_p=request.top_p,
                                      top_k=request.top_k, seed=(request.seed or 0) % 2**31)
        return _Prepared(prompt, sampling, stops)

    @staticmethod
    async def _run(job: Job, events: asyncio.Queue, text: TextStream) -> AsyncIterator[str | Finished]:
        """The job's text deltas as decoded, then its `Finished`; stops its decoding at a stop string."""
        try:
            while True:
                event = await events.get()
                if isinstance(event, Failed):
                    raise RequestError(f"decoding failed: {event.message}", status=500)
                if isinstance(event, Finished):
                    delta = text.finish()
                    if delta:
                        yield delta
                    yield event
                    return
                if text.stopped:
                    continue
                delta = text.push(event.ids)
                if text.stopped:
                    job.cancelled = True
                if delta:
                    yield delta
        finally:
            job.cancelled = True  # a client gone mid-stream frees its slot at the next chunk

    def _start(self, prepared: _Prepared, *, strip: bool, logprobs: bool = False) -> _Answer:
        events, emit = _event_queue()
        job = Job(prepared.prompt, prepared.sampling, emit=emit, logprobs=logprobs)
        text = TextStream(self.tokenizer, prepared.stops, strip=strip)
        self.engine.submit(job)
        return _Answer(job, text, self._run(job, events, text))

    def _usage(self, answer: _Answer) -> CompletionUsage:
        prompt, generated = len(answer.job.prompt), answer.finished.completion_tokens
        return CompletionUsage(prompt_tokens=prompt, completion_tokens=generated, total_tokens=prompt + generated)

    # -- chat --

    def chat(self, request: ChatRequest) -> Any:
        if request.logprobs:
            raise RequestError("log-probabilities are served by /v1/completions (logprobs, echo)", param="logprobs")
        instruction = chat_instruction(request.messages)
        self._check_text(instruction, "messages")
        prompt = prompt_ids(self.tokenizer, instruction)
        requested = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        answer = self._start(self._prepare(request, prompt, requested), strip=True)
        head = {**self._head("chatcmpl"), "object": "chat.completion.chunk" if request.stream else "chat.completion"}
        if request.stream:
            return self._stream_chat(request, head, answer)
        return self._whole_chat(head, answer)

    async def _whole_chat(self, head: dict, answer: _Answer) -> dict:
        text = await answer.collect()
        choice = ChatChoice(index=0, message=ChatCompletionMessage(role="assistant", content=text), logprobs=None,
                            finish_reason=answer.finish_reason)
        return ChatCompletion(**head, choices=[choice], usage=self._usage(answer)).model_dump(mode="json",
                                                                                            exclude_unset=True)

    async def _stream_chat(self, request: ChatRequest, head: dict, answer: _Answer) -> AsyncIterator[dict]:
        def chunk(delta: ChoiceDelta, finish_reason=None) -> dict:
            choice = ChunkChoice(index=0, delta=delta, logprobs=None, finish_reason=finish_reason)
            return ChatCompletionChunk(**head, choices=[choice]).model_dump(mode="json", exclude_unset=True)

        yield chunk(ChoiceDelta(role="assistant", content=""))
        async for delta in answer.deltas():
            yield chunk(ChoiceDelta(content=delta))
        yield chunk(ChoiceDelta(), answer.finish_reason)
        if request.stream_options and request.stream_options.include_usage:
            yield ChatCompletionChunk(**head, choices=[], usage=self._usage(answer)).model_dump(mode="json",
                                                                                              exclude_unset=True)

    # -- completions --

    def _completion_prompt(self, request: CompletionRequest) -> tuple[list[int], str]:
        """The prompt's token ids and its text (what `echo` returns)."""
        prompt = request.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise RequestError("one prompt per request", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("prompt must be a non-empty string", param="prompt")
            self._check_text(prompt, "prompt")
            return self.tokenizer.encode(prompt, bos=True), prompt
        if not prompt or any(not 0 <= t < self.engine.vocab_size for t in prompt):
            raise RequestError(f"prompt token ids must be a non-empty list of ids in [0, {self.engine.vocab_size})",
                               param="prompt")
        if len(prompt) > self.engine.context:
            raise RequestError(f"the prompt has {len(prompt)} tokens; the model's context is {self.engine.context}",
                               param="prompt", code="context_length_exceeded")
        return list(prompt), self.tokenizer.decode(prompt)

    def completions(self, request: CompletionRequest) -> Any:
        if request.stream and (request.logprobs is not None or request.echo):
            raise RequestError("echo and logprobs are not served with stream: true", param="stream")
        prompt, prompt_text = self._completion_prompt(request)
        prepared = self._prepare(request, prompt, request.max_tokens, allow_zero=request.echo)
        answer = self._start(prepared, strip=False, logprobs=request.logprobs is not None)
        head = {**self._head("cmpl"), "object": "text_completion"}
        if request.stream:
            return self._stream_completion(request, head, answer)
        return self._whole_completion(request, head, prompt_text, answer)

    async def _whole_completion(self, request: CompletionRequest, head: dict, prompt_text: str,
                                answer: _Answer) -> dict:
        text = await answer.collect()
        logprobs = None
        if request.logprobs is not None:
            logprobs = self._logprobs(answer, request.logprobs, prompt_text if request.echo else None, text)
        choice = CompletionChoice(index=0, text=prompt_text + text if request.echo else text, logprobs=logprobs,
                                  finish_reason=answer.finish_reason)
        return CompletionBody(**head, choices=[choice], usage=self._usage(answer)).model_dump(mode="json",
                                                                                            exclude_unset=True)

    def _logprobs(self, answer: _Answer, top_n: int, echoed: str | None, text: str) -> Logprobs:
        """OpenAI's completion logprobs: with `echo`, the prompt's tokens first (the first one has none),
        then the answer's tokens that begin inside its (stop-cut) text, EOS left out as in the text."""
        scores, prompt = answer.finished.scores, answer.job.prompt
        generated = [t for t in answer.job.generated if t not in self.engine.eos_ids]

        def alternatives(index: int) -> dict[str, float]:
            # Keyed by text, as OpenAI does; tokens that read alike (pieces of one character's bytes) are
            # keyed by their id instead, so that none is lost.
            best: dict[str, float] = {}
            for token, logprob in scores.top[index][:top_n]:
                text = self.tokenizer.decode([token], skip_special_tokens=False)
                best[f"<id:{token}>" if text in best or "\ufffd" in text else text] = logprob
            return best

        tokens, token_logprobs, top, offsets = [], [], [], []
        if echoed is not None:
            offset = 0
            for i, piece in enumerate(token_pieces(self.tokenizer, prompt)):
                tokens.append(piece)
                token_logprobs.append(None if i == 0 else scores.logprobs[i - 1])
                top.append(None if i == 0 else alternatives(i - 1))
                offsets.append(offset)
                offset += len(piece)
        start = 0 if echoed is None else len(echoed)
        offset = 0
        for i, piece in enumerate(token_pieces(self.tokenizer, generated)):
            if answer.text.stopped and offset >= len(text):  # the tokens after a stop string's cut
                break
            index = len(prompt) - 1 + i  # the score of sequence token len(prompt) + i
            tokens.append(piece)
            token_logprobs.append(scores.logprobs[index])
            top.append(alternatives(index))
            offsets.append(start + offset)
            offset += len(piece)
        # Constructed unvalidated: openai's type has no room for the null of the first echoed token, which
        # OpenAI's API itself sends (and its client reads).
        return Logprobs.model_construct(tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top,
                                        text_offset=offsets)

    async def _stream_completion(self, request: CompletionRequest, head: dict,
                                 answer: _Answer) -> AsyncIterator[dict]:
        # openai's CompletionChoice requires a finish_reason, which a chunk before the last has not yet.
        def chunk(text: str, finish_reason=None) -> dict:
            choice = CompletionChoice.model_construct(index=0, text=text, logprobs=None, finish_reason=finish_reason)
            return CompletionBody.model_construct(**head, choices=[choice]).model_dump(mode="json", exclude_unset=True)

        async for delta in answer.deltas():
            yield chunk(delta)
        yield chunk("", answer.finish_reason)
        if request.stream_options and request.stream_options.include_usage:
            yield CompletionBody.model_construct(**head, choices=[], usage=self._usage(answer)).model_dump(
                mode="json", exclude_unset=True)


@dataclasses.dataclass
class _Answer:
    """A submitted job seen from its request: text deltas as they come, then how it finished."""

    job: Job
    text: TextStream
    items: AsyncIterator[str | Finished]
    finished: Finished | None = None

    async def deltas(self) -> AsyncIterator[str]:
        async for item in self.items:
            if isinstance(item, Finished):
                self.finished = item
            else:
                yield item

    async def collect(self) -> str:
        return "".join([delta async for delta in self.deltas()])

    @property
    def finish_reason(self) -> str:
        return "stop" if self.text.stopped else self.finished.finish_reason


# ---- HTTP: the app, the gate in front of it, the connection protocol -------------------------------------

def _error_response(error: RequestError) -> JSONResponse:
    return JSONResponse(error_body(error.status, str(error), error.param, error.code), status_code=error.status)


def _sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    """Server-sent events as OpenAI sends them: `data: {chunk}` each, then `data: [DONE]`."""

    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except RequestError as e:  # the status line is gone: report in the stream, as OpenAI does
            yield f"data: {json.dumps(error_body(e.status, str(e), e.param, e.code))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def create_app(server: Server, *, api_key: str | None = None) -> FastAPI:
    """The FastAPI app of `server`, behind the request gate (API key, body size and time limits)."""
    app = FastAPI(title="AlpaCare-JAX", docs_url=None, redoc_url=None, openapi_url=None)

    async def respond(result: Any) -> Any:
        if isinstance(result, dict):
            return result
        if hasattr(result, "__aiter__"):
            return _sse(result)
        return await result

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict:
        return server.models()

    @app.post("/v1/chat/completions")
    async def chat(request: ChatRequest) -> Any:
        return await respond(server.chat(request))

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest) -> Any:
        return await respond(server.completions(request))

    @app.exception_handler(RequestError)
    async def refused(_: Request, error: RequestError) -> JSONResponse:
        return _error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        where = [str(part) for part in first.get("loc", ()) if part != "body"]
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message = f"the request body is not valid JSON ({first.get('ctx', {}).get('error', message)})"
        elif where:
            message = f"{'.'.join(where)}: {message}"
        return _error_response(RequestError(message, param=where[0] if where else None))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if isinstance(error.__cause__, RecursionError):  # FastAPI's "error parsing the body", explained
            return await too_deep(request, error.__cause__)
        message = f"no route for {request.method} {request.url.path}" if error.status_code in (404, 405) \
            else str(error.detail)
        return _error_response(RequestError(message, status=error.status_code))

    @app.exception_handler(RecursionError)
    async def too_deep(_: Request, error: RecursionError) -> JSONResponse:
        # Only a request's own nesting recurses this deep (json's parser, pydantic's validation): the
        # client's error, not the server's.
        return _error_response(RequestError("the request body's JSON is nested too deeply", code="invalid_json"))

    @app.exception_handler(Exception)
    async def crashed(_: Request, error: Exception) -> JSONResponse:
        log.exception("request failed")
        return _error_response(RequestError(f"{type(error).__name__}: {error}", status=500))

    app.add_middleware(RequestGate, api_key=api_key, max_body_bytes=server.limits.max_body_bytes,
                       read_timeout=server.limits.read_timeout)
    return app


class RequestGate:
    """ASGI middleware deciding from the request head, before the app reads any of the body:

    * the API key (a bearer token, compared in constant time) on `/v1/...`: 401;
    * a declared `Content-Length` over `max_body_bytes`: 413;
    then it reads the body itself, within `max_body_bytes` (413, also for chunked bodies) and
    `read_timeout` seconds for the whole of it (408), and hands the app the body it read. Refusals
    close the connection, since the rest of an unread body cannot be told from a next request.
    """

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, read_timeout: float):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.read_timeout = read_timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])  # lower-cased names, as the ASGI spec gives them
        if self.expected is not None and scope["path"].startswith("/v1"):
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                return await _refuse(send, RequestError("missing or incorrect API key (send Authorization: Bearer "
                                                        "<key>)", status=401, code="invalid_api_key"))
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit():  # h11 refuses these first; kept so the gate holds under any server
            return await _refuse(send, RequestError("Content-Length must be a non-negative integer"))
        if int(declared) > self.max_body_bytes:
            return await _refuse(send, _too_large(self.max_body_bytes))
        body = await self._read_body(receive, send)
        if body is None:
            return None
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: only the client's disconnect

        return await self.app(scope, replay, send)

    async def _read_body(self, receive, send) -> bytes | None:
        """The whole body, or None once a refusal was sent (or the client left)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.read_timeout
        parts, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:  # the builtin TimeoutError only from Python 3.11 on
                await _refuse(send, RequestError(f"the request body did not arrive within {self.read_timeout:g} s",
                                                 status=408, code="request_timeout"))
                return None
            if message["type"] == "http.disconnect":
                return None
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > self.max_body_bytes:
                await _refuse(send, _too_large(self.max_body_bytes))
                return None
            if not message.get("more_body", False):
                return b"".join(parts)


def _too_large(limit: int) -> RequestError:
    return RequestError(f"the request body exceeds this server's limit of {limit} bytes", status=413,
                        code="request_too_large")


async def _refuse(send, error: RequestError) -> None:
    body = json.dumps(error_body(error.status, str(error), error.param, error.code)).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def _raw_response(status: int, reason: str, error: RequestError) -> bytes:
    body = json.dumps(error_body(status, str(error), error.param, error.code)).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")
    return head.encode() + body


def protocol_class(head_timeout: float) -> type[H11Protocol]:
    """uvicorn's HTTP/1.1 protocol, with a deadline for request heads and OpenAI-style errors for bad HTTP.

    uvicorn waits for a request head as long as the client likes (its keep-alive timer restarts with
    every byte), so a client dripping or stalling mid-head would hold its connection forever: here a
    head must be complete within `head_timeout` seconds of the connection (or of the previous response),
    or the client gets a 408 and the connection is closed (one that never sent a byte is just closed).
    """

    class Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_head_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_head_timer()

        def connection_lost(self, exc) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(head_timeout, self._head_timed_out)

        def _head_timed_out(self) -> None:
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return  # a request is being read or answered: the gate's deadline covers its body
            if self.conn.trailing_data[0]:  # part of a head came, never the rest
                self.transport.write(_raw_response(408, "Request Timeout", RequestError(
                    f"the request head did not arrive within {head_timeout:g} s", status=408,
                    code="request_timeout")))
                self.transport.close()
            elif self.cycle is None:  # connected, never sent a byte
                self.transport.close()
            # else: idle between requests, which uvicorn's keep-alive timeout ends

        def send_400_response(self, msg: str) -> None:
            self.transport.write(_raw_response(400, "Bad Request", RequestError(
                "malformed HTTP request (request line, header or Content-Length)", code="invalid_http")))
            self.transport.close()

    return Protocol


# ---- command line ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    import uvicorn

    defaults = Limits()
    parser = argparse.ArgumentParser(prog="python -m alpacare_jax.infer.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF model directory or training workdir")
    parser.add_argument("--name", default=None, help="model id clients send (default: the directory's name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    parser.add_argument("--max_batch", type=int, default=8, help="requests decoded together at most")
    parser.add_argument("--chunk_tokens", type=int, default=8,
                        help="tokens decoded between two streamed chunks")
    parser.add_argument("--max_tokens", type=int, default=defaults.max_tokens,
                        help="new tokens when a request does not say (capped by the context)")
    parser.add_argument("--max_tokens_limit", type=int, default=None,
                        help="the most new tokens a request may ask for (default: the context)")
    parser.add_argument("--max_body_bytes", type=int, default=defaults.max_body_bytes,
                        help="larger request bodies get 413 before being read")
    parser.add_argument("--max_prompt_chars", type=int, default=None,
                        help="longer prompts get 400 before tokenizing (default: 32 per context position)")
    parser.add_argument("--read_timeout", type=float, default=defaults.read_timeout,
                        help="seconds a client has to send a request head, then its body (else 408)")
    from alpacare_jax.infer.cli import add_model_flags, setup_logging

    add_model_flags(parser)
    args = parser.parse_args(argv)
    setup_logging()
    from alpacare_jax.infer.loading import load_model

    try:
        loaded = load_model(args.model, step=args.step, dtype=args.dtype, name=args.name)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    limits = Limits(max_tokens=args.max_tokens, max_tokens_limit=args.max_tokens_limit,
                    max_body_bytes=args.max_body_bytes, max_prompt_chars=args.max_prompt_chars,
                    read_timeout=args.read_timeout)
    engine = Engine(loaded, max_batch=args.max_batch, chunk_tokens=args.chunk_tokens)
    engine.run_sync(prompt_ids(loaded.tokenizer, "Hello"), SamplingConfig(max_new_tokens=2))  # compile now
    api_key = os.environ.get(API_KEY_ENV) or None
    app = create_app(Server(engine, limits), api_key=api_key)
    # Bound and listening before the line is printed: a client that reads it can connect at once.
    sock = socket.create_server((args.host, args.port), backlog=1024)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, http=protocol_class(args.read_timeout), ws="none", lifespan="off",
                            log_level="warning", access_log=False, timeout_keep_alive=5)
    print(f"serving {loaded.name} at http://{host}:{port}/v1", flush=True)
    log.info("API key %s", f"required ({API_KEY_ENV})" if api_key else f"not required ({API_KEY_ENV} unset)")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
