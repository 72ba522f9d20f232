"""User-facing errors: each says what went wrong and where (file, element, key).

The CLI prints a :class:`MaskSSDError` as one clear message with no traceback; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class MaskSSDError(Exception):
    """Base class of errors caused by the user's input, not by a bug."""


class DataError(MaskSSDError):
    """A problem with one sample of a dataset: names the file and, where known, the element."""

    def __init__(self, message: str, path: str | Path | None = None, element: str | None = None):
        if path is None and "\nOriginal Traceback" in message:
            # re-raised by a DataLoader worker: recover the original message (and its file), not the traceback
            message, path, element = _unwrap_worker_message(message)
        self.path = None if path is None else str(path)
        self.element = element
        self.reason = message
        where = ""
        if self.path:
            where = self.path + (f" [{element}]" if element else "") + ": "
        super().__init__(where + message)


def _unwrap_worker_message(message: str) -> tuple[str, str | None, str | None]:
    import re

    last = [line for line in message.strip().splitlines() if line.strip()][-1].strip()
    for prefix in ("maskssd.errors.DataError: ", "DataError: "):
        last = last.removeprefix(prefix)
    m = re.match(r"^(?P<path>[^\[]+?)(?: \[(?P<el>[^\]]+)\])?: (?P<reason>.+)$", last)
    if m and ("/" in m["path"] or "\\" in m["path"]):
        return m["reason"], m["path"], m["el"]
    return last, None, None


class ConfigError(MaskSSDError):
    """An invalid configuration value: names the key, the file and, where found, the line."""

    def __init__(
        self, message: str, path: str | Path | None = None, key: str | None = None, line: int | None = None
    ):
        self.path = None if path is None else str(path)
        self.key = key
        self.line = line
        where = self.path or "<config>"
        if line is not None:
            where += f":{line}"
        if key:
            where += f" [{key}]"
        super().__init__(f"{where}: {message}")


class NonFiniteLossError(MaskSSDError):
    """Training produced a NaN or infinite loss."""


class PretrainedWeightsMissing(MaskSSDError):
    """Pretrained weights are not on disk and cannot be downloaded offline."""


class TrainingInterrupted(MaskSSDError):
    """Ctrl-C or SIGTERM stopped training; a checkpoint was saved. ``run_id``: the run to resume."""

    run_id: str | None = None


class RunStopped(MaskSSDError):
    """A run stopped by something outside it (a full disk, a tracking server away for too long) with everything
    it finished kept: ``run_id`` is the run to resume once the cause is gone (``maskssd train --resume``)."""

    run_id: str | None = None
    run_status = "FAILED"

    @property
    def run_reason(self) -> str:
        return str(self)


class CheckpointWriteError(RunStopped):
    """A checkpoint could not be written (disk full, file-size limit, permissions); the previous one is intact.
    ``kept_epoch``: the epoch of that checkpoint (0: none)."""

    kept_epoch: int = 0

    @classmethod
    def at(cls, kept_epoch: int, message: str) -> CheckpointWriteError:
        e = cls(message)
        e.kept_epoch = kept_epoch
        return e


class TrackingUnavailable(RunStopped):
    """The tracking server was away for longer than the run could hold what it logged (kept on disk instead)."""


class UnsafeCheckpointError(MaskSSDError):
    """A model file whose unpickling needs arbitrary Python objects (which could run code): refused unread.

    ``forbidden`` lists the pickle globals (``module.name``) that are not allowed.
    """

    def __init__(self, path: str | Path, forbidden: list[str], detail: str = ""):
        self.path = str(path)
        self.forbidden = list(forbidden)
        what = ", ".join(self.forbidden[:5]) + (
            f" (+{len(self.forbidden) - 5} more)" if len(self.forbidden) > 5 else ""
        )
        super().__init__(
            f"{self.path}: refused to load: it needs arbitrary Python objects ({what or detail or 'unknown'}), "
            "which could run code when unpickled; nothing in it was run. maskssd loads model files holding only "
            "tensors and plain containers (and the SSD300 tutorial's pickled modules, rebuilt as inert data); if you "
            "trust the file, re-save its weights as a state dict: torch.save(model.state_dict(), PATH)"
        )
