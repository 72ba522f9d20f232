"""Model files never run code: a checkpoint whose pickle would act is refused by every command that opens model
files, unread; maskssd's own checkpoints load with ``weights_only=True``; the checkpoints of the public SSD300
tutorial (whole pickled modules) and of the reference paper's code (``model_state_dict``) load, and give the
outputs of the same weights loaded as a state dict."""

from __future__ import annotations

import builtins
import importlib
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from maskssd.cli import main
from maskssd.data import DEFAULT_CLASSES
from maskssd.errors import MaskSSDError, UnsafeCheckpointError
from maskssd.ssd.checkpoint import atomic_save, load, load_detector, safe_load
from maskssd.ssd.models import build_model, ssd300_vgg16
from maskssd.ssd.ssd300 import PAPER_CLASSES, SSD300VGG16, load_reference_checkpoint
from maskssd.training import build
from maskssd.training.checkpoint import rng_state, set_rng_state
from maskssd.training.config import load_config
from maskssd.training.engine import Trainer
from maskssd.training.optim import build_optimizer, build_scheduler
from maskssd.training.store import LocalCheckpoints

# ------------------------------------------------------------------------------ the tutorial's model.py
#: The PyTorch SSD300 tutorial's ``model.py`` (sgrvinod), reduced to what its checkpoints pickle: the same
#: classes in a module named ``model``, the same attributes and submodule names, priors as a plain attribute.
TUTORIAL_MODEL_PY = """
import torch
from torch import nn

from tests.reference.tutorial import create_prior_boxes


class VGGBase(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1_1 = nn.Conv2d(3, 64, kernel_size=3, padding=1)
        self.conv1_2 = nn.Conv2d(64, 64, kernel_size=3, padding=1)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.conv2_1 = nn.Conv2d(64, 128, kernel_size=3, padding=1)
        self.conv2_2 = nn.Conv2d(128, 128, kernel_size=3, padding=1)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.conv3_1 = nn.Conv2d(128, 256, kernel_size=3, padding=1)
        self.conv3_2 = nn.Conv2d(256, 256, kernel_size=3, padding=1)
        self.conv3_3 = nn.Conv2d(256, 256, kernel_size=3, padding=1)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)
        self.conv4_1 = nn.Conv2d(256, 512, kernel_size=3, padding=1)
        self.conv4_2 = nn.Conv2d(512, 512, kernel_size=3, padding=1)
        self.conv4_3 = nn.Conv2d(512, 512, kernel_size=3, padding=1)
        self.pool4 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.conv5_1 = nn.Conv2d(512, 512, kernel_size=3, padding=1)
        self.conv5_2 = nn.Conv2d(512, 512, kernel_size=3, padding=1)
        self.conv5_3 = nn.Conv2d(512, 512, kernel_size=3, padding=1)
        self.pool5 = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
        self.conv6 = nn.Conv2d(512, 1024, kernel_size=3, padding=6, dilation=6)
        self.conv7 = nn.Conv2d(1024, 1024, kernel_size=1)


class AuxiliaryConvolutions(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv8_1 = nn.Conv2d(1024, 256, kernel_size=1, padding=0)
        self.conv8_2 = nn.Conv2d(256, 512, kernel_size=3, stride=2, padding=1)
        self.conv9_1 = nn.Conv2d(512, 128, kernel_size=1, padding=0)
        self.conv9_2 = nn.Conv2d(128, 256, kernel_size=3, stride=2, padding=1)
        self.conv10_1 = nn.Conv2d(256, 128, kernel_size=1, padding=0)
        self.conv10_2 = nn.Conv2d(128, 256, kernel_size=3, padding=0)
        self.conv11_1 = nn.Conv2d(256, 128, kernel_size=1, padding=0)
        self.conv11_2 = nn.Conv2d(128, 256, kernel_size=3, padding=0)


class PredictionConvolutions(nn.Module):
    def __init__(self, n_classes):
        super().__init__()
        self.n_classes = n_classes
        n_boxes = {"conv4_3": 4, "conv7": 6, "conv8_2": 6, "conv9_2": 6, "conv10_2": 4, "conv11_2": 4}
        self.loc_conv4_3 = nn.Conv2d(512, n_boxes["conv4_3"] * 4, kernel_size=3, padding=1)
        self.loc_conv7 = nn.Conv2d(1024, n_boxes["conv7"] * 4, kernel_size=3, padding=1)
        self.loc_conv8_2 = nn.Conv2d(512, n_boxes["conv8_2"] * 4, kernel_size=3, padding=1)
        self.loc_conv9_2 = nn.Conv2d(256, n_boxes["conv9_2"] * 4, kernel_size=3, padding=1)
        self.loc_conv10_2 = nn.Conv2d(256, n_boxes["conv10_2"] * 4, kernel_size=3, padding=1)
        self.loc_conv11_2 = nn.Conv2d(256, n_boxes["conv11_2"] * 4, kernel_size=3, padding=1)
        self.cl_conv4_3 = nn.Conv2d(512, n_boxes["conv4_3"] * n_classes, kernel_size=3, padding=1)
        self.cl_conv7 = nn.Conv2d(1024, n_boxes["conv7"] * n_classes, kernel_size=3, padding=1)
        self.cl_conv8_2 = nn.Conv2d(512, n_boxes["conv8_2"] * n_classes, kernel_size=3, padding=1)
        self.cl_conv9_2 = nn.Conv2d(256, n_boxes["conv9_2"] * n_classes, kernel_size=3, padding=1)
        self.cl_conv10_2 = nn.Conv2d(256, n_boxes["conv10_2"] * n_classes, kernel_size=3, padding=1)
        self.cl_conv11_2 = nn.Conv2d(256, n_boxes["conv11_2"] * n_classes, kernel_size=3, padding=1)


class SSD300(nn.Module):
    def __init__(self, n_classes):
        super().__init__()
        self.n_classes = n_classes
        self.base = VGGBase()
        self.aux_convs = AuxiliaryConvolutions()
        self.pred_convs = PredictionConvolutions(n_classes)
        self.rescale_factors = nn.Parameter(torch.FloatTensor(1, 512, 1, 1))
        nn.init.constant_(self.rescale_factors, 20)
        self.priors_cxcy = create_prior_boxes()
"""


