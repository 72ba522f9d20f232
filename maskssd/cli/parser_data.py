"""The parser of ``maskssd data``: ``synth``, ``import``, ``split``, ``stats`` and ``anchors``."""

from __future__ import annotations

from typing import Any

from maskssd.cli.data import cmd_data_anchors, cmd_data_import, cmd_data_split, cmd_data_stats, cmd_data_synth
from maskssd.cli.parser_common import formatter as _formatter

__all__ = ["add_data_commands"]


def add_data_commands(sub: Any) -> None:
    """Add the ``data`` command group and its subcommands."""
    d = sub.add_parser(
        "data",
        help="datasets: synthesise, split, inspect",
        formatter_class=_formatter,
        description="Work with Pascal VOC face-mask datasets (Kaggle images/+annotations/ or classic VOC).",
        epilog="examples:\n"
        "  maskssd data stats ../shared/data/face-mask-detection --split-name paper\n"
        "  maskssd data import --format yolo ~/datasets/helmets data/helmets",
    )
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    _add_synth(dsub)
    _add_import(dsub)
    _add_split(dsub)
    _add_stats(dsub)
    _add_anchors(dsub)


def _add_synth(dsub: Any) -> None:
    s = dsub.add_parser(
        "synth",
        help="generate a synthetic face-mask dataset",
        formatter_class=_formatter,
        description="Draw scenes of faces with a mask, without one, or with one below the nose, in the "
        "real class imbalance; written in the Kaggle VOC layout with a stratified split.",
        epilog="example:\n  maskssd data synth /tmp/synth --images 200 --seed 0 && maskssd data stats /tmp/synth",
    )
    s.add_argument("out", help="output folder (new, empty, or an earlier synthetic dataset)")
    s.add_argument("--images", type=int, default=200, help="number of images (default 200)")
    s.add_argument("--seed", type=int, default=0, help="same seed, same dataset (default 0)")
    s.add_argument("--split-name", default="default", help="written to OUT/splits/NAME/ (default: default)")
    s.set_defaults(func=cmd_data_synth)


def _add_import(dsub: Any) -> None:
    s = dsub.add_parser(
        "import",
        help="write a COCO or YOLO dataset in the layout maskssd reads (VOC, with splits)",
        formatter_class=_formatter,
        description="Read a COCO dataset (a folder with the images and one *.json per split) or a YOLO one (an "
        "Ultralytics folder with data.yaml, or images/ + labels/ + classes.txt) and write it at DST: images/, "
        "annotations/*.xml, splits/source (the source's splits) and splits/default (a stratified 70/15/15 "
        "split). Classes come from the data; the [data] lines of an experiment are printed.",
        epilog="examples:\n  maskssd data import --format coco ~/datasets/pets-coco data/pets\n"
        "  maskssd data import --format yolo ~/datasets/helmets data/helmets\n"
        "  maskssd train my_experiment.toml   # with the printed [data] lines",
    )
    s.add_argument("src", help="the dataset as you have it")
    s.add_argument("dst", help="a new (or empty) folder")
    s.add_argument("--format", required=True, choices=("coco", "yolo"))
    s.add_argument("--seed", type=int, default=0, help="of the stratified split 'default' (default 0)")
    s.set_defaults(func=cmd_data_import)


def _add_split(dsub: Any) -> None:
    s = dsub.add_parser(
        "split",
        help="write a seeded stratified train/val/test split",
        formatter_class=_formatter,
        description="Iterative stratification: every split gets its share of every class.",
        epilog="example:\n  maskssd data split /tmp/synth --split-name seed1 --seed 1",
    )
    s.add_argument("root")
    s.add_argument(
        "--split-name", required=True, help="written to ROOT/splits/SPLIT_NAME/{train,val,test}.txt"
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--ratios", type=float, nargs=3, default=(0.7, 0.15, 0.15), metavar=("TRAIN", "VAL", "TEST")
    )
    s.add_argument(
        "--classes", nargs="+", help="class names (default: with_mask without_mask mask_weared_incorrect)"
    )
    s.add_argument("--on-error", choices=("raise", "skip"), default="raise")
    s.set_defaults(func=cmd_data_split)


def _add_stats(dsub: Any) -> None:
    s = dsub.add_parser(
        "stats",
        help="images and boxes per class and split, box sizes, problems fixed",
        formatter_class=_formatter,
        epilog="example:\n  maskssd data stats ../shared/data/face-mask-detection --split-name paper --split val",
    )
    s.add_argument("root")
    s.add_argument("--split-name", help="split list under ROOT/splits/ (default: every split found)")
    s.add_argument(
        "--split", choices=("train", "val", "test"), help="only this part of each split (default: all three)"
    )
    s.add_argument("--classes", nargs="+")
    s.add_argument(
        "--on-error",
        choices=("raise", "skip"),
        default="raise",
        help="skip: count bad samples instead of stopping at the first",
    )
    s.add_argument(
        "--show-fixes", type=int, default=20, metavar="N", help="list the first N fixes (default 20)"
    )
    s.add_argument("--verify", action="store_true", help="decode every image (finds truncated files; slower)")
    s.set_defaults(func=cmd_data_stats)


def _add_anchors(dsub: Any) -> None:
    s = dsub.add_parser(
        "anchors",
        help="fit default-box scales and aspect ratios to a split's boxes",
        formatter_class=_formatter,
        description="Fit per-level scales and aspect ratios of the default boxes to the boxes of a "
        "split (as the model sees them, squashed into the square input), and compare "
        "the matcher's recall (share of boxes whose best prior has IoU >= 0.5) with the "
        "config's current boxes. Prints [model] lines for the config.",
        epilog="examples:\n"
        "  maskssd data anchors ../shared/data/face-mask-detection --split-name paper "
        "--config experiments/cpu_effnet_lite0.toml --out /tmp/anchors.toml\n"
        "  maskssd data anchors ../shared/data/face-mask-detection --split-name paper "
        "--config experiments/cpu_effnet_lite0.toml --set model.neck=fpn "
        "--set model.stride4=true\n"
        "  maskssd data anchors /tmp/synth --split-name default --input-size 320 --levels 6",
    )
    s.add_argument("root")
    s.add_argument("--split-name", required=True, help="split list under ROOT/splits/")
    s.add_argument("--split", default="train", choices=("train", "val", "test"), help="default: train")
    s.add_argument("--config", help="experiment TOML: input size, maps and current boxes from its model")
    s.add_argument(
        "--set", action="append", metavar="SECTION.KEY=VALUE", help="override a --config value (repeatable)"
    )
    s.add_argument("--input-size", type=int, help="without --config: square input size (default 384)")
    s.add_argument("--levels", type=int, help="without --config: number of feature maps (default 6)")
    s.add_argument(
        "--min-stride",
        type=int,
        choices=(4, 8),
        help="without --config: stride of the finest map (default 8)",
    )
    s.add_argument("--ratios", type=int, help="aspect ratios besides 1 (default: the config's count, else 3)")
    s.add_argument("--out", help="write the [model] lines (scales, aspect_ratios) to this file")
    s.add_argument("--classes", nargs="+")
    s.add_argument("--on-error", choices=("raise", "skip"), default="raise")
    s.set_defaults(func=cmd_data_anchors)
