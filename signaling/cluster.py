"""Where sessions run: the front door's view of its media workers, and placing sessions on them.

A worker is reached through a `WorkerClient`: over HTTP with the cluster's shared secret
(`HttpWorker`), or directly when it runs in this process (`signaling.worker_api.InProcess`).
A `Cluster` knows the live workers and reserves a slot on the one with the most headroom:

- `LocalCluster`: the workers of this machine (the one inside `lipsync serve`, or the processes
  of `serve --workers N`). It asks each for its status twice a second itself; reservations
  are in memory, as one front door makes them all.
- `RedisCluster` (signaling/registry.py): workers anywhere, which register themselves in Redis
  with heartbeats; reservations are made by an atomic script, so several front doors agree.

A reservation is a lease on one of the worker's slots, named by the session's id: it holds
until the worker reports the session as its own (or the lease runs out, if the offer never
got there), so concurrent offers never place more sessions on a worker than it takes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp

from signaling.errors import ApiError

log = logging.getLogger(__name__)

# A worker not heard from for this long is dead: nothing is placed on it, and it leaves health.
DEAD_AFTER = 5.0
POLL_PERIOD = 0.5
# A local cluster's view older than this is refreshed before placing a session or answering
# health: asking workers on this machine costs little, and a slot just freed is free at once.
FRESH_SECONDS = 0.1
RESERVATION_SECONDS = 15.0  # an offer's way to the worker, with room to spare
WORKER_TIMEOUT = aiohttp.ClientTimeout(total=20, sock_connect=3)


class WorkerUnavailable(Exception):
    """The worker could not be reached, or answered what no worker would."""


class AvatarNeeded(Exception):
    """The worker has not analysed this photo yet: send it along."""


@dataclass(frozen=True)
class SessionSpec:
    """What a new session is to be: the offer, the avatar shown, and how audio comes in:
    `kind` "caller" (a microphone), "pusher" (audio pushed on a data channel, at
    `push_rate`) or "ingest" (WHIP: a microphone, no video back)."""

    sdp: str
    avatar_id: str
    kind: str = "caller"
    push_rate: int | None = None


@dataclass(frozen=True)
class Analysis:
    """A photo as a worker analysed it: `{"id", "width", "height", "face": {"box"}}` and the
    preview JPEG (the video frame with the face box drawn)."""

    info: dict[str, Any]
    preview: bytes


class WorkerClient(Protocol):
    """What the front door asks of a worker. Refusals raise ApiError with the worker's own
    status, code and message; an unreachable worker raises WorkerUnavailable."""

    async def status(self) -> dict[str, Any]: ...

    async def describe(self, avatar_id: str) -> Analysis | None: ...

    async def analyse(self, avatar_id: str, photo: bytes) -> Analysis: ...

    async def create_session(self, session_id: str, spec: SessionSpec, photo: bytes | None) -> str:
        """The answer to the offer; the photo goes along if the worker asked for it."""
        ...

    async def end_session(self, session_id: str) -> bool: ...

    async def add_viewer(self, session_id: str, viewer_id: str, sdp: str) -> str | None:
        """The answer to a viewer's offer for a session's video; None if no such session."""
        ...

    async def end_viewer(self, session_id: str, viewer_id: str) -> bool: ...


@dataclass
class WorkerView:
    """A worker as the front door last saw it."""

    client: WorkerClient
    status: dict[str, Any]
    seen: float  # time.monotonic() of its last status
    reserved: dict[str, float] = field(default_factory=dict)  # session id -> lease end

    @property
    def id(self) -> str:
        return str(self.status["id"])

    def live(self, now: float) -> bool:
        return now - self.seen <= DEAD_AFTER

    def headroom(self, now: float) -> int:
        """Slots free: its capacity less its sessions and the reservations not yet its own."""
        if self.status.get("state") != "serving":
            return 0
        own = set(self.status.get("session_ids", ()))
        pending = [s for s, end in self.reserved.items() if end > now and s not in own]
        return int(self.status["capacity"]) - len(own) - len(pending)

    def health(self, now: float) -> dict[str, Any]:
        keys = ("id", "url", "engine", "device", "state", "sessions", "max_sessions")
        entry = {key: self.status.get(key) for key in keys}
        entry["headroom"] = max(0, self.headroom(now))
        entry["last_seen_s"] = round(now - self.seen, 1)
        for key in ("backend", "max_batch", "capacity", "device_fps", "reason", "server_ice"):
            if key in self.status:
                entry[key] = self.status[key]
        return entry


class Cluster(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def workers(self) -> list[dict[str, Any]]:
        """The live workers' health entries."""
        ...

    async def any_worker(self) -> WorkerClient | None:
        """A live worker, for work that is not a session (analysing a photo)."""
        ...

    async def reserve(self, session_id: str) -> tuple[str, WorkerClient] | None:
        """A slot for `session_id` on the live worker with the most headroom: its id and
        client; None when every worker is full."""
        ...

    async def placed(self, session_id: str, worker_id: str) -> None:
        """The session now runs on that worker."""
        ...

    async def release(self, session_id: str, worker_id: str) -> None:
        """The session did not start there, or has ended: free its slot."""
        ...

    async def locate(self, session_id: str) -> WorkerClient | None:
        """The live worker the session runs on, or None (unknown, ended, or its worker died)."""
        ...


