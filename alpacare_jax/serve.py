"""Serve a trained model over an OpenAI-compatible HTTP API (KV-cache decoding, concurrent requests batched):

    python -m alpacare_jax.serve --model=HF_DIR_OR_WORKDIR [--host=127.0.0.1] [--port=8000]

Endpoints: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`, `GET /health`, so the
official `openai` client (`base_url="http://HOST:PORT/v1"`) and other OpenAI tools work unchanged.

* Chat: the model was tuned on single Alpaca instructions, so the last message, which must come from
  the user, becomes the instruction of the training prompt (no input); system and developer messages
  are ignored (the Alpaca preamble plays their part); earlier user or assistant turns are refused
  (400), since silently dropping them would answer a different question.
* Completions: the prompt is continued as given (BOS prepended, no template): send your own
  `format_prompt(...)` text there, or anything else.
* Honoured: `max_tokens` / `max_completion_tokens` (default: up to `--max_tokens`, within the context),
  `temperature` (default 0: greedy, as in evaluation; OpenAI's default is 1), `top_p`, `top_k` (an
  extension, as in vLLM), `seed`, `stop` (a string or up to 4: the text is cut before the first one,
  `finish_reason` "stop"). `n` must be 1. `usage` counts prompt tokens and the tokens generated (EOS
  included; a `stop` cut happens after generation and does not reduce it).
* `stream: true` answers with server-sent events as OpenAI does (chunks, then `data: [DONE]`;
  `stream_options.include_usage` adds the usage chunk), so clients that always stream work. The decoder
  runs the whole answer in one compiled loop, so the text arrives as one chunk when decoding ends.
* API key: when the variable ALPACARE_SERVE_API_KEY is set, every `/v1/...` request must send
  `Authorization: Bearer <key>` (the `openai` client's `api_key`); others get 401. Unset: no check, so
  keep the default `--host=127.0.0.1` then. The key is never logged.

Requests arriving while the model is busy wait in a queue; the next batch takes up to `--max_batch`
of them that share a sampling rule and `max_tokens`, and decodes them together. The standard library
HTTP server (one thread per connection) is enough here: decoding, not HTTP, is the bottleneck.
"""

from __future__ import annotations

import argparse
import dataclasses
import hmac
import json
import logging
import os
import queue
import sys
import threading
import time
import uuid
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from alpacare_jax.inference import Completion, ContextError, complete, fit_to_context, instruction_prompt
from alpacare_jax.model import SamplingConfig

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 512
API_KEY_ENV = "ALPACARE_SERVE_API_KEY"


class RequestError(ValueError):
    """A request the server refuses; becomes an OpenAI-style error body with `status`."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


@dataclasses.dataclass
class _Job:
    prompt: list[int]
    sampling: SamplingConfig
    future: Future = dataclasses.field(default_factory=Future)

    @property
    def group(self) -> SamplingConfig:
        """Jobs with equal groups decode in one batch (the seed is taken from the batch's first job)."""
        return dataclasses.replace(self.sampling, seed=0)


class Engine:
    """Owns the model; one worker thread decodes queued jobs in batches, so JAX runs one program at a time."""

    def __init__(self, loaded, *, max_batch: int = 8):
        self.loaded = loaded
        self.max_batch = max_batch
        self._queue: queue.Queue[_Job] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="decode", daemon=True)
        self._thread.start()

    @property
    def context(self) -> int:
        return self.loaded.model.config.max_position_embeddings

    def submit(self, prompt: list[int], sampling: SamplingConfig) -> Completion:
        job = _Job(prompt, sampling)
        self._queue.put(job)
        return job.future.result()

    def _next_batch(self, waiting: list[_Job]) -> list[_Job]:
        if not waiting:
            waiting.append(self._queue.get())
        while True:  # everything that arrived meanwhile
            try:
                waiting.append(self._queue.get_nowait())
            except queue.Empty:
                break
        group = waiting[0].group
        batch = [j for j in waiting if j.group == group][: self.max_batch]
        for job in batch:
            waiting.remove(job)
        return batch

    def _run(self) -> None:
        waiting: list[_Job] = []
        while True:
            batch = self._next_batch(waiting)
            try:
                results = complete(self.loaded.model, self.loaded.tokenizer, [j.prompt for j in batch],
                                   batch[0].sampling, truncate=False)
            except Exception as e:  # noqa: BLE001 (the waiting handlers report it; the worker lives on)
                log.exception("decoding a batch of %d failed", len(batch))
                for job in batch:
                    job.future.set_exception(e)
                continue
            for job, result in zip(batch, results):
                job.future.set_result(result)


