"""The trial budget a study's workers share: which trials spend it, how many are left, and the two guards a
worker runs with it (a trial that starts after the budget was taken yields; too many failures stop the worker).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import optuna

from maskssd.errors import MaskSSDError

__all__ = [
    "BUDGET_STATES",
    "OVER_BUDGET",
    "BudgetTaken",
    "FailureCap",
    "budget_taken",
    "check_budget",
    "failures",
    "remaining",
    "yielded_trial_log",
]

#: Trials that spend the shared budget: finished ones and those running on any worker (a failed trial does
#: not: it is retried or replaced, up to the failure cap).
BUDGET_STATES = (
    optuna.trial.TrialState.COMPLETE,
    optuna.trial.TrialState.PRUNED,
    optuna.trial.TrialState.RUNNING,
)


class FailureCap:
    """Stop a worker once the study has as many failed trials as its budget (at least 3): something is broken.
    Trials that never ran because other workers had taken the budget are not failures."""

    def __init__(self, n_trials: int):
        self.n = max(n_trials, 3)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if failures(study)[0] >= self.n:
            study.stop()


#: User attribute of a trial that a worker started after the other workers had taken the whole budget.
OVER_BUDGET = "over_budget"


class BudgetTaken(MaskSSDError):
    """Raised at the start of a trial whose place in the budget went to other workers' trials."""

    def __init__(self, number: int, n_trials: int):
        super().__init__(f"trial {number}: the study's budget of {n_trials} trials is taken")
        self.number = number


def failures(study: optuna.Study) -> tuple[int, int]:
    """The study's FAIL trials split in two: (failed, never run because the budget was taken)."""
    failed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
    not_run = sum(OVER_BUDGET in t.user_attrs for t in failed)
    return len(failed) - not_run, not_run


def budget_taken(study: optuna.Study, number: int, n_trials: int) -> bool:
    """Whether the trials numbered below ``number`` that spend the budget (finished or running) fill it.

    ``MaxTrialsCallback`` checks the budget after a trial ends, so workers that start at the same moment can
    each begin the last trial; the storage numbers trials atomically, so the lowest numbers keep their places."""
    trials = study.get_trials(deepcopy=False, states=BUDGET_STATES)
    return sum(t.number < number for t in trials) >= n_trials


def check_budget(trial: optuna.Trial, n_trials: int) -> None:
    """Raise :class:`BudgetTaken` (and stop this worker) if ``trial`` started after the budget was taken; it is
    recorded FAIL with :data:`OVER_BUDGET`, before it samples or trains anything."""
    if budget_taken(trial.study, trial.number, n_trials):
        trial.set_user_attr(OVER_BUDGET, True)
        trial.set_user_attr(
            "fail_reason", f"not run: other workers had started the budget's {n_trials} trials"
        )
        trial.study.stop()
        raise BudgetTaken(trial.number, n_trials)


def remaining(study: optuna.Study, n_trials: int) -> int:
    """Trials still to start: the budget less finished and running ones (enqueued retries still count as to-do)."""
    return max(n_trials - len(study.get_trials(deepcopy=False, states=BUDGET_STATES)), 0)


class _YieldedTrialLog(logging.Filter):
    """Optuna logs a trial that yields to the budget as a failure, with a traceback and a second line; a yielded
    trial is the budget working, not an error: one INFO line instead."""

    def __init__(self) -> None:
        super().__init__()
        self.yielded: set[int] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else None
        if isinstance(err, BudgetTaken):
            self.yielded.add(err.number)
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = f"{err}: not run, this worker stops", ()
            record.exc_info = record.exc_text = None
            return True
        return not any(record.getMessage() == f"Trial {n} failed with value None." for n in self.yielded)


@contextlib.contextmanager
def yielded_trial_log() -> Iterator[None]:
    """While optimising: a trial that yields to the budget is logged as one INFO line, without a traceback."""
    logger, f = logging.getLogger("optuna.study._optimize"), _YieldedTrialLog()
    logger.addFilter(f)
    try:
        yield
    finally:
        logger.removeFilter(f)