def save_tutorial_style(path: Path, state: dict[str, torch.Tensor], n_classes: int, layout: str) -> Path:
    """Write ``state`` (maskssd's SSD300 names, which are the tutorial's) as the tutorial's or the paper's code
    saves it: ``tutorial`` / ``tutorial_legacy`` (pre-1.6 format, as the tutorial's PyTorch 0.4 checkpoint):
    ``{'epoch', 'model': <model.SSD300>, 'optimizer': <SGD>}``; ``paper``: ``{'epoch', 'model_state_dict',
    'optimizer', ...}``. The module ``model`` is gone from ``sys.modules`` and ``sys.path`` afterwards, so
    loading cannot import it."""
    src = path.parent / f"tutorial_src_{path.stem}"
    src.mkdir()
    (src / "model.py").write_text(TUTORIAL_MODEL_PY)
    sys.path.insert(0, str(src))
    try:
        tutorial = importlib.import_module("model")
        m = tutorial.SSD300(n_classes)
        m.load_state_dict(state)
        optimizer = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
        if layout == "paper":
            obj = {"epoch": 231, "model_state_dict": m.state_dict(), "optimizer": optimizer, "loss": 1.25}
        else:
            obj = {"epoch": 231, "model": m, "optimizer": optimizer}
        torch.save(obj, path, _use_new_zipfile_serialization=layout != "tutorial_legacy")
    finally:
        sys.path.remove(str(src))
        sys.modules.pop("model", None)
    return path


@pytest.fixture(scope="module")
def paper_state() -> dict[str, torch.Tensor]:
    """A 4-class SSD300 in the paper's label order, with class heads that tell the classes apart: each class's
    bias is its index in the paper's order (background 0 ... without_mask 3)."""
    torch.manual_seed(3)
    m = SSD300VGG16(4)
    with torch.no_grad():
        for name in m.pred_convs.MAPS:
            getattr(m.pred_convs, f"cl_{name}").bias.view(-1, 4)[:] = torch.arange(4.0)
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.fixture(scope="module")
def voc_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return SSD300VGG16(21).state_dict()


PAPER_TO_OURS = [0] + [1 + PAPER_CLASSES.index(c) for c in DEFAULT_CLASSES]  # score columns, paper -> ours


