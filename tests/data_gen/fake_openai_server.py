"""A small but real OpenAI-compatible HTTP server for tests and benchmarks.

It speaks the subset of the OpenAI REST API that ``data_gen`` uses, over real HTTP on
127.0.0.1, so the official ``openai`` client can talk to it through ``base_url``:

* ``POST /v1/chat/completions`` with ``usage`` and ``finish_reason`` (``length`` when the
  scripted answer does not fit in ``max_tokens``);
* ``POST /v1/files``, ``GET /v1/files/{id}``, ``GET /v1/files/{id}/content``;
* ``POST /v1/batches``, ``GET /v1/batches/{id}`` (batches run in a background thread; with
  ``hold_batches`` each waits, ``in_progress``, until ``release_batches()``, so a test can act while
  a batch is known to be unfinished; ``batch_polls`` counts the retrievals of each batch);
* ``GET /_stats`` and ``GET /_ledger``: what was billed, for assertions.

Faults are scripted by probability with a seeded RNG: 429 with ``retry-after-ms``, 500,
timeouts (the server sleeps past the client's timeout and bills nothing) and malformed
200 bodies. A server-side requests-per-minute limit answers 429 when exceeded.

The answers are deterministic functions of the prompt, recognisable by tests:
instruction-generation prompts (they mention ``Instruction:`` and ``###``) get tasks in the
``###`` format, judge prompts (``Output (a)``/``Output (b)``) get a verdict (the longer
output wins, or the reply of a ``judge(output_a, output_b)`` function a test gives), contextual
prompts (they end with ``Context:``) get a context in the layout ``contexts`` parses,
supporting the option a ``context_rule`` picks, anything else gets an answer whose length is
derived from a hash. A token is a word. Servers seen in use are imitated by options:
``truncate_all`` (every reply cut off, ``finish_reason: "length"``) and ``usage=False`` (no
``usage`` in the body). The ledger records each billed request's ``max_tokens``.

``request_check`` sees the body of every chat request (live and batch) before it is
answered; an ``AssertionError`` it raises is kept in ``violations`` (a live request then
gets a 400). ``PrivacyGuard`` is such a check.

Run standalone (benchmarks): ``python fake_openai_server.py --latency 0.05 --rpm 6000``
prints ``PORT <n>`` and serves until killed or ``--lifetime`` seconds pass.
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import hashlib
import json
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REQUEST_ID_HEADER = "X-Data-Gen-Request-Id"
RUN_ID_HEADER = "X-Data-Gen-Run"


@dataclass
class Faults:
    """Probabilities of injected faults on chat completions (live calls only)."""

    p429: float = 0.0
    retry_after_ms: int = 50
    p500: float = 0.0
    ptimeout: float = 0.0
    timeout_sleep: float = 2.0
    pmalformed: float = 0.0
    seed: int = 0


def _words(text: str) -> list[str]:
    return text.split()


def _h(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


TOPICS = ["Cardiology", "Neurology", "Oncology", "Pharmacology", "Pediatrics", "Dermatology",
          "Endocrinology", "Infectious disease", "Nephrology", "Psychiatry"]
VIEWS = ["Student", "Physician", "Patient", "Nurse", "Researcher"]
TYPES = ["Open Q&A", "Multiple choice", "Summarization", "Text generation", "Classification"]
VERBS = ["Explain", "Describe", "Summarize", "List", "Compare", "Outline", "Discuss", "Identify"]
THINGS = ["the first-line treatment of", "the pathophysiology of", "common complications of",
          "the diagnostic criteria for", "risk factors for", "patient education about",
          "the differential diagnosis of", "drug interactions relevant to"]
DISEASES = ["type 2 diabetes", "asthma", "atrial fibrillation", "migraine", "sepsis", "psoriasis",
            "chronic kidney disease", "major depression", "hypothyroidism", "tuberculosis",
            "heart failure", "multiple sclerosis", "gout", "anemia", "pneumonia", "lupus"]


def fake_tasks(prompt: str, n: int) -> str:
    """Deterministic pseudo-random tasks in the ``###`` block format."""
    rng = random.Random(_h(prompt))
    blocks = []
    for _ in range(n):
        instr = (f"{rng.choice(VERBS)} {rng.choice(THINGS)} {rng.choice(DISEASES)} in a "
                 f"{rng.randint(18, 90)}-year-old patient.")
        inp = "<noinput>" if rng.random() < 0.6 else (
            f"Lab results: HbA1c {rng.randint(50, 120) / 10}%, eGFR {rng.randint(20, 110)}.")
        blocks.append(
            f"Type: {rng.choice(TYPES)}\nTopic: {rng.choice(TOPICS)}\nView: {rng.choice(VIEWS)}\n"
            f"Difficulty: {rng.randint(1, 5)}\nInstruction: {instr}\nInput: {inp}")
    return "###\n" + "\n###\n".join(blocks) + "\n###"