# ---- request handling -----------------------------------------------------------------------------------

def _text_content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"{where}: only text content parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(f"{where}: content must be a string or a list of text parts", param="messages")


def chat_instruction(messages: Any) -> str:
    """The instruction a chat request asks: its last (user) message; see the module docstring."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", param="messages")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise RequestError(f"messages[{i}] must be an object with a role", param="messages")
        if message["role"] in ("system", "developer"):
            continue
        turns.append((message["role"], _text_content(message.get("content"), f"messages[{i}]")))
    if len(turns) != 1 or turns[0][0] != "user":
        raise RequestError("this model answers one instruction at a time: send a single user message "
                           "(system messages are ignored)", param="messages")
    return turns[0][1]


def _number(body: dict, name: str, kind: type, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise RequestError(f"{name} must be a {kind.__name__}", param=name)
    return kind(value)


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise RequestError("stop must be a non-empty string or a list of up to 4 of them", param="stop")
    return stops


def apply_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` cut before the earliest stop string, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


class Server:
    """Turns OpenAI request bodies into engine jobs and results into OpenAI response bodies."""

    def __init__(self, engine: Engine, *, max_tokens: int = DEFAULT_MAX_TOKENS):
        self.engine = engine
        self.max_tokens = max_tokens
        self.created = int(time.time())

    @property
    def name(self) -> str:
        return self.engine.loaded.name

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                            "owned_by": "alpacare-jax"}]}

    def _run(self, body: dict, prompt: list[int]) -> tuple[Completion, str, str]:
        if body.get("model") not in (None, self.name):
            raise RequestError(f"model {body.get('model')!r} not found; this server serves {self.name!r}",
                               status=404, param="model", code="model_not_found")
        if _number(body, "n", int, 1) != 1:
            raise RequestError("only n=1 is supported", param="n")
        if not isinstance(body.get("stream_options") or {}, dict):
            raise RequestError("stream_options must be an object", param="stream_options")
        stops = _stops(body)
        room = self.engine.context - len(prompt)
        max_tokens = _number(body, "max_completion_tokens", int, _number(body, "max_tokens", int, None))
        if max_tokens is None:
            max_tokens = max(1, min(self.max_tokens, room))
        try:
            sampling = SamplingConfig(max_new_tokens=max_tokens, temperature=_number(body, "temperature", float, 0.0),
                                      top_p=_number(body, "top_p", float, 1.0), top_k=_number(body, "top_k", int, 0),
                                      seed=_number(body, "seed", int, 0) % 2**31)
        except ValueError as e:
            raise RequestError(str(e)) from None
        try:
            fit_to_context(prompt, max_tokens, self.engine.context, truncate=False)
        except ContextError as e:
            raise RequestError(str(e), param="max_tokens", code="context_length_exceeded") from None
        completion = self.engine.submit(prompt, sampling)
        text, stopped = apply_stop(completion.text, stops)
        return completion, text, "stop" if stopped else completion.finish_reason

    def _head(self, kind: str, prefix: str) -> dict:
        return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": kind, "created": int(time.time()),
                "model": self.name}

    def _envelope(self, kind: str, prefix: str, completion: Completion, choice: dict) -> dict:
        return {**self._head(kind, prefix), "choices": [choice], "usage": _usage(completion)}

    def _chunks(self, kind: str, prefix: str, body: dict, completion: Completion, *choices: dict) -> list[dict]:
        """The server-sent events of a streamed answer: one chunk per choice, then usage if asked for."""
        head = self._head(kind, prefix)
        chunks = [{**head, "choices": [choice]} for choice in choices]
        if (body.get("stream_options") or {}).get("include_usage"):
            chunks.append({**head, "choices": [], "usage": _usage(completion)})
        return chunks

    def chat(self, body: dict) -> dict | list[dict]:
        tokenizer = self.engine.loaded.tokenizer
        prompt = instruction_prompt(tokenizer, chat_instruction(body.get("messages")))
        completion, text, finish = self._run(body, prompt)
        text = text.strip()
        if body.get("stream"):
            return self._chunks(
                "chat.completion.chunk", "chatcmpl", body, completion,
                {"index": 0, "delta": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": None},
                {"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish})
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish}
        return self._envelope("chat.completion", "chatcmpl", completion, choice)

    def completions(self, body: dict) -> dict:
        prompt_text = body.get("prompt")
        if isinstance(prompt_text, list) and len(prompt_text) == 1:
            prompt_text = prompt_text[0]
        if not isinstance(prompt_text, str) or not prompt_text:
            raise RequestError("prompt must be a non-empty string (one prompt per request)", param="prompt")
        prompt = self.engine.loaded.tokenizer.encode(prompt_text, bos=True)
        completion, text, finish = self._run(body, prompt)
        if body.get("stream"):
            return self._chunks("text_completion", "cmpl", body, completion,
                                {"index": 0, "text": text, "logprobs": None, "finish_reason": None},
                                {"index": 0, "text": "", "logprobs": None, "finish_reason": finish})
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return self._envelope("text_completion", "cmpl", completion, choice)


def _usage(completion: Completion) -> dict:
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens}


def make_handler(server: Server, api_key: str | None = None) -> type[BaseHTTPRequestHandler]:
    """The request handler; with `api_key`, `/v1/...` requests must carry it as a bearer token."""
    routes_post = {"/v1/chat/completions": server.chat, "/v1/completions": server.completions}
    routes_get = {"/v1/models": server.models, "/health": lambda: {"status": "ok"}}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("%s " + fmt, self.address_string(), *args)

        def _send(self, status: int, payload: dict | list[dict]) -> None:
            if isinstance(payload, list):  # a streamed answer: server-sent events
                events = [f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n" for chunk in payload]
                data, content_type = "".join([*events, "data: [DONE]\n\n"]).encode(), "text/event-stream"
            else:
                data, content_type = json.dumps(payload, ensure_ascii=False).encode(), "application/json"
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _refused(self) -> bool:
            """Answers 401 (and says so) when an API key is required and this request lacks it."""
            if api_key is None or not self.path.startswith("/v1"):
                return False
            sent = self.headers.get("Authorization", "").encode()
            if hmac.compare_digest(sent, f"Bearer {api_key}".encode()):
                return False
            self._error(RequestError("missing or incorrect API key (send Authorization: Bearer <key>)",
                                     status=401, code="invalid_api_key"))
            return True

        def _error(self, error: RequestError) -> None:
            kind = "invalid_request_error" if error.status < 500 else "server_error"
            self._send(error.status, {"error": {"message": str(error), "type": kind, "param": error.param,
                                                "code": error.code}})

        def do_GET(self) -> None:  # noqa: N802
            if self._refused():
                return
            route = routes_get.get(self.path.split("?")[0].rstrip("/"))
            if route is None:
                return self._error(RequestError(f"no route for GET {self.path}", status=404))
            self._send(200, route())

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if self._refused():
                return
            route = routes_post.get(self.path.split("?")[0].rstrip("/"))
            if route is None:
                return self._error(RequestError(f"no route for POST {self.path}", status=404))
            try:
                body = json.loads(raw or b"null")
                if not isinstance(body, dict):
                    raise RequestError("the request body must be a JSON object")
                self._send(200, route(body))
            except json.JSONDecodeError as e:
                self._error(RequestError(f"the request body is not JSON ({e.msg})"))
            except RequestError as e:
                self._error(e)
            except Exception as e:  # noqa: BLE001 (report it to the client; keep serving)
                log.exception("request failed")
                self._error(RequestError(f"{type(e).__name__}: {e}", status=500))

    return Handler


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alpacare_jax.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF model directory or training workdir")
    parser.add_argument("--name", default=None, help="model id clients send (default: the directory's name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    parser.add_argument("--max_batch", type=int, default=8, help="requests decoded together at most")
    parser.add_argument("--max_tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        help="new tokens when a request does not say (capped by the context)")
    from alpacare_jax.generate import add_model_flags, setup_logging

    add_model_flags(parser)
    args = parser.parse_args(argv)
    setup_logging()
    from alpacare_jax.loading import load_model

    try:
        loaded = load_model(args.model, step=args.step, dtype=args.dtype, name=args.name)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    engine = Engine(loaded, max_batch=args.max_batch)
    engine.submit(instruction_prompt(loaded.tokenizer, "Hello"), SamplingConfig(max_new_tokens=1))  # compile now
    api_key = os.environ.get(API_KEY_ENV) or None
    httpd = _HTTPServer((args.host, args.port),
                        make_handler(Server(engine, max_tokens=args.max_tokens), api_key=api_key))
    host, port = httpd.server_address[:2]
    print(f"serving {loaded.name} at http://{host}:{port}/v1", flush=True)
    log.info("API key %s", f"required ({API_KEY_ENV})" if api_key else f"not required ({API_KEY_ENV} unset)")
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
