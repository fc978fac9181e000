"""What can be checked of the deployment here (no Docker engine runs on this machine): the
compose file, the Dockerfile, and the server starting with TLS and TURN credentials."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import ipaddress
import json
import os
import re
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from signaling.cli import build_parser
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _substitute(text: str, env: dict[str, str]) -> str:
    """Docker compose's ${VAR:?message} substitution, for the variables the file uses."""
    return re.sub(r"\$\{(\w+)(?::\?[^}]*)?\}", lambda m: env[m.group(1)], text)


def test_compose_runs_the_server_and_coturn_on_one_secret() -> None:
    compose = _compose()
    assert set(compose["services"]) == {"lipsync", "coturn"}
    server, coturn = compose["services"]["lipsync"], compose["services"]["coturn"]
    # aiortc's media ports cannot be pinned to a range: host networking for both.
    assert server["network_mode"] == coturn["network_mode"] == "host"
    assert "--use-auth-secret" in coturn["command"]
    assert "--static-auth-secret=${TURN_SECRET:?set TURN_SECRET}" in coturn["command"]
    assert "--turn-secret=${TURN_SECRET:?set TURN_SECRET}" in server["command"]
    # The weights volume is where the image keeps its cache.
    assert any(v.endswith(":/weights") for v in server["volumes"])
    assert "ENV LIPSYNC_CACHE=/weights" in (ROOT / "Dockerfile").read_text()


def test_compose_command_is_valid_for_lipsync_serve() -> None:
    env = {"TURN_SECRET": "s3cret", "PUBLIC_HOST": "example.org"}
    command = [_substitute(arg, env) for arg in _compose()["services"]["lipsync"]["command"]]
    args = build_parser().parse_args(["serve", "--host", "0.0.0.0", *command])
    assert args.turn_secret == "s3cret"
    assert args.ice_server == [
        "stun:example.org:3478",
        "turn:example.org:3478?transport=udp",
    ]
    from signaling.config import ServerConfig

    ServerConfig(ice_servers=tuple(args.ice_server), turn_secret=args.turn_secret)  # accepted


def test_dockerfile_pins_torch_before_the_project() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert text.index("torch==2.13.0") < text.index("pip install --no-cache-dir .")
    assert 'ENTRYPOINT ["lipsync", "serve", "--host", "0.0.0.0"]' in text


def _self_signed(folder: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_server_starts_with_tls_and_mints_turn_credentials(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    port = free_port()
    env = dict(os.environ, LIPSYNC_CACHE=str(tmp_path / "cache"))
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "lipsync"),
            "serve",
            "--offline",
            "--port",
            str(port),
            "--tls-cert",
            str(cert),
            "--tls-key",
            str(key),
            "--ice-server",
            "turn:127.0.0.1:3478",
            "--turn-secret",
            "s3cret",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    context = ssl.create_default_context(cafile=str(cert))
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(
                    f"https://127.0.0.1:{port}/api/health", context=context, timeout=5
                ) as response:
                    health = json.load(response)
                break
            except OSError:
                assert server.poll() is None, server.stdout.read().decode()
                assert time.monotonic() < deadline, "the server did not come up over HTTPS"
                time.sleep(0.5)
        assert health["status"] == "ok" and health["engine"] == "animator"
        with urllib.request.urlopen(
            f"https://127.0.0.1:{port}/api/ice-servers", context=context
        ) as response:
            servers = json.load(response)["iceServers"]
        (turn,) = servers
        expiry, _, _ = turn["username"].partition(":")
        assert int(expiry) > time.time() + 3600
        expected = base64.b64encode(
            hmac.new(b"s3cret", turn["username"].encode(), hashlib.sha1).digest()
        ).decode()
        assert turn["credential"] == expected
        # Plain HTTP is not served on the TLS port.
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=5)
            plain_works = True
        except OSError:
            plain_works = False
        assert not plain_works
    finally:
        server.terminate()
        server.wait(timeout=10)
