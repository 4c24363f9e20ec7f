"""Command-line pieces shared by the commands that load a model to answer (generate, serve, the evaluations).

Each command parses its own flags with argparse and calls a typed function; what they have in common (which
checkpoint, which dtype, how to sample, how to log) is declared once here so the flags read the same in all.
"""

from __future__ import annotations

import argparse
import logging

from alpacare_jax.model import SamplingConfig
from data_gen import silence_transport_logs

DEFAULT_MAX_NEW_TOKENS = 512


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """Which checkpoint of a workdir, and in which dtype."""
    parser.add_argument("--step", type=int, default=None, help="checkpoint step of a workdir (default: latest)")
    parser.add_argument("--dtype", default=None,
                        help="parameter and compute dtype, e.g. bfloat16 (default: as stored; HF dirs load as float32)")


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch_size", type=int, default=16, help="prompts decoded together")
    parser.add_argument("--max_new_tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=0, help="0: no top-k filter")
    parser.add_argument("--seed", type=int, default=0)


def sampling_from_args(args: argparse.Namespace) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed)


def setup_logging() -> None:
    # force: importing orbax has already configured the root logger (at WARNING), which would swallow INFO.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs each file
    silence_transport_logs()  # the HTTP clients log each request
