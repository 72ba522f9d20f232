"""The MLflow pyfunc model as MLflow users call it: uint8 arrays or encoded images (bytes, base64) in, one row
per detection out, per-class thresholds applied, bad input refused with the reason; and a real
``mlflow models serve`` of the registered model answering a JPEG of the real dataset."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

from maskssd import tracking
from maskssd.deploy.model_input import images_from_input
from maskssd.errors import MaskSSDError
from maskssd.ssd.checkpoint import with_thresholds
from maskssd.tracking import registry
from maskssd.tracking.runs import MlflowRun


def _encode(img: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    return buf.getvalue()


IMG = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)


def test_model_input_forms():
    import pandas as pd

    png = _encode(IMG)
    b64 = base64.b64encode(png).decode()
    for form in (
        pd.DataFrame({"image": [png, b64]}),  # bytes and base64 in the image column
        pd.DataFrame({"anything": [b64, png]}),  # a single column of encoded images
        {"image": [b64, png]},
        [png, "data:image/png;base64," + b64],
        np.array([b64, b64], dtype=object),
        np.stack([IMG, IMG]),  # uint8 arrays
        np.stack([IMG, IMG]).astype(np.int64),  # JSON "inputs" parse to int64
        {"images": np.stack([IMG, IMG])},
    ):
        images = images_from_input(form)
        assert len(images) == 2 and all(np.array_equal(im, IMG) for im in images), type(form)
    assert np.array_equal(images_from_input(IMG)[0], IMG)  # one (H, W, 3) image
    jpeg = images_from_input([_encode(IMG, "JPEG")])[0]
    assert jpeg.shape == IMG.shape and jpeg.dtype == np.uint8


@pytest.mark.parametrize(
    ("junk", "reason"),
    [
        (["not an image"], "neither an encoded image"),
        ([b"\x00\x01garbage bytes"], "not a readable image"),
        (
            [base64.b64encode(b"plain text, not pixels").decode()],
            "base64 decodes to 22 bytes, not a readable",
        ),
        (["junk"], "neither an encoded image"),
        (np.zeros((2, 8, 8), np.uint8), "shape"),
        (np.full((1, 4, 4, 3), 300), "0..255"),
        (np.zeros((1, 4, 4, 3), np.float32), "uint8"),
        ({"other": [1]}, "expected a key"),
    ],
)
def test_model_input_refuses_junk_with_the_reason(junk, reason):
    with pytest.raises(MaskSSDError, match=reason):
        images_from_input(junk)


@pytest.fixture(scope="module")
def served_model(tmp_path_factory, tiny_checkpoint):
    """The tiny model with per-class thresholds, logged in a SQLite store and registered as @champion."""
    tmp = tmp_path_factory.mktemp("pyfunc")
    ckpt = with_thresholds(tiny_checkpoint, {"with_mask": 1.01, "mask_weared_incorrect": 0.0}, tmp / "m.pt")
    uri = f"sqlite:///{tmp}/mlflow.db"
    c = tracking.client(uri)
    run = MlflowRun.start(c, "pyfunc", run_name="tiny")
    model_uri = run.log_model(ckpt, {})
    run.log_metrics({"val_map": 0.5}, step=1)
    run.finish()
    registry.promote(run.run_id, tracking_uri=uri)
    return uri, model_uri, tmp


@pytest.mark.slow
def test_pyfunc_takes_encoded_images_and_applies_the_thresholds(served_model):
    import pandas as pd

    uri, model_uri, _ = served_model
    tracking.client(uri)
    model = mlflow.pyfunc.load_model(f"models:/{registry.DEFAULT_MODEL_NAME}@champion")
    img = np.full((120, 160, 3), 90, np.uint8)
    frame = pd.DataFrame({"image": [base64.b64encode(_encode(img, "JPEG")).decode()]})
    shown = model.predict(frame)
    assert list(shown.columns) == ["image_index", "x1", "y1", "x2", "y2", "label", "score"]
    # with_mask's threshold (1.01) is above any score; mask_weared_incorrect's (0) keeps them all
    assert len(shown) > 0 and set(shown["label"]) == {"mask_weared_incorrect"}
    everything = model.predict(frame, params={"score_threshold": 0.0})
    assert {"with_mask", "mask_weared_incorrect"} <= set(everything["label"])
    as_array = mlflow.pyfunc.load_model(model_uri).predict(img[None], params={"score_threshold": 0.0})
    assert len(as_array) == len(everything)
    assert (shown["x2"] <= 160).all() and (shown["y2"] <= 120).all()  # original pixels
    with pytest.raises(mlflow.exceptions.MlflowException, match="neither an encoded image"):
        model.predict(pd.DataFrame({"image": ["junk"]}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_jpeg(served_model, real_data):
    """``mlflow models serve -m models:/maskssd-face-mask@champion --env-manager local`` on loopback: a JPEG
    (one of the real dataset's PNGs, re-encoded) gets boxes; junk gets a 400 with the reason."""
    httpx = pytest.importorskip("httpx", reason="the HTTP client is in the [serve] extra")
    uri, _, tmp = served_model
    port = _free_port()
    bin_dir = str(Path(sys.executable).parent)  # the scoring server execs `uvicorn` from PATH
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
    }
    log = (tmp / "serve.log").open("w")
    cmd = [
        str(Path(bin_dir) / "mlflow"),
        "models",
        "serve",
        "-m",
        f"models:/{registry.DEFAULT_MODEL_NAME}@champion",
    ]
    proc = subprocess.Popen(
        [*cmd, "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"mlflow models serve exited: {(tmp / 'serve.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow models serve did not answer /ping in 180 s")
        png = sorted((real_data / "images").glob("*.png"))[0]
        buf = io.BytesIO()
        Image.open(png).convert("RGB").save(buf, format="JPEG", quality=90)
        body = {
            "dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(buf.getvalue()).decode()]]}
        }
        r = httpx.post(f"{url}/invocations", json=body, timeout=120)
        assert r.status_code == 200, r.text[:2000]
        rows = r.json()["predictions"]
        assert rows and {"x1", "y1", "x2", "y2", "label", "score"} <= set(rows[0])
        assert {row["label"] for row in rows} == {"mask_weared_incorrect"}  # the model's thresholds apply
        junk = httpx.post(f"{url}/invocations", json={"dataframe_records": [{"image": "junk"}]}, timeout=60)
        assert 400 <= junk.status_code < 500
        assert "neither an encoded image" in junk.json()["message"]
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()