def summarize(workers: list[dict[str, Any]]) -> dict[str, Any]:
    """Health's totals over the live workers; "ok" while one of them serves."""
    serving = [w for w in workers if w["state"] == "serving"]
    engines = sorted({str(w["engine"]) for w in workers})
    summary: dict[str, Any] = {
        "status": "ok" if serving else "degraded",
        "engine": ",".join(engines) if engines else None,
        "sessions": sum(int(w["sessions"]) for w in workers),
        "max_sessions": sum(int(w["max_sessions"]) for w in workers),
        "capacity": sum(int(w.get("capacity", 0)) for w in serving),
        "headroom": sum(int(w["headroom"]) for w in serving),
        "workers": workers,
    }
    if not serving:
        reasons = [str(w["reason"]) for w in workers if "reason" in w]
        summary["reason"] = "; ".join(reasons) or "no media worker is serving"
    return summary


class LocalCluster:
    """Workers this front door knows by their clients; it polls their status itself."""

    def __init__(self, clients: list[WorkerClient]) -> None:
        self._clients = clients
        self._views: dict[str, WorkerView] = {}
        self._sessions: dict[str, str] = {}  # session id -> worker id
        self._poller: asyncio.Task[None] | None = None
        self._polled = 0.0  # time.monotonic() of the last poll

    async def start(self) -> None:
        await self._poll_all()
        self._poller = asyncio.create_task(self._poll_forever(), name="cluster-poll")

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(POLL_PERIOD)
            await self._poll_all()

    async def _fresh(self) -> None:
        if time.monotonic() - self._polled > FRESH_SECONDS:
            await self._poll_all()

    async def _poll_all(self) -> None:
        await asyncio.gather(*(self._poll(client) for client in self._clients))
        now = self._polled = time.monotonic()
        for session_id, worker_id in list(self._sessions.items()):
            view = self._views.get(worker_id)
            # Gone with its worker, or ended there (unless the worker has not reported it yet).
            if (
                view is None
                or not view.live(now)
                or (
                    session_id not in view.status.get("session_ids", ())
                    and view.reserved.get(session_id, 0.0) <= now
                )
            ):
                del self._sessions[session_id]

    async def _poll(self, client: WorkerClient) -> None:
        try:
            status = await client.status()
        except WorkerUnavailable as exc:
            log.debug("worker unreachable: %s", exc)
            return
        now = time.monotonic()
        view = self._views.get(str(status["id"]))
        if view is None:
            self._views[str(status["id"])] = WorkerView(client, status, now)
            return
        view.status, view.seen = status, now
        own = set(status.get("session_ids", ()))
        view.reserved = {s: end for s, end in view.reserved.items() if end > now and s not in own}

    def _live(self) -> list[WorkerView]:
        now = time.monotonic()
        return [view for view in self._views.values() if view.live(now)]

    async def workers(self) -> list[dict[str, Any]]:
        await self._fresh()
        now = time.monotonic()
        return [view.health(now) for view in self._live()]

    async def any_worker(self) -> WorkerClient | None:
        await self._fresh()
        now = time.monotonic()
        live = sorted(self._live(), key=lambda view: view.headroom(now), reverse=True)
        return live[0].client if live else None

    async def reserve(self, session_id: str) -> tuple[str, WorkerClient] | None:
        await self._fresh()
        now = time.monotonic()
        live = [view for view in self._live() if view.headroom(now) > 0]
        if not live:
            return None
        best = max(live, key=lambda view: view.headroom(now))
        best.reserved[session_id] = now + RESERVATION_SECONDS
        return best.id, best.client

    async def placed(self, session_id: str, worker_id: str) -> None:
        self._sessions[session_id] = worker_id
        self._polled = 0.0  # the worker has changed: ask it again before relying on it

    async def release(self, session_id: str, worker_id: str) -> None:
        self._sessions.pop(session_id, None)
        view = self._views.get(worker_id)
        if view is not None:
            view.reserved.pop(session_id, None)
        self._polled = 0.0

    async def locate(self, session_id: str) -> WorkerClient | None:
        worker_id = self._sessions.get(session_id)
        view = self._views.get(worker_id) if worker_id is not None else None
        if view is None or not view.live(time.monotonic()):
            return None
        self._polled = 0.0  # it is likely to end there now
        return view.client


