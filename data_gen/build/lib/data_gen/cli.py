"""What every command line that calls an endpoint through data_gen shares: the client flags, their
spelling and quiet transport logs. data_gen's own commands use it, and so do the commands of other
packages that run the judge, so that one flag means one thing everywhere.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Sequence

from .client import ClientConfig
from .runner import RunSettings


def add_client_flags(parser: argparse.ArgumentParser, title: str = "endpoint and client") -> None:
    """The endpoint, client, budget and Batch API flags, as one argument group; read back by ``run_settings``."""
    d, c = RunSettings(), ClientConfig()
    g = parser.add_argument_group(title)
    g.add_argument("--base_url", help="OpenAI-compatible endpoint (default: $OPENAI_BASE_URL, else OpenAI)")
    g.add_argument("--api_key", help="API key (default: $OPENAI_API_KEY; prefer the variable: flags show in ps)")
    g.add_argument("--concurrency", type=int, default=c.concurrency, help="requests in flight at once")
    g.add_argument("--rpm", type=float, help="client-side limit, requests per minute")
    g.add_argument("--tpm", type=float, help="client-side limit, tokens per minute")
    g.add_argument("--timeout", type=float, default=c.timeout, help="seconds per request attempt")
    g.add_argument("--max_attempts", type=int, default=c.max_attempts, help="attempts per request (429/5xx/timeouts)")
    g.add_argument("--backoff_base", type=float, default=c.backoff_base, help="first backoff in seconds (doubles)")
    g.add_argument("--max_retry_wait", type=float, default=c.max_total_wait,
                   help="total seconds one request may wait in retries")
    g.add_argument("--max_cost", type=float, help="USD budget for this run: stop cleanly before exceeding it")
    g.add_argument("--price_in", type=float, help="USD per 1M prompt tokens (overrides the built-in list)")
    g.add_argument("--price_out", type=float, help="USD per 1M completion tokens")
    g.add_argument("--batch_api", action="store_true", help="use the OpenAI Batch API (half price, resumable)")
    g.add_argument("--batch_poll_seconds", type=float, default=d.batch_poll_seconds)


def run_settings(args: argparse.Namespace, *, progress: bool = True) -> RunSettings:
    """The ``RunSettings`` that the flags of ``add_client_flags`` ask for."""
    client = ClientConfig(base_url=args.base_url, api_key=args.api_key, concurrency=args.concurrency, rpm=args.rpm,
                          tpm=args.tpm, timeout=args.timeout, max_attempts=args.max_attempts,
                          backoff_base=args.backoff_base, max_total_wait=args.max_retry_wait)
    return RunSettings(client=client, max_cost=args.max_cost, price_in=args.price_in, price_out=args.price_out,
                       batch_api=args.batch_api, batch_poll_seconds=args.batch_poll_seconds, progress=progress)


def underscore_flags(argv: Sequence[str]) -> list[str]:
    """``--max-tokens=8`` as ``--max_tokens=8``: the dashed spelling of older command lines, accepted unlisted."""
    out, options = [], True
    for arg in argv:
        if arg == "--":
            options = False
        if options and arg.startswith("--") and len(arg) > 2:
            name, sep, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + sep + value
        out.append(arg)
    return out


# The HTTP transport family: openai and whichever httpx/httpcore generation it uses (httpx2,
# httpcore2.connection, ...), h11, h2. Matched by name when a record is emitted, so loggers
# created later (or renamed by a new transport release) are covered too.
_TRANSPORT = re.compile(r"^(openai|httpx|httpcore|h11|h2|hpack)\w*(\.|$)")


def quiet_transport(record: logging.LogRecord) -> bool:
    """Drop the transport's records below WARNING: its debug lines show request details."""
    return record.levelno >= logging.WARNING or not _TRANSPORT.match(record.name)


def silence_transport_logs() -> None:
    """Keep the transport family below WARNING out of every handler of the root logger (call after configuring it)."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(quiet_transport)
