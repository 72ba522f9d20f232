"""Runs that survive their tracking store going away, against a real ``mlflow server`` stopped mid-run for
longer than MLflow's retry window (shortened here to no retry and a 2 s timeout): training goes on, what it
logs is held and sent once the server is back; an outage beyond what the run may hold stops it after its
checkpoint, and ``maskssd train --resume`` finishes it with no epoch lost. And the buffer itself, on a store
that fails on cue."""

from __future__ import annotations

import threading
import time

import pytest

from maskssd import tracking
from maskssd.cli import main
from maskssd.errors import TrackingUnavailable
from maskssd.tracking.buffered import BufferedRun, store_unavailable
from maskssd.tracking.experiment import run_experiment
from maskssd.training.config import load_config
from tests.conftest import MlflowServer, write_tiny_experiment

pytestmark = pytest.mark.slow


@pytest.fixture()
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MASKSSD_CHECKPOINT_DIR", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's retry window: one 2 s attempt
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MASKSSD_TRACKING_RETRY", "1")  # held records tried again every second, not every 10
    return tmp_path


def steps(c, run_id: str, key: str = "train/loss") -> list[int]:
    return sorted(m.step for m in c.get_metric_history(run_id, key))


def test_training_goes_on_while_its_tracking_server_is_away(project, synth_root, monkeypatch):
    server = MlflowServer(project, f"sqlite:///{project}/server.db").start()
    cfg_path = write_tiny_experiment(project / "exp.toml", synth_root, epochs=5)
    away: dict[str, float] = {}

    def outage(epoch, metrics):
        if epoch == 1:  # the server goes away for ~5 s (and its restart) while epochs 2-5 train
            server.stop()
            away["from"] = time.time()

            def back() -> None:
                server.start()
                away["to"] = time.time()

            threading.Timer(5, back).start()

    monkeypatch.setenv("MASKSSD_TRACKING_DRAIN", "120")
    try:
        result = run_experiment(
            load_config(cfg_path), tracking_uri=server.url, log_model=False, on_eval=[outage]
        )
        c = tracking.client(server.url)
        run = c.get_run(result.run_id)
        assert run.info.status == "FINISHED" and steps(c, result.run_id) == [1, 2, 3, 4, 5]
        # epochs trained while the server was away, sent later with the time they were measured
        when = {m.step: m.timestamp / 1000 for m in c.get_metric_history(result.run_id, "train/loss")}
        assert any(away["from"] < when[e] < away["to"] for e in (2, 3, 4, 5)), (away, when)
        arts = {a.path for a in c.list_artifacts(result.run_id, "checkpoints")}
        assert {"checkpoints/last.pt", "checkpoints/best.pt"} <= arts

        # beyond what a run may hold: it stops after its checkpoint, naming the run to resume
        monkeypatch.setenv("MASKSSD_TRACKING_MAX_OUTAGE", "1")

        def gone(epoch, metrics):
            if epoch == 1:
                server.stop()  # the store is found away when epoch 1's checkpoint and report are sent
            if epoch == 2:
                time.sleep(2)  # epoch 2's report comes past the allowed outage, however fast the epochs train

        with pytest.raises(TrackingUnavailable, match="unreachable for") as stopped:
            run_experiment(load_config(cfg_path), tracking_uri=server.url, log_model=False, on_eval=[gone])
        run_id = stopped.value.run_id
        journal = project / "mlruns" / "checkpoints" / run_id / "pending-tracking.jsonl"
        assert journal.is_file()
        server.start()
        assert (
            main(["train", str(cfg_path), "--resume", run_id, "--tracking-uri", server.url, "--no-progress"])
            == 0
        )
        assert c.get_run(run_id).info.status == "FINISHED" and not journal.exists()
        assert steps(c, run_id) == [1, 2, 3, 4, 5]  # every epoch once: none lost, none twice
    finally:
        server.stop()


class FlakyRun:
    """A run whose store is away while ``away`` is set (the errors MLflow raises then), recording what it got."""

    def __init__(self):
        self.run_id, self.away, self.got = "r", False, []
        self.client = type("C", (), {"tracking_uri": "http://mlflow:5000"})()

    def log_metrics(self, metrics, step, timestamp_ms=None):
        if self.away:
            raise ConnectionError("Max retries exceeded with url: /api/2.0/mlflow/runs/log-batch")
        self.got.append(("m", step, dict(metrics), timestamp_ms))

    def set_tags(self, tags):
        if tags.get("bad"):
            raise ValueError("a tag value that is wrong, not a store that is away")
        self.got.append(("t", dict(tags)))


def test_the_buffer_holds_in_order_keeps_times_and_raises_real_errors(tmp_path):
    now = [0.0]
    run = FlakyRun()
    b = BufferedRun(run, tmp_path / "j.jsonl", max_outage=100, retry_every=10, drain=0, clock=lambda: now[0])
    b.log_metrics({"a": 1.0}, 1)
    run.away = True
    b.log_metrics({"a": 2.0}, 2)
    now[0] = 5
    b.set_tags({"x": "1"})  # queued behind the held metric, not sent out of order
    assert [g[0] for g in run.got] == ["m"] and len(b.pending) == 2
    run.away = False
    now[0] = 20
    time.sleep(0.01)  # wall-clock time passes too: the metric times below differ
    b.log_metrics({"a": 3.0}, 3)
    assert [(g[0], g[1]) for g in run.got] == [("m", 1), ("m", 2), ("t", {"x": "1"}), ("m", 3)]
    assert run.got[1][3] < run.got[3][3]  # the held metric kept the time it was measured
    with pytest.raises(ValueError, match="wrong"):
        b.set_tags({"bad": "1"})
    run.away = True
    b.log_metrics({"a": 4.0}, 4)
    now[0] = 200  # away longer than allowed
    with pytest.raises(TrackingUnavailable, match="unreachable for"):
        b.log_metrics({"a": 5.0}, 5)
    assert len((tmp_path / "j.jsonl").read_text().splitlines()) == 2
    run.away = False
    again = BufferedRun(run, tmp_path / "j.jsonl", clock=lambda: now[0])  # a resume replays them first
    assert (
        [g[1] for g in run.got[-2:]] == [4, 5] and not (tmp_path / "j.jsonl").exists() and not again.pending
    )
    assert store_unavailable(OSError("disk I/O error")) and not store_unavailable(KeyError("x"))
