"""Cross-validation: stratified folds (every fold gets its share of each class's images, reproducibly), and
``maskssd train --folds K`` against a real MLflow store: one parent, a child per fold, every train+val image
scored exactly once out of fold, the test split untouched, and ``maskssd compare`` on two CV parents."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from maskssd import tracking
from maskssd.cli import commands, main
from maskssd.data import load_split
from maskssd.data.folds import fold_digest, fold_split, stratified_folds
from maskssd.tracking.seeds import children_of
from tests.conftest import write_tiny_experiment


def _classes(n: int, seed: int) -> dict[str, set[int]]:
    """Images with 80/17/3-like classes: most hold class 1, some 2, a few the rare class 3."""
    rng = random.Random(seed)
    out = {}
    for i in range(n):
        held = {1} if rng.random() < 0.9 else set()
        if rng.random() < 0.25:
            held.add(2)
        if rng.random() < 0.08:
            held.add(3)
        out[f"img{i:04d}"] = held
    return out


def test_folds_are_stratified_on_every_class_and_reproducible():
    classes = _classes(600, seed=1)
    folds = stratified_folds(classes, 5, seed=0)
    assert sorted(i for f in folds for i in f) == sorted(classes)  # a partition
    assert max(map(len, folds)) - min(map(len, folds)) <= 2
    for c in (1, 2, 3):
        per_fold = [sum(c in classes[i] for i in f) for f in folds]
        total = sum(per_fold)
        assert max(per_fold) - min(per_fold) <= 1, (c, per_fold)  # each fold holds ~1/K of the class
        assert min(per_fold) >= total // 5
    assert stratified_folds(dict(reversed(list(classes.items()))), 5, seed=0) == folds  # order-free
    assert stratified_folds(classes, 5, seed=1) != folds
    assert fold_digest(folds, 0) != fold_digest(stratified_folds(classes, 5, seed=1), 1)
    with pytest.raises(ValueError):
        stratified_folds(classes, 1)


def test_plain_random_folds_would_not_spread_the_rare_class():
    """What stratification buys: with ~48 rare images, unstratified folds are often off by 5 or more."""
    classes = _classes(600, seed=1)
    ids = sorted(classes)
    worst = []
    for s in range(20):
        random.Random(s).shuffle(ids)
        per_fold = [sum(3 in classes[i] for i in ids[k::5]) for k in range(5)]
        worst.append(max(per_fold) - min(per_fold))
    assert max(worst) >= 4


def test_fold_split_of_annotations(synth_root):
    anns = load_split(synth_root, "train", "default") + load_split(synth_root, "val", "default")
    train, val, folds = fold_split(anns, 3, 2, seed=0)
    assert {a.image_id for a in val} == set(folds[1]) and len(train) + len(val) == len(anns)
    assert not {a.image_id for a in train} & {a.image_id for a in val}
    with pytest.raises(ValueError, match="twice"):
        fold_split(anns + anns[:1], 3, 1)


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MASKSSD_CHECKPOINT_DIR", raising=False)
    return tmp_path


def _cv_parent(c, name: str = "t") -> list:
    exp = c.get_experiment_by_name(name)
    return c.search_runs(
        [exp.experiment_id], "tags.`maskssd.role` = 'cv'", order_by=["attributes.start_time"]
    )


@pytest.mark.slow
def test_train_folds_scores_every_image_once_out_of_fold(workdir, synth_root, capsys, monkeypatch):
    monkeypatch.setattr(commands.out, "width", 250)
    cfg = write_tiny_experiment(workdir / "exp.toml", synth_root, epochs=1)
    fast = ["--no-progress", "--set", "schedule.warmup_epochs=0", "--set", "eval.bootstrap=50"]
    assert main(["train", str(cfg), "--folds", "3", *fast, "--record", str(workdir / "cv.json")]) == 0
    out = capsys.readouterr().out
    assert "pooled" in out and "3 folds x 1 seeds" in out
    c = tracking.client()
    [parent] = _cv_parent(c)
    exp = parent.info.experiment_id  # where to see it, in the UI's model-training view
    assert f"#/experiments/{exp}/runs/{parent.info.run_id}?workflowType=machine_learning" in out.replace(
        "\n", ""
    )
    kids = children_of(c, parent.info.run_id)
    assert [k.data.tags["maskssd.fold"] for k in kids] == ["1", "2", "3"] and parent.info.status == "FINISHED"
    m = parent.data.metrics
    assert 0 <= m["oof_map_ci_low"] <= m["oof_map"] <= m["oof_map_ci_high"] <= 1
    assert {"val_map_mean", "val_map_std", "oof_ap_mask_weared_incorrect"} <= set(m)
    # the test split is never touched: no child scored it
    assert not any(k.startswith("test_") for kid in kids for k in kid.data.metrics)
    arts = [{a.path for a in c.list_artifacts(k.info.run_id, "detections")} for k in kids]
    assert all(a == {"detections/val.json"} for a in arts)
    # every train+val image exactly once, each from the fold that held it out
    run = tracking.MlflowRun(c, parent.info.run_id)
    folds = json.loads(run.download("folds.json", workdir / "dl").read_text())
    oof = json.loads(run.download("detections/oof_seed3.json", workdir / "dl").read_text())
    union = [a.image_id for s in ("train", "val") for a in load_split(synth_root, s, "default")]
    ids = [im["id"] for im in oof["images"]]
    assert sorted(ids) == sorted(set(union)) and len(ids) == len(set(ids))
    for kid, fold in zip(kids, folds["folds"], strict=True):
        doc = json.loads(
            tracking.MlflowRun(c, kid.info.run_id)
            .download("detections/val.json", workdir / kid.info.run_id)
            .read_text()
        )
        assert sorted(im["id"] for im in doc["images"]) == fold
        assert doc["data"]["fold"] == int(kid.data.tags["maskssd.fold"])
    assert oof["metrics"]["map"] == pytest.approx(m["oof_map"], abs=1e-12)
    # the record says where the errors are: every true box of every class once in its confusion row
    errors = json.loads((workdir / "cv.json").read_text())["oof_errors"]
    assert (errors["images"], errors["folds"], errors["seed"]) == (len(ids), 3, 3)
    for i, name in enumerate(errors["labels"][1:], start=1):
        n = errors["n_gt_by_size"][name]
        assert (
            sum(errors["rows_true_columns_predicted"][i])
            == n["all"]
            == sum(n[b["key"]] for b in errors["size_buckets"])
        )
    assert parent.data.tags["data.folds_hash"] == folds["digest"] == fold_digest(folds["folds"], 0)
    # stratified: the rarest class of the data is in every fold
    rare = {
        a.image_id for s in ("train", "val") for a in load_split(synth_root, s, "default") if 3 in a.labels
    }
    assert all(rare & set(f) for f in folds["folds"])
    # reproducible from the seed: a second parent has the same folds
    assert main(["train", str(cfg), "--folds", "3", *fast, "--set", "loss.alpha=2"]) == 0
    capsys.readouterr()
    first, second = _cv_parent(c)
    assert first.data.tags["data.folds_hash"] == second.data.tags["data.folds_hash"]

    # compare two CV parents: their out-of-fold detections, paired image by image
    a, b = second.info.run_id, first.info.run_id
    assert main(["compare", a, b, "--n", "50", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc["metrics"]) == {"map", "with_mask", "without_mask", "mask_weared_incorrect"}
    assert doc["split"] == "oof" and doc["images"] == len(set(union))
    # B's out-of-fold file stands for B (it carries its folds' digest): the same comparison, on another machine
    assert oof["data"]["folds_hash"] == folds["digest"]
    b_file = tracking.MlflowRun(c, b).download("detections/oof_seed3.json", workdir / "b")
    assert main(["compare", a, str(b_file), "--n", "50", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == doc["metrics"]

    # B scored again out of fold by its own fold models (here with other inference settings: the mirrored
    # image too): every image once, the same folds, so it pairs with A and with B itself
    def rescore(path, *more: str) -> None:
        argv = [
            "evaluate",
            "--model",
            b,
            "--split",
            "oof",
            "--backend",
            "torch",
            "--save-detections",
            str(path),
        ]
        assert main([*argv, *more]) == 0

    again, plain = workdir / "b_tta.json", workdir / "b_plain.json"
    rescore(again, "--tta-hflip", "--json")
    capsys.readouterr()
    redone = json.loads(again.read_text())
    assert sorted(im["id"] for im in redone["images"]) == sorted(ids)
    assert redone["data"]["folds_hash"] == folds["digest"] and redone["settings"]["tta_hflip"] is True
    assert main(["compare", str(again), b, "--n", "50", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["split"] == "oof"
    # without the mirror, the same settings as the runs' own evaluation: the parent's own out-of-fold mAP
    rescore(plain)
    capsys.readouterr()
    assert json.loads(plain.read_text())["metrics"]["map"] == pytest.approx(
        first.data.metrics["oof_map"], abs=0.02
    )
    # other folds (another fold seed): refused, saying why
    assert main(["train", str(cfg), "--folds", "3", *fast, "--set", "data.fold_seed=7"]) == 0
    capsys.readouterr()
    other = _cv_parent(c)[-1].info.run_id
    assert main(["compare", other, b, "--n", "50"]) == 2
    assert "different folds" in capsys.readouterr().err
    _fold_by_fold(workdir, cfg, fast, c, b, a, folds, capsys)


def _fold_by_fold(workdir, cfg, fast, c, b, a, folds, capsys) -> None:
    """A cross-validation trained fold by fold (``--fold k``, each fold's detections kept in a file that
    outlives the store) is the same cross-validation: the folds' files joined pair exactly as the parent does."""
    from maskssd.evaluation.detections_file import load_detections

    assert main(["compare", a, b, "--n", "50", "--json"]) == 0
    whole = json.loads(capsys.readouterr().out)
    files = []
    for kid in children_of(c, b):
        k = kid.data.tags["maskssd.fold"]
        path = workdir / f"b_fold{k}.json.gz"  # what --fold k --save-detections writes: the fold run's file
        assert (
            main(["evaluate", "--model", kid.info.run_id, "--split", "oof", "--save-detections", str(path)])
            == 0
        )
        doc = load_detections(path)
        assert doc["data"]["fold"] == int(k) and doc["data"]["folds_hash"] == folds["digest"]
        assert sorted(im["id"] for im in doc["images"]) == folds["folds"][int(k) - 1]
        files.append(str(path))
    capsys.readouterr()
    # the children's own files (the runner's) joined: exactly the parent's comparison
    own = []
    for kid in children_of(c, b):
        own.append(
            str(
                tracking.MlflowRun(c, kid.info.run_id).download(
                    "detections/val.json", workdir / "own" / kid.info.run_id
                )
            )
        )
        assert json.loads(Path(own[-1]).read_text())["data"]["folds_hash"] == folds["digest"]
    assert main(["compare", a, ",".join(reversed(own)), "--n", "50", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == whole["metrics"]
    # the re-scored fold files (compressed): joined into the out-of-fold set
    assert main(["compare", a, ",".join(files), "--n", "50", "--json"]) == 0
    joined = json.loads(capsys.readouterr().out)
    assert joined["images"] == whole["images"] and "partial" not in joined
    # one fold so far: compared on that fold's images only, and said so
    assert main(["compare", a, files[0], "--n", "50", "--json"]) == 0
    part = json.loads(capsys.readouterr().out)
    assert (
        part["partial"] is True and part["folds_compared"] == [1] and part["images"] == len(folds["folds"][0])
    )
    # wrong uses say why
    assert main(["compare", a, f"{files[0]},{files[0]}", "--n", "50"]) == 2
    assert "fold 1 given twice" in capsys.readouterr().err
    assert main(["train", str(cfg), "--fold", "2"]) == 2
    assert "--folds K" in capsys.readouterr().err
    assert main(["train", str(cfg), "--folds", "3", "--fold", "4"]) == 2
    assert "1 to 3" in capsys.readouterr().err
    assert main(["train", str(cfg), "--seeds", "0,1", "--save-detections", "x.json"]) == 2
    assert "writes one file" in capsys.readouterr().err
    # last (--tracking-uri stays the process's store): fold by fold on another machine (another store), one
    # fold a process, in any order: one parent, scored out of fold when its last fold finishes; each fold the
    # same run as inside the first parent
    other = ["--tracking-uri", f"sqlite:///{workdir / 'other.db'}"]
    alone = workdir / "alone_fold2.json.gz"
    argv = ["train", str(cfg), *fast, *other, "--folds", "3", "--fold", "2", "--save-detections", str(alone)]
    argv += ["--record", str(workdir / "fold2.json")]
    assert main(argv) == 0
    assert "fold(s) 1, 3 of 3 still to train" in capsys.readouterr().out
    assert load_detections(alone)["images"] == json.loads(Path(own[1]).read_text())["images"]
    record = json.loads((workdir / "fold2.json").read_text())
    assert record["run"]["fold"] == "2" and record["kind"] == "train"  # the fold's run, not the parent
    oc = tracking.client(other[1])
    [p] = _cv_parent(oc)
    assert p.info.status == "RUNNING" and p.data.tags["maskssd.folds_done"] == "2"
    assert main(["train", str(cfg), *fast, *other, "--folds", "3", "--fold", "3"]) == 0
    assert main(["train", str(cfg), *fast, *other, "--folds", "3", "--fold", "2"]) == 0  # done: kept
    assert "kept (it had finished)" in capsys.readouterr().out
    assert main(["train", str(cfg), *fast, *other, "--folds", "3", "--fold", "1"]) == 0
    assert f"parent run {p.info.run_id} finished" in capsys.readouterr().out
    [p] = _cv_parent(oc)
    assert p.info.status == "FINISHED" and [
        k.data.tags["maskssd.fold"] for k in children_of(oc, p.info.run_id)
    ] == [
        "1",
        "2",
        "3",
    ]
    assert p.data.metrics["oof_map"] == c.get_run(b).data.metrics["oof_map"]  # the same cross-validation


@pytest.mark.slow
def test_the_last_fold_to_finish_scores_out_of_fold_though_others_finished_while_it_trained(
    workdir, synth_root
):
    """Two machines on one store: process A plans fold 1 while folds 2 and 3 are not trained, then B and C
    train them (each sees fold 1 unfinished and leaves the parent RUNNING) before A's fold ends. A reads the
    other folds again at its end, so the parent is scored out of fold and finished, not left waiting."""
    from maskssd.tracking.seeds import run_seeds
    from maskssd.training.config import load_config

    path = write_tiny_experiment(workdir / "exp.toml", synth_root, epochs=1)
    cfg = load_config(path, ["schedule.warmup_epochs=0", "eval.bootstrap=0"])
    uri = f"sqlite:///{workdir / 'store.db'}"
    seen: list[tuple[str, list]] = []

    def others_meanwhile(parent_id: str) -> None:
        for k in (2, 3):
            r = run_seeds(cfg, [0], tracking_uri=uri, folds=3, fold=k, log_model=False)
            seen.append((r.status, sorted(f for _, f in r.waiting)))
            assert r.parent_run_id == parent_id  # the same parent, found by its key

    r = run_seeds(cfg, [0], tracking_uri=uri, folds=3, fold=1, log_model=False, on_start=others_meanwhile)
    assert seen == [("RUNNING", [1, 3]), ("RUNNING", [1])]  # neither saw fold 1 finished
    assert r.status == "FINISHED" and not r.waiting and "oof_map" in r.aggregate
    c = tracking.client(uri)
    parent = c.get_run(r.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["maskssd.folds_done"] == "1, 2, 3"
    assert len(children_of(c, r.parent_run_id)) == 3
