"""The ``maskssd`` argument parser: every subcommand, its options and examples (``--help`` teaches)."""

from __future__ import annotations

import argparse

from maskssd.cli.commands import (
    cmd_detect,
    cmd_evaluate,
    cmd_models,
    cmd_promote,
    cmd_runs,
    cmd_study,
    cmd_study_report,
    cmd_train,
)
from maskssd.cli.docs import cmd_docs
from maskssd.cli.parser_common import formatter as _formatter
from maskssd.cli.parser_common import model_arg as _model_arg
from maskssd.cli.parser_data import add_data_commands
from maskssd.cli.parser_deploy import add_deploy_commands
from maskssd.cli.research import cmd_compare, cmd_study_config
from maskssd.deploy.model_ref import BACKENDS
from maskssd.ssd.decode_spec import DISPLAY_THRESHOLD, DecodeSpec

__all__ = ["build_parser"]


EPILOG_MAIN = """\
examples:
  maskssd data synth /tmp/synth --images 200          # a synthetic face-mask dataset (VOC layout)
  maskssd data stats ../shared/data/face-mask-detection --split-name paper
  maskssd train experiments/quickstart.toml            # train, evaluate, log everything to MLflow
  mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db
  maskssd runs --experiment quickstart                 # compare runs in the terminal
  maskssd compare RUN_A RUN_B --split val              # paired bootstrap: A - B with its interval
  maskssd study studies/quickstart.toml                # an Optuna study, each trial an MLflow run
  maskssd promote --study quickstart                   # register the best trial, move @champion
  maskssd detect --model models:/maskssd-face-mask@champion --source photo.jpg --out out/
"""


