"""Benchmark: ROUGE-L dedup of 52,000 instructions (data_gen) vs the rouge_score pairwise reference
and AlpaCare's all-vs-all process-pool rule, measured in the same run.

    python bench/dedup.py [--n 52000] [--pool-sample 2] [--pair-sample 3000] [--skip-all-vs-all]

The corpus is the 167 AlpaCare seed tasks plus ``--n`` synthetic variants of the seed and
MedInstruct-test instructions (``data_gen.synthetic``). The peers are far too slow to run
in full, so their time is extrapolated from a measured sample:

* rouge_score keep-first: every candidate scored against every seed and kept instruction
  with ``rouge_scorer._score_lcs``; pairs needed x measured seconds per pair;
* AlpaCare: for each instruction a fresh ``multiprocessing.Pool`` maps ``_score_lcs`` over all
  other instructions; instructions x measured seconds per instruction.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rouge_score import rouge_scorer  # noqa: E402

from data_gen.dedup import deduplicate, rouge_tokenize  # noqa: E402
from data_gen.synthetic import variants  # noqa: E402

DATA = ROOT / ".." / "shared" / "alpacare_data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=52_000)
    ap.add_argument("--pool-sample", type=int, default=2, help="instructions timed for the AlpaCare pool peer")
    ap.add_argument("--pair-sample", type=int, default=3000, help="pairs timed for the rouge_score peer")
    ap.add_argument("--skip-all-vs-all", action="store_true")
    args = ap.parse_args()

    seeds = [t["instruction"] for t in json.loads((DATA / "med_seed.json").read_text())]
    test = [json.loads(line)["instruction"] for line in (DATA / "MedInstruct-test.jsonl").open()]
    cands = variants(seeds + test, args.n, seed=1)
    print(f"corpus: {len(seeds)} seeds + {len(cands)} candidates; {os.cpu_count()} CPUs")

    t = time.perf_counter()
    res = deduplicate(cands, seeds, 0.7)
    ours = time.perf_counter() - t
    print(f"data_gen keep-first: {ours:.1f} s, kept {len(res.kept)}, dropped {len(res.dropped)}, "
          f"{res.stats['pairs_scored']:,} pairs scored with LCS")

    ours_avs = None
    if not args.skip_all_vs_all:
        t = time.perf_counter()
        avs = deduplicate(cands, seeds, 0.7, rule="all-vs-all")
        ours_avs = time.perf_counter() - t
        print(f"data_gen all-vs-all (AlpaCare's rule, fast): {ours_avs:.1f} s, kept {len(avs.kept)} "
              f"({len(res.kept) - len(avs.kept)} fewer than keep-first: both members of each pair dropped)")

    toks = rouge_tokenize(seeds + cands)
    rng = random.Random(0)
    pairs = [(rng.randrange(len(toks)), rng.randrange(len(toks))) for _ in range(args.pair_sample)]
    t = time.perf_counter()
    for i, j in pairs:
        rouge_scorer._score_lcs(toks[i], toks[j])
    per_pair = (time.perf_counter() - t) / len(pairs)
    # keep-first pairs: candidate k is compared with the seeds and everything kept before it
    needed, kept_so_far, kept = 0, 0, set(res.kept)
    for k in range(len(cands)):
        needed += len(seeds) + kept_so_far
        kept_so_far += k in kept
    ref_time = needed * per_pair
    print(f"rouge_score keep-first reference: {needed:,} pairs x {per_pair * 1e6:.1f} us = {ref_time:,.0f} s "
          f"(extrapolated from {len(pairs)} pairs)")

    workers = os.cpu_count() or 1
    t = time.perf_counter()
    for k in range(args.pool_sample):
        with mp.Pool(workers) as pool:  # AlpaCare rebuilt the pool for every instruction
            pool.map(partial(rouge_scorer._score_lcs, toks[len(seeds) + k]), toks)
    per_instr = (time.perf_counter() - t) / args.pool_sample
    alp_time = per_instr * len(cands)
    print(f"AlpaCare all-vs-all pool: {per_instr:.2f} s per instruction x {len(cands):,} = {alp_time:,.0f} s "
          f"({alp_time / 3600:.1f} h; extrapolated from {args.pool_sample} instructions, Pool({workers}))")

    print("\nsummary")
    print(f"  data_gen keep-first            {ours:8.1f} s")
    if ours_avs is not None:
        print(f"  data_gen all-vs-all rule       {ours_avs:8.1f} s")
    print(f"  rouge_score keep-first (extr.) {ref_time:8.0f} s   ratio {ref_time / ours:,.0f}x")
    print(f"  AlpaCare pool all-vs-all (ex.) {alp_time:8.0f} s   ratio {alp_time / ours:,.0f}x"
          + (f"  (same rule: {alp_time / ours_avs:,.0f}x)" if ours_avs else ""))
    print(f"  target < 60 s: {'met' if ours < 60 else 'MISSED'}")


if __name__ == "__main__":
    main()
