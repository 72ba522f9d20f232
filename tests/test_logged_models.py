"""MLflow 3 conventions without training: logged models carry their metrics (ranked by
``search_logged_models``), promotion registers the logged model's ``models:/<model_id>``, runs get MLflow's
own context tags, and system metrics are sampled when asked for. Real SQLite stores under tmp_path."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from maskssd import tracking
from maskssd.tracking import lineage, registry
from maskssd.tracking.runs import MlflowRun
from maskssd.training.tracker import DatasetInfo, SplitMetrics

pytestmark = pytest.mark.slow

VAL = DatasetInfo("synth/default/val", "0123456789ab", "/data/synth", "val", {"images": 6})


@pytest.fixture()
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return f"sqlite:///{tmp_path}/mlruns/mlflow.db"


def _run_with_model(uri: str, checkpoint: Path, val_map: float, name: str) -> tuple[str, str]:
    c = tracking.client(uri)
    run = MlflowRun.start(c, "models", run_name=name)
    run.log_datasets([VAL])
    model_uri = run.log_model(
        checkpoint,
        {},
        evaluations=[SplitMetrics(VAL, {"val_map": val_map, "val_ap_with_mask": val_map})],
        step=3,
    )
    run.log_metrics({"best_epoch": 3.0}, step=3)
    run.finish()
    return run.run_id, model_uri


def test_search_logged_models_ranks_by_val_map_and_promote_registers_the_model(store, tiny_checkpoint):
    low_run, low_uri = _run_with_model(store, tiny_checkpoint, 0.25, "low")
    high_run, high_uri = _run_with_model(store, tiny_checkpoint, 0.75, "high")
    assert low_uri.startswith("models:/m-") and high_uri.startswith("models:/m-")
    c = tracking.client(store)
    exp = c.get_experiment_by_name("models").experiment_id
    ranked = c.search_logged_models(  # mlflow.search_logged_models, on this store
        experiment_ids=[exp], order_by=[{"field_name": "metrics.val_map", "ascending": False}]
    )
    assert [m.source_run_id for m in ranked] == [high_run, low_run]
    best = ranked[0]
    assert {(m.key, m.dataset_name, m.dataset_digest, m.step) for m in best.metrics} == {
        ("val_map", VAL.name, VAL.digest, 3),
        ("val_ap_with_mask", VAL.name, VAL.digest, 3),
    }  # best_epoch stays a run metric; the run's later metrics are not linked to the model
    on_val = c.search_logged_models(experiment_ids=[exp], datasets=[{"dataset_name": VAL.name}])
    assert len(on_val) == 2
    # the run sees the same final metrics; its input is the dataset
    run = c.get_run(high_run)
    assert run.data.metrics["val_map"] == 0.75 and run.inputs.dataset_inputs[0].dataset.digest == VAL.digest

    p = registry.promote(low_run, tracking_uri=store)
    assert p.moved_alias and p.metric == "val_map" and p.value == 0.25
    p2 = registry.promote(high_run, tracking_uri=store)
    assert p2.moved_alias and "beats" in p2.reason
    mv = c.get_model_version_by_alias(registry.DEFAULT_MODEL_NAME, registry.CHAMPION)
    assert (
        mv.source == high_uri and mv.run_id == high_run and mv.tags["model_id"] == high_uri[len("models:/") :]
    )
    # every reference form resolves to the model's checkpoint
    for ref in (f"models:/{registry.DEFAULT_MODEL_NAME}@champion", high_uri, f"runs:/{high_run}/model"):
        assert registry.download_model(ref, store).is_file(), ref
    assert registry.best_run(c, "models", "val_map") == high_run
    assert registry.best_run(c, "models", "best_val_map") == high_run  # the older name still reads
    chosen = registry.select_best(c, "models", "val_map")  # and what it compared, said by promote
    assert (chosen.run_id, chosen.compared, chosen.skipped_no_model) == (high_run, 2, 0)
    assert "best of 2 finished runs with a model in experiment 'models' by val_map" in chosen.describe()


def test_promote_from_an_experiment_says_what_it_compared_and_warns_across_configs(
    store, tiny_checkpoint, capsys
):
    from maskssd.cli import main

    a, _ = _run_with_model(store, tiny_checkpoint, 0.5, "a")
    b, _ = _run_with_model(store, tiny_checkpoint, 0.6, "b")
    c = tracking.client(store)
    c.set_tag(a, "config_hash", "aaaaaaaaaaaa")
    c.set_tag(b, "config_hash", "bbbbbbbbbbbb")
    assert main(["promote", "--experiment", "models", "--metric", "val_map"]) == 0
    cap = capsys.readouterr()
    assert f"run {b}: best of 2 finished runs" in " ".join(cap.out.split())
    said = " ".join(cap.out.split())
    assert "2 configs (" in said and "aaaaaaaaaaaa x1" in said and "bbbbbbbbbbbb x1" in said
    assert "different configs" in cap.err


def test_final_metric_reads_both_namings():
    old = {"best_val_map": 0.6, "val_map": 0.4}  # runs logged before the curves moved to val/*
    new = {"val_map": 0.6, "val/map": 0.4}
    for metrics in (old, new):
        assert registry.final_metric(metrics, "val_map") == 0.6
        assert registry.final_metric(metrics, "best_val_map") == 0.6
    assert registry.final_metric({"test_map": 0.5}, "test_map") == 0.5
    assert registry.final_metric(new, "test_map") is None


def test_runs_carry_mlflows_run_context(store):
    c = tracking.client(store)
    run = MlflowRun.start(c, "ctx", run_name="r", tags={"mine": "1"})
    t = c.get_run(run.run_id).data.tags
    assert t["mine"] == "1" and t["mlflow.user"] and t["mlflow.source.type"] == "LOCAL"
    assert t["mlflow.source.name"] and c.get_run(run.run_id).info.user_id == t["mlflow.user"]


def test_system_metrics_are_sampled_when_enabled(store, monkeypatch):
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", raising=False)
    c = tracking.client(store)
    run = MlflowRun.start(c, "sys", run_name="r")
    with lineage.system_metrics(run.run_id, store, enabled=False) as off:
        assert off is None
    with lineage.system_metrics(run.run_id, store, enabled=True, interval_s=0.2):
        deadline = time.monotonic() + 30  # sampled in a background thread: wait for the first point
        while time.monotonic() < deadline and not c.get_metric_history(
            run.run_id, "system/cpu_utilization_percentage"
        ):
            time.sleep(0.2)
    keys = set(c.get_run(run.run_id).data.metrics)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= keys


def test_system_metrics_option(tmp_path):
    from maskssd.cli.parser import build_parser
    from maskssd.training.config import load_config

    args = build_parser().parse_args(["train", "experiments/quickstart.toml", "--system-metrics"])
    assert args.system_metrics is True
    repo = Path(__file__).resolve().parents[1]
    assert load_config(repo / "experiments/quickstart.toml").train.system_metrics is False
    on = load_config(repo / "experiments/quickstart.toml", ["train.system_metrics=true"])
    assert on.train.system_metrics is True


def test_a_dataset_another_run_created_meanwhile_is_linked_not_a_failure(store):
    """Two study workers starting together both insert a split's dataset; the store refuses the second insert
    (a unique constraint, as SQLite words it). The run tries again and links the dataset the other created;
    any other store error is raised at once."""
    from mlflow.exceptions import MlflowException

    c = tracking.client(store)
    run = MlflowRun.start(c, "race", run_name="second")
    calls = []

    class Racing:
        def __init__(self, error: str):
            self.error = error

        def log_inputs(self, run_id, datasets):
            calls.append(run_id)
            if len(calls) == 1:
                raise MlflowException(self.error)
            return c.log_inputs(run_id, datasets=datasets)

    race = "(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, datasets.name"
    lineage.log_datasets(Racing(race), run.run_id, [VAL])
    assert len(calls) == 2
    assert [d.dataset.digest for d in c.get_run(run.run_id).inputs.dataset_inputs] == [VAL.digest]
    calls.clear()
    with pytest.raises(MlflowException, match="no such table"):
        lineage.log_datasets(Racing("(sqlite3.OperationalError) no such table: datasets"), run.run_id, [VAL])
    assert len(calls) == 1
    run.finish()
