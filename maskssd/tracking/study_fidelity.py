"""Multi-fidelity studies: pruners over epochs whose first trials run the full budget, and the check that the
cheap fidelity ranks configurations the way full runs do.

Successive halving (ASHA, asynchronous: several workers never wait for a rung to fill) and Hyperband stop a
trial at a rung (``min_resource * reduction_factor**k`` epochs) unless its value is in the best
``1/reduction_factor`` of the trials that reached that rung. Whether that is sound depends on the early value
predicting the final one; :func:`fidelity_check` measures it: the Spearman rank correlation between each
trial's value at the lowest rung and its final value, over the trials that ran the full budget. The first
``n_full`` trials (by number) are never pruned, so the check always has unselected full-budget trials (the
ones promoted by the pruner were selected on their early value, which narrows their range).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna

__all__ = ["FidelityCheck", "Hyperband", "SuccessiveHalving", "fidelity_check", "spearman"]


class _FullBudgetFirst:
    """Pruner mixin: trials numbered below ``n_full`` are never pruned. The wrapped pruner still sees them (it
    records their rung values, so later trials have competitors); only its verdict is ignored."""

    n_full = 0

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        pruned = super().prune(study, trial)  # type: ignore[misc]
        return bool(pruned) and trial.number >= self.n_full


class SuccessiveHalving(_FullBudgetFirst, optuna.pruners.SuccessiveHalvingPruner):
    """Optuna's asynchronous successive halving (ASHA) whose first ``n_full`` trials run the full budget."""

    def __init__(self, *, n_full: int = 0, **kwargs: Any):
        super().__init__(**kwargs)
        self.n_full = n_full


class Hyperband(_FullBudgetFirst, optuna.pruners.HyperbandPruner):
    """Optuna's Hyperband (still a ``HyperbandPruner``: TPE keeps sampling per bracket) whose first ``n_full``
    trials run the full budget."""

    def __init__(self, *, n_full: int = 0, **kwargs: Any):
        super().__init__(**kwargs)
        self.n_full = n_full


# -------------------------------------------------------------------------------------------- check
def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (ties get their average rank); NaN under 3 pairs or for a constant side."""
    if len(x) != len(y) or len(x) < 3:
        return math.nan
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def _ranks(v: Sequence[float]) -> list[float]:
    order = sorted(range(len(v)), key=lambda i: v[i])
    ranks = [0.0] * len(v)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


@dataclass
class FidelityCheck:
    """Spearman ρ between each full-budget trial's value at ``rung_epoch`` (its first report at or after it)
    and its final value, over ``n`` trials; ``by_epoch``: the same at every reported epoch, ``epoch -> (ρ, n)``."""

    rung_epoch: int
    full_epochs: int
    n: int
    spearman: float
    by_epoch: dict[int, tuple[float, int]] = field(default_factory=dict)
    epochs: int = 0  # a fold study: steps 1..epochs are fold 1's epochs, step epochs + k is after fold k
    folds: int = 0

    def step_name(self, step: int) -> str:
        """``epoch 3``, or in a fold study ``fold 2`` for the steps after the epochs."""
        if self.folds and step > self.epochs:
            return f"fold {step - self.epochs}"
        return f"epoch {step}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "rung_epoch": self.rung_epoch,
            "full_epochs": self.full_epochs,
            "n": self.n,
            "spearman": self.spearman,
            "by_epoch": {str(e): {"spearman": r, "n": n} for e, (r, n) in self.by_epoch.items()},
            "folds": self.folds,
            "steps": {str(e): self.step_name(e) for e in self.by_epoch},
        }


def fidelity_check(
    study: optuna.Study, *, rung_epoch: int | None = None, full_epochs: int | None = None
) -> FidelityCheck | None:
    """The cheap-fidelity check of a study (None before any trial completed). The rung and the full budget
    default to what :func:`maskssd.tracking.studies.run_study` stored in the study (user attr ``fidelity``),
    else to the earliest reported epoch and the longest completed trial."""
    complete = [
        t
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if t.intermediate_values and t.value is not None and math.isfinite(t.value)
    ]
    if not complete:
        return None
    stored = study.user_attrs.get("fidelity") or {}
    full = int(full_epochs or stored.get("full_epochs") or max(max(t.intermediate_values) for t in complete))
    rung = int(rung_epoch or stored.get("rung_epoch") or min(min(t.intermediate_values) for t in complete))
    # trials pruned at their last report (by a pruner asked at the final epoch) ran the full budget too; their
    # final value is their best report, as the selected checkpoint's is
    best = max if study.direction == optuna.study.StudyDirection.MAXIMIZE else min
    ran_out = [
        optuna.trial.create_trial(
            params=t.params,
            distributions=t.distributions,
            value=best(t.intermediate_values.values()),
            intermediate_values=t.intermediate_values,
        )
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,))
        if t.intermediate_values and max(t.intermediate_values) >= full
    ]
    full_trials = [t for t in [*complete, *ran_out] if max(t.intermediate_values) >= full]

    def at(t: optuna.trial.FrozenTrial, epoch: int) -> float | None:
        step = next((s for s in sorted(t.intermediate_values) if s >= epoch), None)
        return None if step is None or step >= full else t.intermediate_values[step]

    def rho(epoch: int, exact: bool) -> tuple[float, int]:
        pairs = [
            (t.intermediate_values[epoch] if exact else at(t, epoch), t.value)
            for t in full_trials
            if (epoch in t.intermediate_values) or not exact
        ]
        pairs = [(a, b) for a, b in pairs if a is not None and math.isfinite(a)]
        return spearman([a for a, _ in pairs], [b for _, b in pairs]), len(pairs)

    epochs = sorted({s for t in full_trials for s in t.intermediate_values if s < full})
    value, n = rho(rung, exact=False)
    by_step = {e: rho(e, exact=True) for e in epochs}
    return FidelityCheck(
        rung, full, n, value, by_step, int(stored.get("epochs", 0)), int(stored.get("folds", 0))
    )
