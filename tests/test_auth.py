"""A server that lets in only its clients, against a real uvicorn server on loopback: bearer tokens (none, wrong,
right; the liveness probe open), TLS with a certificate made here, the camera client with its token and CA, a
non-loopback address refused without tokens, per-client rate limits, and a flood beyond the queue answered with
503 + Retry-After while the server keeps answering."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

for _module in ("fastapi", "uvicorn", "python_multipart", "prometheus_client", "httpx", "cryptography"):
    pytest.importorskip(_module, reason='serving is the [serve] extra: pip install "maskssd[serve]"')

import httpx  # noqa: E402
import uvicorn  # noqa: E402

from maskssd.deploy.auth import RateLimiter, TokenSet, is_loopback, load_tokens  # noqa: E402
from maskssd.deploy.predictor import Predictor  # noqa: E402
from maskssd.deploy.serving import create_app  # noqa: E402
from maskssd.errors import MaskSSDError  # noqa: E402
from tests.test_serving import jpeg  # noqa: E402

TOKENS = ["camera-door-0123456789abcdef", "dashboard-0123456789abcdef"]


class Server:
    """uvicorn on a free loopback port in a thread, over TLS when given a certificate."""

    def __init__(self, app: Any, cert: Path | None = None, key: Path | None = None):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        scheme = "https" if cert else "http"
        self.url = f"{scheme}://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            ssl_certfile=str(cert) if cert else None,
            ssl_keyfile=str(key) if key else None,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.verify: Any = ssl.create_default_context(cafile=str(cert)) if cert else True

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/livez", timeout=1, verify=self.verify).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint: Path) -> Predictor:
    return Predictor.from_checkpoint(tiny_checkpoint)


def test_tokens_are_read_checked_and_compared_by_client(tmp_path, monkeypatch):
    f = tmp_path / "tokens.txt"
    f.write_text(f"# cameras\n{TOKENS[0]}\n\n{TOKENS[1]}  # the dashboard\n")
    assert load_tokens(f) == TOKENS
    monkeypatch.setenv("MASKSSD_SERVE_TOKENS", ",".join(TOKENS))
    assert load_tokens() == TOKENS
    (tmp_path / "short.txt").write_text("hunter2\n")
    with pytest.raises(MaskSSDError, match=r"short.txt:1: a token of 7 characters is too short"):
        load_tokens(tmp_path / "short.txt")
    with pytest.raises(MaskSSDError, match="holds no token"):
        (tmp_path / "empty.txt").write_text("# nobody\n")
        load_tokens(tmp_path / "empty.txt")
    s = TokenSet(TOKENS)
    assert s.client(f"Bearer {TOKENS[1]}") == "client-2" and s.client(f"bearer  {TOKENS[0]} ") == "client-1"
    assert (
        s.client(None) is None and s.client("Bearer nope") is None and s.client(f"Basic {TOKENS[0]}") is None
    )
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5") and not is_loopback("myhost")


def test_rate_limiter_is_a_token_bucket_per_client():
    now = [0.0]
    r = RateLimiter(rate=2.0, burst=2, clock=lambda: now[0])
    assert r.admit("a") == 0 and r.admit("a") == 0 and r.admit("a") == pytest.approx(0.5)
    assert r.admit("b") == 0  # another client is not slowed
    now[0] = 0.5
    assert r.admit("a") == 0 and r.admit("a") > 0


def test_only_clients_with_a_token_get_in(predictor):
    app = create_app(predictor, tokens=TOKENS)
    with Server(app) as s:
        assert httpx.get(s.url + "/livez").json() == {"status": "ok"}  # liveness: no token, nothing told
        for path in ("/health", "/metrics", "/montage"):
            r = httpx.get(s.url + path)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), path
        r = httpx.post(s.url + "/detect", content=jpeg(0))
        assert r.status_code == 401 and "required" in r.json()["detail"]
        r = httpx.post(s.url + "/detect", content=jpeg(0), headers=bearer("camera-door-wrong-token-xxxxxx"))
        assert r.status_code == 401 and "not accepted" in r.json()["detail"]
        assert TOKENS[0] not in r.text
        r = httpx.post(s.url + "/detect", content=jpeg(0), headers=bearer(TOKENS[0]), timeout=30)
        assert r.status_code == 200 and "detections" in r.json()
        assert httpx.get(s.url + "/metrics", headers=bearer(TOKENS[1])).status_code == 200
        metrics = httpx.get(s.url + "/metrics", headers=bearer(TOKENS[1])).text
        assert 'maskssd_requests_total{endpoint="/detect",status="401"} 2.0' in metrics


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made here (what a user does with openssl)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "maskssd test server")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def test_tls_with_a_self_signed_certificate_and_the_camera_client(predictor, tmp_path):
    import cv2

    from maskssd.cli import main
    from tests.test_serving import _write_video

    cert, key = _self_signed(tmp_path)
    app = create_app(predictor, tokens=TOKENS)
    with Server(app, cert, key) as s:
        r = httpx.post(s.url + "/detect", content=jpeg(1), headers=bearer(TOKENS[0]), verify=s.verify)
        assert r.status_code == 200
        with pytest.raises(httpx.ConnectError):  # not trusted without the CA: the certificate is checked
            httpx.post(s.url + "/detect", content=jpeg(1), headers=bearer(TOKENS[0]))
        assert cv2 is not None
        video = _write_video(tmp_path / "cam.mp4", n=3)
        token_file = tmp_path / "camera.token"
        token_file.write_text(TOKENS[0] + "\n")
        stream = ["stream", "--server", s.url, "--source", str(video), "--name", "door"]
        assert main([*stream, "--token-file", str(token_file), "--ca-file", str(cert)]) == 0
        assert main([*stream, "--ca-file", str(cert)]) == 2  # no token: refused, said why
        assert main([*stream, "--token-file", str(token_file)]) == 2  # the certificate is not trusted


def test_a_network_address_without_tokens_is_refused(tiny_checkpoint, monkeypatch, capsys):
    from maskssd.cli import main

    monkeypatch.delenv("MASKSSD_SERVE_TOKENS", raising=False)
    seen: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    base = ["serve", "--model", str(tiny_checkpoint), "--host", "0.0.0.0"]
    assert main(base) == 2 and not seen
    assert "refusing to serve 0.0.0.0 without authentication" in capsys.readouterr().err
    assert main([*base, "--insecure-no-auth"]) == 0 and seen["host"] == "0.0.0.0"
    assert "no authentication (--insecure-no-auth)" in capsys.readouterr().err
    monkeypatch.setenv("MASKSSD_SERVE_TOKENS", TOKENS[0])
    assert main([*base, "--ssl-certfile", "c.pem", "--ssl-keyfile", "k.pem"]) == 0
    assert seen["ssl_certfile"] == "c.pem" and "1 bearer token" in capsys.readouterr().err


class SlowPredictor:
    """A real predictor that takes 30 ms more per call: a model slower than the clients."""

    def __init__(self, predictor: Predictor):
        self._p = predictor

    def predict(self, images: Any, decode: Any = None, floor: Any = None) -> Any:
        time.sleep(0.03)
        return self._p.predict(images, decode, floor)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._p, name)


def test_rate_limit_per_client_and_a_flood_beyond_the_queue(predictor):
    app = create_app(
        SlowPredictor(predictor), tokens=TOKENS, rate_limit=1.0, burst=3, max_queue=2, max_batch=1
    )
    body = jpeg(2)
    with Server(app) as s:
        codes = [
            httpx.post(s.url + "/detect", content=body, headers=bearer(TOKENS[1])).status_code
            for _ in range(4)
        ]
        assert codes[:3] == [200, 200, 200] and codes[3] == 429
        r = httpx.post(s.url + "/detect", content=body, headers=bearer(TOKENS[1]))
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert httpx.post(s.url + "/detect", content=body, headers=bearer(TOKENS[0])).status_code == 200
    app = create_app(SlowPredictor(predictor), tokens=TOKENS, max_queue=2, max_batch=1)
    with Server(app) as s, httpx.Client(timeout=30) as client:

        def send(_: int) -> httpx.Response:
            return client.post(s.url + "/detect", content=body, headers=bearer(TOKENS[0]))

        with ThreadPoolExecutor(24) as pool:
            flood = list(pool.map(send, range(48)))
        busy = [r for r in flood if r.status_code == 503]
        assert busy and all(int(r.headers["retry-after"]) >= 1 for r in busy)
        assert all("busy" in r.json()["detail"] for r in busy)
        assert {r.status_code for r in flood} <= {200, 503} and any(r.status_code == 200 for r in flood)
        after = client.post(s.url + "/detect", content=body, headers=bearer(TOKENS[1]))
        assert after.status_code == 200  # the server keeps answering
