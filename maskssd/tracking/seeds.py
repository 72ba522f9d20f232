"""Seeds and folds as axes: one experiment trained once per seed (and, with ``folds``, once per fold of a
K-fold cross-validation of its train and val images), every one a child MLflow run of one parent run that holds
the mean and the standard deviation of every final metric over its children (and, for folds, the pooled
out-of-fold evaluation: :mod:`maskssd.tracking.folds`).

``maskssd train CONFIG --seeds 0,1,2 [--folds 5]`` calls :func:`run_seeds`. The parent run (tag
``maskssd.role=seeds``, or ``cv`` with folds)
holds the config (its params, ``config.toml`` and ``config.json``; no ``experiment.seed``), the seed list
(param ``seeds``), and for every final metric ``K`` its finished children logged (``val_*`` and ``test_*``,
written once at a child's final step; confidence-interval metrics named that way included) ``K_mean`` and
``K_std`` (the sample standard deviation, ddof 1; NaN for a single seed), ``n_seeds`` (the finished children
averaged), a tag ``maskssd.children`` listing its children's run ids in seed order and the artifact
``seeds.json`` (each child's seed, fold, run id and status). Children carry ``mlflow.parentRunId``,
``maskssd.role=seed`` (``fold``), ``maskssd.seed`` and ``maskssd.fold``; children run seed by seed, each
seed's folds in order, so a seed's out-of-fold evaluation is complete as early as possible.

Resuming a parent (``resume_parent_id``) finishes only what is missing: a FINISHED child is kept untouched; a
KILLED, FAILED or RUNNING child that saved a checkpoint continues from it in the same run
(``run_experiment(resume_run_id=...)``); a seed with neither starts a new child (one left RUNNING without a
checkpoint, whose process died, is then marked KILLED with the reason). Then the parent is aggregated again.
An interrupted seed (Ctrl-C, SIGTERM) marks the parent KILLED and raises
:class:`~maskssd.errors.TrainingInterrupted` whose ``run_id`` is the parent's: resume that.

Under torchrun every rank calls :func:`run_seeds` (``--nproc`` re-runs the whole command): one process group
serves every seed, each seed's child trains distributed, and rank 0 alone writes to MLflow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow

from maskssd.errors import MaskSSDError, NonFiniteLossError, RunStopped, TrainingInterrupted
from maskssd.tracking import runs
from maskssd.tracking.experiment import run_experiment
from maskssd.training import distributed
from maskssd.training.config import ExperimentConfig, validate
from maskssd.training.context import EvalHook
from maskssd.training.engine import TrainProgress

__all__ = [
    "CHILDREN_TAG",
    "FINAL_PREFIXES",
    "FOLD_TAG",
    "Member",
    "ROLE_TAG",
    "SEED_TAG",
    "SeedRun",
    "SeedsResult",
    "aggregate",
    "children_of",
    "finished_children",
    "is_final_metric",
    "is_seeds_parent",
    "run_seeds",
]

log = logging.getLogger(__name__)

ROLE_TAG = "maskssd.role"
SEED_TAG = "maskssd.seed"
FOLD_TAG = "maskssd.fold"
#: A cross-validation parent's key (its config and seeds): ``--fold k`` processes of one recipe find their parent.
CV_KEY_TAG = "maskssd.cv_key"
#: The folds of a cross-validation parent whose children have finished (``1, 3``): trained fold by fold.
FOLDS_DONE_TAG = "maskssd.folds_done"
CHILDREN_TAG = "maskssd.children"
#: ``(seed, fold)`` of a child; fold 0 without cross-validation.
Member = tuple[int, int]
#: A run's final metrics (logged once, at its last step): the selected checkpoint's ``val_*`` and ``test_*``
#: (the per-epoch curves are ``train/*`` and ``val/*``).
FINAL_PREFIXES = ("val_", "test_")


@dataclass
class SeedRun:
    """One child run (a seed, or a seed's fold). ``action``: ``new`` (started), ``resumed`` (continued) or
    ``kept`` (already done)."""

    seed: int
    run_id: str | None
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    action: str = "new"
    reason: str = ""
    fold: int = 0

    @property
    def label(self) -> str:
        return f"seed {self.seed}" + (f" fold {self.fold}" if self.fold else "")


@dataclass
class SeedsResult:
    """The parent run, each seed's child, and the aggregate the parent logged (``K_mean``, ``K_std``, ``n_seeds``)."""

    parent_run_id: str
    seeds: list[int]
    runs: dict[Member, SeedRun]
    aggregate: dict[str, float]
    status: str
    folds: int = 0
    waiting: list[Member] = field(default_factory=list)  # --fold k: children not trained yet (parent RUNNING)

    def mean_std(self, key: str) -> tuple[float, float, int]:
        """``(mean, std, n)`` of a final metric over the finished seeds (NaN when absent)."""
        a = self.aggregate
        return a.get(f"{key}_mean", math.nan), a.get(f"{key}_std", math.nan), int(a.get("n_seeds", 0))


@dataclass
class _Plan:
    parent_id: str
    name: str
    cfg: ExperimentConfig
    seeds: list[int]
    # (seed, fold) -> (new | resumed | kept | elsewhere: another --fold process's, child run id)
    actions: dict[Member, tuple[str, str | None]]
    folds: int = 0
    only: list[Member] | None = None  # --fold k: the members this process trains (the rest: kept or left)

    @property
    def members(self) -> list[Member]:
        """Every child in training order: seed by seed, each seed's folds in order."""
        return [(s, f) for s in self.seeds for f in (range(1, self.folds + 1) if self.folds else [0])]


# ------------------------------------------------------------------------------------------ reading
def is_final_metric(key: str) -> bool:
    return key.startswith(FINAL_PREFIXES) and "/" not in key


def aggregate(metrics: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """``K_mean`` and ``K_std`` (sample std, ddof 1; NaN for one run) of every final metric ``K`` that each of
    ``metrics`` holds, and ``n_seeds``."""
    out = {"n_seeds": float(len(metrics))}
    if not metrics:
        return out
    keys = set.intersection(*({k for k in m if is_final_metric(k)} for m in metrics))
    n = len(metrics)
    for k in sorted(keys):
        values = [float(m[k]) for m in metrics]
        mean = math.fsum(values) / n
        out[f"{k}_mean"] = mean
        out[f"{k}_std"] = (
            math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
        )
    return out


def children_of(c: Any, parent_id: str) -> list[Any]:
    """The child runs of a parent (``mlflow.parentRunId``), by seed, fold, then start time (MLflow ``Run``s)."""
    exp = c.get_run(parent_id).info.experiment_id
    found = c.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=1000)
    return sorted(
        found, key=lambda r: (_seed_of(r) is None, _seed_of(r) or 0, _fold_of(r), r.info.start_time or 0)
    )


def finished_children(parent_id: str, *, tracking_uri: str | None = None) -> list[str]:
    """Run ids of a seeds parent's FINISHED children in seed order: the runs its mean and std average."""
    c = runs.client(tracking_uri, create=False)
    return [r.info.run_id for r in children_of(c, parent_id) if r.info.status == "FINISHED"]


def is_seeds_parent(run_id: str, *, tracking_uri: str | None = None) -> bool:
    """Whether ``run_id`` is the parent of a seeds or cross-validation run (False for any other run, or none)."""
    try:
        return runs.client(tracking_uri, create=False).get_run(run_id).data.tags.get(ROLE_TAG) in (
            "seeds",
            "cv",
        )
    except mlflow.exceptions.MlflowException:
        return False


def fold_models(c: Any, parent_id: str, seed: int | None = None) -> tuple[dict[str, Any], int, list[str]]:
    """A cross-validation parent's folds (its ``folds.json``: ``k``, ``root``, ``digest``, each fold's image
    ids), the seed whose models are taken (the parent's first unless ``seed``) and that seed's finished child
    run of every fold, in fold order; refuses a parent a fold's model is missing from."""
    from maskssd.tracking.folds import seeds_of

    seeds = seeds_of(c.get_run(parent_id))
    seed = seed if seed is not None else (seeds[0] if seeds else 0)
    with tempfile.TemporaryDirectory(prefix="maskssd-folds-") as tmp:
        try:
            folds = json.loads(runs.MlflowRun(c, parent_id).download("folds.json", tmp).read_text())
        except (MaskSSDError, ValueError) as e:
            raise MaskSSDError(
                f"run {parent_id} has no readable folds.json: is it a --folds parent? ({e})"
            ) from None
    kids = {
        _fold_of(r): r.info.run_id
        for r in children_of(c, parent_id)
        if r.info.status == "FINISHED" and _seed_of(r) == seed and _fold_of(r)
    }
    missing = [k for k in range(1, int(folds["k"]) + 1) if k not in kids]
    if missing:
        raise MaskSSDError(
            f"cross-validation parent {parent_id} has no finished model of seed {seed} for fold(s)"
            f" {', '.join(map(str, missing))}: finish it with maskssd train CONFIG --resume {parent_id}"
        )
    return folds, seed, [kids[k] for k in range(1, int(folds["k"]) + 1)]


def _seed_of(run: Any) -> int | None:
    raw = run.data.tags.get(SEED_TAG, run.data.params.get("experiment.seed"))
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def _fold_of(run: Any) -> int:
    try:
        return int(run.data.tags.get(FOLD_TAG, 0))
    except ValueError:
        return 0


def _final_metrics(c: Any, run_id: str) -> dict[str, float]:
    return {k: v for k, v in c.get_run(run_id).data.metrics.items() if is_final_metric(k)}


def _resumable(c: Any, run_id: str) -> bool:
    """A child that logged its config and a last checkpoint can continue where it stopped."""
    top = {a.path for a in c.list_artifacts(run_id)}
    ckpts = {a.path for a in c.list_artifacts(run_id, "checkpoints")} if "checkpoints" in top else set()
    return "config.json" in top and "checkpoints/last.pt" in ckpts


# ------------------------------------------------------------------------------------- the parent
def _check_seeds(seeds: Sequence[int] | None) -> list[int]:
    seeds = [int(s) for s in (seeds or [])]
    if not seeds:
        raise MaskSSDError("give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise MaskSSDError(f"seeds repeat: {seeds}")
    return seeds


def _new_parent(
    c: Any,
    cfg: ExperimentConfig,
    seeds: list[int],
    run_name: str | None,
    folds: int = 0,
    parent_run_id: str | None = None,
    extra_tags: Mapping[str, str] | None = None,
) -> _Plan:
    role = "cv" if folds else "seeds"
    name = run_name or f"{cfg.experiment.name}-{role}"
    listed = ",".join(map(str, seeds))
    tags = {**(extra_tags or {}), ROLE_TAG: role, "maskssd.seeds": listed}
    tags.update(runs.git_info(Path(__file__).resolve().parent))
    if cfg.experiment.description:
        tags["mlflow.note.content"] = cfg.experiment.description
    run = runs.MlflowRun.start(c, cfg.experiment.name, name, tags, parent_run_id)
    params = {k: v for k, v in cfg.flat().items() if k not in ("experiment.seed", "data.fold")}
    run.log_params({**params, "seeds": listed})
    run.log_text(cfg.to_toml(), "config.toml")
    run.log_dict(cfg.model_dump(mode="json"), "config.json")
    plan = _Plan(run.run_id, name, cfg, seeds, {}, folds)
    plan.actions = {m: ("new", None) for m in plan.members}
    if folds:
        from maskssd.tracking.folds import log_folds

        log_folds(run, cfg)
    return plan


def _resume_parent(c: Any, parent_id: str, seeds: Sequence[int] | None, fold: int | None = None) -> _Plan:
    """The plan that finishes a parent: each child kept (finished), resumed (from its last checkpoint) or new.
    ``fold``: only that fold's children are resumed or replaced; another fold's unfinished child may be
    training in another process right now, and is left as it is."""
    try:
        run = c.get_run(parent_id)
    except mlflow.exceptions.MlflowException:
        raise MaskSSDError(f"no MLflow run {parent_id} in {c.tracking_uri}") from None
    role = run.data.tags.get(ROLE_TAG)
    if role not in ("seeds", "cv") or "seeds" not in run.data.params:
        raise MaskSSDError(f"run {parent_id} is not the parent of a seeds or folds run (tag {ROLE_TAG})")
    logged = _check_seeds([int(s) for s in run.data.params["seeds"].split(",")])
    if seeds and list(seeds) != logged:
        raise MaskSSDError(f"run {parent_id} was started with seeds {logged}, not {list(seeds)}")
    with tempfile.TemporaryDirectory() as tmp:
        text = runs.MlflowRun(c, parent_id).download("config.json", tmp).read_text()
    cfg = validate(json.loads(text), f"run {parent_id} config.json")
    c.update_run(parent_id, status="RUNNING")
    by_member: dict[Member, list[Any]] = {}
    for child in children_of(c, parent_id):
        seed = _seed_of(child)
        if seed is not None:
            by_member.setdefault((seed, _fold_of(child)), []).append(child)
    plan = _Plan(
        parent_id, run.info.run_name or f"{cfg.experiment.name}-{role}", cfg, logged, {}, cfg.data.folds
    )
    for member in plan.members:
        candidates = by_member.get(member, [])
        finished = [r.info.run_id for r in candidates if r.info.status == "FINISHED"]
        if fold and member[1] != fold and not finished:
            plan.actions[member] = ("elsewhere", None)
            continue
        resumable = [r.info.run_id for r in candidates if _resumable(c, r.info.run_id)]
        if finished:
            plan.actions[member] = ("kept", finished[-1])
        elif resumable:
            plan.actions[member] = ("resumed", resumable[-1])
        else:
            plan.actions[member] = ("new", None)
            _close_stale(c, [r for r in candidates if r.info.status == "RUNNING"], parent_id)
    return plan


def _cv_key(cfg: ExperimentConfig, seeds: Sequence[int]) -> str:
    """What makes two ``--fold`` processes folds of one cross-validation: the parent's config and seeds."""
    import hashlib

    return hashlib.sha256(f"{cfg.digest()}|{','.join(map(str, seeds))}".encode()).hexdigest()[:16]


def _find_parent(c: Any, experiment: str, key: str) -> str | None:
    """The latest parent of this key that is not finished or has finished (a deleted one is not found)."""
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return None
    found = c.search_runs(
        [exp.experiment_id],
        f"tags.`{CV_KEY_TAG}` = '{key}' and tags.`{ROLE_TAG}` = 'cv'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0].info.run_id if found else None


def _close_stale(c: Any, stale: Sequence[Any], parent_id: str) -> None:
    """A child still RUNNING with nothing to resume from died before its first checkpoint (a killed process, a
    lost machine): a new child replaces it, so it is marked KILLED with the reason instead of running forever
    in the MLflow UI."""
    for run in stale:
        reason = f"no checkpoint to resume from; the resume of parent {parent_id} started a new run"
        c.set_tag(run.info.run_id, "stopped", reason)
        c.set_terminated(run.info.run_id, "KILLED")
        log.info("run %s: %s (marked KILLED)", run.info.run_id, reason)


def _record(parent: runs.MlflowRun, results: Mapping[Member, SeedRun], plan: _Plan) -> dict[str, float]:
    """Children, their statuses and the aggregate over the finished ones, written to the parent (rank 0)."""
    order = [results[m] for m in plan.members if m in results]
    parent.set_tags({CHILDREN_TAG: ",".join(r.run_id for r in order if r.run_id)})
    doc = {
        "parent_run_id": plan.parent_id,
        "folds": plan.folds,
        "children": [
            {
                "seed": r.seed,
                "fold": r.fold,
                "run_id": r.run_id,
                "status": r.status,
                **({"reason": r.reason} if r.reason else {}),
            }
            for r in order
        ],
    }
    parent.log_dict(doc, "seeds.json")
    agg = aggregate([r.metrics for r in order if r.status == "FINISHED"])
    parent.log_metrics(agg, step=0)
    return agg


# ---------------------------------------------------------------------------------------- the seeds
def _member_config(cfg: ExperimentConfig, seed: int, fold: int) -> ExperimentConfig:
    data = cfg.model_dump(mode="json")
    data["experiment"]["seed"] = seed
    if fold:
        data["data"]["fold"] = fold
    return validate(data, f"seed {seed}" + (f" fold {fold}" if fold else ""))


def _train_member(
    c: Any, plan: _Plan, member: Member, tracking_uri: str | None, main: bool, run_kw: Mapping[str, Any]
) -> SeedRun:
    seed, fold = member
    action, child = plan.actions[member]
    started: list[str] = [child] if child else []
    label = SeedRun(seed, None, "", fold=fold).label
    log.info("%s: %s", label, f"resuming run {child}" if action == "resumed" else "new run")
    tags = {ROLE_TAG: "fold" if fold else "seed", SEED_TAG: str(seed)}
    if fold:
        tags[FOLD_TAG] = str(fold)
    try:
        r = run_experiment(
            _member_config(plan.cfg, seed, fold),
            tracking_uri=tracking_uri,
            run_name=f"{plan.name}-seed{seed}" + (f"-fold{fold}" if fold else ""),
            resume_run_id=child if action == "resumed" else None,
            parent_run_id=plan.parent_id,
            tags=tags,
            on_start=started.append,
            **run_kw,
        )
    except NonFiniteLossError as e:  # a diverging seed is a result: record it, go on with the others
        return SeedRun(
            seed, started[-1] if started else None, "FAILED", action=action, reason=str(e), fold=fold
        )
    metrics = _final_metrics(c, r.run_id) if main else dict(r.metrics)
    return SeedRun(seed, r.run_id, "FINISHED", metrics, action, fold=fold)


def _run_all(
    c: Any,
    plan: _Plan,
    tracking_uri: str | None,
    run_kw: Mapping[str, Any],
    info: distributed.DistInfo,
    on_child: Callable[[Member, SeedRun], None] | None = None,
) -> SeedsResult:
    parent = runs.MlflowRun(c, plan.parent_id) if info.is_main else runs.ReadOnlyRun(c, plan.parent_id)
    results: dict[Member, SeedRun] = {}
    member = plan.members[0]
    try:
        for member in plan.members:
            action, child = plan.actions[member]
            if plan.only is not None and member not in plan.only and action != "kept":
                continue  # another fold: another --fold process trains it (or a later one)
            if action == "kept":
                metrics = _final_metrics(c, child) if info.is_main else {}  # type: ignore[arg-type]
                results[member] = SeedRun(member[0], child, "FINISHED", metrics, "kept", fold=member[1])
                log.info("%s: kept finished run %s", results[member].label, child)
            else:
                results[member] = _train_member(c, plan, member, tracking_uri, info.is_main, run_kw)
            if info.is_main:
                _record(parent, results, plan)
            if on_child is not None and results[member].status == "FINISHED":
                on_child(member, results[member])  # may raise to stop the rest (a pruned study trial)
    except (TrainingInterrupted, KeyboardInterrupt) as e:
        child = getattr(e, "run_id", None) or plan.actions[member][1]
        results[member] = SeedRun(
            member[0], child, "KILLED", action=plan.actions[member][0], reason=str(e), fold=member[1]
        )
        label = results[member].label
        if info.is_main:
            _record(parent, results, plan)
            parent.set_tags({"stopped": f"{label}: {e or 'interrupted'}"})
        parent.finish("KILLED")
        stop = e if isinstance(e, TrainingInterrupted) else TrainingInterrupted(f"interrupted at {label}")
        stop.run_id = plan.parent_id
        raise stop from None
    except RunStopped as e:  # a full disk, a tracking server away: resume the parent once it is back
        results[member] = SeedRun(
            member[0], e.run_id, "FAILED", action="stopped", reason=str(e), fold=member[1]
        )
        with contextlib.suppress(Exception):
            _record(parent, results, plan)
            parent.set_tags({"failure_reason": f"{results[member].label}: {e}"[:5000]})
            parent.finish("FAILED")
        e.run_id = plan.parent_id
        raise
    except BaseException as e:
        status = getattr(e, "run_status", "FAILED")  # a pruned trial: KILLED, with its reason
        reason = getattr(e, "run_reason", f"{type(e).__name__}: {e}")
        label = SeedRun(member[0], None, "", fold=member[1]).label
        parent.set_tags({"failure_reason" if status == "FAILED" else "stopped": f"{label}: {reason}"[:5000]})
        parent.finish(status)
        raise
    return _close(parent, plan, results, info)


def _close(
    parent: runs.MlflowRun, plan: _Plan, results: dict[Member, SeedRun], info: distributed.DistInfo
) -> SeedsResult:
    if plan.only is not None and info.is_main:
        _others_finished(parent.client, plan, results)
    agg = _record(parent, results, plan) if info.is_main else {}
    failed = [r for r in results.values() if r.status != "FINISHED"]
    waiting = [m for m in plan.members if m not in results]
    status = "FAILED" if failed else "RUNNING" if waiting else "FINISHED"
    if failed:
        parent.set_tags({"failure_reason": "; ".join(f"{r.label}: {r.reason}" for r in failed)[:5000]})
    elif waiting and info.is_main:  # a cross-validation trained fold by fold: in progress, not stopped
        done = ", ".join(sorted({str(m[1]) for m in results}, key=int))
        parent.set_tags({FOLDS_DONE_TAG: done})
        log.info("parent %s: fold(s) %s done; out of fold once every fold is", plan.parent_id, done)
    elif plan.folds and info.is_main:
        from maskssd.tracking.folds import out_of_fold

        parent.set_tags({FOLDS_DONE_TAG: ", ".join(str(k) for k in range(1, plan.folds + 1))})
        agg.update(out_of_fold(parent, plan.cfg, results, plan.seeds))
    if failed or not waiting:  # else RUNNING: the other folds are still to train
        parent.finish(status)
    result = SeedsResult(plan.parent_id, plan.seeds, results, agg, status, plan.folds, waiting)
    return distributed.broadcast_object(result if info.is_main else None)


def _others_finished(c: Any, plan: _Plan, results: dict[Member, SeedRun]) -> None:
    """``--fold k`` at its end: the other folds' children that finished meanwhile (other processes), read
    again from the store and kept, so the last fold to finish sees every fold and scores out of fold."""
    for child in children_of(c, plan.parent_id):
        member = (_seed_of(child), _fold_of(child))
        if member in plan.members and member not in results and child.info.status == "FINISHED":
            metrics = _final_metrics(c, child.info.run_id)
            results[member] = SeedRun(
                member[0], child.info.run_id, "FINISHED", metrics, "kept", fold=member[1]
            )


def run_seeds(
    cfg: ExperimentConfig,
    seeds: Sequence[int] | None = None,
    *,
    tracking_uri: str | None = None,
    resume_parent_id: str | None = None,
    run_name: str | None = None,
    on_eval: list[EvalHook] | None = None,
    progress: TrainProgress | None = None,
    log_model: bool = True,
    folds: int = 0,
    final_split: str | None = None,
    parent_run_id: str | None = None,
    parent_tags: Mapping[str, str] | None = None,
    on_child: Callable[[Member, SeedRun], None] | None = None,
    on_start: Callable[[str], None] | None = None,
    fold: int | None = None,
) -> SeedsResult:
    """Train ``cfg`` once per seed (and per fold of ``folds``, K >= 2: ``cfg.data.folds``/``fold_seed`` set the
    folds) as children of one parent run, or finish the parent ``resume_parent_id`` (its own config, seeds and
    folds; ``seeds``, if given, must match). Returns each child and the aggregate. Cross-validation never
    touches the test split unless ``final_split="test"`` asks (each fold's model then scores it once).

    ``fold`` (with ``folds``): train fold ``fold`` only (of each seed), as the child of the parent of this
    config and seeds in this store (the one ``resume_parent_id`` names, else the latest found by its
    :data:`CV_KEY_TAG`, else a new one): several processes, one per fold, on one store build one
    cross-validation. The parent stays RUNNING until every fold has finished, then the process that finishes
    the last scores out of fold and finishes it (``--resume PARENT`` does it too, if two last folds finish at
    once).

    A child whose loss goes non-finite is recorded FAILED and the others still run (the parent ends FAILED);
    an interruption marks the parent KILLED and raises ``TrainingInterrupted`` naming the parent.
    """
    if folds:
        if folds < 2:
            raise MaskSSDError(f"--folds needs K >= 2, got {folds}")
        data = cfg.model_dump(mode="json")
        data["data"].update(folds=folds, fold=0, final_split=final_split or "none")
        cfg = validate(data, "the cross-validation parent")
    info = distributed.DistInfo.from_env()
    owns_group = info.enabled and not distributed.active()
    if owns_group:
        distributed.setup(info, cfg.experiment.device)
    try:
        c = runs.client(tracking_uri)
        plan = None
        if info.is_main:
            key = _cv_key(cfg, _check_seeds(seeds)) if fold and not resume_parent_id else None
            found = _find_parent(c, cfg.experiment.name, key) if key else None
            if resume_parent_id or found:
                plan = _resume_parent(c, resume_parent_id or found, seeds, fold)
            else:
                tags = {**(parent_tags or {}), **({CV_KEY_TAG: key} if key else {})}
                plan = _new_parent(c, cfg, _check_seeds(seeds), run_name, folds, parent_run_id, tags)
            if fold:
                if not 1 <= fold <= plan.folds:
                    raise MaskSSDError(f"fold {fold}: parent {plan.parent_id} has folds 1 to {plan.folds}")
                plan.only = [(s, fold) for s in plan.seeds]
            if on_start is not None:
                on_start(plan.parent_id)
            todo = {SeedRun(s, None, "", fold=f).label: a for (s, f), (a, _) in plan.actions.items()}
            log.info(
                "seeds %s%s: parent run %s in experiment %s; %s",
                plan.seeds,
                f" x {plan.folds} folds" if plan.folds else "",
                plan.parent_id,
                plan.cfg.experiment.name,
                ", ".join(f"{k} {a}" for k, a in todo.items()),
            )
        plan = distributed.broadcast_object(plan)
        run_kw = {"on_eval": on_eval, "progress": progress, "log_model": log_model}
        return _run_all(c, plan, tracking_uri, run_kw, info, on_child if info.is_main else None)
    finally:
        if owns_group:
            distributed.teardown()
