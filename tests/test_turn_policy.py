"""The compose file's coturn relay policy, checked against a real coturn (Debian's turnserver).

A TURN login must not become a proxy into the host's own or a private network. coturn is started
here with the coturn service's `command` from docker-compose.yml, changed only where a test on
loopback must (listening and relay addresses, ports, log, pid and database files), and asked over
UDP, with aioice's STUN code and a login minted like the server's, for permissions to peers in
each denied class: each must be refused with 403 (Forbidden IP). Controls show the test can fail:
a public peer (TEST-NET, never contacted: a permission only installs state) is allowed, and a
coturn started without the compose file's denied-peer-ip and no-multicast-peers options lets a
private and a multicast peer through.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from aioice import stun
from aioice.turn import UDP_TRANSPORT, make_integrity_key

from signaling.ice import turn_credentials
from tests.conftest import ROOT, free_port

REALM = "lipsync.test"
SECRET = secrets.token_hex(16)
TIMEOUT = 0.5  # seconds per read; a request is sent up to 4 times
FORBIDDEN = 403

# What the compose file must deny, as networks: a range missing from it fails a test.
MUST_DENY = [
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "240.0.0.0/4",
    "255.255.255.255/32",
    "::1/128",
    "::ffff:0:0/96",
    "64:ff9b::/96",
    "fc00::/7",
    "fe80::/10",
]

# Peers asked for, one or more in each denied class.
DENIED_PEERS = [
    "0.1.2.3",
    "10.1.2.3",
    "100.64.0.1",
    "127.0.0.1",
    "127.1.2.3",
    "169.254.169.254",
    "172.16.5.5",
    "172.31.255.254",
    "192.0.0.9",
    "192.168.1.1",
    "198.18.0.1",
    "224.0.0.1",
    "239.255.255.250",
    "240.0.0.1",
    "255.255.255.255",
    "::1",
    "::ffff:127.0.0.1",
    "::ffff:10.1.2.3",
    "64:ff9b::a01:203",
    "fc00::1",
    "fd12:3456::1",
    "fe80::1",
    "ff02::1",
]
PUBLIC_PEERS = ["203.0.113.5", "2001:db8::5"]  # documentation ranges: never contacted
PEER_PORT = 5000
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# The compose options that make the relay policy, removed for the control coturn.
POLICY_OPTIONS = ("--denied-peer-ip", "--no-multicast-peers")
# Options a test on loopback must set itself; the compose file's values are replaced.
REPLACED_OPTIONS = ("--listening-port", "--min-port", "--max-port")
# TLS (on 443, with the deployment's certificate) is left out: the policy is the same for it.
DROPPED_OPTIONS = ("--tls-listening-port", "--cert", "--pkey")


def _option(arg: str) -> str:
    return arg.partition("=")[0]


def _substitute(text: str, env: dict[str, str]) -> str:
    """Docker compose's ${VAR:?message} substitution, for the variables the file uses."""
    return re.sub(r"\$\{(\w+)(?::\?[^}]*)?\}", lambda m: env[m.group(1)], text)


def compose_command() -> list[str]:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    env = {"TURN_SECRET": SECRET, "PUBLIC_HOST": REALM}
    return [_substitute(str(arg), env) for arg in compose["services"]["coturn"]["command"]]


def denied_ranges(command: list[str]) -> list[tuple[IPAddress, IPAddress]]:
    """The compose file's --denied-peer-ip values as (first, last) addresses."""
    ranges = []
    for arg in command:
        if _option(arg) == "--denied-peer-ip":
            value = arg.partition("=")[2]
            first, _, last = value.partition("-")
            try:
                ranges.append((ipaddress.ip_address(first), ipaddress.ip_address(last or first)))
            except ValueError:
                raise AssertionError(
                    f"--denied-peer-ip={value}: coturn 4.6 reads an address or a range "
                    "first-last (not CIDR: it logs an error and denies nothing)"
                ) from None
    return ranges


@dataclass
class Coturn:
    process: subprocess.Popen
    port: int
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def describe(self) -> str:
        return f"coturn's log ({self.log}):\n{self.log_text()[-3000:]}"


