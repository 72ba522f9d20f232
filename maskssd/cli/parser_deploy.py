"""The parser of the deployment commands: ``serve``, ``stream`` and ``export``."""

from __future__ import annotations

import argparse
from typing import Any

from maskssd.cli.commands import cmd_export, cmd_serve, cmd_stream
from maskssd.cli.parser_common import formatter as _formatter
from maskssd.cli.parser_common import model_arg as _model_arg
from maskssd.deploy.model_ref import BACKENDS
from maskssd.ssd.decode_spec import DISPLAY_THRESHOLD

__all__ = ["add_deploy_commands"]


def add_deploy_commands(sub: Any) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """Add ``serve``, ``stream`` and ``export``; returns the serve and export parsers (shared options follow)."""
    sv = _add_serve(sub)
    _add_stream(sub)
    return sv, _add_export(sub)


def _add_serve(sub: Any) -> argparse.ArgumentParser:
    sv = sub.add_parser(
        "serve",
        help="HTTP detection service with dynamic batching",
        formatter_class=_formatter,
        description="Serve a model over HTTP: POST /detect (an image), GET /health, /metrics, /montage behind "
        "bearer tokens, GET /livez (liveness) open. On this machine only (127.0.0.1) it may run without tokens; "
        "on any other address it needs --token-file (or $MASKSSD_SERVE_TOKENS), and TLS with "
        "--ssl-certfile/--ssl-keyfile for cameras on a network.",
        epilog="examples:\n  maskssd serve --model models:/maskssd-face-mask@champion --port 8000\n"
        "  curl -F file=@photo.jpg http://127.0.0.1:8000/detect\n"
        "  python -c 'import secrets; print(secrets.token_urlsafe(32))' >> tokens.txt   # one per camera\n"
        "  maskssd serve --model model.pt --host 0.0.0.0 --token-file tokens.txt \\\n"
        "      --ssl-certfile cert.pem --ssl-keyfile key.pem\n"
        '  curl -H "Authorization: Bearer $TOKEN" --cacert cert.pem -F file=@photo.jpg https://HOST:8000/detect',
    )
    _model_arg(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (not loopback: tokens required)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-batch", type=int, default=8)
    sv.add_argument("--max-wait-ms", type=float, default=10.0)
    sv.add_argument("--no-batching", action="store_true")
    sv.add_argument(
        "--model-workers",
        type=int,
        default=1,
        metavar="N",
        help="batches in the model at once, each on a copy with its share of the cores (ONNX Runtime backends; "
        "default 1)",
    )
    sv.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="auto (default): ONNX Runtime on a CPU when the [onnx] extra is installed (int8 where the CPU has "
        "VNNI and the model carries its calibration images, else float), else PyTorch; said at start",
    )
    sv.add_argument(
        "--montage", metavar="FILE.jpg", help="keep a montage of the latest frame of every camera here"
    )
    sv.add_argument(
        "--score-threshold",
        type=float,
        default=None,
        help="display threshold of answers (default: the model's per-class thresholds, else "
        f"{DISPLAY_THRESHOLD}; a request's ?score_threshold= wins)",
    )
    sv.add_argument("--device", default="cpu")
    sv.add_argument("--class-agnostic", action="store_true")
    sv.add_argument(
        "--token-file",
        metavar="FILE",
        help="accepted bearer tokens, one per line (one per client: delete a line to revoke it); default "
        "$MASKSSD_SERVE_TOKENS. Never pass a token as an argument",
    )
    sv.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="serve a non-loopback address without tokens: anyone on the network may use the model",
    )
    sv.add_argument("--ssl-certfile", metavar="PEM", help="TLS certificate (with --ssl-keyfile): https://")
    sv.add_argument("--ssl-keyfile", metavar="PEM", help="the certificate's private key")
    sv.add_argument(
        "--rate-limit", type=float, default=30.0, help="requests per second per client (0 = no limit)"
    )
    sv.add_argument("--burst", type=int, default=30, help="requests a client may make at once")
    sv.add_argument(
        "--max-queue",
        type=int,
        default=100,
        help="images waiting for the model at most; beyond, 503 with Retry-After (not unbounded waiting)",
    )
    sv.set_defaults(func=cmd_serve)
    return sv


def _add_stream(sub: Any) -> None:
    sm = sub.add_parser(
        "stream",
        help="camera client: send frames to a maskssd server",
        formatter_class=_formatter,
        epilog="example:\n  maskssd stream --server http://10.0.0.5:8000 --source 0 --name door",
    )
    sm.add_argument("--server", required=True)
    sm.add_argument("--source", required=True, help="CAMERA_INDEX, VIDEO file or stream URL")
    sm.add_argument("--name", default="cam1")
    sm.add_argument("--max-frames", type=int, default=0)
    sm.add_argument(
        "--fps", type=float, default=0, help="cap the frame rate (0 = as fast as the server answers)"
    )
    sm.add_argument("--jpeg-quality", type=int, default=85)
    sm.add_argument(
        "--token-file",
        metavar="FILE",
        help="this camera's bearer token (the file's first one; default $MASKSSD_TOKEN)",
    )
    sm.add_argument(
        "--ca-file", metavar="PEM", help="trust this certificate (a self-signed server's) for https://"
    )
    sm.set_defaults(func=cmd_stream)


def _add_export(sub: Any) -> argparse.ArgumentParser:
    ex = sub.add_parser(
        "export",
        help="export a model to ONNX (float or int8) or TorchScript",
        formatter_class=_formatter,
        epilog="examples:\n  maskssd export --model runs:/RUN_ID/model --format onnx --out model.onnx\n"
        "  maskssd export --model models:/maskssd-face-mask@champion --format onnx --int8 --out model.int8.onnx",
    )
    _model_arg(ex)
    ex.add_argument(
        "--format",
        choices=("onnx", "torchscript", "checkpoint"),
        required=True,
        help="checkpoint: the model again, carrying --calibration's images (int8 then needs no dataset)",
    )
    ex.add_argument("--out", required=True)
    ex.add_argument(
        "--int8",
        action="store_true",
        help="ONNX Runtime int8: static quantisation calibrated on the training images the model carries "
        "(or --calibration's)",
    )
    ex.add_argument(
        "--calibration",
        metavar="DATA_ROOT",
        help="dataset whose training images calibrate --int8 (models trained before maskssd carried their own)",
    )
    ex.add_argument(
        "--split-name",
        default="paper",
        help="split list of --calibration under ROOT/splits/ (default: paper)",
    )
    ex.add_argument(
        "--calibration-images",
        type=int,
        default=100,
        metavar="N",
        help="default: 100, as many as training stores",
    )
    ex.set_defaults(func=cmd_export)
    return ex
