"""Training that does not wait on its tracking store: what a run logs while the MLflow server (or its database,
or the disk under a local store) is away is held, in order, and replayed once the store answers again.

:class:`BufferedRun` wraps a :class:`~maskssd.tracking.runs.MlflowRun` as the run's tracker. A call that finds
the store away (connection refused, timed out, a 5xx, a disk I/O error) is kept; later calls join the queue and
the queue is retried at most every ``retry_every`` seconds (a down server costs a training epoch one short,
failed request, not MLflow's four minutes of retries: maskssd shortens those, see :mod:`maskssd.tracking.runs`).
Metrics keep the time they were measured. Training goes on, checkpointing locally as always.

An outage longer than ``max_outage`` seconds (or more than ``max_pending`` records held) stops the run after
its epoch's checkpoint, the held records written to ``journal`` (``pending-tracking.jsonl`` beside the
checkpoints): ``maskssd train CONFIG --resume RUN`` replays them first and goes on from the next epoch, so no
epoch is lost. At the end of a run the queue is drained, waiting up to ``drain`` seconds for the store.
A call that fails for another reason (a bug, a bad value) raises at once, as without the buffer.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from maskssd.errors import TrackingUnavailable
from maskssd.tracking.runs import MlflowRun
from maskssd.training.tracker import DatasetInfo, SplitMetrics

__all__ = ["BufferedRun", "store_unavailable"]

log = logging.getLogger(__name__)

_AWAY = (
    "Connection refused",
    "Max retries exceeded",
    "Failed to establish a new connection",
    "Connection aborted",
    "RemoteDisconnected",
    "timed out",
    "Read timed out",
    "disk I/O error",
    "database or disk is full",
    "unable to open database",
    "database is locked",
    "No space left on device",
    "File too large",
    "Read-only file system",
    "could not connect to server",
    "server closed the connection",
    "Temporary failure in name resolution",
    "status code 502",
    "status code 503",
    "status code 504",
    "too many 50",  # urllib3: "too many 503 error responses"
)


def store_unavailable(e: BaseException) -> bool:
    """Whether ``e`` says the tracking store is away (rather than that the call was wrong)."""
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(e).__name__}: {e}"
    return any(s in text for s in _AWAY) or type(e).__name__ in (
        "ConnectionError",
        "ConnectTimeout",
        "ReadTimeout",
    )


@dataclass
class _Op:
    """One held call: the tracker method, its arguments as JSON values, when it was made and for which epoch."""

    name: str
    args: dict[str, Any]
    at: float = field(default_factory=time.time)
    step: int | None = None


class BufferedRun:
    """A :class:`~maskssd.training.tracker.Tracker` over an MLflow run that holds what it cannot send yet."""

    def __init__(
        self,
        run: MlflowRun,
        journal: str | Path,
        *,
        max_outage: float | None = None,
        max_pending: int = 50_000,
        retry_every: float | None = None,
        drain: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.run, self.journal = run, Path(journal)
        self.max_outage = float(
            os.environ.get("MASKSSD_TRACKING_MAX_OUTAGE", 3600) if max_outage is None else max_outage
        )
        self.drain = float(os.environ.get("MASKSSD_TRACKING_DRAIN", 300) if drain is None else drain)
        self.retry_every = float(
            os.environ.get("MASKSSD_TRACKING_RETRY", 10) if retry_every is None else retry_every
        )
        self.max_pending, self.clock = max_pending, clock
        self.pending: list[_Op] = []
        self.away_since: float | None = None
        self.last_try = 0.0
        self._load_journal()

    @property
    def run_id(self) -> str:
        return self.run.run_id

    @property
    def client(self) -> Any:
        return self.run.client

    # ------------------------------------------------------------------------------------ the queue
    def _load_journal(self) -> None:
        """Records a stopped run could not send (a resume): first in the queue."""
        if not self.journal.is_file():
            return
        lines = self.journal.read_text().splitlines()
        self.pending = [_Op(**json.loads(line)) for line in lines if line.strip()]
        log.info(
            "replaying %d tracking records held while the store was away (%s)",
            len(self.pending),
            self.journal,
        )
        self.journal.unlink()
        self._flush()

    def _execute(self, op: _Op) -> Any:
        a = op.args
        if op.name == "log_metrics":
            return self.run.log_metrics(a["metrics"], op.step or 0, timestamp_ms=int(op.at * 1000))
        if op.name == "log_datasets":
            return self.run.log_datasets([DatasetInfo(**d) for d in a["datasets"]])
        return getattr(self.run, op.name)(**a)

    def _flush(self) -> bool:
        """Send what is held, in order; False (and stop) at the first record the store cannot take yet."""
        while self.pending:
            try:
                self._execute(self.pending[0])
            except Exception as e:
                if not store_unavailable(e):
                    raise
                self._away(e)
                return False
            self.pending.pop(0)
        if self.away_since is not None:
            log.info(
                "tracking store back after %.0f s; every held record sent", self.clock() - self.away_since
            )
        self.away_since = None
        return True

    def _away(self, e: BaseException) -> None:
        now = self.clock()
        self.last_try = now
        if self.away_since is None:
            self.away_since = now
            log.warning(
                "tracking store unreachable (%s): training goes on, logging held (up to %.0f min)",
                str(e).splitlines()[0][:200],
                self.max_outage / 60,
            )

    def _call(self, name: str, step: int | None = None, **args: Any) -> Any:
        op = _Op(name, args, step=step)
        if self.pending and self.clock() - self.last_try < self.retry_every:
            self.pending.append(op)  # away a moment ago: do not wait on it again yet
        elif not self._flush():
            self.pending.append(op)
        else:
            try:
                return self._execute(op)
            except Exception as e:
                if not store_unavailable(e):
                    raise
                self._away(e)
                self.pending.append(op)
        return None

    def _check_capacity(self) -> None:
        """Stop the run when the store has been away too long. Called from the epoch's report only, which the
        engine makes once the epoch's checkpoint is written: a resume goes on from the next epoch."""
        if self.away_since is None:
            return
        away = self.clock() - self.away_since
        if away > self.max_outage or len(self.pending) > self.max_pending:
            held = len(self.pending)
            self.hold_on_disk()
            raise TrackingUnavailable(
                f"the tracking store {self.client.tracking_uri} has been unreachable for {away / 60:.1f} min "
                f"({held} records held, now in {self.journal}); the run stopped after its last "
                "checkpoint"
            )

    def hold_on_disk(self, until_step: int | None = None) -> None:
        """Move the held records (those of epochs ``<= until_step`` when given) to the journal, for a resume."""
        keep = [op for op in self.pending if until_step is None or op.step is None or op.step <= until_step]
        self.pending = []
        if not keep:
            return
        try:
            self.journal.parent.mkdir(parents=True, exist_ok=True)
            with self.journal.open("a") as f:
                for op in keep:
                    f.write(json.dumps(asdict(op)) + "\n")
        except OSError as e:  # a full disk: these epochs are trained again on resume
            log.warning("could not keep %d tracking records in %s: %s", len(keep), self.journal, e)

    def close(self) -> None:
        """Send everything held, waiting up to ``drain`` seconds for the store; else keep it and stop the run."""
        deadline = self.clock() + self.drain
        while self.pending and not self._flush():
            if self.clock() > deadline:
                held = len(self.pending)
                self.hold_on_disk()
                raise TrackingUnavailable(
                    f"the tracking store {self.client.tracking_uri} did not come back within {self.drain:.0f} s "
                    f"of the end of training ({held} records, now in {self.journal})"
                )
            time.sleep(min(5.0, self.retry_every))

    # ------------------------------------------------------------------------------ the tracker
    def log_params(self, params: Mapping[str, Any]) -> None:
        self._call("log_params", params={k: str(v) for k, v in params.items()})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._call("set_tags", tags={k: str(v) for k, v in tags.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """The epoch's report (after its checkpoint): held if need be, and the point where a run that has
        been without its store for too long stops."""
        self._call("log_metrics", step=step, metrics={k: float(v) for k, v in metrics.items()})
        self._check_capacity()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call("log_artifact", path=str(path), artifact_path=artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call("log_text", text=text, artifact_file=artifact_file)

    def log_dict(self, d: Mapping[str, Any], artifact_file: str) -> None:
        self._call("log_dict", d=json.loads(json.dumps(d, default=str)), artifact_file=artifact_file)

    def log_figure(self, path: Path, artifact_path: str = "plots") -> None:
        self._call("log_figure", path=str(path), artifact_path=artifact_path)

    def log_datasets(self, datasets: Sequence[DatasetInfo]) -> None:
        self._call("log_datasets", datasets=[asdict(d) for d in datasets])

    def log_model(
        self,
        checkpoint: Path,
        tags: Mapping[str, str],
        *,
        evaluations: Sequence[SplitMetrics] = (),
        step: int = 0,
    ) -> str | None:
        """The model is logged when the store is there (it is a resume's first job otherwise: the last epoch's
        checkpoint is kept, so the final evaluation and the model are redone)."""
        self.close()
        return self.run.log_model(checkpoint, tags, evaluations=evaluations, step=step)

    def download(self, artifact_path: str, dst: str | Path) -> Path:
        return self.run.download(artifact_path, dst)
