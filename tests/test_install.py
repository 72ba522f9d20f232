"""What an install holds: the core (``pip install maskssd``) trains, evaluates, tracks and runs studies; serving,
ONNX, video, PostgreSQL and the dashboard are extras, and a missing one says which (``pip install
"maskssd[serve]"``). Declared dependencies match what is imported; the README's commands are what CI runs."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from maskssd.errors import MaskSSDError
from maskssd.extras import EXTRAS, MissingExtraError, import_extra, require

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "maskssd"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
#: import name -> the extra that provides it (third-party modules optional features import)
OPTIONAL = {m: extra for extra, mods in EXTRAS.items() for m in mods} | {
    "starlette": "serve",
    "multipart": "serve",
}
#: modules of an extra that the core install has anyway: MLflow itself depends on FastAPI and uvicorn
CORE_PROVIDES = {"fastapi", "starlette", "uvicorn"}


def _requirement_names(reqs: list[str]) -> set[str]:
    return {re.split(r"[\[<>=!~;\s]", r, maxsplit=1)[0].lower() for r in reqs}


def test_core_and_extras_are_declared():
    core = PYPROJECT["project"]["dependencies"]
    names = _requirement_names(core)
    assert {"pandas", "sqlalchemy", "tomli-w", "psutil", "mlflow", "optuna", "torch", "torchvision"} <= names
    assert "plotly" not in names  # not imported anywhere
    for optional in (
        "fastapi",
        "uvicorn",
        "opencv-python-headless",
        "onnx",
        "onnxruntime",
        "psycopg",
        "httpx",
    ):
        assert optional not in names, optional
    assert "sqlalchemy>=2.1" in core  # postgresql:// = psycopg 3
    for pkg in ("torch", "torchvision"):  # compatible ranges, not pins that force a reinstall
        (spec,) = [r for r in core if r.split(">")[0].split("=")[0] == pkg]
        assert ">=" in spec and "==" not in spec, spec
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {"serve", "onnx", "video", "postgres", "dashboard", "all", "dev"} <= set(extras)
    assert _requirement_names(extras["serve"]) == {
        "fastapi",
        "uvicorn",
        "python-multipart",
        "prometheus-client",
        "httpx",
    }
    assert _requirement_names(extras["onnx"]) == {"onnx", "onnxscript", "onnxruntime"}
    assert extras["all"] == ["maskssd[serve,onnx,video,postgres,dashboard]"]


def test_readme_commands_are_what_ci_runs():
    readme = (REPO / "README.md").read_text()
    lines = (REPO / ".ci" / "run").read_text().splitlines()
    ci = lines[lines.index("# --- the README's test command, verbatim ---") + 1]
    assert ci in readme and '.[all,dev]"' in ci and ci.endswith("python -m pytest")
    assert "mkdocs build --strict" in ci  # a broken link or a missing docs page fails CI
    assert "`pip install -e .`" in readme  # the lean install is documented


def _module_level_imports(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text())
    found = []
    for node in tree.body:  # module level only; a try/except or guard at module level counts too
        for sub in ast.walk(node) if isinstance(node, (ast.Try, ast.If)) else [node]:
            if isinstance(sub, ast.Import):
                found += [(a.name.split(".")[0], sub.lineno) for a in sub.names]
            elif isinstance(sub, ast.ImportFrom) and sub.module and sub.level == 0:
                found.append((sub.module.split(".")[0], sub.lineno))
    return found


def test_only_the_serving_module_imports_an_extra_at_module_level():
    """Everything else imports optional modules inside the function that needs them (through
    :func:`maskssd.extras.import_extra`), so the core install imports every other module."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        for module, line in _module_level_imports(path):
            if module in OPTIONAL and rel != "maskssd/deploy/serving.py":
                offenders.append(f"{rel}:{line} imports {module}")
    assert not offenders, offenders


def test_a_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # what an install without the module gives: ImportError
    with pytest.raises(
        MissingExtraError,
        match=re.escape('video input needs the [video] extra: pip install "maskssd[video]"'),
    ):
        import_extra("cv2", "video", "video input")
    with pytest.raises(MissingExtraError) as e:
        require("video", "maskssd detect on a video")
    assert e.value.extra == "video" and e.value.module == "cv2" and isinstance(e.value, MaskSSDError)
    with pytest.raises(ValueError, match="unknown extra"):
        require("nope", "x")


def test_serve_without_the_serve_extra_says_which(monkeypatch, tiny_checkpoint, capsys):
    from maskssd.cli import main

    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.delitem(sys.modules, "maskssd.deploy.serving", raising=False)
    assert main(["serve", "--model", str(tiny_checkpoint)]) == 2
    err = capsys.readouterr().err
    assert 'pip install "maskssd[serve]"' in err and "prometheus_client" in err and "Traceback" not in err


def test_detect_show_works_or_says_why_not(tiny_checkpoint, tmp_path, capsys):
    pytest.importorskip("cv2", reason="video is the [video] extra")
    from maskssd.deploy.video import window_problem

    problem = window_problem()
    if problem is None:
        pytest.skip("OpenCV can open windows here: --show works (nothing to refuse)")
    from maskssd.cli import main

    argv = [
        "detect",
        "--model",
        str(tiny_checkpoint),
        "--source",
        str(tmp_path),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main([*argv, "--show"]) == 2
    err = capsys.readouterr().err
    assert "--show cannot open a window" in err and ("headless" in err or "display" in err.lower())


def test_core_modules_import_without_any_extra(tmp_path):
    """In a fresh interpreter where every extra's modules fail to import (as in ``pip install maskssd``),
    every maskssd module but the HTTP service imports, and that one names its extra."""
    blocked = sorted(set(OPTIONAL) - CORE_PROVIDES)
    script = textwrap.dedent(
        f"""
        import importlib, pathlib, sys
        for name in {blocked!r}:
            sys.modules[name] = None  # `import name` raises ModuleNotFoundError, find_spec gives None
        root = pathlib.Path({str(PACKAGE)!r})
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root.parent).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            if name in ("maskssd.deploy.serving", "maskssd.__main__", "maskssd.deploy.pyfunc"):
                continue
            importlib.import_module(name)
        from maskssd.extras import MissingExtraError
        try:
            importlib.import_module("maskssd.deploy.serving")
        except MissingExtraError as e:
            print("SERVE:", e)
        """
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    expected = 'SERVE: maskssd serve (the HTTP detection service) needs the [serve] extra: pip install "maskssd[serve]"'
    assert expected in r.stdout, r.stdout