class HttpWorker:
    """A worker's internal API over HTTP, with the cluster's shared secret."""

    def __init__(self, url: str, secret: str, http: aiohttp.ClientSession) -> None:
        self.url = url.rstrip("/")
        self._http = http
        self._headers = {"Authorization": f"Bearer {secret}"}

    async def _call(
        self, method: str, path: str, json: Any = None, data: bytes | None = None
    ) -> tuple[int, Any]:
        try:
            async with self._http.request(
                method,
                f"{self.url}{path}",
                json=json,
                data=data,
                headers=self._headers,
                timeout=WORKER_TIMEOUT,
            ) as response:
                if response.status == 204:
                    return 204, None
                body = await response.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise WorkerUnavailable(f"{self.url}: {exc!r}") from exc
        if response.status >= 400:
            error = body.get("error", {}) if isinstance(body, dict) else {}
            if error.get("code") == "avatar_needed":
                raise AvatarNeeded()
            if response.status in (401, 404) and path.endswith("/status"):
                raise WorkerUnavailable(f"{self.url}: {response.status} {error}")
            headers = {k: v for k, v in response.headers.items() if k == "Retry-After"}
            raise ApiError(
                response.status,
                str(error.get("code", "worker_error")),
                str(error.get("message", f"the media worker answered {response.status}")),
                headers or None,
            )
        return response.status, body

    async def status(self) -> dict[str, Any]:
        return dict((await self._call("GET", "/internal/status"))[1])

    async def describe(self, avatar_id: str) -> Analysis | None:
        try:
            _, body = await self._call("GET", f"/internal/avatars/{avatar_id}")
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        return _analysis(body)

    async def analyse(self, avatar_id: str, photo: bytes) -> Analysis:
        return _analysis((await self._call("PUT", f"/internal/avatars/{avatar_id}", data=photo))[1])

    async def create_session(self, session_id: str, spec: SessionSpec, photo: bytes | None) -> str:
        body: dict[str, Any] = {
            "sdp": spec.sdp,
            "avatar": spec.avatar_id,
            "kind": spec.kind,
            "push_rate": spec.push_rate,
        }
        if photo is not None:
            body["photo"] = base64.b64encode(photo).decode("ascii")
        _, answer = await self._call("PUT", f"/internal/sessions/{session_id}", json=body)
        return str(answer["sdp"])

    async def end_session(self, session_id: str) -> bool:
        return await self._delete(f"/internal/sessions/{session_id}")

    async def add_viewer(self, session_id: str, viewer_id: str, sdp: str) -> str | None:
        path = f"/internal/sessions/{session_id}/viewers/{viewer_id}"
        try:
            _, answer = await self._call("PUT", path, json={"sdp": sdp})
        except ApiError as exc:
            if exc.code == "session_not_found":
                return None
            raise
        return str(answer["sdp"])

    async def end_viewer(self, session_id: str, viewer_id: str) -> bool:
        return await self._delete(f"/internal/sessions/{session_id}/viewers/{viewer_id}")

    async def _delete(self, path: str) -> bool:
        try:
            await self._call("DELETE", path)
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True


def _analysis(body: dict[str, Any]) -> Analysis:
    preview = base64.b64decode(body.pop("preview"))
    return Analysis(body, preview)
