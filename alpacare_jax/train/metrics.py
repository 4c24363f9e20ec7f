"""Training metrics: throughput and MFU accounting, and writing them to metrics.jsonl, TensorBoard and the console.

MFU = model FLOPs per second (`LlamaConfig.flops_per_token`, forward + backward, attention included)
divided by the dense bf16 peak of all devices in use. The peak comes from the table below, keyed by
`device.device_kind`; devices not in it (CPUs) get no MFU, only the achieved FLOP/s.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

import jax
from etils import epath
from tensorboardX import SummaryWriter

from alpacare_jax import storage
from alpacare_jax.workdir import Workdir

log = logging.getLogger(__name__)

# Dense bf16 FLOP/s per chip, from the vendors' spec sheets.
PEAK_FLOPS_PER_CHIP = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,  # v5e
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,  # v5p reports itself as "TPU v5"
    "tpu v6 lite": 918e12,  # v6e (Trillium)
    "tpu v6e": 918e12,
    "h100": 989e12,
    "h200": 989e12,
    "a100": 312e12,
}


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
    """The table's peak for `device` (default: the first device), or None when unknown (e.g. CPU)."""
    kind = (device or jax.devices()[0]).device_kind.lower()
    # Longest key first, so "tpu v5 lite" wins over "tpu v5".
    for key in sorted(PEAK_FLOPS_PER_CHIP, key=len, reverse=True):
        if key in kind:
            return PEAK_FLOPS_PER_CHIP[key]
    return None


class Throughput:
    """Tokens/s, FLOP/s and MFU over the steps since the last report (wall time between reports)."""

    def __init__(self, flops_per_token: float, tokens_per_step: int, num_devices: int):
        self.flops_per_token = flops_per_token
        self.tokens_per_step = tokens_per_step
        peak = peak_flops_per_device()
        self.peak_total = peak * num_devices if peak else None
        self.reset()

    def reset(self) -> None:
        self._start = time.perf_counter()
        self._steps = 0

    def step(self) -> None:
        self._steps += 1

    def exclude(self, seconds: float) -> None:
        """Leaves `seconds` of non-training work (evaluation) out of the current interval."""
        self._start += seconds

    def report(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self._start
        if self._steps == 0 or elapsed <= 0:
            return {}
        tokens_per_second = self._steps * self.tokens_per_step / elapsed
        out = {
            "tokens_per_second": tokens_per_second,
            "step_time_s": elapsed / self._steps,
            "flops_per_second": tokens_per_second * self.flops_per_token,
        }
        if self.peak_total:
            out["mfu"] = out["flops_per_second"] / self.peak_total
        self.reset()
        return out


class MetricsWriter:
    """One JSON object per logged step in WORKDIR/metrics.jsonl, the same scalars to TensorBoard.

    Only process 0 writes. On resume, lines for steps after the restored checkpoint (logged by the
    interrupted run, then redone) are dropped, so the file reads as one uninterrupted run, and so is a
    half-written last line (a kill during a write), with a warning.
    """

    def __init__(self, run: Workdir, *, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = run.metrics_file
        self._tb = None
        if not enabled:
            return
        records = _parse_lines(self.path, allow_partial_tail=True) if self.path.exists() else []
        kept = [json.dumps(r) for r in records if r.get("step", 0) <= resume_step]
        # Rewritten whole, not appended: appending is not available on every filesystem (GCS).
        self._lines = kept
        self._flush()
        self._tb = SummaryWriter(str(run.tensorboard_dir))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._lines.append(json.dumps(record))
        if storage.is_url(self.path):  # objects cannot be appended to: upload the whole file again
            self._flush()
        else:
            with self.path.open("a") as f:
                f.write(self._lines[-1] + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def _flush(self) -> None:
        """Replaces the file whole, never leaving it half-written (a kill mid-write keeps the old one)."""
        storage.makedirs(self.path.parent)
        storage.write_bytes(self.path, "".join(line + "\n" for line in self._lines).encode())

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _plain(value: Any) -> Any:
    """jax/numpy scalars -> Python numbers, for JSON."""
    if hasattr(value, "item"):
        return value.item()
    return value


def _parse_lines(path: epath.Path, *, allow_partial_tail: bool = False) -> list[dict[str, Any]]:
    """The records of a metrics file; a bad line raises naming it, unless it is the last and may be partial."""
    lines = path.read_text().splitlines()
    last = max((n for n, line in enumerate(lines, 1) if line.strip()), default=0)
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if allow_partial_tail and number == last:
                log.warning("%s: dropped a half-written last line %d (%.60r)", path, number, line)
                break
            raise ValueError(f"{path}: line {number} is not valid JSON ({e.msg})") from None
    return records


def read_metrics(workdir: str | epath.PathLike | Workdir) -> list[dict[str, Any]]:
    """The records of a training workdir's metrics.jsonl."""
    run = workdir if isinstance(workdir, Workdir) else Workdir(workdir)
    return _parse_lines(run.metrics_file)
