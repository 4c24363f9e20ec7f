"""`python -m alpacare_jax.infer.serve` as a real process on 127.0.0.1: the official `openai` client, streaming,
echo + logprobs against transformers, and raw-socket clients sending what a client library would refuse
to send. One server process serves the whole module; its output goes to a file (a pipe nobody reads
would fill up and block it)."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import psutil
import pytest

from alpacare_jax.data.prompts import format_prompt
from alpacare_jax.data.tokenizer import load_tokenizer
from alpacare_jax.infer.serve import API_KEY_ENV, ChatMessage, RequestError, TextStream, apply_stop, chat_instruction
from tests.infer.fixtures import GROUP, MODEL_NAME, REPO_ROOT, subprocess_env, trained  # noqa: F401

INSTRUCTION = "What are the common symptoms of iron deficiency anemia?"
API_KEY = "sk-serve-test-4242"
MAX_BODY = 64 * 1024
READ_TIMEOUT = 1.0
VOCAB = 512  # the tiny trained model's (tests/conftest.py)


class Served:
    """The server process and how to reach it."""

    def __init__(self, proc: subprocess.Popen, log_path, base_url: str, tokenizer):
        self.proc, self.log_path, self.base_url, self.tokenizer = proc, log_path, base_url, tokenizer
        self.host, self.port = re.match(r"http://([^:]+):(\d+)/v1", base_url).groups()
        self.port = int(self.port)

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=API_KEY, max_retries=0, timeout=60, **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def compilations(self) -> int:
        return self.log().count("Compiling ")

    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss


@contextlib.contextmanager
def serve(model_dir, log_path, *flags: str):
    """`python -m alpacare_jax.infer.serve` on a free port, once it says it is serving; killed afterwards."""
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "alpacare_jax.infer.serve", f"--model={model_dir}", f"--name={MODEL_NAME}",
             "--port=0", *flags], env={**subprocess_env(1), API_KEY_ENV: API_KEY, "JAX_LOG_COMPILES": "1"},
            cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not (match := re.search(r"^serving \S+ at (\S+)$", log_path.read_text(), re.M)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"serve did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield Served(proc, log_path, match.group(1), load_tokenizer(model_dir))
    finally:
        proc.kill()
        proc.wait(timeout=30)
        assert API_KEY not in log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):  # noqa: F811
    """The served HF export of the trained demo, with small limits so the abuse tests stay quick."""
    with serve(trained / "hf", tmp_path_factory.mktemp("serve") / "server.log", "--max_tokens=24", "--chunk_tokens=4",
               f"--max_body_bytes={MAX_BODY}", "--max_prompt_chars=4000", f"--read_timeout={READ_TIMEOUT}") as served:
        yield served


@pytest.fixture(scope="module")
def wider_server(trained, tmp_path_factory):  # noqa: F811
    """A randomly initialised model 4x wider than the demo, served: the demo decodes a token in well under a
    millisecond on a CPU, so fixed per-request costs would hide whether text arrives as it is decoded."""
    from flax import nnx

    from alpacare_jax import hf
    from alpacare_jax.model import Llama, LlamaConfig

    root = tmp_path_factory.mktemp("wider")
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8,
                         num_kv_heads=4, max_position_embeddings=256)
    hf.save_pretrained(Llama(config, rngs=nnx.Rngs(0)), root / "hf", dtype="float32",
                       tokenizer=load_tokenizer(trained / "hf"))
    with serve(root / "hf", root / "server.log", "--chunk_tokens=4") as served:
        yield served


def raw_request(served: Served, data: bytes, *, timeout: float = 10.0, pause_after: int | None = None,
                pause: float = 0.0) -> tuple[int | None, dict | str, float]:
    """Sends `data` as is, or its first `pause_after` bytes, then (unless the server answers within
    `pause` seconds) the rest. Returns the status (None: closed without an answer), the parsed body and
    the seconds until the server answered."""
    start = time.monotonic()
    received = b""
    with socket.create_connection((served.host, served.port), timeout=timeout) as sock:
        try:
            sock.sendall(data if pause_after is None else data[:pause_after])
            if pause_after is not None:
                sock.settimeout(pause)
                try:
                    received = sock.recv(65536)
                except TimeoutError:
                    sock.settimeout(timeout)
                    sock.sendall(data[pause_after:])
            while chunk := sock.recv(65536):
                received += chunk
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before reading everything sent
    elapsed = time.monotonic() - start
    if not received:
        return None, "", elapsed
    head, _, body = received.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    try:
        return status, json.loads(body), elapsed
    except json.JSONDecodeError:
        return status, body.decode(errors="replace"), elapsed


def post(path: str, body: bytes, *, key: str = API_KEY, length: str | None = None, extra: str = "") -> bytes:
    """A raw HTTP/1.1 POST (Connection: close), with any Content-Length header one likes."""
    length = str(len(body)) if length is None else length
    head = (f"POST /v1{path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\nConnection: close\r\n{extra}\r\n")
    return head.encode() + body


def head_end(request: bytes) -> int:
    return request.index(b"\r\n\r\n") + 4


def completion_body(**fields) -> bytes:
    return json.dumps({"model": MODEL_NAME, "prompt": format_prompt(INSTRUCTION), "max_tokens": 4, **fields}).encode()


# ---- the OpenAI API -------------------------------------------------------------------------------------

@GROUP
@pytest.mark.slow
def test_openai_client_chat_and_completions(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]

    chat = client.chat.completions.create(
        model=MODEL_NAME, max_tokens=12,
        messages=[{"role": "system", "content": "Ignored."}, {"role": "user", "content": INSTRUCTION}])
    choice = chat.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"  # two training steps: the model has not learned to stop
    prompt_tokens = len(server.tokenizer.encode(format_prompt(INSTRUCTION), bos=True))
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens, chat.usage.total_tokens) == (
        prompt_tokens, 12, prompt_tokens + 12)

    # /v1/completions continues the text as given: the chat prompt sent raw gives the chat answer.
    text = client.completions.create(model=MODEL_NAME, prompt=format_prompt(INSTRUCTION), max_tokens=12)
    assert text.choices[0].text.strip() == choice.message.content
    assert text.usage.prompt_tokens == prompt_tokens and text.usage.completion_tokens == 12

    raw = text.choices[0].text
    stop = raw[len(raw) // 2:len(raw) // 2 + 2]
    cut = client.completions.create(model=MODEL_NAME, prompt=format_prompt(INSTRUCTION), max_tokens=12, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == raw[: raw.find(stop)]

    # Concurrent requests are decoded side by side and get what each would get alone.
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda n: client.chat.completions.create(
            model=MODEL_NAME, max_tokens=12 - n, messages=[{"role": "user", "content": INSTRUCTION}]
        ).choices[0].message.content, range(4)))
    assert answers[0] == choice.message.content and all(choice.message.content.startswith(a) for a in answers)

    # A sampled answer depends on its seed alone, not on what it was batched with.
    def sampled(seed):
        return client.chat.completions.create(model=MODEL_NAME, max_tokens=8, temperature=1.0, top_p=0.9, seed=seed,
                                              extra_body={"top_k": 50},
                                              messages=[{"role": "user", "content": INSTRUCTION}])
    first = sampled(3)
    assert first.usage.completion_tokens <= 8
    with ThreadPoolExecutor(3) as pool:
        again = list(pool.map(sampled, (3, 4, 3)))
    texts = [answer.choices[0].message.content for answer in (first, *again)]
    assert texts[1] == texts[3] == texts[0]


@GROUP
@pytest.mark.slow
def test_bad_requests_get_openai_errors(server):
    client = server.client()
    user = [{"role": "user", "content": INSTRUCTION}]
    with pytest.raises(openai.NotFoundError, match="serves 'demo'"):
        client.chat.completions.create(model="gpt-4", messages=user)
    with pytest.raises(openai.BadRequestError, match="context of 256") as error:
        client.chat.completions.create(model=MODEL_NAME, messages=user, max_tokens=200)
    assert error.value.body["code"] == "context_length_exceeded" and error.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="at most 256"):
        client.chat.completions.create(model=MODEL_NAME, messages=user, max_tokens=1000)
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client.chat.completions.create(model=MODEL_NAME, messages=user, n=2)
    with pytest.raises(openai.BadRequestError, match="single user message"):
        client.chat.completions.create(model=MODEL_NAME, messages=[*user, {"role": "assistant", "content": "x"}, *user])
    with pytest.raises(openai.BadRequestError, match="4000"):  # bounded in characters, before tokenizing
        client.completions.create(model=MODEL_NAME, prompt="a" * 4001, max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL_NAME, prompt="a", max_tokens=1, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL_NAME, prompt="a", max_tokens=0)  # 0 only with echo


@GROUP
@pytest.mark.slow
def test_streaming_sends_tokens_as_they_are_decoded(wider_server):
    """A 64-token answer comes in at least 8 chunks, the first in under a quarter of the whole answer's
    time, and the chunks add up to the answer the same request gets unstreamed."""
    client = wider_server.client()
    # A short prompt: the timing is of the answer's decoding, not of reading a long prompt.
    short = "Iron deficiency anemia causes"
    whole = client.completions.create(model=MODEL_NAME, prompt=short, max_tokens=64)
    assert whole.usage.completion_tokens == 64
    for _ in range(3):  # a busy machine can delay one run; the claim must hold in one of three
        start = time.monotonic()
        arrivals, parts = [], []
        for chunk in client.completions.create(model=MODEL_NAME, prompt=short, max_tokens=64, stream=True):
            parts.append(chunk.choices[0].text)
            if chunk.choices[0].text:
                arrivals.append(time.monotonic() - start)
        total = time.monotonic() - start
        if arrivals[0] < total / 4:
            break
    print(f"streaming: {len(arrivals)} chunks with text, the first after {arrivals[0]:.3f} s of {total:.3f} s")
    assert len(arrivals) >= 8, arrivals
    assert arrivals[0] < total / 4, (arrivals, total)
    assert "".join(parts) == whole.choices[0].text

    user = [{"role": "user", "content": INSTRUCTION}]
    answer = client.chat.completions.create(model=MODEL_NAME, max_tokens=64, messages=user)
    chunks = list(client.chat.completions.create(model=MODEL_NAME, max_tokens=64, messages=user, stream=True,
                                                 stream_options={"include_usage": True}))
    assert len(chunks) > 8
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == answer.choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 64

    prompt = format_prompt(INSTRUCTION)
    text = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12).choices[0].text
    streamed = list(client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, stream=True))
    assert len(streamed) > 2 and "".join(c.choices[0].text for c in streamed) == text
    assert streamed[-1].choices[0].finish_reason == "length" and streamed[-1].usage is None
    # A stop string ends the stream where the unstreamed answer is cut.
    stop = text[5:8]
    cut = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, stop=stop).choices[0].text
    parts = list(client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in parts) == cut == text[: text.find(stop)]
    assert parts[-1].choices[0].finish_reason == "stop"


@GROUP
@pytest.mark.slow
def test_a_client_that_leaves_frees_its_slot(wider_server):
    """Every slot (8) taken by a long streamed answer whose client reads one chunk and leaves: a new
    request is answered at once, not after those answers would have been decoded."""
    client = wider_server.client()
    short = "Iron deficiency anemia causes"

    def one(max_tokens):
        start = time.monotonic()
        client.completions.create(model=MODEL_NAME, prompt=short, max_tokens=max_tokens)
        return time.monotonic() - start

    one(8)
    long_answer = one(200)
    streams = [client.completions.create(model=MODEL_NAME, prompt=short, max_tokens=200, stream=True)
               for _ in range(8)]
    for stream in streams:
        next(iter(stream))
        stream.close()
    served_in = one(8)
    print(f"a 200-token answer takes {long_answer:.2f} s; with 8 clients gone, a new request took {served_in:.2f} s")
    assert served_in < long_answer / 2, (served_in, long_answer)


@GROUP
@pytest.mark.slow
def test_concurrent_greedy_requests_return_what_they_return_alone(server):
    """Continuous batching: 64 greedy requests of different prompt lengths and max_tokens, sent at once to
    8 slots (so each joins while others decode, in whichever slot frees up), each get exactly their answer
    sent alone."""
    client = server.client()
    rng = np.random.default_rng(7)
    words = INSTRUCTION.split()
    requests = [(" ".join(rng.choice(words, int(rng.integers(2, 25)))), int(rng.integers(1, 41))) for _ in range(64)]

    def ask(request):
        prompt, max_tokens = request
        answer = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens)
        return answer.choices[0].text, answer.usage.completion_tokens

    alone = [ask(request) for request in requests]
    compilations = server.compilations()
    with ThreadPoolExecutor(64) as pool:
        together = list(pool.map(ask, requests))
    assert together == alone
    assert [tokens for _, tokens in alone] == [max_tokens for _, max_tokens in requests]
    assert server.compilations() == compilations  # however many requests are in flight
    # A temperature too small to divide by decodes greedily (was: logits overflowed to inf, NaN probabilities).
    for temperature in (1e-40, 5e-324):
        tiny = client.completions.create(model=MODEL_NAME, prompt=requests[0][0], max_tokens=requests[0][1],
                                         temperature=temperature, seed=1)
        assert tiny.choices[0].text == alone[0][0]


@GROUP
@pytest.mark.slow
def test_echo_and_logprobs_equal_transformers(server, trained):  # noqa: F811
    """Prompt and completion token log-probabilities (and the top alternatives) equal transformers'
    log-softmax on the exported model, in float32."""
    import torch
    import transformers

    client = server.client()
    prompt = format_prompt(INSTRUCTION)
    answer = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=10, echo=True, logprobs=3)
    choice = answer.choices[0]
    logprobs = choice.logprobs
    prompt_ids = server.tokenizer.encode(prompt, bos=True)
    assert choice.text.startswith(prompt) and len(logprobs.tokens) == len(prompt_ids) + 10
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:i])) for i in range(len(logprobs.tokens))]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None

    torch_model = transformers.AutoModelForCausalLM.from_pretrained(trained / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        generated = torch_model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=10,
                                         min_new_tokens=10, pad_token_id=0)[0].tolist()
        reference = torch.log_softmax(torch_model(torch.tensor([generated])).logits[0].float(), dim=-1).numpy()
    expected = reference[np.arange(len(generated) - 1), generated[1:]]
    np.testing.assert_allclose(logprobs.token_logprobs[1:], expected, atol=1e-4, rtol=0)
    for position, top in enumerate(logprobs.top_logprobs[1:]):
        best = np.sort(reference[position])[::-1][:3]
        assert len(top) <= 3
        np.testing.assert_allclose(sorted(top.values(), reverse=True), best[: len(top)], atol=1e-4, rtol=0)
    assert server.tokenizer.decode(generated[len(prompt_ids):]) == choice.text[len(prompt):]

    # Without echo: the answer's tokens only; with max_tokens 0: the prompt scored, nothing generated;
    # token ids as the prompt give the same scores.
    plain = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=10, logprobs=1).choices[0]
    assert plain.logprobs.token_logprobs == pytest.approx(logprobs.token_logprobs[len(prompt_ids):], abs=1e-6)
    assert plain.logprobs.text_offset[0] == 0 and "".join(plain.logprobs.tokens) == plain.text
    scored = client.completions.create(model=MODEL_NAME, prompt=generated, max_tokens=0, echo=True, logprobs=0)
    assert scored.usage.completion_tokens == 0 and scored.choices[0].logprobs.top_logprobs[1] == {}
    np.testing.assert_allclose(scored.choices[0].logprobs.token_logprobs[1:], expected, atol=1e-4, rtol=0)


@GROUP
@pytest.mark.slow
def test_api_key_is_required_when_set(server):
    client = openai.OpenAI(base_url=server.base_url, api_key="sk-wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        client.models.list()
    with pytest.raises(openai.AuthenticationError, match="API key"):
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": INSTRUCTION}])
    request = urllib.request.Request(server.base_url + "/models")  # no Authorization header at all
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 401 and json.load(refused.value)["error"]["code"] == "invalid_api_key"
    health = urllib.request.urlopen(server.base_url.removesuffix("/v1") + "/health", timeout=30)
    assert json.load(health) == {"status": "ok"}  # for load balancers: no key needed


# ---- limits and bad requests (raw sockets) --------------------------------------------------------------

@GROUP
@pytest.mark.slow
def test_key_and_size_are_checked_before_the_body_is_read(server):
    """A wrong key or a declared 8 GiB body is answered at once, with no byte of the body sent."""
    for key, status in (("sk-wrong", 401), (API_KEY, 413)):
        code, body, seconds = raw_request(server, post("/completions", b"", key=key, length=str(8 << 30)))
        assert code == status and body["error"]["type"] == "invalid_request_error" and seconds < 2, (code, body)
    code, body, _ = raw_request(server, post("/completions", b"", length=str(10**12)))
    assert code == 413 and "65536 bytes" in body["error"]["message"]
    # A body over the limit that declares no length (chunked) is cut off at the limit.
    chunked = b"".join(b"%x\r\n%s\r\n" % (8192, b"x" * 8192) for _ in range(MAX_BODY // 8192 + 2)) + b"0\r\n\r\n"
    head = post("/completions", b"").replace(b"Content-Length: 0\r\n", b"Transfer-Encoding: chunked\r\n")
    assert raw_request(server, head + chunked)[0] == 413


@GROUP
@pytest.mark.slow
def test_bad_requests_get_400_not_500_garbage_or_a_hang(server):
    surrogate = b'{"model": "demo", "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    cases = {
        "top_k over the vocabulary": post("/completions", completion_body(top_k=VOCAB + 1)),
        "lone surrogate": post("/chat/completions", surrogate),
        **{f"temperature {value}": post("/completions", completion_body()[:-1] + b', "temperature": ' + value + b"}")
           for value in (b"NaN", b"Infinity", b"-Infinity", b"1e999")},
        "Content-Length abc": post("/completions", completion_body(), length="abc"),
        "Content-Length -1": post("/completions", completion_body(), length="-1"),
        "not JSON": post("/completions", b"{"),
        "token id out of range": post("/completions", completion_body(prompt=[1, VOCAB])),
        # Python's json parser gives up past ~1000 levels (RecursionError): was a 500 with its text.
        "deeply nested": post("/completions", b'{"prompt": ' + b"[" * 20000 + b"]" * 20000 + b"}"),
    }
    for name, data in cases.items():
        # A bad head is sent before its body: a server refusing it may close before reading the body, and
        # a body arriving after the close makes the kernel reset the connection, discarding the answer.
        bad_head = name.startswith("Content-Length")
        code, body, seconds = raw_request(server, data, pause_after=head_end(data) if bad_head else None, pause=5)
        assert code == 400 and seconds < 5, (name, code, body)
        assert set(body["error"]) == {"message", "type", "param", "code"}, (name, body)
    assert "nested too deeply" in raw_request(server, cases["deeply nested"])[1]["error"]["message"]
    # A body shorter than declared: 408 once the read timeout passes, the connection closed.
    code, body, seconds = raw_request(server, post("/completions", b'{"prompt": "a"', length="100"))
    assert code == 408 and READ_TIMEOUT <= seconds < READ_TIMEOUT + 3, (code, body, seconds)


@GROUP
@pytest.mark.slow
def test_sampling_settings_compile_no_new_program(server):
    """50 distinct temperature / top_p / top_k / seed / max_tokens settings: not one new compilation."""
    client = server.client()

    def ask(i):
        return client.completions.create(model=MODEL_NAME, prompt=format_prompt(INSTRUCTION), max_tokens=1 + i % 8,
                                         temperature=0.05 + i / 25, top_p=0.3 + i / 72, seed=i,
                                         extra_body={"top_k": i * 7})

    ask(0)  # this shape's programs exist from here on
    before = server.compilations()
    start = time.monotonic()
    answers = [ask(i) for i in range(1, 51)]
    assert all(a.usage.completion_tokens == 1 + i % 8 for i, a in enumerate(answers, 1))
    assert server.compilations() == before, server.log()[-3000:]
    assert time.monotonic() - start < 30


# ---- the bounded abuse test -----------------------------------------------------------------------------

@GROUP
@pytest.mark.slow
def test_abuse_is_answered_in_time_while_others_are_served(server):
    """Oversized bodies, bad lengths, slow and stalled clients and 50 sampling settings at once: each gets
    its status within its time limit, a normal request is served within 1 s meanwhile, and the server's
    memory ends within 10% of where it started."""
    client = server.client()
    prompt = format_prompt(INSTRUCTION)

    def normal(max_tokens=4):
        return client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens)

    normal()  # batches are always --max_batch rows: this compiles every program the abuse below needs
    rss_start = server.rss()
    compilations = server.compilations()

    good = completion_body()
    slow_body = post("/completions", good)
    oversized = post("/completions", b"x" * (MAX_BODY + 1))
    length_abc, length_minus_1 = (post("/completions", good, length=bad) for bad in ("abc", "-1"))
    abusers = {  # name: (request bytes, pause_after, pause seconds, expected status, time limit)
        "oversized declared": (post("/completions", b"", length=str(8 << 30)), None, 0, 413, 2),
        "oversized sent": (oversized, len(oversized) - MAX_BODY - 1, 5, 413, 2),
        "wrong key, huge": (post("/completions", b"", key="nope", length=str(10**12)), None, 0, 401, 2),
        "Content-Length abc": (length_abc, head_end(length_abc), 5, 400, 2),  # head first, as in the 400 test
        "Content-Length -1": (length_minus_1, head_end(length_minus_1), 5, 400, 2),
        "short body": (post("/completions", good[:10], length=str(len(good))), None, 0, 408, READ_TIMEOUT + 3),
        "stalled body": (slow_body, len(slow_body) - len(good) + 5, 30, 408, READ_TIMEOUT + 3),
        "stalled head": (slow_body, 20, 30, 408, READ_TIMEOUT + 3),
        "slow but in time": (slow_body, len(slow_body) - 3, READ_TIMEOUT / 3, 200, 10),
    }
    results: dict[str, tuple] = {}

    def abuse(name, repeat):
        data, after, pause, _, limit = abusers[name]
        results[f"{name} #{repeat}"] = (name, *raw_request(server, data, pause_after=after, pause=pause,
                                                           timeout=limit + 5))

    sampled = []

    def settings():
        for i in range(50):
            answer = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=1 + i % 4,
                                               temperature=0.1 + i / 30, top_p=0.2 + i / 65, seed=100 + i,
                                               extra_body={"top_k": i})
            sampled.append(answer.usage.completion_tokens)

    threads = [threading.Thread(target=abuse, args=(name, r)) for name in abusers for r in range(3)]
    threads.append(threading.Thread(target=settings))
    for thread in threads:
        thread.start()
    served_in = []
    time.sleep(0.2)
    while any(t.is_alive() for t in threads[:-1]):
        start = time.monotonic()
        assert normal().usage.completion_tokens == 4
        served_in.append(time.monotonic() - start)
        time.sleep(0.1)
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 3 * len(abusers) and sampled == [1 + i % 4 for i in range(50)]
    for key, (name, code, body, seconds) in results.items():
        _, _, _, status, limit = abusers[name]
        assert code == status and seconds < limit, (key, code, body, seconds)
        if status != 200:
            assert set(body["error"]) == {"message", "type", "param", "code"}, (key, body)
    assert served_in and max(served_in) < 1.0, served_in
    assert server.proc.poll() is None and server.compilations() == compilations
    rss_end = server.rss()
    print(f"abuse: {len(results)} raw requests and 50 sampling settings; {len(served_in)} normal requests served "
          f"in at most {max(served_in):.3f} s; RSS {rss_start / 2**20:.0f} -> {rss_end / 2**20:.0f} MiB")
    assert rss_end < 1.1 * rss_start, (rss_end, rss_start)


# ---- pieces, without a server -------------------------------------------------------------------------

def test_chat_mapping_and_stop():
    def messages(*items):
        return [ChatMessage.model_validate(m) for m in items]

    assert chat_instruction(messages({"role": "system", "content": "s"}, {"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]})) == "ab"
    for bad in (messages({"role": "assistant", "content": "x"}), messages({"role": "user"}),
                messages({"role": "user", "content": "a"}, {"role": "user", "content": "b"})):
        with pytest.raises(RequestError):
            chat_instruction(bad)
    assert apply_stop("one two three", ["three", "two"]) == ("one ", True)
    assert apply_stop("one", ["x"]) == ("one", False)


class _CharTokenizer:
    def decode(self, ids):
        return "".join(map(chr, ids))


def test_text_stream_deltas_add_up_to_the_final_text():
    def run(stops, strip):
        stream = TextStream(_CharTokenizer(), stops, strip=strip)
        deltas = [stream.push([ord(c) for c in part]) for part in ("  Hel", "lo ", "world  ")]
        return [*deltas, stream.finish()], stream.stopped

    deltas, stopped = run([], strip=True)  # chat answers are stripped: trailing spaces wait for the end
    assert deltas == ["Hel", "lo", " world", ""] and not stopped
    deltas, stopped = run(["o w"], strip=False)  # "o " may begin the stop string: held back
    assert deltas == ["  Hel", "l", "", ""] and stopped
    deltas, stopped = run(["xyz"], strip=False)
    assert "".join(deltas) == "  Hello world  " and not stopped
