"""One meaning per flag across the ``maskssd`` commands, read from the parser itself."""

from __future__ import annotations

import argparse

from maskssd.cli.parser import build_parser


def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[f"{prefix}{name}"] = sub
                out.update(_commands(sub, f"{prefix}{name} "))
    return out


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return next((a for a in parser._actions if flag in a.option_strings), None)


def test_split_is_train_val_or_test_and_split_name_names_a_list_everywhere():
    commands = _commands(build_parser())
    with_split = {name: _option(p, "--split") for name, p in commands.items() if _option(p, "--split")}
    assert {"evaluate", "data stats", "data anchors"} <= set(with_split)
    for name, action in with_split.items():
        # a split, or the out-of-fold pooling of a cross-validation parent's train and val images
        assert set(action.choices) <= {"train", "val", "test", "oof"} and "val" in action.choices, name
    with_name = {name for name, p in commands.items() if _option(p, "--split-name")}
    assert {"evaluate", "data stats", "data split", "data anchors", "data synth"} <= with_name
    for name in ("data split", "data stats"):  # the split list is never --name or --split there
        assert _option(commands[name], "--name") is None, name


def test_evaluate_json_and_thresholds_options():
    args = build_parser().parse_args(
        ["evaluate", "--model", "m.pt", "--data", "d", "--json", "--fit-thresholds", "--out", "n.pt"]
    )
    assert args.json and args.fit_thresholds and args.out == "n.pt" and args.split == "val"
    for command in ("detect", "serve"):  # the model's per-class thresholds unless given
        base = ["--model", "m.pt"] + (["--source", "s", "--out", "o"] if command == "detect" else [])
        assert build_parser().parse_args([command, *base]).score_threshold is None
