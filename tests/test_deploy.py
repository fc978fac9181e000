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


def test_compose_runs_a_gateway_two_workers_redis_and_coturn() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"redis", "gateway", "worker-1", "worker-2", "coturn"}
    # aiortc's media ports cannot be pinned to a range: host networking for all.
    assert {s["network_mode"] for s in services.values()} == {"host"}
    coturn = services["coturn"]
    assert "--use-auth-secret" in coturn["command"]
    assert "--static-auth-secret=${TURN_SECRET:?set TURN_SECRET}" in coturn["command"]
    assert "--tls-listening-port=443" in coturn["command"] and "--no-tls" not in coturn["command"]
    secret = "${CLUSTER_SECRET:?set CLUSTER_SECRET}"
    for name in ("gateway", "worker-1", "worker-2"):
        service = services[name]
        assert service["restart"] == "unless-stopped"
        assert service["environment"]["LIPSYNC_CLUSTER_SECRET"] == secret
        assert "--turn-secret=${TURN_SECRET:?set TURN_SECRET}" in service["command"]
        assert "--redis=redis://127.0.0.1:6379/0" in service["command"]
    assert services["gateway"]["environment"]["LIPSYNC_API_KEY"].startswith("${LIPSYNC_API_KEY")
    # Only the page and API face the network; Redis and the workers' internal API do not.
    assert "127.0.0.1" in services["redis"]["command"]
    for name in ("worker-1", "worker-2"):
        assert "--host=127.0.0.1" in services[name]["command"]
        # The weights volume is where the image keeps its cache.
        assert any(v.endswith(":/weights") for v in services[name]["volumes"])
    assert "ENV LIPSYNC_CACHE=/weights" in (ROOT / "Dockerfile").read_text()


def test_compose_commands_are_valid(monkeypatch) -> None:
    from signaling.cli import config_from_args

    env = {"TURN_SECRET": "s3cret", "PUBLIC_HOST": "example.org"}
    services = _compose()["services"]
    configs = {}
    for name in ("gateway", "worker-1", "worker-2"):
        command = [_substitute(arg, env) for arg in services[name]["command"]]
        args = build_parser().parse_args(command)
        assert args.redis == "redis://127.0.0.1:6379/0"
        # UDP, and for networks that block it TCP, and TLS on 443.
        assert args.ice_server == [
            "stun:example.org:3478",
            "turn:example.org:3478?transport=udp",
            "turn:example.org:3478?transport=tcp",
            "turns:example.org:443?transport=tcp",
        ]
        configs[name] = config_from_args(args)  # accepted
    assert configs["gateway"].public_hosts == ("example.org",)
    assert {configs["worker-1"].port, configs["worker-2"].port} == {8081, 8082}


def test_dockerfile_pins_torch_before_the_project() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert text.index("torch==2.13.0") < text.index("pip install --no-cache-dir .")
    assert 'ENTRYPOINT ["lipsync"]' in text
    assert 'CMD ["serve", "--host", "0.0.0.0"]' in text


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
