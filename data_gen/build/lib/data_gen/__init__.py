"""data_gen: regenerate MedInstruct-52k and judge model outputs against any OpenAI-compatible endpoint.

Standalone: it imports nothing from ``alpacare_jax`` and needs only ``openai``, ``rouge_score``,
``rapidfuzz``, ``numpy`` and ``tqdm`` (``keywords`` also ``yake``). Commands: ``python -m data_gen
{instructions,dedup,responses,judge,keywords,contexts}``.

The names below are its public API, the one that other packages (alpacare_jax among them) use;
the modules behind them may change.
"""

from .cli import add_client_flags, run_settings, silence_transport_logs
from .client import ClientConfig
from .errors import BudgetExceeded, DataError, FatalAPIError, JudgeIncomplete
from .judge import (
    Comparison,
    JudgeConfig,
    JudgeResult,
    Summary,
    WinRate,
    build_comparisons,
    read_summaries,
    run_judge,
    summary_path,
    win_rate,
)
from .outputs import Example, load_outputs, parse_claude_prompt, text_key
from .runner import RunSettings, RunSummary
from .store import JsonlStore, decode_utf8, read_records, write_json_atomic

__version__ = "0.2.0"

__all__ = [
    "BudgetExceeded", "ClientConfig", "Comparison", "DataError", "Example", "FatalAPIError", "JsonlStore",
    "JudgeConfig", "JudgeIncomplete", "JudgeResult", "RunSettings", "RunSummary", "Summary", "WinRate",
    "add_client_flags", "build_comparisons", "decode_utf8", "load_outputs", "parse_claude_prompt", "read_records",
    "read_summaries", "run_judge", "run_settings", "silence_transport_logs", "summary_path", "text_key",
    "win_rate", "write_json_atomic",
]
