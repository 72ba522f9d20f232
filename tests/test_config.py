"""Experiment configs: validation errors name key, file and line; overrides; dotted params; shipped configs."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from maskssd.errors import ConfigError
from maskssd.training.config import apply_overrides, flatten, load_config, parse_value, validate

REPO = Path(__file__).resolve().parents[1]

BASE = """\
[experiment]
name = "t"

[data]
root = "somewhere"
batch_size = 4

[loss]
alpha = 2
class_weights = { background = 1, with_mask = 2 }

[model]
name = "tiny"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "exp.toml"
    p.write_text(text)
    return p


def error_of(path: Path, overrides=()) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    return e.value


def test_valid_config_and_defaults(tmp_path):
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.loss.alpha == 2.0 and cfg.data.batch_size == 4
    assert cfg.class_names == ("with_mask", "without_mask", "mask_weared_incorrect")
    assert cfg.class_weight_list() == [1.0, 2.0, 1.0, 1.0]


def test_unknown_key_names_key_file_and_line(tmp_path):
    p = write(tmp_path, BASE + "bogus = 1\n")
    e = error_of(p)
    assert e.key == "model.bogus" and e.line == 14 and str(p) in str(e) and "unknown key" in str(e)


def test_unknown_section(tmp_path):
    e = error_of(write(tmp_path, BASE + "\n[trian]\nepochs = 3\n"))
    assert e.key == "trian" and e.line == 15


@pytest.mark.parametrize(
    "override, key, words",
    [
        ('loss.alpha="x"', "loss.alpha", "valid number"),
        ("data.batch_size=0", "data.batch_size", "greater than or equal to 1"),
        ("optim.lr=-1", "optim.lr", "greater than 0"),
        ("optim.name=rmsprop", "optim.name", "'sgd', 'adam' or 'adamw'"),
        ('model.name="resnet"', "model.name", "unknown model"),
        ("loss.loc_loss=l2", "loss.loc_loss", "'l1' or 'smooth_l1'"),
        ("loss.class_weights.cat=2", "loss.class_weights", "unknown classes"),
        ("schedule.decay_lr_at=[50]", "schedule.decay_lr_at", "train.epochs"),
        ("augment.hflip_p=1.5", "augment.hflip_p", "less than or equal to 1"),
        ("train.epochs=2.5", "train.epochs", "valid integer"),
        ("model.neck=bifpn", "model.neck", "'none', 'fpn' or 'pan'"),
        ("model.stride4=true", "model", "need a neck"),
        ("model.neck_channels=64", "model", "need a neck"),
        ("model.neck_channels=4", "model.neck_channels", "greater than or equal to 8"),
    ],
)
def test_bad_values_name_the_key(tmp_path, override, key, words):
    p = write(tmp_path, BASE)
    e = error_of(p, [override])
    assert e.key == key, str(e)
    assert words in str(e) and str(p) in str(e)


def test_missing_required_key(tmp_path):
    e = error_of(write(tmp_path, BASE.replace('root = "somewhere"\n', "")))
    assert e.key == "data.root" and "missing" in str(e)


def test_toml_syntax_error_has_line(tmp_path):
    e = error_of(write(tmp_path, BASE.replace('name = "t"', 'name = = "t"')))
    assert "not valid TOML" in str(e) and e.line == 2


def test_missing_file(tmp_path):
    assert "not found" in str(error_of(tmp_path / "nope.toml"))


def test_set_overrides_parse_toml_values():
    assert parse_value("2") == 2 and parse_value("1e-3") == 1e-3 and parse_value("true") is True
    assert parse_value("[1, 2]") == [1, 2] and parse_value("cosine") == "cosine"
    d = apply_overrides({"a": {"b": 1}}, ["a.b=3", "a.c.d=x"])
    assert d == {"a": {"b": 3, "c": {"d": "x"}}}
    with pytest.raises(ConfigError):
        apply_overrides({"a": 1}, ["a.b=2"])
    with pytest.raises(ConfigError):
        apply_overrides({}, ["no-equals-sign"])


def test_flat_params_are_dotted_and_roundtrip(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["optim.lr=0.01"])
    flat = cfg.flat()
    assert flat["optim.lr"] == 0.01 and flat["loss.class_weights.with_mask"] == 2.0
    assert all("." in k for k in flat)
    again = validate(tomllib.loads(cfg.to_toml()))
    assert again == cfg and again.digest() == cfg.digest()
    # the digest names the recipe: its words do not change it, any computed setting does
    reworded = load_config(write(tmp_path, BASE), ["optim.lr=0.01", 'experiment.description="reworded"'])
    assert reworded.digest() == cfg.digest()
    assert load_config(write(tmp_path, BASE), ["optim.lr=0.02"]).digest() != cfg.digest()
    assert flatten({"a": {}, "b": {"c": 1}}) == {"a": "{}", "b.c": 1}


def test_class_weight_exponent_uses_box_counts(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["loss.class_weight_exponent=1.0"])
    w = cfg.class_weight_list({"with_mask": 100, "without_mask": 20, "mask_weared_incorrect": 5})
    assert w == [1.0, 2.0, 5.0, 20.0]  # explicit with_mask=2 wins; others (100/n)^1