# context_rule(keywords, options) -> index of the option the written context supports, or None.
ContextRule = Callable[[list[str], list[str]], "int | None"]
MALFORMED_MARK = "[malformed]"  # a keyword with this mark gets a reply missing its option lines


def default_context_rule(keywords: list[str], options: list[str]) -> int | None:
    return _h("|".join(keywords)) % len(options)


def parse_context_prompt(text: str) -> tuple[list[str], list[str]]:
    """(keywords, options) of the last question in a contextual prompt (after the demonstrations)."""
    query = text.rsplit("Question Keywords:", 1)[1]
    kw_line, rest = query.split("\nCandidate Answers:", 1)
    answers = rest.rsplit("\nContext:", 1)[0]
    options = [o.strip() for o in re.split(r"\(([a-j])\)\s", answers)[2::2]]
    return [k.strip() for k in kw_line.split(",") if k.strip()], options


def fake_context(text: str, rule: ContextRule | None) -> str:
    """A context in the layout ``data_gen.contexts`` parses; the option ``rule`` picks is 'supported'."""
    keywords, options = parse_context_prompt(text)
    pick = (rule or default_context_rule)(keywords, options)
    shown = ", ".join(keywords) or "none"
    overall = f"Overall: The keywords ({shown}) describe the case."
    if pick is not None:
        overall += f" They point to {options[pick]}."
    lines = [overall]
    for i, o in enumerate(options):
        verdict = ("supported: it is the established explanation of these findings" if i == pick
                   else "not supported: it is not associated with these findings")
        lines.append(f"({'abcdefghij'[i]}) {o}: This answer is {verdict}.")
    if any(MALFORMED_MARK in k for k in keywords):
        lines = lines[:1] + lines[3:]  # options (a) and (b) missing
    label = f"({'abcdefghij'[pick]})" if pick is not None else "uncertain"
    return "\n".join(lines + [f"Preliminary answer: {label}"])


_JUDGE_OUTPUTS = re.compile(r"## Output \(a\)\n(?P<a>.*?)\n\n## Output \(b\)\n(?P<b>.*?)\n\n## Your verdict", re.DOTALL)
JudgeFn = Callable[[str, str], str]  # (output a, output b) as shown to the judge -> the judge's reply


