"""Shared fixtures: the read-only ``../shared`` folder, a small synthetic dataset, and in-test VOC datasets.

``../shared`` (beside the repository root) holds the real face-mask dataset; tests that need it skip with a
clear reason where it is absent. Nothing from it is ever copied into the project.

* ``shared_dir``, ``real_data``, ``rgba_sample``: paths under ``../shared`` (session; skip when absent).
* ``tiny_checkpoint``: a deploy checkpoint of the tiny model that detects something (session; read-only).
* ``python_sigint``: Python's SIGINT handler for one test (a background job starts with SIGINT ignored).
* ``synth_root``: a 40-image synthetic dataset, split ``default`` (session; read-only, copy it to write).
* ``make_dataset(samples, splits=None, name="ds")``: a Kaggle-layout dataset under ``tmp_path`` from
  in-test images (PIL image, raw bytes or None) and XML strings; ``voc_xml(...)`` writes those strings and
  ``good_sample(id)`` gives a valid (image, xml) pair.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):  # one of two test processes on 2 cores: one thread each (and the
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # processes its tests start), not two oversubscribed
        os.environ.setdefault(_var, "1")

import numpy as np
import pytest
import torch
from PIL import Image

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
REAL_DATA = SHARED_DIR / "data" / "face-mask-detection"
RGBA_SAMPLE = SHARED_DIR / "data" / "face-mask-detection-rgba-sample"


def _need(path: Path, what: str) -> Path:
    if not path.is_dir():
        pytest.skip(
            f"{what} not available: {path} is absent (the read-only ../shared folder beside the repo root)"
        )
    return path


# ----------------------------------------------------------------------------------------- ../shared
@pytest.fixture()
def python_sigint() -> Iterator[None]:
    """Python's own SIGINT handler for the test. A job started in the background by a shell without job
    control (`pytest &`, CI scripts) inherits SIGINT ignored, and a raised SIGINT would then do nothing."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` beside the repository root; skips when absent."""
    return _need(SHARED_DIR, "shared folder")


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The real Face Mask Detection dataset (853 images, split ``paper``); skips when absent."""
    return _need(REAL_DATA, "real face-mask dataset")


@pytest.fixture(scope="session")
def rgba_sample() -> Path:
    """Six original (mostly RGBA) PNGs of the real dataset with their XMLs; skips when absent."""
    return _need(RGBA_SAMPLE, "original RGBA sample of the face-mask dataset")


@pytest.fixture(scope="session", autouse=True)
def _own_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """maskssd's user cache (downloaded models, ONNX builds) in a folder of the session, not the user's."""
    import os

    before = os.environ.get("MASKSSD_CACHE_DIR")
    os.environ["MASKSSD_CACHE_DIR"] = str(tmp_path_factory.mktemp("maskssd-cache"))
    yield
    if before is None:
        os.environ.pop("MASKSSD_CACHE_DIR", None)
    else:
        os.environ["MASKSSD_CACHE_DIR"] = before


# ------------------------------------------------------------------------------------- MLflow stores
@pytest.fixture(scope="session", autouse=True)
def _mlflow_schema_once(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A new SQLite MLflow store in this process gets its tables from one store migrated for the session
    (SQLite's backup API copies them), not by running MLflow's migrations again: those take seconds each,
    and most tests open a store of their own. Still a real store: the same schema, created by MLflow, with
    its default experiment created by the store itself afterwards. Stores of other processes (servers, CLI
    subprocesses) and other databases migrate as usual."""
    import sqlite3

    try:
        import mlflow.store.db.utils as db_utils
    except ImportError:  # the tests that need MLflow skip without it
        yield
        return
    migrate = db_utils._initialize_tables
    template = tmp_path_factory.mktemp("mlflow-schema") / "schema.db"

    def initialize(engine) -> None:
        path = engine.url.database if engine.url.get_backend_name() == "sqlite" else None
        if not path or path == ":memory:":
            return migrate(engine)
        if not template.is_file():
            from sqlalchemy import create_engine

            fresh = create_engine(f"sqlite:///{template}")
            migrate(fresh)
            fresh.dispose()
        with sqlite3.connect(template) as src, sqlite3.connect(path) as dst:
            src.backup(dst)

    db_utils._initialize_tables = initialize
    try:
        yield
    finally:
        db_utils._initialize_tables = migrate


