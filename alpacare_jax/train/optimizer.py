"""AdamW with warmup + cosine decay, global-norm clipping and a weight-decay mask (the HF Trainer recipe).

Gradient accumulation is not an optimizer wrapper here: the train step sums gradients over
microbatches before one update (see `step.py`), which keeps the loss an exact per-token mean over the
whole global batch; `optax.MultiSteps` would average per-microbatch means instead.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import ml_collections
import optax

SCHEDULES = ("cosine", "linear", "constant")


def warmup_steps(opt_config: ml_collections.ConfigDict, total_steps: int) -> int:
    """`warmup_steps` when set, else HF's rounding of the ratio: ceil(warmup_ratio * total_steps)."""
    if opt_config.get("warmup_steps", 0) > 0:
        return min(opt_config.warmup_steps, total_steps)
    return math.ceil(opt_config.warmup_ratio * total_steps)


def learning_rate_schedule(opt_config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate`, then cosine / linear decay (or constant) to the last step."""
    if opt_config.schedule not in SCHEDULES:
        raise ValueError(f"optimizer.schedule={opt_config.schedule!r}; choose one of {SCHEDULES}")
    if total_steps < 1:
        raise ValueError(f"total training steps must be >= 1, got {total_steps}")
    peak = opt_config.learning_rate
    warmup = warmup_steps(opt_config, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    end = peak * opt_config.final_lr_fraction
    if opt_config.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=opt_config.final_lr_fraction)
    elif opt_config.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def weight_decay_mask(params: Any, no_decay_patterns: tuple[str, ...]) -> Any:
    """True for parameters that get weight decay: those whose '/'-joined path matches no pattern."""
    patterns = [re.compile(p) for p in no_decay_patterns]

    def decays(path, _):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        return not any(p.search(name) for p in patterns)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(opt_config: ml_collections.ConfigDict,
                   total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer and its schedule (the schedule is also logged as `learning_rate`)."""
    schedule = learning_rate_schedule(opt_config, total_steps)
    parts = []
    if opt_config.max_grad_norm and opt_config.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(opt_config.max_grad_norm))
    parts.append(optax.adamw(
        schedule, b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps, weight_decay=opt_config.weight_decay,
        mask=lambda params: weight_decay_mask(params, tuple(opt_config.no_decay)),
    ))
    return optax.chain(*parts), schedule