def test_neck_keys_reach_the_model_and_default_off_adds_nothing(tmp_path):
    """Configs without a neck build (and record in checkpoints) exactly the arguments they did before."""
    cfg = load_config(REPO / "experiments" / "cpu_effnet_lite0.toml")
    assert (cfg.model.neck, cfg.model.neck_channels, cfg.model.stride4) == ("none", None, False)
    kw = cfg.model.build_kwargs()
    assert not {"neck", "neck_channels", "stride4"} & set(kw)
    assert kw == {
        "input_size": 384,
        "pretrained": True,
        "freeze_stages": 3,
        "bn_mode": "frozen_stages",
        "scales": [0.04, 0.08, 0.16, 0.3, 0.5, 0.7],
        "aspect_ratios": [0.6, 0.4, 0.8],
    }
    on = load_config(
        write(tmp_path, BASE), ["model.neck=pan", "model.neck_channels=96", "model.stride4=true"]
    )
    assert on.model.build_kwargs() == {
        "pretrained": False,
        "freeze_stages": 0,
        "neck": "pan",
        "neck_channels": 96,
        "stride4": True,
    }


def test_training_levers_default_off_and_refuse_bad_values(tmp_path):
    """Issue 16's training levers are off unless set; their impossible values name the key."""
    cfg = load_config(REPO / "experiments" / "cpu_effnet_lite0.toml")
    off = (
        cfg.data.repeat_factor_threshold,
        cfg.augment.copy_paste_p,
        cfg.loss.class_balance_beta,
        cfg.train.ema_decay,
        cfg.train.progressive_sizes,
        cfg.train.cpu_bf16,
    )
    assert off == (0.0, 0.0, 0.0, 0.0, [], False) and cfg.schedule.name == "cosine"
    p = write(tmp_path, BASE)
    for override, key in [
        ("data.repeat_factor_threshold=-0.1", "data.repeat_factor_threshold"),
        ("augment.copy_paste_classes=['nobody']", "augment.copy_paste_classes"),
        ("augment.copy_paste_scale=[1.2, 0.8]", "augment.copy_paste_scale"),
        ("loss.class_balance_beta=1.0", "loss.class_balance_beta"),
        ("train.ema_decay=1.0", "train.ema_decay"),
        ("schedule.name='sgdr'", "schedule.name"),
        ("schedule.restart_mult=0.5", "schedule.restart_mult"),
        ("train.progressive_sizes=[128]", "train.progressive_sizes"),
    ]:
        assert error_of(p, [override]).key == key, override
    e = error_of(p, ["model.input_size=128", "train.progressive_sizes=[96, 112]"])
    assert e.key == "train.progressive_sizes" and "128" in str(e)


@pytest.mark.parametrize("path", sorted((REPO / "experiments").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_experiments_validate(path):
    cfg = load_config(path)
    assert cfg.experiment.name


def test_paper_config_is_the_papers(tmp_path):
    cfg = load_config(REPO / "experiments" / "paper_ssd300.toml")
    assert cfg.model.name == "ssd300_vgg16" and cfg.data.split_name == "paper"
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (
        "sgd",
        1e-2,
        0.9,
        5e-4,
    )
    assert cfg.optim.bias_lr_mult == 2 and cfg.schedule.name == "constant"
    assert (cfg.data.batch_size, cfg.train.epochs, cfg.loss.alpha, cfg.loss.neg_pos_ratio) == (42, 300, 2, 2)
    assert cfg.loss.loc_loss == "l1"
    assert cfg.class_weight_list() == [1.0, 2.0, 3.0, 4.0]  # by name: bg 1, with 2, without 3, incorrect 4
    assert (cfg.train.best_metric, cfg.train.best_after_epoch) == ("val_loss", 40)


def test_a_model_keyword_the_model_does_not_take_names_its_line(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('[data]\nroot = "x"\n\n[model]\nname = "ssdlite_effnet_lite0"\nwidth = 8\n')
    with pytest.raises(
        ConfigError, match=r"exp.toml:6 \[model.width\]: model 'ssdlite_effnet_lite0' takes no 'width'"
    ):
        load_config(path)


def test_relative_paths_are_relative_to_the_config_file_from_any_working_directory(tmp_path, monkeypatch):
    (tmp_path / "proj" / "experiments").mkdir(parents=True)
    (tmp_path / "proj" / "data").mkdir()
    cfg_file = tmp_path / "proj" / "experiments" / "exp.toml"
    cfg_file.write_text(BASE.replace('root = "somewhere"', 'root = "../data"'))
    for cwd in (tmp_path / "proj", tmp_path / "proj" / "experiments", tmp_path):
        monkeypatch.chdir(cwd)
        cfg = load_config(cfg_file.relative_to(tmp_path) if cwd == tmp_path else cfg_file)
        assert Path(cfg.data.root).resolve() == (tmp_path / "proj" / "data").resolve(), cwd
    monkeypatch.chdir(tmp_path / "proj")
    assert load_config(cfg_file).data.root == "data"  # from the root: the short path, as a user types it
    # a --set path is the user's, relative to where they typed it
    assert load_config(cfg_file, ["data.root=elsewhere"]).data.root == "elsewhere"
    absolute = str(tmp_path / "abs")
    assert load_config(cfg_file, [f'data.root="{absolute}"']).data.root == absolute


def test_a_config_without_an_experiment_name_logs_into_its_file_name(tmp_path):
    path = tmp_path / "my_recipe.toml"
    path.write_text(BASE.replace('name = "t"\n', "", 1))
    assert load_config(path).experiment.name == "my_recipe"
    assert load_config(write(tmp_path, BASE)).experiment.name == "t"  # a name given is kept


def test_each_shipped_config_has_its_own_experiment_and_finds_its_data(monkeypatch):
    paths = sorted((REPO / "experiments").glob("*.toml"))
    assert [load_config(p).experiment.name for p in paths] == [p.stem for p in paths]
    monkeypatch.chdir(REPO)  # from the project's root: the data beside it, the synthetic data in mlruns/
    roots = {load_config(p).data.root for p in paths}
    assert roots == {"../shared/data/face-mask-detection", "mlruns/data/synth-quickstart-v3"}