def migrated_store(path: Path) -> str:
    """``sqlite:///PATH`` with MLflow's tables made in this process (from the session's migrated copy), for a
    store a subprocess or server opens first: it then finds them instead of migrating (seconds each, and two
    workers opening a new store at once would both migrate it)."""
    import mlflow.store.db.utils as db_utils
    from sqlalchemy import create_engine

    path.parent.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{path}"
    engine = create_engine(uri)
    try:
        if not db_utils._all_tables_exist(engine):
            db_utils._initialize_tables(engine)
    finally:
        engine.dispose()
    return uri


# ---------------------------------------------------------------------------------------- synthetic
TINY_CLASSES = ["with_mask", "without_mask", "mask_weared_incorrect"]
TINY_DECODE = {
    "min_score": 0.01,
    "max_overlap": 0.45,
    "top_k": 200,
    "class_agnostic": False,
    "pre_nms_top_k": None,
}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model (seed 0), confident about ``with_mask`` on its coarsest priors and ``mask_weared_incorrect``
    on the next level, so that detection has boxes to draw and class-agnostic NMS has overlaps to resolve."""
    from maskssd.ssd.checkpoint import atomic_save
    from maskssd.ssd.models import build_model

    torch.manual_seed(0)
    m = build_model("tiny", num_classes=4, input_size=128)
    with torch.no_grad():
        bias = m.cls_head[-1][-1].bias.view(-1, 4)
        bias[:, 0], bias[:, 1] = 0.0, 8.0
        bias = m.cls_head[-2][-1].bias.view(-1, 4)
        bias[:, 0], bias[:, 3] = 0.0, 6.0
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    atomic_save(
        {
            "format": 1,
            "model": m.state_dict(),
            "build_args": m.build_args,
            "class_names": TINY_CLASSES,
            "decode": TINY_DECODE,
            "epoch": 1,
        },
        path,
    )
    return path


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40-image synthetic dataset (Kaggle layout, split ``default``), generated once per session.

    Treat it as read-only: copy it (``shutil.copytree``) before writing into it.
    """
    from maskssd.data.synth import generate

    return generate(tmp_path_factory.mktemp("synth") / "synth40", n_images=40, seed=0).root