def fake_answer(messages: list[dict], max_tokens: int | None, judge: JudgeFn | None = None,
                truncate_all: bool = False, context_rule: ContextRule | None = None) -> tuple[str, str]:
    """(content, finish_reason) for a chat request."""
    text = "\n".join(str(m.get("content", "")) for m in messages)
    shown = _JUDGE_OUTPUTS.search(text)
    if judge is not None and shown:
        content = judge(shown.group("a"), shown.group("b"))
    elif "Question Keywords:" in text and text.rstrip().endswith("Context:"):
        content = fake_context(text, context_rule)
    elif "Output (a)" in text and "Output (b)" in text:
        a = text.split("Output (a)", 1)[1].split("Output (b)", 1)[0]
        b = text.split("Output (b)", 1)[1].split("\n## ", 1)[0]
        verdict = "Tie" if len(a) == len(b) else ("Output (a)" if len(a) > len(b) else "Output (b)")
        content = verdict
    elif "Instruction:" in text and "###" in text:
        m = re.search(r"(\d+) new tasks", text)
        content = fake_tasks(text, int(m.group(1)) if m else 5)
    else:
        n = 20 + _h(text) % 40
        first = _words(text)[:6]
        content = " ".join(["Answer:"] + first + [f"w{i}" for i in range(n)]) + "."
    words = _words(content)
    if max_tokens is not None and len(words) > max_tokens:
        return " ".join(words[:max_tokens]), "length"
    return content, "length" if truncate_all else "stop"


def completion_body(body: dict, judge: JudgeFn | None = None, truncate_all: bool = False,
                    usage: bool = True, context_rule: ContextRule | None = None) -> dict:
    messages = body.get("messages", [])
    content, finish = fake_answer(messages, body.get("max_tokens") or body.get("max_completion_tokens"), judge,
                                  truncate_all, context_rule)
    prompt_tokens = sum(len(_words(str(m.get("content", "")))) for m in messages)
    out = {
        "id": "chatcmpl-" + uuid.uuid4().hex[:20],
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "unknown"),
        "choices": [{"index": 0, "finish_reason": finish,
                     "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(_words(content)),
                  "total_tokens": prompt_tokens + len(_words(content))},
    }
    if not usage:
        del out["usage"]
    return out