# ----------------------------------------------------------------------------------- a hostile file
class Payload:
    """Unpickled with ``weights_only=False``, runs ``call(*args)``: here, creates a marker file."""

    def __init__(self, call: object, *args: object):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def write_hostile(path: Path, marker: Path, kind: str) -> Path:
    """A real torch checkpoint whose unpickling creates ``marker``: by ``exec``, ``os.system``, in the pre-1.6
    format, or hidden beside a whole pickled module (the tutorial's shape)."""
    exec_payload = Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()")
    if kind == "exec":
        torch.save({"epoch": 1, "model_state_dict": {}, "x": exec_payload}, path)
    elif kind == "os.system":
        torch.save({"model": {}, "build_args": Payload(os.system, f"touch '{marker}'")}, path)
    elif kind == "legacy":
        torch.save({"model": exec_payload}, path, _use_new_zipfile_serialization=False)
    elif kind == "with_module":
        torch.save({"epoch": 1, "model": nn.Sequential(nn.Conv2d(1, 1, 1)), "optimizer": exec_payload}, path)
    return path


HOSTILE = ["exec", "os.system", "legacy", "with_module"]


def test_hostile_checkpoint_is_live(tmp_path):
    """The test files really act when unpickled the old way (so that their refusal below means something)."""
    marker = tmp_path / "PWNED"
    torch.load(write_hostile(tmp_path / "evil.pt", marker, "exec"), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("kind", HOSTILE)
@pytest.mark.parametrize("command", ["evaluate", "export", "detect", "serve"])
def test_commands_refuse_a_checkpoint_that_runs_code(command, kind, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    evil = write_hostile(tmp_path / "evil.pt", marker, kind)
    args = {
        "evaluate": ["--data", str(tmp_path)],
        "export": ["--format", "onnx", "--out", str(tmp_path / "m.onnx")],
        "detect": ["--source", str(tmp_path), "--out", str(tmp_path / "out")],
        "serve": ["--port", "1"],
    }[command]
    assert main([command, "--model", str(evil), *args]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "refused to load" in err and "evil.pt" in err and "nothing in it was run" in err
    assert {"exec": "exec", "os.system": "system", "legacy": "exec", "with_module": "exec"}[kind] in err
    assert not marker.exists()
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", HOSTILE)
def test_init_checkpoint_refuses_a_checkpoint_that_runs_code(kind, tmp_path):
    marker = tmp_path / "PWNED"
    evil = write_hostile(tmp_path / "evil.pt", marker, kind)
    cfg_path = tmp_path / "exp.toml"
    cfg_path.write_text(
        f'[data]\nroot = "{tmp_path}"\n\n[model]\nname = "ssd300_vgg16"\ninput_size = 300\n'
        f'init_checkpoint = "{evil}"\n'
    )
    with pytest.raises(UnsafeCheckpointError, match="refused to load") as e:
        build.build_detector(load_config(cfg_path))  # what `maskssd train` builds its model with
    assert e.value.path == str(evil) and e.value.forbidden
    with pytest.raises(UnsafeCheckpointError):
        load_reference_checkpoint(SSD300VGG16(4), evil)
    assert not marker.exists()


@pytest.mark.slow
def test_train_with_a_hostile_init_checkpoint_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MASKSSD_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    marker = tmp_path / "PWNED"
    evil = write_hostile(tmp_path / "evil.pt", marker, "exec")
    cfg_path = tmp_path / "exp.toml"
    cfg_path.write_text(
        f'[data]\nroot = "{tmp_path}"\n\n[model]\nname = "ssd300_vgg16"\ninput_size = 300\n'
        f'init_checkpoint = "{evil}"\n'
    )
    assert (
        main(["train", str(cfg_path), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--no-progress"])
        == 2
    )
    assert "refused to load" in capsys.readouterr().err
    assert not marker.exists()


# --------------------------------------------------------------------------- maskssd's own checkpoints
def test_training_checkpoint_loads_weights_only_and_restores(tmp_path):
    """Everything ``Trainer.checkpoint`` and the deployment checkpoint hold is tensors and plain values: plain
    ``torch.load(weights_only=True)`` reads them (no stand-ins), and resume and the RNG states round-trip."""
    cfg_path = tmp_path / "exp.toml"
    cfg_path.write_text(
        f'[data]\nroot = "{tmp_path}"\n\n[model]\nname = "tiny"\ninput_size = 64\nwidth = 4\n'
    )
    cfg = load_config(cfg_path)

    def trainer() -> Trainer:
        torch.manual_seed(0)
        model = build_model("tiny", num_classes=4, input_size=64, width=4)
        opt = build_optimizer(model, cfg.optim)
        return Trainer(
            cfg=cfg,
            model=model,
            loss_fn=None,
            optimizer=opt,
            scheduler=build_scheduler(opt, cfg.schedule, 2, 3),
            train_loader=[],
            val_loader=[],
            device=torch.device("cpu"),
            store=LocalCheckpoints(tmp_path),
            extra_state={"config": cfg.model_dump(mode="json"), "run_id": "abc"},
        )

    a = trainer()
    _, scores = a.model(torch.rand(2, 3, 64, 64))
    scores.sum().backward()
    a.optimizer.step()
    a.scheduler.step()
    a.state.epoch, a.state.best_value, a.state.best_epoch = (
        1,
        np.float64(0.25),
        1,
    )  # metrics may be numpy floats
    path = atomic_save(a.checkpoint(), tmp_path / "last.pt")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["best_value"] == 0.25 and raw["config"]["model"]["name"] == "tiny"
    b = trainer()
    b.restore(load(path))
    assert b.state.epoch == 1 and b.state.best_value == 0.25
    assert b.scheduler.last_epoch == a.scheduler.last_epoch
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert torch.equal(
        a.optimizer.state_dict()["state"][0]["momentum_buffer"],
        b.optimizer.state_dict()["state"][0]["momentum_buffer"],
    )
    deploy = atomic_save(build.deploy_checkpoint(raw, cfg), tmp_path / "model.pt")
    assert torch.load(deploy, weights_only=True)["class_names"] == list(cfg.class_names)
    load_detector(deploy)


def test_rng_state_round_trip():
    random.random(), np.random.random(), torch.rand(1)
    state = rng_state()
    assert isinstance(state["numpy"]["keys"], torch.Tensor) and isinstance(
        state["python"]["state"], torch.Tensor
    )
    first = (random.random(), random.gauss(0, 1), np.random.random(), np.random.normal(), torch.rand(3))
    set_rng_state(state)
    again = (random.random(), random.gauss(0, 1), np.random.random(), np.random.normal(), torch.rand(3))
    assert first[:4] == again[:4] and torch.equal(first[4], again[4])


def test_checkpoints_of_earlier_versions_with_numpy_rng_load_and_restore(tmp_path):
    """Earlier maskssd checkpoints stored numpy's and Python's RNG states as they come (an ndarray, tuples): plain
    numeric arrays load weights-only and restore; an object array is still refused."""
    random.random(), np.random.random()
    path = tmp_path / "old.pt"
    torch.save(
        {
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": np.random.get_state(),
                "python": random.getstate(),
            }
        },
        path,
    )
    first = (random.random(), np.random.random(), np.random.normal())
    set_rng_state(load_rng := safe_load(path)["rng"])
    assert isinstance(load_rng["numpy"][1], np.ndarray)
    assert (random.random(), np.random.random(), np.random.normal()) == first

    objects = tmp_path / "objects.pt"
    torch.save({"x": np.array([1, "a", None], dtype=object)}, objects)
    with pytest.raises(UnsafeCheckpointError):
        safe_load(objects)


def test_maskssd_module_pickle_is_refused(tmp_path):
    """A whole pickled maskssd module is no tutorial checkpoint: its classes are not stand-ins, so it is refused."""
    path = tmp_path / "whole.pt"
    torch.save({"model": build_model("tiny", num_classes=4, input_size=64, width=4)}, path)
    with pytest.raises(UnsafeCheckpointError, match="maskssd"):
        safe_load(path)


# ------------------------------------------------------------------- the tutorial's and the paper's files
@pytest.mark.parametrize("layout", ["tutorial", "tutorial_legacy", "paper"])
def test_reference_code_checkpoints_load_with_the_same_outputs(layout, paper_state, tmp_path, capsys):
    path = save_tutorial_style(tmp_path / "checkpoint_ssd300.pth.tar", paper_state, 4, layout)
    assert "model" not in sys.modules
    ckpt = load(path)
    assert ckpt["class_names"] == list(DEFAULT_CLASSES) and ckpt["epoch"] == 231
    assert (
        "assumed the paper's label order (with_mask, mask_weared_incorrect, without_mask)"
        in ckpt["import_note"]
    )
    assert "assumed the paper's label order" in " ".join(capsys.readouterr().err.split())
    model, _ = load_detector(ckpt)
    reference = SSD300VGG16(4).eval()
    reference.load_state_dict(
        paper_state
    )  # the same weights, loaded as a state dict (the paper's class order)
    x = torch.rand(1, 3, 300, 300, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        locs, scores = model(x)
        ref_locs, ref_scores = reference(x)
        reference.load_state_dict(ckpt["model"])  # and as maskssd's state dict of the file (classes mapped)
        same_locs, same_scores = reference(x)
    assert torch.equal(locs, ref_locs) and torch.equal(locs, same_locs) and torch.equal(scores, same_scores)
    # the same classes, in maskssd's order (a convolution with permuted output channels may round differently)
    torch.testing.assert_close(scores, ref_scores[..., PAPER_TO_OURS], rtol=1e-5, atol=1e-5)
    # mapped by name: the head biases were the paper's indices, so each class keeps its own
    bias = model.pred_convs.cl_conv7.bias.view(-1, 4)[0].tolist()
    assert bias == [0.0] + [1.0 + PAPER_CLASSES.index(c) for c in DEFAULT_CLASSES]


def test_whole_module_pickle_rebuilds_the_state_dict(voc_state, tmp_path):
    for layout in ("tutorial", "tutorial_legacy"):
        obj = safe_load(save_tutorial_style(tmp_path / f"{layout}.pth.tar", voc_state, 21, layout))
        assert set(obj) == {"epoch", "model", "optimizer"} and obj["optimizer"] is None
        assert set(obj["model"]) == set(voc_state)
        for k, v in voc_state.items():
            assert type(obj["model"][k]) is torch.Tensor and torch.equal(obj["model"][k], v), k


@pytest.mark.parametrize("layout", ["tutorial", "plain_state_dict"])
def test_voc_start_is_an_init_checkpoint_not_a_model(layout, voc_state, tmp_path, capsys):
    path = tmp_path / "ssd300_PascalVOC.pth"
    if layout == "plain_state_dict":  # the paper repository's starting point
        torch.save(voc_state, path)
    else:
        save_tutorial_style(path, voc_state, 21, layout)
    torch.manual_seed(2)
    model = ssd300_vgg16(init_checkpoint=str(path))
    own = model.state_dict()
    heads = sorted(k for k in own if k.startswith("pred_convs.cl_"))
    assert model.init_report["dropped"] == heads and model.init_report["class_order"] is None
    for k in own:
        if k not in heads:
            assert torch.equal(own[k], voc_state[k]), k
    for command, extra in (
        ("evaluate", ["--data", str(tmp_path)]),
        ("export", ["--format", "torchscript", "--out", str(tmp_path / "m.pt")]),
    ):
        assert main([command, "--model", str(path), *extra]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert "21-class" in err and "model.init_checkpoint" in err


def test_paper_checkpoint_as_init_checkpoint_maps_classes_by_name(paper_state, tmp_path):
    path = save_tutorial_style(tmp_path / "paper.pt", paper_state, 4, "paper")
    model = ssd300_vgg16(
        init_checkpoint=str(path), class_names=["without_mask", "with_mask", "mask_weared_incorrect"]
    )
    assert model.init_report["dropped"] == [] and model.init_report["missing"] == []
    assert "assumed the paper's label order" in model.init_report["class_order"]
    bias = model.pred_convs.cl_conv4_3.bias.view(-1, 4)[0].tolist()
    assert bias == [
        0.0,
        3.0,
        1.0,
        2.0,
    ]  # without_mask, with_mask, mask_weared_incorrect in the paper's indices
    with pytest.raises(MaskSSDError, match="does not look like"):
        load_reference_checkpoint(SSD300VGG16(4), {"model": {"w": torch.zeros(1)}})


@pytest.mark.slow
def test_paper_checkpoint_evaluates_and_exports(paper_state, tmp_path, make_dataset, good_sample, capsys):
    """A model trained with the paper's code evaluates under maskssd's protocol and exports, without retraining."""
    path = save_tutorial_style(tmp_path / "paper.pt", paper_state, 4, "paper")
    root = make_dataset({"a": good_sample("a"), "b": good_sample("b", seed=1)}, {"val": ["a", "b"]})
    dets = tmp_path / "dets.json"
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(path),
                "--data",
                str(root),
                "--split",
                "val",
                "--split-name",
                "test_split",
                "--save-detections",
                str(dets),
            ]
        )
        == 0
    )
    assert "assumed the paper's label order" in " ".join(capsys.readouterr().err.split())
    doc = json.loads(dets.read_text())
    assert doc["classes"] == list(DEFAULT_CLASSES) and set(doc["metrics"]["ap"]) == set(DEFAULT_CLASSES)
    assert len(doc["images"]) == 2
    assert (
        main(["export", "--model", str(path), "--format", "torchscript", "--out", str(tmp_path / "m.ts")])
        == 0
    )
    assert "verification against PyTorch" in capsys.readouterr().out