@pytest.fixture(scope="session")
def easy_synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 synthetic images with large faces and balanced classes: a tiny model scores above zero within two
    epochs, so trials differ (studies, importances, the champion rule). Read-only."""
    from maskssd.data.synth import generate

    return generate(
        tmp_path_factory.mktemp("easy") / "easy40",
        n_images=40,
        seed=1,
        face_size=(0.25, 0.5),
        faces_per_image=(1, 3),
        class_probs=(0.5, 0.3, 0.2),
    ).root


# ---------------------------------------------------------------------------- in-test VOC datasets
#: One object of :func:`_voc_xml`: (name, xmin, ymin, xmax, ymax) or (name, xmin, ymin, xmax, ymax, difficult);
#: coordinates may be strings (to write non-numeric ones).
VocObject = Sequence[object]


def _voc_xml(
    filename: str, width: int | None, height: int | None, objects: Sequence[VocObject] = (), prolog: str = ""
) -> str:
    """A Pascal VOC annotation as the face-mask dataset writes it (``width=None`` leaves out ``<size>``)."""
    lines = [prolog, "<annotation>", "  <folder>images</folder>", f"  <filename>{filename}</filename>"]
    if width is not None and height is not None:
        lines += [
            "  <size>",
            f"    <width>{width}</width>",
            f"    <height>{height}</height>",
            "    <depth>3</depth>",
            "  </size>",
        ]
    for obj in objects:
        name, x1, y1, x2, y2, *rest = obj
        difficult = rest[0] if rest else 0
        lines += [
            "  <object>",
            f"    <name>{name}</name>",
            "    <truncated>0</truncated>",
            f"    <difficult>{int(difficult) if isinstance(difficult, bool) else difficult}</difficult>",
            "    <bndbox>",
            f"      <xmin>{x1}</xmin>",
            f"      <ymin>{y1}</ymin>",
            f"      <xmax>{x2}</xmax>",
            f"      <ymax>{y2}</ymax>",
            "    </bndbox>",
            "  </object>",
        ]
    lines.append("</annotation>")
    return "\n".join(line for line in lines if line) + "\n"


#: An image entry of :func:`write_kaggle_dataset`: a PIL image (saved as PNG), raw bytes (written as they
#: are), or None (no image file).
ImageSpec = Image.Image | bytes | None


def write_kaggle_dataset(
    root: Path,
    samples: Mapping[str, tuple[ImageSpec, str | None]],
    splits: Mapping[str, Sequence[str]] | None = None,
    split_name: str = "test_split",
) -> Path:
    """Write ``root/images/ID.png`` + ``root/annotations/ID.xml`` for each ``ID: (image, xml_text)``.

    ``xml_text`` None writes no annotation. ``splits`` (``{"train": [...], ...}``) writes
    ``root/splits/SPLIT_NAME/*.txt``. Returns ``root``.
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for image_id, (image, xml) in samples.items():
        if isinstance(image, Image.Image):
            image.save(root / "images" / f"{image_id}.png")
        elif isinstance(image, bytes):
            (root / "images" / f"{image_id}.png").write_bytes(image)
        if xml is not None:
            (root / "annotations" / f"{image_id}.xml").write_text(xml, encoding="utf-8")
    if splits:
        d = root / "splits" / split_name
        d.mkdir(parents=True, exist_ok=True)
        for split, ids in splits.items():
            (d / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def _good_sample(image_id: str, width: int = 64, height: int = 48, seed: int = 0) -> tuple[Image.Image, str]:
    """A valid (image, xml) pair with two boxes (one ``with_mask``, one ``without_mask``)."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    xml = _voc_xml(
        f"{image_id}.png",
        width,
        height,
        [("with_mask", 2, 3, 20, 25), ("without_mask", 30, 10, width - 2, height - 4)],
    )
    return img, xml


@pytest.fixture
def make_dataset(tmp_path: Path) -> Callable[..., Path]:
    """``make_dataset(samples, splits=None, name="ds")``: :func:`write_kaggle_dataset` under ``tmp_path``."""

    def make(
        samples: Mapping[str, tuple[ImageSpec, str | None]],
        splits: Mapping[str, Sequence[str]] | None = None,
        name: str = "ds",
        split_name: str = "test_split",
    ) -> Path:
        return write_kaggle_dataset(tmp_path / name, samples, splits, split_name)

    return make


@pytest.fixture(scope="session")
def voc_xml() -> Callable[..., str]:
    """``voc_xml(filename, width, height, objects=(), prolog="")``: the text of a VOC annotation."""
    return _voc_xml


@pytest.fixture(scope="session")
def good_sample() -> Callable[..., tuple[Image.Image, str]]:
    """``good_sample(image_id, width=64, height=48, seed=0)``: a valid (noise image, xml) pair, two boxes."""
    return _good_sample


# ------------------------------------------------------------------------------ a tiny experiment
TINY_EXPERIMENT = """\
[experiment]
name = "{name}"
seed = 3
device = "cpu"

[data]
root = "{root}"
split_name = "default"
batch_size = 8
eval_batch_size = 16
cache_images = true

[augment]
zoom_out_p = 0.3
zoom_out_max = 2.0

[model]
name = "tiny"
input_size = 96
width = 8

[loss]
class_weights = {{ background = 1.0, mask_weared_incorrect = 3.0 }}

[optim]
name = "adamw"
lr = 3e-3
weight_decay = 1e-4

[schedule]
name = "cosine"
warmup_epochs = 1

[train]
epochs = {epochs}
eval_every = 1
best_metric = "val_map"
log_images = 1

[eval]
coco = {coco}
"""


def write_tiny_experiment(
    path: Path, root: Path, name: str = "t", epochs: int = 2, coco: bool = False
) -> Path:
    """An experiment TOML for the tiny model (96 px, width 8) on ``root``: seconds per epoch on a laptop CPU."""
    path.write_text(TINY_EXPERIMENT.format(root=root, name=name, epochs=epochs, coco=str(coco).lower()))
    return path


# ------------------------------------------------------------------------------ scale-out services
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresCluster:
    """A throw-away PostgreSQL cluster on loopback that a test may stop and start again (a restart mid-study)."""

    def __init__(self) -> None:
        import os
        import shutil
        import tempfile

        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
        initdb = str(bins[-1] / "initdb") if bins else shutil.which("initdb")
        if not initdb:
            pytest.skip(
                "PostgreSQL is not installed and MASKSSD_TEST_POSTGRES_URL is not set (.ci/run starts one)"
            )
        self.pg_ctl = str(Path(initdb).parent / "pg_ctl")
        self.data = Path(tempfile.mkdtemp(prefix="maskssd-test-pg-"))  # outside pytest's root-only temp tree
        self.runas: list[str] = []
        if os.geteuid() == 0:
            try:
                import pwd

                pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root without a 'postgres' user to run a PostgreSQL server")
            shutil.chown(self.data, "postgres")
            self.runas = ["runuser", "-u", "postgres", "--"]
        self.port = _free_port()
        self._run(initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres")
        self.start()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str) -> None:
        import subprocess

        try:
            subprocess.run([*self.runas, *argv], check=True, capture_output=True, timeout=120)
        except (subprocess.SubprocessError, OSError) as e:
            pytest.skip(f"could not run PostgreSQL ({argv[0]}): {e}")

    def start(self) -> None:
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.data} -c fsync=off"
        self._run(self.pg_ctl, "-D", str(self.data), "-w", "-l", str(self.data / "log"), "-o", opts, "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(self.pg_ctl, "-D", str(self.data), "-w", "-m", mode, "stop")

    def remove(self) -> None:
        import shutil
        import subprocess

        subprocess.run(
            [*self.runas, self.pg_ctl, "-D", str(self.data), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(self.data, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory):
    """A PostgreSQL server on loopback: ``$MASKSSD_TEST_POSTGRES_URL`` (``.ci/run`` starts one), else a throw-away
    cluster started here when the server binaries are installed; skips, saying why, otherwise."""
    import os

    url = os.environ.get("MASKSSD_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    cluster = PostgresCluster()
    yield cluster.url
    cluster.remove()


@pytest.fixture()
def postgres_cluster():
    """A PostgreSQL cluster of this test's own, which it may restart."""
    pytest.importorskip(
        "psycopg", reason='PostgreSQL is the [postgres] extra: pip install "maskssd[postgres]"'
    )
    cluster = PostgresCluster()
    yield cluster
    cluster.remove()


@pytest.fixture()
def postgres_db(postgres_server: str, request: pytest.FixtureRequest) -> str:
    """A fresh database on the test PostgreSQL server, for one test."""
    import re
    import uuid

    psycopg = pytest.importorskip(
        "psycopg", reason='PostgreSQL is the [postgres] extra: pip install "maskssd[postgres]"'
    )

    name = "t_" + re.sub(r"\W", "_", request.node.name.lower())[:40] + "_" + uuid.uuid4().hex[:6]
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return postgres_server.rsplit("/", 1)[0] + f"/{name}"


class MlflowServer:
    """A real ``mlflow server`` on a fixed loopback port: its backend store, artifacts served from ``root``;
    stopped and started again on the same port and store (an outage)."""

    def __init__(self, root: Path, backend: str):
        self.root, self.backend, self.port = root, backend, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.starts = 0

    def start(self) -> MlflowServer:
        import os
        import subprocess
        import sys
        import time

        httpx = pytest.importorskip(
            "httpx", reason='the HTTP client is the [serve] extra: pip install "maskssd[serve]"'
        )
        self.starts += 1
        if self.backend.startswith(
            "sqlite:///"
        ):  # its tables as this process makes them (the session's copy)
            migrated_store(Path(self.backend.removeprefix("sqlite:///")))
        log_path = self.root / f"mlflow-server-{self.starts}.log"
        cmd = [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            self.backend,
            "--artifacts-destination",
            str(self.root / "server-artifacts"),
            "--serve-artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        with log_path.open("w") as log:
            # no background job runner (MLflow 3's huey consumers): maskssd uses none, and on 2 cores its
            # processes doubled the server's start and made its stop wait seconds
            env = {**os.environ, "PYTHONWARNINGS": "ignore", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited: {log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.3)
        self.proc.kill()
        pytest.fail("mlflow server did not come up in 120 s")

    def stop(self) -> None:
        import subprocess

        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.proc = None


@pytest.fixture()
def mlflow_server(tmp_path: Path, postgres_db: str):
    """A real ``mlflow server`` on loopback: PostgreSQL backend store, artifacts served from tmp_path."""
    server = MlflowServer(tmp_path, postgres_db).start()
    yield server.url
    server.stop()
