"""Tracking: MLflow stores and runs, one experiment as one MLflow run, the Model Registry, and Optuna
studies whose trials are nested MLflow runs.

Names resolve lazily (:mod:`maskssd._lazy`): importing one loads only its module."""

from __future__ import annotations

from maskssd._lazy import lazy_exports

_EXPORTS = {
    "MAX_PARAM_LENGTH": "runs",
    "default_tracking_uri": "runs",
    "resolve_tracking_uri": "runs",
    "sqlite_init_lock": "runs",
    "open_store": "runs",
    "client": "runs",
    "experiment_id": "runs",
    "git_info": "lineage",
    "run_context": "lineage",
    "dataset_input": "lineage",
    "log_datasets": "lineage",
    "system_metrics": "lineage",
    "MlflowRun": "runs",
    "ReadOnlyRun": "runs",
    "log_model": "runs",
    "runs_table": "runs",
    "run_experiment": "experiment",
    "DEFAULT_MODEL_NAME": "registry",
    "CHAMPION": "registry",
    "download_model": "registry",
    "Promotion": "registry",
    "best_run": "registry",
    "promote": "registry",
    "ParamSpec": "study_config",
    "SamplerSpec": "study_config",
    "PrunerSpec": "study_config",
    "StudySection": "study_config",
    "StudyConfig": "study_config",
    "load_study_config": "study_config",
    "first_value": "study_config",
    "sample": "study_config",
    "trial_config": "study_config",
    "PrunedTrial": "studies",
    "default_storage_url": "studies",
    "make_storage": "studies",
    "make_sampler": "studies",
    "make_pruner": "studies",
    "remaining": "studies",
    "parent_run": "studies",
    "make_objective": "studies",
    "open_study": "studies",
    "StudyOutcome": "studies",
    "StudyReport": "studies",
    "run_study": "studies",
    "best_trial_run": "studies",
    "load_study": "studies",
    "report_study": "studies",
    "summarize": "studies",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS, globals())
