"""lm-evaluation-harness requests per second: our `alpacare_jax` backend against the harness's `hf` backend.

The same random 58M-parameter LLaMA (bench/decode_throughput.py's), exported to an HF directory with a
sentencepiece tokenizer, is loaded by both backends on the same CPU (fp32). Both answer the same harness
requests, built once from the suite's task configs over local JSONL files:

- 200 four-option questions (MMLU's prompt and letter answers: 800 log-likelihood requests),
- 50 generative questions (BBH's 3-shot prompt, greedy, 32 new tokens, stop on a blank line).

Runs alternate (ours, hf, ours, ...) so machine noise hits both; medians are compared. Our one-off
compile time (first call) is reported separately. Results of the two backends are checked to agree.

    python bench/eval_throughput.py [--questions 200 --generative 50 --batch_size 16 --repeats 2] [--only KIND]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from alpacare_jax import hf
from alpacare_jax.data.tokenizer import train_tokenizer
from alpacare_jax.eval import tasks as tasks_lib
from alpacare_jax.model import Llama, LlamaConfig
from tests.eval.fixtures import SAMPLE, write_local_data

MC_TASK, GEN_TASK = "mmlu_anatomy", "bbh_fewshot_boolean_expressions"


def build_requests(task: str, data_dir: Path, config_dir: Path, overrides: dict) -> list:
    from lm_eval.tasks import TaskManager

    files = {task: tasks_lib.local_split_files(task, data_dir)}
    [path] = tasks_lib.write_task_configs([task], config_dir, files, {task: overrides})
    built = TaskManager(include_path=str(config_dir), include_defaults=False).load([str(path)])["tasks"][task]
    built.build_all_requests()
    return built.instances


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--generative", type=int, default=50)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", choices=("loglikelihood", "generate_until"), default=None,
                        help="time one request type only")
    args = parser.parse_args()

    import lm_eval
    import torch
    import transformers
    from lm_eval.models.huggingface import HFLM

    from alpacare_jax.eval.lm_eval_backend import AlpacareJaxLM

    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8,
                         num_kv_heads=8, max_position_embeddings=1024)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer = train_tokenizer(SAMPLE, tmp / "model", vocab_size=8000)
        model = Llama(config, rngs=nnx.Rngs(0))
        # The small corpus gives fewer pieces than the model's 32000 rows: zero output columns for the ids the
        # tokenizer lacks, so greedy decoding never picks one (random logits of real ids are far above 0).
        model.lm_head.value = model.lm_head.value.at[:, tokenizer.vocab_size:].set(0.0)
        hf.save_pretrained(model, tmp / "model", dtype="float32", tokenizer=tokenizer)
        data_dir = tmp / "data"
        write_local_data(data_dir, [MC_TASK], n=args.questions, seed=1)
        write_local_data(data_dir, [GEN_TASK], n=args.generative, seed=2)
        requests = {
            "loglikelihood": build_requests(MC_TASK, data_dir, tmp / "tasks", {}),
            "generate_until": build_requests(GEN_TASK, data_dir, tmp / "tasks", {
                "generation_kwargs": {"until": ["\n\n"], "do_sample": False, "max_gen_toks": 32}}),
        }
        ours = AlpacareJaxLM(str(tmp / "model"), batch_size=args.batch_size)
        theirs = HFLM(pretrained=str(tmp / "model"), dtype="float32", device="cpu", batch_size=args.batch_size)

        print(f"model: {config.num_params() / 1e6:.0f}M params, fp32, {jax.devices()[0].platform} "
              f"({jax.device_count()} device), batch {args.batch_size}; lm_eval {lm_eval.__version__}, "
              f"torch {torch.__version__}, transformers {transformers.__version__}", flush=True)
        for kind, instances in requests.items():
            if args.only not in (None, kind):
                continue
            def run(lm, instances=instances, kind=kind):
                return getattr(lm, kind)([i for i in instances], disable_tqdm=True)

            start = time.perf_counter()
            first = run(ours)
            compile_and_run = time.perf_counter() - start
            reference = run(theirs)
            if kind == "loglikelihood":
                gap = max(abs(a[0] - b[0]) for a, b in zip(first, reference))
                agree = f"max |log-likelihood difference| {gap:.1e}, same is_greedy: " \
                        f"{all(a[1] == b[1] for a, b in zip(first, reference))}"
            else:
                agree = f"identical generations: {np.mean([a == b for a, b in zip(first, reference)]):.0%}"
            times = {"ours": [], "hf": []}
            for _ in range(args.repeats):
                for name, lm in (("ours", ours), ("hf", theirs)):
                    start = time.perf_counter()
                    run(lm)
                    times[name].append(time.perf_counter() - start)
            rate = {name: len(instances) / statistics.median(t) for name, t in times.items()}
            questions = args.questions if kind == "loglikelihood" else args.generative
            print(f"\n{kind}: {len(instances)} requests ({questions} questions); {agree}; "
                  f"our first call (compile + run) {compile_and_run:.1f} s")
            for name, r in rate.items():
                print(f"  {name:5s} {r:8.1f} requests/s  (runs: {', '.join(f'{t:.2f}s' for t in times[name])})")
            print(f"  ratio ours / hf: {rate['ours'] / rate['hf']:.2f}x (target >= 3x)", flush=True)


if __name__ == "__main__":
    main()
