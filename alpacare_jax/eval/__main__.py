"""`python -m alpacare_jax.eval COMMAND` (console script `alpacare-eval`):

    benchmarks   the paper's benchmark suite (lm-evaluation-harness tasks + AlpacaFarm), one table
    export_data  write the suite's datasets as local JSONL files for --data_dir (needs internet)
    lm_eval      the harness's own command line with the `alpacare_jax` backend registered, e.g.
                 alpacare-eval lm_eval run --model alpacare_jax --model_args model=DIR --tasks pubmedqa

Multi-host: run the same command on every host of a TPU pod (jax finds its peers itself), or give the
coordinator explicitly (--coordinator_address=host:port --num_processes=N --process_id=I).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from data_gen.errors import DataError, FatalAPIError


def _init_distributed(args: argparse.Namespace) -> None:
    import jax

    if args.coordinator_address:
        if args.num_processes is None or args.process_id is None:
            raise ValueError("--coordinator_address needs --num_processes and --process_id")
        jax.distributed.initialize(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                                   process_id=args.process_id)
    elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):  # a TPU VM in a multi-host slice
        jax.distributed.initialize()


def _benchmarks(args: argparse.Namespace) -> int:
    from data_gen.client import ClientConfig
    from data_gen.runner import RunSettings

    from alpacare_jax.eval.benchmarks import SuiteLayout, SuiteOptions, run_suite, format_markdown

    _init_distributed(args)
    options = SuiteOptions(
        suite=args.suite, data_dir=Path(args.data_dir) if args.data_dir else None, limit=args.limit,
        batch_size=args.batch_size,
        alpaca_farm_reference=Path(args.alpaca_farm_reference) if args.alpaca_farm_reference else None,
        judge_model=args.judge_model, max_new_tokens=args.max_new_tokens, progress=not args.no_progress,
        judge=RunSettings(client=ClientConfig(base_url=args.base_url, api_key=args.api_key,
                                              concurrency=args.concurrency, timeout=args.timeout),
                          progress=not args.no_progress))
    model_args = {"step": args.step, "dtype": args.dtype, "data": args.mesh_data, "fsdp": args.mesh_fsdp,
                  "tensor": args.mesh_tensor, "max_gen_toks": args.max_gen_toks}
    table = run_suite(args.model, SuiteLayout(Path(args.out_dir)), options, model_args=model_args, name=args.name)
    if table:
        print(format_markdown(table), flush=True)
    return 0


def _export_data(args: argparse.Namespace) -> int:
    from alpacare_jax.eval.tasks import export_data

    written = export_data(Path(args.data_dir), args.suite)
    print(f"wrote {len(written)} files under {args.data_dir}")
    return 0


def _lm_eval(argv: list[str]) -> int:
    """The harness's CLI with our backend imported first: its model registry then knows `alpacare_jax`."""
    import alpacare_jax.eval.lm_eval_backend  # noqa: F401  (registers the backend)
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lm_eval"]:  # everything after it belongs to the harness's own parser
        return _lm_eval(argv[1:])
    parser = argparse.ArgumentParser(prog="alpacare-eval", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser("benchmarks", help="the paper's benchmark suite")
    bench.add_argument("--model", required=True, help="HF model directory or training workdir")
    bench.add_argument("--suite", default="all", choices=("medical", "general", "all"))
    bench.add_argument("--out_dir", required=True, help="results, AlpacaFarm outputs and verdicts, the table")
    bench.add_argument("--data_dir", default=None,
                       help="local JSONL files (DATA_DIR/<task>/<split>.jsonl, see export_data); default: the hub")
    bench.add_argument("--name", default=None, help="the model's row in the table (default: its directory name)")
    bench.add_argument("--limit", type=int, default=None, help="only the first N documents of each task")
    bench.add_argument("--batch_size", type=int, default=16)
    bench.add_argument("--max_new_tokens", type=int, default=512, help="AlpacaFarm answer length")
    bench.add_argument("--max_gen_toks", type=int, default=256,
                       help="generated tokens at most for harness tasks that set none (BBH, MeQSum)")
    bench.add_argument("--step", type=int, default=None, help="checkpoint step of a workdir (default: latest)")
    bench.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: as stored)")
    bench.add_argument("--mesh_data", type=int, default=1)
    bench.add_argument("--mesh_fsdp", type=int, default=-1, help="-1: all remaining devices")
    bench.add_argument("--mesh_tensor", type=int, default=1)
    bench.add_argument("--alpaca_farm_reference", default=None,
                       help="AlpacaFarm evaluation set with reference outputs (default: DATA_DIR/alpaca_farm/eval.jsonl)")
    bench.add_argument("--judge_model", default="gpt-3.5-turbo")
    bench.add_argument("--base_url", default=None, help="judge endpoint (default: $OPENAI_BASE_URL)")
    bench.add_argument("--api_key", default=None, help="default: $OPENAI_API_KEY (prefer it: flags show in ps)")
    bench.add_argument("--concurrency", type=int, default=16)
    bench.add_argument("--timeout", type=float, default=120.0)
    bench.add_argument("--coordinator_address", default=None, help="host:port of process 0 (multi-process runs)")
    bench.add_argument("--num_processes", type=int, default=None)
    bench.add_argument("--process_id", type=int, default=None)
    bench.add_argument("--no_progress", action="store_true")

    export = commands.add_parser("export_data", help="write the suite's datasets as local JSONL (needs internet)")
    export.add_argument("--data_dir", required=True)
    export.add_argument("--suite", default="all", choices=("medical", "general", "all"))
    commands.add_parser("lm_eval", help="the harness's own CLI with the alpacare_jax backend registered")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "httpx", "httpcore", "openai", "lm_eval"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return {"benchmarks": _benchmarks, "export_data": _export_data}[args.command](args)
    except (DataError, FileNotFoundError, ValueError, FatalAPIError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
