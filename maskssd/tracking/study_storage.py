"""An Optuna RDB storage that rides out its database going away (a PostgreSQL restart, a failover, a network
blip): every storage call that fails on a lost connection is retried, with backoff, until the database answers
again or ``max_outage`` seconds have passed. A worker waits instead of failing its trial, so a restart loses
no trial and runs none twice.

SQLAlchemy's ``pool_pre_ping`` replaces the pooled connections the restart killed; Optuna's heartbeat fails the
trials of workers that are really gone (``grace_period``). Keep ``grace_period`` longer than the outages you
expect: a worker whose heartbeat could not reach the database for longer looks dead to the others.

One window is not covered: a write whose commit reached the database but whose answer was lost with the
connection is sent again. For a state change this is detected (the trial is already finished with that
state: success); a new trial would be created twice, the second left RUNNING without a heartbeat.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import optuna
from sqlalchemy import exc as sa_exc

log = logging.getLogger(__name__)

#: Seconds a worker waits for its storage to come back before the call fails (``$MASKSSD_STORAGE_MAX_OUTAGE``).
DEFAULT_MAX_OUTAGE = 300.0

#: The storage calls of Optuna's study loop and its cache (``_CachedStorage``) on an RDB storage.
RETRIED = (
    "create_new_study",
    "delete_study",
    "set_study_user_attr",
    "set_study_system_attr",
    "get_study_id_from_name",
    "get_study_name_from_id",
    "get_study_directions",
    "get_study_user_attrs",
    "get_study_system_attrs",
    "get_all_studies",
    "create_new_trial",
    "_create_new_trial",
    "set_trial_param",
    "_set_trial_param",
    "get_trial_param",
    "set_trial_state_values",
    "set_trial_intermediate_value",
    "set_trial_user_attr",
    "set_trial_system_attr",
    "get_trial_user_attrs",
    "get_trial_system_attrs",
    "get_trial_id_from_study_id_trial_number",
    "get_trial",
    "get_all_trials",
    "_get_trials",
    "get_best_trial",
    "_get_best_trial_id",
    "record_heartbeat",
    "_get_stale_trial_ids",
)


def is_connection_error(e: BaseException | None) -> bool:
    """Whether ``e`` (or what caused it: Optuna wraps SQLAlchemy's errors) is a lost or refused connection,
    not a problem with the data."""
    while e is not None:
        if isinstance(e, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError)):
            return True
        if isinstance(e, sa_exc.DBAPIError) and e.connection_invalidated:
            return True
        e = e.__cause__ or e.__context__
    return False


class ResilientRDBStorage(optuna.storages.RDBStorage):
    """:class:`optuna.storages.RDBStorage` whose calls wait out a database outage (see the module)."""

    def __init__(self, *args: Any, max_outage: float | None = None, **kwargs: Any):
        env = os.environ.get("MASKSSD_STORAGE_MAX_OUTAGE")
        self.max_outage = float(max_outage if max_outage is not None else env or DEFAULT_MAX_OUTAGE)
        super().__init__(*args, **kwargs)


def _retrying(name: str, call: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(call)
    def method(self: ResilientRDBStorage, *args: Any, **kwargs: Any) -> Any:
        deadline, delay, failed = None, 0.5, False
        while True:
            try:
                result = call(self, *args, **kwargs)
            except optuna.exceptions.UpdateFinishedTrialError:
                if failed and name == "set_trial_state_values" and _committed(self, *args, **kwargs):
                    return True  # the attempt that lost its connection had committed this very state
                raise
            except Exception as e:
                if not is_connection_error(e):
                    raise
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.max_outage
                    log.warning(
                        "Optuna storage unreachable (%s); waiting up to %.0f s for it to come back",
                        type(e.__cause__ or e).__name__,
                        self.max_outage,
                    )
                if now >= deadline:
                    raise optuna.exceptions.StorageInternalError(
                        f"the Optuna storage did not come back within {self.max_outage:.0f} s "
                        "($MASKSSD_STORAGE_MAX_OUTAGE); run the same study command again once it is up: the "
                        "study resumes"
                    ) from e
                failed = True
                time.sleep(delay)
                delay = min(2 * delay, 5.0)
                continue
            if failed:
                log.warning("Optuna storage back: %s went through", name)
            return result

    return method


def _committed(storage: ResilientRDBStorage, trial_id: int, state: Any, values: Any = None) -> bool:
    trial = storage.get_trial(trial_id)
    return trial.state == state and (values is None or list(trial.values or []) == list(values))


for _name in RETRIED:
    setattr(ResilientRDBStorage, _name, _retrying(_name, getattr(optuna.storages.RDBStorage, _name)))