class TurnClient:
    """A TURN client over one UDP socket, blocking, with a timeout on every read."""

    def __init__(self, server: tuple[str, int], username: str, password: str) -> None:
        family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(server)
        self.username, self.password = username, password
        self.key: bytes | None = None
        self.nonce: bytes | None = None
        self.realm: str | None = None

    def close(self) -> None:
        self.sock.close()

    def transact(self, method: stun.Method, attributes: dict | None = None) -> stun.Message:
        """Send a request (signed once the realm and nonce are known) and return the response
        or error response; retransmit on silence, fail after four tries."""
        request = stun.Message(method, stun.Class.REQUEST, attributes=dict(attributes or {}))
        if self.key is not None:
            request.attributes.update(USERNAME=self.username, NONCE=self.nonce, REALM=self.realm)
            request.add_message_integrity(self.key)
        else:
            request.add_fingerprint()
        data = bytes(request)
        for _ in range(4):
            self.sock.send(data)
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline:
                try:
                    reply = self.sock.recv(2048)
                except (TimeoutError, ConnectionRefusedError):
                    break
                try:
                    response = stun.parse_message(reply)
                except ValueError:
                    continue
                if response.transaction_id == request.transaction_id:
                    return response
        raise AssertionError(f"no answer to {method.name} from {self.sock.getpeername()}")

    def authenticated(self, method: stun.Method, attributes: dict | None = None) -> stun.Message:
        """A request with the long-term credentials, through the 401 realm/nonce exchange and a
        438 stale nonce, as aioice.turn does."""
        response = self.transact(method, attributes)
        if response.error_code in (401, 438) and "NONCE" in response.attributes:
            self.nonce = response.attributes["NONCE"]
            self.realm = response.attributes.get("REALM", self.realm)
            assert self.realm is not None, f"no REALM in {response}"
            self.key = make_integrity_key(self.username, self.realm, self.password)
            response = self.transact(method, attributes)
        if response.message_class == stun.Class.RESPONSE:
            assert response.check_message_integrity(self.key), f"unsigned response {response}"
        return response

    def allocate(self) -> tuple[str, int]:
        response = self.authenticated(
            stun.Method.ALLOCATE, {"LIFETIME": 60, "REQUESTED-TRANSPORT": UDP_TRANSPORT}
        )
        assert response.message_class == stun.Class.RESPONSE, (
            f"Allocate with a REST login failed: {_error(response)}"
        )
        assert self.realm == REALM
        return response.attributes["XOR-RELAYED-ADDRESS"]

    def release(self) -> None:
        with contextlib.suppress(AssertionError, OSError):
            self.authenticated(stun.Method.REFRESH, {"LIFETIME": 0})


def _error(response: stun.Message) -> str:
    if response.message_class != stun.Class.ERROR:
        return f"success ({response.message_method.name})"
    code, reason = response.attributes.get("ERROR-CODE", (None, "no ERROR-CODE"))
    return f"error {code} {reason!r}"


def start_coturn(command: list[str], directory: Path) -> Iterator[Coturn]:
    """coturn with `command` (its options), on loopback, with its ports, log and files here."""
    turnserver = shutil.which("turnserver")
    if turnserver is None:
        pytest.fail("coturn's turnserver is not installed; scripts/test.sh installs it (coturn)")
    # Set below; were the compose file to set them too, coturn would use both.
    for option in ("--listening-ip", "--relay-ip", "--log-file", "--pidfile", "--userdb"):
        assert all(_option(arg) != option for arg in command), f"compose sets {option}"
    port = free_port()
    relay_base = 40000 + secrets.randbelow(8000)
    log = directory / "turnserver.log"
    argv = [
        turnserver,
        *(arg for arg in command if _option(arg) not in REPLACED_OPTIONS + DROPPED_OPTIONS),
        "--no-tls",
        # Loopback only, IPv4 and IPv6; an IPv6 client gets an IPv6 relay.
        "--listening-ip=127.0.0.1",
        "--listening-ip=::1",
        "--relay-ip=127.0.0.1",
        "--relay-ip=::1",
        "--allocation-default-address-family=keep",
        f"--listening-port={port}",
        f"--min-port={relay_base}",
        f"--max-port={relay_base + 200}",
        f"--log-file={log}",
        "--simple-log",
        "--no-stdout-log",
        f"--pidfile={directory / 'turnserver.pid'}",
        f"--userdb={directory / 'turndb'}",
    ]
    process = subprocess.Popen(
        argv, cwd=directory, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    coturn = Coturn(process, port, log)
    try:
        _wait_until_answering(coturn)
        yield coturn
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def _wait_until_answering(coturn: Coturn) -> None:
    """Until both listeners answer a STUN Binding request (or coturn exits: fail)."""
    for host in ("127.0.0.1", "::1"):
        client = TurnClient((host, coturn.port), "", "")
        try:
            deadline = time.monotonic() + 15
            while True:
                if coturn.process.poll() is not None:
                    pytest.fail(
                        f"turnserver exited ({coturn.process.returncode}); {coturn.describe()}"
                    )
                try:
                    response = client.transact(stun.Method.BINDING)
                    assert response.message_class == stun.Class.RESPONSE, _error(response)
                    break
                except AssertionError:
                    if time.monotonic() > deadline:
                        pytest.fail(f"turnserver does not answer on {host}; {coturn.describe()}")
        finally:
            client.close()


@pytest.fixture(scope="module")
def compose_coturn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coturn]:
    """coturn with the compose file's options."""
    yield from start_coturn(compose_command(), tmp_path_factory.mktemp("coturn"))


