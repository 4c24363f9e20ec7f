"""The `alpacare-human-eval` command: a thin layer over `create_study`, `serve` and `study_results`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from data_gen import DataError

from .study import StudyError, create_study


def _create(args: argparse.Namespace) -> None:
    invites = create_study(args.outputs, args.db, sample=args.sample, seed=args.seed, raters=args.raters,
                           overlap=args.overlap)
    print(f"study written to {args.db}; serve it with: alpacare-human-eval serve --db {args.db}")
    print("Invite links (send each rater their own; anyone with a link can rate as that rater):")
    for name, link in invites.links(args.base_url):
        print(f"  {name}: {link}")


def _serve(args: argparse.Namespace) -> None:
    from .app import serve  # the web stack is needed only here

    serve(args.db, host=args.host, port=args.port, ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile)


def _results(args: argparse.Namespace) -> None:
    from .chart import preference_chart
    from .results import study_results

    results = study_results(args.db, n_resamples=args.n_resamples, seed=args.seed)
    out = args.out or args.db.with_name(args.db.stem + "_results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(results.to_json() + "\n", encoding="utf-8")
    (out / "votes.csv").write_text(results.votes_csv(), encoding="utf-8")
    (out / "chart.png").write_bytes(preference_chart(results.comparisons))
    print(results.table())
    print(f"wrote {out / 'results.json'}, {out / 'votes.csv'}, {out / 'chart.png'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alpacare-human-eval", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    create = commands.add_parser("create", help="make a study database from two or more model-output files")
    create.add_argument("--outputs", type=Path, nargs="+", required=True,
                        help="JSON / JSONL answers: `generate` outputs or AlpaCare's released outputs")
    create.add_argument("--sample", type=int, default=None,
                        help="tasks to sample (default: all answered by every file); "
                             "each gives one item per model pair")
    create.add_argument("--seed", type=int, default=0, help="seeds the sample, the rater queues and the A/B sides")
    create.add_argument("--raters", type=int, default=3)
    create.add_argument("--overlap", type=int, default=None,
                        help="raters per item (default: every rater rates every item); 2 or more gives agreement")
    create.add_argument("--db", type=Path, required=True, help="the study file to write (never overwritten)")
    create.add_argument("--base_url", default="http://127.0.0.1:8000", help="where the study will be served")
    create.set_defaults(run=_create)

    serve = commands.add_parser("serve", help="serve the rating pages and the admin page")
    serve.add_argument("--db", type=Path, required=True)
    serve.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to reach it from other machines")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    serve.add_argument("--ssl_certfile", default=None, help="serve HTTPS with this certificate (PEM)")
    serve.add_argument("--ssl_keyfile", default=None, help="the certificate's private key (PEM)")
    serve.set_defaults(run=_serve)

    results = commands.add_parser("results", help="print the results; write results.json, votes.csv and chart.png")
    results.add_argument("--db", type=Path, required=True)
    results.add_argument("--out", type=Path, default=None, help="directory for the files (default: DB_results/)")
    results.add_argument("--n_resamples", type=int, default=2000, help="bootstrap resamples for the 95%% intervals")
    results.add_argument("--seed", type=int, default=0, help="seeds the bootstrap")
    results.set_defaults(run=_results)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    try:
        args.run(args)
    except (DataError, StudyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
