"""Early stopping on an evaluation metric, rebuilt from metrics.jsonl so that it survives a restart.

The multiple-choice recipe evaluates the dev split once per epoch and stops after `patience`
evaluations in a row without a better dev accuracy. The only state (the best value, when it was seen,
how many evaluations since) is a function of the logged evaluations, and a resumed run's metrics.jsonl
holds exactly the records up to its checkpoint; so the state is recomputed from there, never saved.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any


@dataclasses.dataclass
class EarlyStopping:
    metric: str  # e.g. "eval_accuracy"
    higher_is_better: bool
    patience: int  # evaluations without improvement before stopping; 0 = never stop
    best: float = math.nan
    best_step: int = 0
    since_best: int = 0

    def update(self, step: int, value: float) -> None:
        better = value > self.best if self.higher_is_better else value < self.best
        if math.isnan(self.best) or better:
            self.best, self.best_step, self.since_best = value, step, 0
        else:
            self.since_best += 1

    def observe(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self.metric in metrics:
            self.update(step, float(metrics[self.metric]))

    def replay(self, records: Iterable[Mapping[str, Any]]) -> EarlyStopping:
        """Feeds the evaluations of earlier metrics.jsonl records (a resumed run's history)."""
        for record in records:
            self.observe(int(record["step"]), record)
        return self

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.since_best >= self.patience