@pytest.fixture(scope="module")
def control_coturn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coturn]:
    """coturn with the compose file's options except its relay policy."""
    command = [arg for arg in compose_command() if _option(arg) not in POLICY_OPTIONS]
    yield from start_coturn(command, tmp_path_factory.mktemp("coturn-control"))


@contextlib.contextmanager
def turn_login(coturn: Coturn, peer: str) -> Iterator[TurnClient]:
    """An allocation, in the family of `peer`, made with a login minted as the server does."""
    username, password = turn_credentials(SECRET, 300, name="test")
    host = "::1" if ipaddress.ip_address(peer).version == 6 else "127.0.0.1"
    client = TurnClient((host, coturn.port), username, password)
    try:
        client.allocate()
        yield client
        client.release()
    finally:
        client.close()


def relay_requests(client: TurnClient, peer: str) -> dict[str, stun.Message]:
    """CreatePermission and ChannelBind for `peer`: the requests coturn checks peers on."""
    return {
        "CreatePermission": client.authenticated(
            stun.Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": (peer, PEER_PORT)}
        ),
        "ChannelBind": client.authenticated(
            stun.Method.CHANNEL_BIND,
            {"CHANNEL-NUMBER": 0x4000, "XOR-PEER-ADDRESS": (peer, PEER_PORT)},
        ),
    }


def test_compose_coturn_denies_every_private_range() -> None:
    command = compose_command()
    ranges = denied_ranges(command)
    missing = [
        net
        for net in map(ipaddress.ip_network, MUST_DENY)
        if not any(
            first.version == net.version and first <= net[0] and net[-1] <= last
            for first, last in ranges
        )
    ]
    assert not missing, f"docker-compose.yml's coturn does not deny {missing}"
    assert "--no-multicast-peers" in command
    # Options that would let a login through to the host or a private network anyway.
    for option in ("--allow-loopback-peers", "--allowed-peer-ip", "--server-relay"):
        assert all(_option(arg) != option for arg in command), f"compose sets {option}"


def test_coturn_reads_every_denied_range(compose_coturn: Coturn) -> None:
    """coturn 4.6 logs a CIDR range (or any it cannot read) as an error and runs without it."""
    log = compose_coturn.log_text()
    assert "Wrong address format" not in log, compose_coturn.describe()
    for arg in compose_command():
        if _option(arg) == "--denied-peer-ip":
            value = arg.partition("=")[2]
            assert f"Black listing: {value}" in log, f"{value}: {compose_coturn.describe()}"


@pytest.mark.parametrize("peer", DENIED_PEERS)
def test_turn_login_cannot_reach(compose_coturn: Coturn, peer: str) -> None:
    with turn_login(compose_coturn, peer) as client:
        for name, response in relay_requests(client, peer).items():
            assert response.error_code == FORBIDDEN, (
                f"{name} for {peer}: expected 403 Forbidden IP, got {_error(response)}"
            )


@pytest.mark.parametrize("peer", PUBLIC_PEERS)
def test_turn_login_reaches_a_public_peer(compose_coturn: Coturn, peer: str) -> None:
    with turn_login(compose_coturn, peer) as client:
        for name, response in relay_requests(client, peer).items():
            assert response.message_class == stun.Class.RESPONSE, (
                f"{name} for public {peer}: expected success, got {_error(response)}"
            )


@pytest.mark.parametrize(
    ("peer", "allowed"),
    [
        ("10.1.2.3", True),
        ("169.254.169.254", True),
        ("224.0.0.1", True),
        ("fc00::1", True),
        ("ff02::1", True),
        # coturn's loopback check misses loopback written as an IPv4-mapped IPv6 address.
        ("::ffff:127.0.0.1", True),
        # coturn's own default, without --allow-loopback-peers.
        ("127.0.0.1", False),
        ("::1", False),
    ],
)
def test_without_the_compose_policy_private_peers_are_relayed(
    control_coturn: Coturn, peer: str, allowed: bool
) -> None:
    """The refusals above come from the compose file's options, not coturn's defaults."""
    with turn_login(control_coturn, peer) as client:
        for name, response in relay_requests(client, peer).items():
            if allowed:
                assert response.message_class == stun.Class.RESPONSE, (
                    f"{name} for {peer} without the compose policy: {_error(response)}"
                )
            else:
                assert response.error_code == FORBIDDEN, (
                    f"{name} for {peer} without the compose policy: {_error(response)}"
                )