# -------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="maskssd",
        description="maskssd: face-mask detection with SSD: data, training, evaluation, studies, promotion, serving.",
        epilog=EPILOG_MAIN,
        formatter_class=_formatter,
    )
    from maskssd import __version__

    p.add_argument("--version", action="version", version=f"maskssd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    add_data_commands(sub)

    # train
    t = sub.add_parser(
        "train",
        help="train + evaluate one experiment, tracked in MLflow",
        formatter_class=_formatter,
        description="Train the model of an experiment config, evaluate it every train.eval_every epochs, "
        "keep last/best checkpoints, evaluate the best on the final split and log params, "
        "metrics, checkpoints, plots and the model to MLflow.",
        epilog="examples:\n  maskssd train experiments/quickstart.toml\n"
        "  maskssd train experiments/quickstart.toml --set optim.lr=1e-3 --set loss.alpha=2\n"
        "  maskssd train experiments/quickstart.toml --resume RUN_ID   # after Ctrl-C / SIGTERM\n"
        "  maskssd train experiments/quickstart.toml --seeds 0,1,2      # mean ± std over 3 seeds\n"
        "  maskssd train experiments/quickstart.toml --folds 5          # 5-fold CV: out-of-fold AP\n"
        "  maskssd train experiments/quickstart.toml --folds 5 --fold 2 --save-detections f2.json.gz\n"
        "                                            # one fold of 5 as one run; its fold's detections kept\n"
        "  MLFLOW_TRACKING_URI=http://mlflow:5000 maskssd train experiments/paper_ssd300.toml",
    )
    t.add_argument("config", help="experiment TOML (see experiments/)")
    t.add_argument(
        "--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)"
    )
    t.add_argument("--run-name")
    t.add_argument(
        "--resume",
        metavar="RUN_ID",
        help="continue this MLflow run from its last checkpoint; a --seeds or --folds parent: finish its "
        "missing children",
    )
    t.add_argument(
        "--seeds",
        type=_seed_list,
        metavar="S,S,...",
        help="train once per seed (experiment.seed; e.g. 0,1,2 or 0-4) as child runs of one parent run "
        "that logs each final metric's mean and std over the seeds",
    )
    t.add_argument(
        "--folds",
        type=int,
        metavar="K",
        help="K-fold cross-validation of the train and val images together (K >= 2; 5 is a good default), "
        "stratified on the classes each image holds: one child per fold (x seed), validated and selected on "
        "its fold; the parent logs the pooled out-of-fold AP with its interval and the per-fold mean ± std",
    )
    t.add_argument(
        "--fold",
        type=int,
        metavar="k",
        help="with --folds K: train fold k only, as one run (trained on the other folds, validated on k): a "
        "cross-validation trained fold by fold, in several sessions or on several machines; keep each fold's "
        "detections (--save-detections) and maskssd compare joins them",
    )
    t.add_argument(
        "--save-detections",
        metavar="FILE.json[.gz]",
        help="also write the run's validation detections (with --fold: its fold, out of fold; a --folds "
        "parent of one seed: the pooled out-of-fold set) in maskssd evaluate --save-detections's format, "
        "gzip-compressed for .gz: a file that outlives the MLflow store, for maskssd compare",
    )
    t.add_argument(
        "--final-split",
        choices=("val", "test", "none"),
        help="the split the selected checkpoint is scored on once at the end (= --set data.final_split=...); "
        "--folds: none unless you ask for test (each fold's model then scores it: mean ± std)",
    )
    t.add_argument(
        "--tracking-uri",
        help="MLflow store or server (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)",
    )
    t.add_argument(
        "--nproc", type=int, default=1, help="data-parallel processes on this machine (torchrun underneath)"
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    t.add_argument(
        "--record",
        metavar="FILE.json",
        help="also write the run's final metrics (a --seeds or --folds parent's summary) as a record (with the machine, the commit and the wall time): what "
        "`maskssd docs` renders the docs' tables from",
    )
    t.add_argument(
        "--system-metrics",
        action="store_true",
        help="log CPU, memory, disk, network (GPU) use into the run as system/* (= --set train.system_metrics=true)",
    )
    t.set_defaults(func=cmd_train)

    # evaluate
    e = sub.add_parser(
        "evaluate",
        help="per-class AP and mAP of a model on a split",
        formatter_class=_formatter,
        description="The paper's protocol (VOC07 11-point AP at IoU > 0.5, difficult ignored, detections "
        "at min_score 0.01, NMS 0.45, top_k 200), plus all-point and COCO mAP.",
        epilog="examples:\n  maskssd evaluate --model models:/maskssd-face-mask@champion --split val\n"
        "      # the data and split list the model was trained on (from its checkpoint)\n"
        "  maskssd evaluate --model runs:/RUN_ID/model --data ../shared/data/face-mask-detection \\\n"
        "      --split-name paper --split test --save-detections dets.json\n"
        "  maskssd evaluate --model runs:/RUN_ID/model --fit-thresholds --out model-thresholds.pt\n"
        "      # per-class operating thresholds (max F1 on val)\n"
        "  maskssd evaluate --model CV_PARENT --split oof --tta-hflip --save-detections tta.json\n"
        "  maskssd compare tta.json CV_PARENT  # an inference setting judged out of fold",
    )
    _model_arg(e)
    e.add_argument(
        "--data", help="dataset root (default: the one the model was trained on, from its checkpoint)"
    )
    e.add_argument(
        "--split",
        choices=("train", "val", "test", "oof"),
        default="val",
        help="oof: --model names a cross-validation parent (maskssd train --folds K); each fold's model scores "
        "its own fold again with these settings, pooled; compare the file with the parent (default val)",
    )
    e.add_argument(
        "--split-name",
        help="split list under ROOT/splits/ (default: the model's, from its checkpoint; else paper)",
    )
    e.add_argument(
        "--save-detections",
        metavar="FILE.json",
        help="write every detection (original pixels) and the metrics",
    )
    e.add_argument(
        "--min-score",
        type=float,
        default=DecodeSpec.min_score,
        help=f"decode threshold: detections kept for AP (default {DecodeSpec.min_score}, the paper's)",
    )
    e.add_argument("--max-overlap", type=float, default=DecodeSpec.max_overlap, help="NMS IoU")
    e.add_argument("--top-k", type=int, default=DecodeSpec.top_k, help="detections kept per image")
    e.add_argument("--class-agnostic", action="store_true", help="NMS across classes (one class per face)")
    e.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="auto (default): ONNX Runtime float on a CPU when the [onnx] extra is installed (the faster), else "
        "PyTorch; never int8 unless asked (an evaluation measures the model as trained); said at start",
    )
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--workers", type=int, default=0)
    e.add_argument("--device", default="cpu")
    e.add_argument("--on-error", choices=("raise", "skip"), default="raise")
    e.add_argument(
        "--bootstrap",
        type=int,
        default=0,
        metavar="N",
        help="percentile intervals on every AP from N image resamples (e.g. 1000; default 0 = none)",
    )
    e.add_argument("--ci", type=float, default=0.95, help="interval level (default 0.95)")
    e.add_argument("--seed", type=int, default=0, help="resampling seed (default 0)")
    e.add_argument(
        "--operating-threshold",
        type=float,
        default=DISPLAY_THRESHOLD,
        help=f"error analysis: recall and false boxes at this score (default {DISPLAY_THRESHOLD})",
    )
    e.add_argument("--json", action="store_true", help="print the results as JSON (stdout) instead of tables")
    e.add_argument(
        "--record",
        metavar="FILE.json",
        help="also write the results as a record (with the machine, the commit and the wall time): what "
        "`maskssd docs` renders the docs' tables from",
    )
    e.add_argument(
        "--fit-thresholds",
        action="store_true",
        help="per class, the score threshold maximising F1 (IoU > 0.5) on --split val; written with --out",
    )
    e.add_argument(
        "--out",
        metavar="NEW.pt",
        help="with --fit-thresholds: write the model's checkpoint with the thresholds here (detect and serve "
        "then use them)",
    )
    e.set_defaults(func=cmd_evaluate)

    # detect
    de = sub.add_parser(
        "detect",
        help="annotate images, a folder, a video, a camera or a stream URL",
        formatter_class=_formatter,
        description="Detect faces and mask use; writes annotated images/video and JSON detections "
        "(with_mask green, mask_weared_incorrect yellow, without_mask red).",
        epilog="examples:\n  maskssd detect --model runs:/RUN_ID/model --source photos/ --out out/\n"
        "  maskssd detect --model models:/maskssd-face-mask@champion --source clip.mp4 --out out/\n"
        "  maskssd detect --model model.pt --source 0 --out out/ --max-frames 300   # webcam 0",
    )
    _model_arg(de)
    de.add_argument(
        "--source",
        required=True,
        help="IMAGE, DIR, VIDEO file, CAMERA_INDEX or stream URL (rtsp://, http://)",
    )
    de.add_argument("--out", required=True, help="output folder")
    de.add_argument(
        "--score-threshold",
        type=float,
        default=None,
        help="display threshold: draw and report detections above it (default: the model's per-class "
        f"thresholds, fitted on validation, else {DISPLAY_THRESHOLD})",
    )
    de.add_argument("--max-overlap", type=float, default=None, help="NMS IoU (default: the model's)")
    de.add_argument("--class-agnostic", action="store_true", help="one class per face: NMS across classes")
    de.add_argument(
        "--smooth",
        type=int,
        default=0,
        metavar="FRAMES",
        help="video: vote each face's class over the last FRAMES frames (0 = off)",
    )
    de.add_argument("--max-frames", type=int, default=0, help="video/camera: stop after N frames (0 = all)")
    de.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="auto (default): ONNX Runtime on a CPU when the [onnx] extra is installed (int8 where the CPU has "
        "VNNI and the model carries its calibration images, else float), else PyTorch; said at start",
    )
    de.add_argument("--device", default="cpu")
    de.add_argument(
        "--in-flight",
        type=int,
        default=0,
        metavar="N",
        help="video/camera: frames in the model at once, each on its own ONNX Runtime session with its share "
        "of the cores (more frames per second, more latency each); 0 (default): one per core, at most 2, "
        "with ONNX Runtime, else 1",
    )
    de.add_argument(
        "--show",
        action="store_true",
        help="also show the annotated frames in a window (q stops); needs a display and OpenCV with GUI "
        "support (opencv-python, not the headless build): says why not otherwise",
    )
    de.set_defaults(func=cmd_detect)

    # runs
    r = sub.add_parser(
        "runs",
        help="compare runs in a table",
        formatter_class=_formatter,
        epilog="examples:\n  maskssd runs --experiment quickstart --sort val_map\n"
        "  maskssd runs --experiment quickstart --wide | less -S\n\n"
        "Metrics print in percent; MLflow holds the same numbers as fractions (91.2 here is 0.912 there).",
    )
    r.add_argument("--experiment")
    r.add_argument("--sort", help="column to sort by (e.g. val_map, test_map, status)")
    r.add_argument("--limit", type=int, default=50)
    r.add_argument(
        "--children", action="store_true", help="also list the seed runs of a --seeds parent, under it"
    )
    r.add_argument(
        "--wide",
        action="store_true",
        help="every column, however wide (default: those that fit the terminal)",
    )
    r.add_argument("--tracking-uri")
    r.set_defaults(func=cmd_runs)

    cp = sub.add_parser(
        "compare",
        help="paired bootstrap: is run A better than run B on the same images?",
        formatter_class=_formatter,
        description="Resample the images of a split with replacement, re-score both runs' saved detections on\n"
        "each resample (no inference), and report A - B in mAP and per-class AP (VOC07) with its percentile\n"
        "interval and the share of resamples in which A beats B.\n\n"
        "RUN_A and RUN_B are MLflow run ids (their detections/<split>.json, saved at the end of training) or\n"
        "detection files (maskssd evaluate --save-detections); several, comma-separated, are pooled (seeds);\n"
        "the parent run of `train --seeds` stands for its finished seeds. Two parents of `train --folds K`\n"
        "are compared out of fold: every train+val image scored by the model that did not see it, paired image\n"
        "by image (--split is then ignored); their folds must be the same (fold seed and images), or it says so.\n"
        "A parent's out-of-fold file (detections/oof_seed<S>.json) stands for it, wherever it was trained.\n"
        "Ground truth is read from the data the detections were made on (or --data). Nothing is logged.",
        epilog="examples:\n  maskssd compare 3f2a... 9c1b... --split val\n"
        "  maskssd compare PARENT_A PARENT_B --split val   # two --seeds parents: pooled over seeds x images\n"
        "  maskssd compare CV_A CV_B --record r.json      # two --folds parents: out of fold, one record\n"
        "  maskssd compare CV_A oof_seed0.json            # B's out-of-fold file, from another machine\n"
        "  maskssd compare a.json b.json --n 2000 --json\n"
        "  maskssd compare RUN_A1,RUN_A2,RUN_A3 RUN_B1,RUN_B2,RUN_B3   # seeds pooled",
    )
    cp.add_argument("run_a", metavar="RUN_A", help="run id(s) or detections file(s), comma-separated")
    cp.add_argument("run_b", metavar="RUN_B", help="run id(s) or detections file(s), comma-separated")
    cp.add_argument("--split", choices=("val", "test"), default="val")
    cp.add_argument("--n", type=int, default=1000, help="image resamples (default 1000)")
    cp.add_argument("--seed", type=int, default=0)
    cp.add_argument("--ci", type=float, default=0.95, help="interval level (default 0.95)")
    cp.add_argument("--json", action="store_true", help="print JSON (for scripts) instead of a table")
    cp.add_argument(
        "--record",
        metavar="FILE.json",
        help="also write the comparison as a record (with the machine, the commit and the wall time): what "
        "`maskssd docs` renders the docs' tables from",
    )
    cp.add_argument("--data", help="dataset root (default: where the detections were made)")
    cp.add_argument("--split-name", help="split list under ROOT/splits/ (default: the detections')")
    cp.add_argument("--on-error", choices=("raise", "skip"), default="raise")
    cp.add_argument("--tracking-uri")
    cp.set_defaults(func=cmd_compare)

    # study
    st = sub.add_parser(
        "study",
        help="run (or resume) an Optuna study; each trial an MLflow run",
        formatter_class=_formatter,
        description="Search MultiBox loss and learning-rate parameters. Running the same command again "
        "resumes the study; several workers may share one storage.",
        epilog="examples:\n  maskssd study studies/quickstart.toml\n"
        "  maskssd study studies/cpu_effnet_lite0.toml --workers 2   # two one-thread workers on 2 cores\n"
        "  maskssd study studies/paper_multibox.toml --storage postgresql://user:pw@db/optuna  # on each worker",
    )
    st.add_argument("config", help="study TOML (see studies/)")
    st.add_argument("--n-trials", type=int, help="trials for this worker (default: the config's)")
    st.add_argument("--storage", help="Optuna storage URL (default: sqlite:///mlruns/optuna.db)")
    st.add_argument("--study-name", help="default: the config's study.name")
    st.add_argument("--tracking-uri")
    st.add_argument("--timeout", type=float, help="seconds for this worker")
    st.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="worker processes on this machine sharing the study's storage and budget, each with "
        "cores/N torch threads (or --threads)",
    )
    st.add_argument("--no-report", action="store_true", help="skip the closing report and plots")
    st.set_defaults(func=cmd_study)

    sr = sub.add_parser(
        "study-report",
        help="best trials, parameter importances, the cheap-fidelity check and plots of a study",
        description="The study's report, from its storage (while it runs, too): trials by state and wall time,\n"
        "the best trials with their parameters, parameter importances, and the fidelity check: how well a\n"
        "trial's value at each pruning rung ranks like its final value (a low rank correlation means the\n"
        "pruner discards trials at random). Its plots are logged to the study's parent run.",
        epilog="examples:\n"
        "  maskssd study-report cpu_rare_folds\n"
        "  maskssd study-report cpu_rare_folds --record records/study_rare_folds.json   # for `maskssd docs`\n"
        "  maskssd study-report paper_multibox --storage postgresql://optuna@db/optuna",
        formatter_class=_formatter,
    )
    sr.add_argument("name", help="the study's name (its config's [study] name)")
    sr.add_argument("--storage", help="Optuna storage URL (default: sqlite:///mlruns/optuna.db)")
    sr.add_argument("--tracking-uri", help="MLflow tracking URI (default: the project's store)")
    sr.add_argument(
        "--record",
        metavar="FILE.json",
        help="also write the study's summary (trials by state, wall time, best trial, the fidelity check) as a "
        "record for `maskssd docs`",
    )
    sr.set_defaults(func=cmd_study_report)

    sc = sub.add_parser(
        "study-config",
        help="a study's best trial (or --trial N) as an experiment TOML at the base experiment's full budget",
        description="Write the base experiment with a trial's sampled values and the study's recipe overrides "
        "(not its [study] trial_only ones, nor the trials' cheaper epochs and input size): the configuration "
        "to retrain over seeds, compare with `maskssd compare`, and ship in experiments/.",
        formatter_class=_formatter,
        epilog="examples:\n  maskssd study-config studies/cpu_effnet_lite0.toml -o experiments/cpu_study_best.toml\n"
        "  maskssd train experiments/cpu_study_best.toml --seeds 0,1,2 --set data.final_split='\"none\"'",
    )
    sc.add_argument("config", help="the study TOML the study was run from")
    sc.add_argument("--trial", type=int, help="a completed trial's number (default: the best)")
    sc.add_argument("-o", "--output", help="TOML file to write (default: print it)")
    sc.add_argument("--storage", help="Optuna storage URL (default: sqlite:///mlruns/optuna.db)")
    sc.add_argument("--study-name", help="default: the config's study.name")
    sc.set_defaults(func=cmd_study_config)

    # promote
    pr = sub.add_parser(
        "promote",
        help="register a run's model; move @champion if it is better",
        formatter_class=_formatter,
        epilog="examples:\n  maskssd promote --study quickstart\n  maskssd promote --run RUN_ID --force\n"
        "  maskssd promote --experiment quickstart --metric val_map",
    )
    g = pr.add_mutually_exclusive_group(required=True)
    g.add_argument("--study", help="the best trial of this Optuna study")
    g.add_argument("--run", help="this MLflow run")
    g.add_argument("--experiment", help="the best run of this experiment by --metric")
    pr.add_argument(
        "--metric",
        help="selection metric: a final metric of the runs (default val_map; best_val_map also reads)",
    )
    pr.add_argument("--minimize", action="store_true", help="lower is better for --metric")
    pr.add_argument("--name", default="maskssd-face-mask", help="registered model name")
    pr.add_argument(
        "--force", action="store_true", help="move @champion even if the new version is not better"
    )
    pr.add_argument("--storage", help="Optuna storage of --study")
    pr.add_argument("--tracking-uri")
    pr.set_defaults(func=cmd_promote)

    # docs
    dc = sub.add_parser(
        "docs",
        help="render the docs' result and benchmark tables from the committed records",
        formatter_class=_formatter,
        description="Every table of results in README.md and docs/ is rendered from records/*.json, each written "
        "by the command that measured it (--record): this rewrites them; --check only says which pages differ.",
        epilog="examples:\n  maskssd docs            # after adding a record\n  maskssd docs --check    # what the tests run",
    )
    dc.add_argument("--check", action="store_true", help="exit 1 if a page differs from its records")
    dc.add_argument("--root", default=".", help="the project folder (README.md, docs/, records/)")
    dc.set_defaults(func=cmd_docs)

    sv, ex = add_deploy_commands(sub)

    mo = sub.add_parser(
        "models",
        help="list the model names a config may use",
        description="The registered networks: the values a config's [model] name may take.",
        epilog="examples:\n  maskssd models\n  maskssd train experiments/quickstart.toml --set model.name='\"ssdlite_effnet_lite0\"'",
        formatter_class=_formatter,
    )
    mo.set_defaults(func=cmd_models)
    _threads_arg(t, e, de, st, sv, ex)
    _inference_args(e, de, sv)
    return p


