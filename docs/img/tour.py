"""Take docs/tracking.md's screenshots again, from a running ``mlflow ui`` on this project's store.

    mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --port 5000 &
    python docs/img/tour.py --experiment cpu_effnet_lite0_pan_s4_rfs --study study-cpu_rare_folds

Needs Chromium and ``npm install playwright-core`` (docs/img/shoot.js drives the browser).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

from mlflow import MlflowClient

HERE = Path(__file__).resolve().parent
EXPAND = '[data-component-id$="runnamecellrenderer.tsx_46"]'  # the + beside a parent run's name


def shots(c: MlflowClient, ui: str, experiment: str, study: str) -> list[dict]:
    exp = c.get_experiment_by_name(experiment).experiment_id
    parents = c.search_runs([exp], "tags.`maskssd.role` = 'seeds'", order_by=["attributes.start_time DESC"])
    child = c.search_runs(
        [exp], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}' and attributes.status = 'FINISHED'"
    )[0]
    model = c.search_logged_models(
        experiment_ids=[exp], filter_string=f"source_run_id = '{child.info.run_id}'"
    )[0]
    study_exp = c.get_experiment_by_name(study).experiment_id
    base, ml = f"{ui}/#/experiments", "workflowType=machine_learning"
    return [
        {"name": "mlflow-runs", "url": f"{base}/{exp}/runs?{ml}", "click": [EXPAND]},
        {
            "name": "mlflow-charts",
            "url": f"{base}/{exp}/runs?compareRunsMode=CHART&{ml}",
            "click": [EXPAND],
            "type": "val/map",
        },
        {"name": "mlflow-run", "url": f"{base}/{exp}/runs/{child.info.run_id}?{ml}"},
        {
            "name": "mlflow-run-metrics",
            "url": f"{base}/{exp}/runs/{child.info.run_id}/model-metrics?{ml}",
            "type": "val/",
        },
        {"name": "mlflow-models", "url": f"{base}/{exp}/models?{ml}"},
        {"name": "mlflow-model", "url": f"{base}/{exp}/models/{model.model_id}?{ml}"},
        {"name": "mlflow-study", "url": f"{base}/{study_exp}/runs?{ml}", "click": [EXPAND]},
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", required=True, help="an experiment with a --seeds parent")
    p.add_argument("--study", required=True, help="a study's MLflow experiment (study-NAME)")
    p.add_argument("--ui", default="http://127.0.0.1:5000")
    p.add_argument("--store", default="sqlite:///mlruns/mlflow.db")
    a = p.parse_args()
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(shots(MlflowClient(a.store), a.ui, a.experiment, a.study), f)
    subprocess.run(["node", str(HERE / "shoot.js"), f.name, str(HERE)], check=True)


if __name__ == "__main__":
    main()