@dataclass
class _Bucket:
    """Server-side requests-per-minute limit: a token bucket holding one second of requests."""

    rpm: float
    tokens: float = 0.0
    last: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.tokens = max(1.0, self.rpm / 60.0)

    def take(self) -> bool:
        now = time.monotonic()
        cap = max(1.0, self.rpm / 60.0)
        self.tokens = min(cap, self.tokens + (now - self.last) * self.rpm / 60.0)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class FakeOpenAI:
    """The server: start() in a daemon thread, stop() (or let ``lifetime`` expire)."""

    def __init__(self, *, latency: float = 0.0, rpm: float | None = None,
                 faults: Faults | None = None, lifetime: float = 300.0, batch_delay: float = 0.2,
                 require_key: str | None = None, judge: JudgeFn | None = None, truncate_all: bool = False,
                 usage: bool = True, context_rule: ContextRule | None = None,
                 request_check: Callable[[dict], None] | None = None, hold_batches: bool = False):
        self.latency = latency
        self.judge, self.truncate_all, self.usage = judge, truncate_all, usage
        self.require_key = require_key  # when set, other keys get 401
        self.faults = faults or Faults()
        self.lifetime = lifetime
        self.batch_delay = batch_delay
        self._batches_released = threading.Event()
        if not hold_batches:
            self._batches_released.set()
        self.batch_polls: dict[str, int] = {}  # batch id -> GET /v1/batches/{id} answered
        self.context_rule = context_rule
        self.request_check = request_check
        self.violations: list[str] = []  # AssertionErrors raised by request_check
        self.checked = 0  # chat requests request_check has passed or failed
        self._bucket = _Bucket(rpm) if rpm else None
        self._rng = random.Random(self.faults.seed)
        self._lock = threading.Lock()
        self.ledger: list[dict] = []  # one entry per chat request answered (any status)
        self.files: dict[str, dict] = {}
        self.batches: dict[str, dict] = {}
        self.seen_auth: list[str] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._timer: threading.Timer | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self, port: int = 0) -> str:
        server = self

        class Handler(_Handler):
            fake = server

        self._httpd = _Server(("127.0.0.1", port), Handler)
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        self._timer = threading.Timer(self.lifetime, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self.base_url

    @property
    def port(self) -> int:
        assert self._httpd is not None
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        if self._timer:
            self._timer.cancel()
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FakeOpenAI:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ accounting
    def record(self, **entry) -> None:
        with self._lock:
            self.ledger.append(entry)

    def stats(self) -> dict:
        with self._lock:
            out: dict[str, int] = {}
            for e in self.ledger:
                out[e["status"]] = out.get(e["status"], 0) + 1
            out["billed"] = sum(1 for e in self.ledger if e["status"] == "ok")
            return out

    def completion(self, body: dict) -> dict:
        return completion_body(body, self.judge, self.truncate_all, self.usage, self.context_rule)

    def draw_fault(self) -> str | None:
        f = self.faults
        with self._lock:
            r = self._rng.random()
        for name, p in (("429", f.p429), ("500", f.p500), ("timeout", f.ptimeout), ("malformed", f.pmalformed)):
            if r < p:
                return name
            r -= p
        return None

    def rate_limited(self) -> bool:
        if self._bucket is None:
            return False
        with self._lock:
            return not self._bucket.take()

    def check(self, body: dict) -> bool:
        """Run ``request_check`` on a chat request body; False (and the reason kept) if it fails."""
        if self.request_check is None:
            return True
        try:
            self.request_check(body)
            return True
        except AssertionError as e:
            with self._lock:
                self.violations.append(str(e))
            return False
        finally:
            with self._lock:
                self.checked += 1

    # ------------------------------------------------------------------ batches
    def release_batches(self) -> None:
        """Let held batches (``hold_batches=True``) run to completion."""
        self._batches_released.set()

    def run_batch(self, batch_id: str) -> None:
        time.sleep(self.batch_delay)
        batch = self.batches[batch_id]
        batch["status"] = "in_progress"
        self._batches_released.wait(self.lifetime)
        lines = self.files[batch["input_file_id"]]["content"].decode().splitlines()
        out_lines = []
        for line in lines:
            if not line.strip():
                continue
            req = json.loads(line)
            self.check(req["body"])
            body = self.completion(req["body"])
            self.record(request_id=req["custom_id"], run="batch", status="ok", kind="batch",
                        max_tokens=req["body"].get("max_tokens"))
            out_lines.append(json.dumps({
                "id": "batch_req_" + uuid.uuid4().hex[:12], "custom_id": req["custom_id"],
                "response": {"status_code": 200, "request_id": uuid.uuid4().hex, "body": body},
                "error": None}))
        time.sleep(self.batch_delay)
        fid = self.add_file(("\n".join(out_lines) + "\n").encode(), "batch_output", "output.jsonl")
        batch.update(status="completed", output_file_id=fid, completed_at=int(time.time()),
                     request_counts={"total": len(out_lines), "completed": len(out_lines), "failed": 0})

    def add_file(self, content: bytes, purpose: str, filename: str) -> str:
        fid = "file-" + uuid.uuid4().hex[:16]
        self.files[fid] = {"content": content, "purpose": purpose, "filename": filename,
                           "created_at": int(time.time())}
        return fid

    def file_object(self, fid: str) -> dict:
        f = self.files[fid]
        return {"id": fid, "object": "file", "bytes": len(f["content"]), "created_at": f["created_at"],
                "filename": f["filename"], "purpose": f["purpose"], "status": "processed"}


class _Server(ThreadingHTTPServer):
    request_queue_size = 512  # the default listen backlog of 5 drops bursts of connections
    daemon_threads = True


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeOpenAI

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def _send(self, status: int, payload: bytes | dict | str, headers: dict | None = None,
              ctype: str = "application/json") -> None:
        if isinstance(payload, dict):
            payload = json.dumps(payload).encode()
        elif isinstance(payload, str):
            payload = payload.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(payload)

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _error(self, status: int, message: str, headers: dict | None = None) -> None:
        self._send(status, {"error": {"message": message, "type": "fake_error", "code": None}}, headers)

    # ------------------------------------------------------------------ routes
    def do_GET(self) -> None:  # noqa: N802
        fake = self.fake
        path = self.path.split("?")[0]
        if path == "/_stats":
            return self._send(200, fake.stats())
        if path == "/_ledger":
            with fake._lock:
                return self._send(200, {"ledger": list(fake.ledger)})
        m = re.fullmatch(r"/v1/files/([\w-]+)(/content)?", path)
        if m and m.group(1) in fake.files:
            if m.group(2):
                return self._send(200, fake.files[m.group(1)]["content"], ctype="application/octet-stream")
            return self._send(200, fake.file_object(m.group(1)))
        m = re.fullmatch(r"/v1/batches/([\w-]+)", path)
        if m and m.group(1) in fake.batches:
            with fake._lock:
                fake.batch_polls[m.group(1)] = fake.batch_polls.get(m.group(1), 0) + 1
            return self._send(200, fake.batches[m.group(1)])
        self._error(404, f"no route for GET {path}")

    def do_POST(self) -> None:  # noqa: N802
        fake = self.fake
        path = self.path.split("?")[0]
        raw = self._body()
        auth = self.headers.get("Authorization", "")
        fake.seen_auth.append(auth)
        if fake.require_key is not None and auth != f"Bearer {fake.require_key}":
            return self._error(401, "Incorrect API key provided.")
        if path == "/v1/chat/completions":
            return self._chat(raw)
        if path == "/v1/files":
            return self._upload(raw)
        if path == "/v1/batches":
            req = json.loads(raw)
            if req.get("input_file_id") not in fake.files:
                return self._error(400, "unknown input_file_id")
            bid = "batch_" + uuid.uuid4().hex[:16]
            fake.batches[bid] = {
                "id": bid, "object": "batch", "endpoint": req.get("endpoint"), "errors": None,
                "input_file_id": req["input_file_id"], "completion_window": req.get("completion_window", "24h"),
                "status": "validating", "output_file_id": None, "error_file_id": None,
                "created_at": int(time.time()), "metadata": req.get("metadata"),
                "request_counts": {"total": 0, "completed": 0, "failed": 0}}
            threading.Thread(target=fake.run_batch, args=(bid,), daemon=True).start()
            return self._send(200, fake.batches[bid])
        self._error(404, f"no route for POST {path}")

    def _upload(self, raw: bytes) -> None:
        ctype = self.headers.get("Content-Type", "")
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {ctype}\r\n\r\n".encode() + raw)
        fields: dict[str, tuple[bytes, str | None]] = {}
        for part in msg.iter_parts():
            fields[part.get_param("name", header="content-disposition")] = (
                part.get_payload(decode=True), part.get_filename())
        if "file" not in fields:
            return self._error(400, "multipart field 'file' missing")
        content, filename = fields["file"]
        purpose = fields.get("purpose", (b"batch", None))[0].decode()
        fid = self.fake.add_file(content, purpose, filename or "upload.jsonl")
        self._send(200, self.fake.file_object(fid))

    def _chat(self, raw: bytes) -> None:
        fake = self.fake
        rid = self.headers.get(REQUEST_ID_HEADER, "")
        run = self.headers.get(RUN_ID_HEADER, "")
        if fake.rate_limited():
            fake.record(request_id=rid, run=run, status="429-rpm", kind="live")
            return self._error(429, "rate limit reached (requests per minute)", {"retry-after-ms": "20"})
        fault = fake.draw_fault()
        if fault == "429":
            fake.record(request_id=rid, run=run, status="429", kind="live")
            return self._error(429, "Rate limit reached", {"retry-after-ms": str(fake.faults.retry_after_ms)})
        if fault == "500":
            fake.record(request_id=rid, run=run, status="500", kind="live")
            return self._error(500, "The server had an error while processing your request.")
        if fault == "timeout":
            fake.record(request_id=rid, run=run, status="timeout", kind="live")
            time.sleep(fake.faults.timeout_sleep)
            self.close_connection = True
            return
        if fake.latency:
            time.sleep(fake.latency)
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            return self._error(400, "body is not JSON")
        if not fake.check(body):
            fake.record(request_id=rid, run=run, status="refused", kind="live")
            return self._error(400, "request refused by request_check")
        if fault == "malformed":
            fake.record(request_id=rid, run=run, status="malformed", kind="live")
            broken = fake.completion(body)
            broken["choices"] = []
            return self._send(200, broken)
        fake.record(request_id=rid, run=run, status="ok", kind="live", max_tokens=body.get("max_tokens"))
        self._send(200, fake.completion(body))


class PrivacyGuard:
    """A ``request_check``: no request may carry a run of ``n`` consecutive words of a protected question
    unless the run lies inside one keyword of that question, nor any planted identifier.

    Words are lower-case letter/digit runs. In the request, a run of words is broken by any
    punctuation (the comma between two keywords, the parenthesis before an option label), so
    neighbouring keywords do not count as one run; in the question, punctuation is ignored,
    which makes the check stricter. An identifier counts as present when its words appear
    consecutively anywhere in the request, punctuation ignored.

    ``fixed_text``: parts of the prompt that are the same for every question (instruction,
    demonstrations). They are cut out, where they occur verbatim, before the word-run check:
    a question that happens to share four words with them sends nothing of itself.
    """

    def __init__(self, questions: Sequence[tuple[str, Sequence[str]]], identifiers: Sequence[str] = (),
                 n: int = 4, fixed_text: Sequence[str] = ()):
        self.n = n
        self.fixed_text = [t for t in fixed_text if t]
        self.forbidden: dict[tuple[str, ...], str] = {}  # n-gram -> the question it comes from
        for question, keywords in questions:
            allowed = {g for k in keywords for g in self._ngrams(self._tokens(k))}
            for g in self._ngrams(self._tokens(question)):
                if g not in allowed:
                    self.forbidden.setdefault(g, question[:60])
        self.identifiers = [(ident, tuple(self._tokens(ident))) for ident in identifiers]
        assert all(toks for _, toks in self.identifiers), "an identifier without words cannot be checked"

    @staticmethod
    def _tokens(text: str) -> list[str]:
        return re.findall(r"[a-z0-9]+", text.lower())

    def _ngrams(self, toks: list[str]) -> set[tuple[str, ...]]:
        return {tuple(toks[i:i + self.n]) for i in range(len(toks) - self.n + 1)}

    def __call__(self, body: dict) -> None:
        text = "\n".join(str(m.get("content", "")) for m in body.get("messages", []))
        variable = text
        for fixed in self.fixed_text:
            variable = variable.replace(fixed, "\n")
        for segment in re.split(r"[^\w\s'’-]|\n", variable):
            for g in self._ngrams(self._tokens(segment)):
                assert g not in self.forbidden, (
                    f"request carries {' '.join(g)!r} of the question {self.forbidden[g]!r}...")
        toks = self._tokens(text)
        for ident, it in self.identifiers:
            k = len(it)
            assert not any(tuple(toks[i:i + k]) == it for i in range(len(toks) - k + 1)), (
                f"request carries the identifier {ident!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--rpm", type=float, default=None)
    ap.add_argument("--lifetime", type=float, default=900.0)
    args = ap.parse_args()
    fake = FakeOpenAI(latency=args.latency, rpm=args.rpm, lifetime=args.lifetime)
    fake.start(args.port)
    print(f"PORT {fake.port}", flush=True)
    deadline = time.monotonic() + args.lifetime
    while time.monotonic() < deadline and fake._httpd is not None:
        time.sleep(0.5)


if __name__ == "__main__":
    main()