def _seed_list(text: str) -> list[int]:
    """``0,1,2`` or ``0-4`` (or both: ``0-2,7``) -> distinct seeds in order."""
    seeds: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            lo, sep, hi = part.partition("-") if not part.startswith("-") else (part, "", "")
            seeds += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a seed list: {text!r} (e.g. 0,1,2 or 0-4)") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"give distinct seeds: {text!r}")
    return seeds


def _inference_args(*parsers: argparse.ArgumentParser) -> None:
    """Options of the predictor: test-time augmentation, BatchNorm folding, the int8 backend's calibration."""
    for p in parsers:
        p.add_argument(
            "--tta-hflip",
            action="store_true",
            help="also run the model on the mirrored image and merge both before NMS (about 2x the model time)",
        )
        p.add_argument(
            "--no-fold-bn",
            action="store_true",
            help="keep BatchNorm layers (by default they are folded into the convolutions: same outputs, faster)",
        )
        p.add_argument(
            "--calibration",
            metavar="DATA_ROOT",
            help="int8: dataset whose training images calibrate the quantisation (default: the images a "
            "trained model carries; older models need this)",
        )
        p.add_argument(
            "--calibration-split-name",
            metavar="NAME",
            help="split list of --calibration (default: --split-name where there is one, else paper)",
        )
        p.add_argument(
            "--calibration-images",
            type=int,
            default=100,
            metavar="N",
            help="default: 100, as many as training stores",
        )


def _threads_arg(*parsers: argparse.ArgumentParser) -> None:
    for p in parsers:
        p.add_argument(
            "--threads",
            type=int,
            metavar="N",
            help="torch CPU threads (default: all cores). Several processes on one machine (study "
            "workers, servers) run far better with cores / processes each than oversubscribed",
        )
