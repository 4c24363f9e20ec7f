"""Serving under load: our server (continuous batching over KV-cache slots) against `transformers serve
--continuous-batching`, the same exported model, the same requests, one server after the other.

    python bench/serve_load.py [--clients 32 --requests 96 --slots 32]

The model is a random LLaMA of the decode benchmark's size (hidden 512, 8 layers, 1024 positions) with a
sentencepiece tokenizer trained on the bundled MedInstruct sample, exported once with
`hf.save_pretrained` (safetensors, config, tokenizer.model and tokenizer.json): both servers load that
directory. The workload is fixed by a seed: `--requests` completions, prompts of 20-400 tokens (text cut
from the sample's answers) and `max_tokens` of 16-256, greedy, sent by `--clients` clients that each send
their next request when the previous one is answered. Reported per server: completed tokens per second
over the whole run (usage.completion_tokens summed, over the wall time) and the p50 / p95 latency of a
request (sent to answered, unstreamed).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SAMPLE = ROOT / "alpacare_jax" / "data" / "sample" / "medinstruct_sample.json"


@dataclasses.dataclass(frozen=True)
class LoadResult:
    server: str
    requests: int
    completion_tokens: int
    seconds: float
    latencies: list[float]

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q))

    def row(self) -> str:
        return (f"| {self.server} | {self.requests} | {self.completion_tokens} | {self.seconds:.1f} "
                f"| {self.tokens_per_second:.1f} | {self.percentile(50):.2f} | {self.percentile(95):.2f} |")


def build_model(out: Path) -> None:
    """A random LLaMA with a tokenizer trained on the sample, exported for transformers and for us."""
    from flax import nnx

    from alpacare_jax import hf
    from alpacare_jax.data.tokenizer import train_tokenizer
    from alpacare_jax.model import Llama, LlamaConfig

    tokenizer = train_tokenizer(SAMPLE, out / "tokenizer", vocab_size=8000)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=512, intermediate_size=1376, num_layers=8,
                         num_heads=8, num_kv_heads=8, max_position_embeddings=1024)
    hf.save_pretrained(Llama(config, rngs=nnx.Rngs(0)), out / "model", dtype="float32", tokenizer=tokenizer)


def workload(model_dir: Path, count: int, seed: int) -> list[tuple[str, int]]:
    """(prompt text, max_tokens) pairs: prompts of 20-400 tokens cut from the sample's answers."""
    from alpacare_jax.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    corpus = tokenizer.encode(" ".join(r["output"] for r in json.loads(SAMPLE.read_text())))
    rng = np.random.default_rng(seed)
    requests = []
    for _ in range(count):
        length, max_tokens = int(rng.integers(20, 401)), int(rng.integers(16, 257))
        start = int(rng.integers(0, len(corpus) - length))
        requests.append((tokenizer.decode(corpus[start:start + length]), max_tokens))
    return requests


@contextlib.contextmanager
def running(command: list[str], ready: re.Pattern, log_path: Path, timeout: float = 900):
    """A server process, once its log matches `ready` (the match is yielded); killed afterwards."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + timeout
        while not (match := ready.search(log_path.read_text(errors="replace"))):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{command[:3]} did not start:\n{log_path.read_text()[-12000:]}")
            time.sleep(0.5)
        yield match
    finally:
        proc.kill()
        proc.wait()


def load(name: str, base_url: str, model: str, requests: list[tuple[str, int]], clients: int) -> LoadResult:
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=3600)
    client.completions.create(model=model, prompt=requests[0][0], max_tokens=4, temperature=0)  # warm
    todo: queue.Queue = queue.Queue()
    for request in requests:
        todo.put(request)
    latencies, tokens, errors = [], [], []

    def worker():
        while True:
            try:
                prompt, max_tokens = todo.get_nowait()
            except queue.Empty:
                return
            start = time.perf_counter()
            try:
                answer = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
            except openai.OpenAIError as e:
                errors.append(repr(e))
                continue
            latencies.append(time.perf_counter() - start)
            tokens.append(answer.usage.completion_tokens)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{name}: {len(errors)} requests failed, e.g. {errors[0]}")
    return LoadResult(name, len(latencies), sum(tokens), seconds, latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--slots", type=int, default=32, help="our server's --max_batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=8931, help="transformers serve's port")
    args = parser.parse_args()

    import torch
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_model(tmp)
        model_dir = tmp / "model"
        requests = workload(model_dir, args.requests, args.seed)
        results = []
        ours = [sys.executable, "-m", "alpacare_jax.infer.serve", f"--model={model_dir}", "--port=0",
                f"--max_batch={args.slots}"]
        with running(ours, re.compile(r"^serving (\S+) at (\S+)$", re.M), tmp / "ours.log") as match:
            results.append(load("alpacare_jax serve", match.group(2), match.group(1), requests, args.clients))
        theirs = ["transformers", "serve", "--continuous-batching", "--device", "cpu", "--dtype", "float32",
                  "--port", str(args.port), str(model_dir)]
        with running(theirs, re.compile(r"Uvicorn running on (\S+)"), tmp / "theirs.log"):
            results.append(load("transformers serve --continuous-batching", f"http://localhost:{args.port}/v1",
                                str(model_dir), requests, args.clients))

    lengths = [len(p) for p, _ in requests]
    print(f"model: random LLaMA, hidden 512, 8 layers, vocab 8000, fp32, CPU; {args.requests} requests from "
          f"{args.clients} clients, prompts {min(lengths)}-{max(lengths)} characters (20-400 tokens), "
          f"max_tokens 16-256, greedy; our slots: {args.slots}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    print("| server | requests | completed tokens | wall s | tokens/s | p50 latency s | p95 latency s |")
    print("|---|---|---|---|---|---|---|")
    for result in results:
        print(result.row())
    ours_result, peer = results
    print(f"throughput ratio: {ours_result.tokens_per_second / peer.tokens_per_second:.2f}x (target >= 2x); "
          f"p95 {ours_result.percentile(95):.2f} s against {peer.percentile(95):.2f} s "
          f"({'no worse' if ours_result.percentile(95) <= peer.percentile(95) else 'WORSE'})")


if __name__ == "__main__":
    main()
