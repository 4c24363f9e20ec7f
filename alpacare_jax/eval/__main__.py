"""`python -m alpacare_jax.eval COMMAND` (console script `alpacare-eval`):

    judge_table  the paper's Table 1: answers to iCliniq and MedInstruct-test, judged against four references
    train        the training command (alpacare-train's flags) that also scores config.harness.tasks every
                 config.harness.every steps, beside eval_loss (see alpacare_jax.eval.training)
    benchmarks   the paper's benchmark suite (lm-evaluation-harness tasks + AlpacaFarm), one table
    export_data  write the suite's datasets as local JSONL files for --data_dir (needs internet)
    lm_eval      the harness's own command line with the `alpacare_jax` backend registered, e.g.
                 alpacare-eval lm_eval run --model alpacare_jax --model_args model=DIR --tasks pubmedqa
                 (plain `lm_eval --model alpacare_jax` cannot work: lm_eval 0.4.x finds backends only among
                 its own modules, see alpacare_jax.eval.lm_eval_backend)

Multi-host: run the same command on every host of a TPU pod (jax finds its peers itself), or give the
coordinator explicitly (--coordinator_address=host:port --num_processes=N --process_id=I).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import jax
from lm_eval.__main__ import cli_evaluate

import alpacare_jax.eval.lm_eval_backend  # noqa: F401  (registers the backend with the harness)
from alpacare_jax.eval import tasks
from alpacare_jax.eval.benchmarks import OtherProcessFailed, SuiteLayout, SuiteOptions, format_markdown, run_suite
from data_gen import DataError, FatalAPIError, JudgeIncomplete, add_client_flags, run_settings, silence_transport_logs


def _init_distributed(args: argparse.Namespace) -> None:
    if args.coordinator_address:
        if args.num_processes is None or args.process_id is None:
            raise ValueError("--coordinator_address needs --num_processes and --process_id")
        jax.distributed.initialize(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                                   process_id=args.process_id)
    elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):  # a TPU VM in a multi-host slice
        jax.distributed.initialize()


def _named_overrides(args: argparse.Namespace) -> dict[str, dict]:
    """--task_overrides (a YAML file), then --num_fewshot on top: {"all", benchmark or task: settings}."""
    return tasks.merge_overrides(tasks.read_overrides(Path(args.task_overrides)) if args.task_overrides else {},
                                 tasks.parse_num_fewshot(args.num_fewshot) if args.num_fewshot else {})


def _add_override_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num_fewshot", default=None,
                        help="shots instead of the stock configs': N for every task, or NAME=N,... with NAME a "
                             "benchmark (MMLU, BBH, ...) or a task (pubmedqa, ...)")
    parser.add_argument("--task_overrides", default=None,
                        help="YAML file: {all | benchmark | task: {task config key: value}}, e.g. "
                             "'MMLU: {num_fewshot: 5}'; --num_fewshot wins over it")


def _benchmarks(args: argparse.Namespace) -> int:
    _init_distributed(args)
    options = SuiteOptions(
        suite=args.suite, data_dir=Path(args.data_dir) if args.data_dir else None, limit=args.limit,
        batch_size=args.batch_size, overrides=_named_overrides(args),
        benchmarks=tuple(filter(None, (t.strip() for t in (args.benchmarks or "").split(",")))),
        alpaca_farm_reference=Path(args.alpaca_farm_reference) if args.alpaca_farm_reference else None,
        judge_model=args.judge_model, max_new_tokens=args.max_new_tokens, progress=not args.no_progress,
        judge=run_settings(args, progress=not args.no_progress), allow_missing=args.allow_missing)
    model_args = {"step": args.step, "dtype": args.dtype, "data": args.mesh_data, "fsdp": args.mesh_fsdp,
                  "tensor": args.mesh_tensor, "max_gen_toks": args.max_gen_toks}
    table = run_suite(args.model, SuiteLayout(Path(args.out_dir)), options, model_args=model_args, name=args.name)
    if table:
        print(format_markdown(table), flush=True)
    return 0


def _export_data(args: argparse.Namespace) -> int:
    overrides = tasks.expand_overrides(_named_overrides(args), tasks.suite_benchmarks(args.suite))
    written = tasks.export_data(Path(args.data_dir), args.suite, overrides)
    print(f"wrote {len(written)} files under {args.data_dir}")
    return 0


def _lm_eval(argv: list[str]) -> int:
    """The harness's CLI in this process, where the backend is imported: its model registry knows `alpacare_jax`."""
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lm_eval"]:  # everything after it belongs to the harness's own parser
        return _lm_eval(argv[1:])
    if argv[:1] == ["judge_table"]:  # a command with a parser of its own
        from alpacare_jax.eval.judge_table import main as judge_table_main

        return judge_table_main(argv[1:])
    if argv[:1] == ["train"]:  # the training command's absl flags
        from alpacare_jax.eval.training import main as train_main

        return train_main(argv[1:])
    parser = argparse.ArgumentParser(prog="alpacare-eval", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser("benchmarks", help="the paper's benchmark suite")
    bench.add_argument("--model", required=True, help="HF model directory or training workdir")
    bench.add_argument("--suite", default="all", choices=("medical", "general", "all"))
    bench.add_argument("--benchmarks", default=None,
                       help="score only these of the suite, e.g. MMLU,AlpacaFarm (the table still has every one)")
    bench.add_argument("--out_dir", required=True, help="results, AlpacaFarm outputs and verdicts, the table")
    bench.add_argument("--data_dir", default=None,
                       help="local JSONL files (DATA_DIR/<task>/<split>.jsonl, see export_data); default: the hub")
    bench.add_argument("--name", default=None, help="the model's row in the table (default: its directory name, "
                                                    "with a workdir's step and the --dtype if given)")
    bench.add_argument("--limit", type=int, default=None, help="only the first N documents of each task")
    bench.add_argument("--batch_size", type=int, default=16)
    bench.add_argument("--max_new_tokens", type=int, default=512, help="AlpacaFarm answer length")
    bench.add_argument("--max_gen_toks", type=int, default=256,
                       help="generated tokens at most for harness tasks that set none (BBH, MeQSum)")
    _add_override_flags(bench)
    bench.add_argument("--step", type=int, default=None, help="checkpoint step of a workdir (default: latest)")
    bench.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: as stored)")
    bench.add_argument("--mesh_data", type=int, default=1)
    bench.add_argument("--mesh_fsdp", type=int, default=-1, help="-1: all remaining devices")
    bench.add_argument("--mesh_tensor", type=int, default=1)
    bench.add_argument("--alpaca_farm_reference", default=None,
                       help="AlpacaFarm evaluation set with reference outputs "
                            "(default: DATA_DIR/alpaca_farm/eval.jsonl)")
    bench.add_argument("--judge_model", default="gpt-3.5-turbo")
    bench.add_argument("--allow_missing", action="store_true",
                       help="exit 0 even when AlpacaFarm rows have no answer (they are still listed)")
    add_client_flags(bench, "judge endpoint and client")
    bench.add_argument("--coordinator_address", default=None, help="host:port of process 0 (multi-process runs)")
    bench.add_argument("--num_processes", type=int, default=None)
    bench.add_argument("--process_id", type=int, default=None)
    bench.add_argument("--no_progress", action="store_true")

    export = commands.add_parser("export_data", help="write the suite's datasets as local JSONL (needs internet)")
    export.add_argument("--data_dir", required=True)
    export.add_argument("--suite", default="all", choices=("medical", "general", "all"))
    _add_override_flags(export)  # shots may need another split (the one they are drawn from)
    commands.add_parser("lm_eval", help="the harness's own CLI with the alpacare_jax backend registered")
    commands.add_parser("judge_table", help="the paper's Table 1 (alpacare-eval judge_table --help)")
    commands.add_parser("train", help="training that scores config.harness.tasks as it goes (alpacare-train's flags)")

    args = parser.parse_args(argv)
    # force: importing the JAX stack has already given the root logger a handler of its own (at WARNING)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("absl", "lm_eval"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    silence_transport_logs()  # the HTTP clients log each request
    try:
        return {"benchmarks": _benchmarks, "export_data": _export_data}[args.command](args)
    except JudgeIncomplete as e:
        print(f"error: {e}", file=sys.stderr)
        return e.status
    except (DataError, FileNotFoundError, ValueError, FatalAPIError, OtherProcessFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
