"""The cluster in Redis: workers register with heartbeats, front doors place sessions on them.

The shape of LiveKit's own node registry. Every key has a lease, so whatever dies leaves
nothing behind for long:

- `worker:{id}`, a hash: the worker's status as JSON, and its state, capacity and engine for
  the placement script. Each heartbeat (every second) rewrites it and sets it to expire after
  `dead_after` (5 s): a worker not heard from for that long is gone from placement and health.
- `workers`, a set of the ids ever seen; front doors drop the ids whose hash has expired.
- `slots:{id}`, a sorted set: one member per session on the worker or reserved for it, scored
  by when its lease ends (Redis time, ms). A front door reserves a slot with `RESERVE`, one
  atomic script, so offers through several front doors never overshoot a worker's capacity;
  the worker's heartbeat renews its live sessions' leases and removes the ended ones.
- `session:{id}`: the worker a session runs on, renewed with each heartbeat.
- `avatar:{id}` (photo, analysis, preview) with an expiry, and `avatars`, a sorted set by last
  use that caps how many are kept.

Keys other than the ones a script is given are only those of sessions, so one Redis (or a
primary with replicas) is assumed, not a Redis Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError

from signaling.avatars import PHOTO_TTL, StoredAvatar
from signaling.cluster import (
    DEAD_AFTER,
    FRESH_SECONDS,
    RESERVATION_SECONDS,
    Analysis,
    HttpWorker,
    WorkerClient,
)
from signaling.errors import ApiError

log = logging.getLogger(__name__)

PREFIX = "lipsync:"
HEARTBEAT_SECONDS = 1.0
# A session's slot lease and its session key; renewed every RENEW_BEATS heartbeats. They only
# clean up after a worker that vanished: a dead worker's record lapses after `dead_after`,
# which is what placement and lookups go by.
SESSION_LEASE = 30.0
RENEW_BEATS = 10
VIEW_SECONDS = 0.5  # how often a front door rereads the workers' records
CANDIDATES = 4  # workers, by headroom as last read, the placement script chooses among
POOL_CONNECTIONS = 64  # Redis connections a process keeps at most; more requests wait
POOL_WAIT = 5.0  # seconds a request waits for a connection before the registry is unavailable

# KEYS: the workers set, the worker's hash, its slots. ARGV: id, status JSON, state, capacity,
# engine, dead-after ms, lease ms, key prefix, 1 to empty the slots first (a worker's first
# beat: what an earlier run of it left is void), the count of sessions to add or renew (their
# ids follow), then the ids of the sessions that ended.
HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], 'status', ARGV[2], 'state', ARGV[3], 'capacity', ARGV[4],
           'engine', ARGV[5], 'seen', now)
redis.call('PEXPIRE', KEYS[2], ARGV[6])
if ARGV[9] == '1' then redis.call('DEL', KEYS[3]) end
local added = tonumber(ARGV[10])
if added > 0 then
  local members = {}
  for i = 11, 10 + added do
    members[#members + 1] = now + tonumber(ARGV[7])
    members[#members + 1] = ARGV[i]
    redis.call('SET', ARGV[8] .. 'session:' .. ARGV[i], ARGV[1], 'PX', ARGV[7])
  end
  redis.call('ZADD', KEYS[3], unpack(members))
  redis.call('PEXPIRE', KEYS[3], ARGV[7])
end
if #ARGV > 10 + added then
  redis.call('ZREM', KEYS[3], unpack(ARGV, 11 + added))
  for i = 11 + added, #ARGV do
    local key = ARGV[8] .. 'session:' .. ARGV[i]
    if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key) end
  end
end
return now
"""

# KEYS: each candidate's worker hash and slots set, in pairs. ARGV: session id, lease ms.
# Returns the 1-based index of the chosen pair, the one with the most room; nil if none has.
# A slot counts while its lease runs: a reservation whose offer never arrived lapses.
RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local best, best_room = nil, 0
for i = 1, #KEYS, 2 do
  local record = redis.call('HMGET', KEYS[i], 'state', 'capacity')
  if record[1] == 'serving' then
    local room = tonumber(record[2]) - redis.call('ZCOUNT', KEYS[i + 1], now, '+inf')
    if room > best_room then best, best_room = i, room end
  end
end
if not best then return nil end
redis.call('ZREMRANGEBYSCORE', KEYS[best + 1], '-inf', now)
redis.call('ZADD', KEYS[best + 1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[best + 1], math.max(tonumber(ARGV[2]), tonumber(ARGV[3])))
return (best + 1) / 2
"""

# KEYS: the slots set and the session key. ARGV: session id, worker id.
RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
if redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('DEL', KEYS[2]) end
return 1
"""


class RegistryUnavailable(ApiError):
    """Redis could not be reached (or answered in time): 503, try again shortly."""

    def __init__(self, exc: Exception) -> None:
        super().__init__(
            503,
            "registry_unavailable",
            f"the cluster's registry cannot be reached ({type(exc).__name__}); try again shortly",
            {"Retry-After": "5"},
        )


@contextlib.asynccontextmanager
async def _registry() -> AsyncIterator[None]:
    """Redis's failures as a 503 to the caller, never a 500."""
    try:
        yield
    except RedisError as exc:
        log.warning("Redis: %r", exc)
        raise RegistryUnavailable(exc) from exc


def connect(url: str) -> Redis:
    """A client whose requests wait for one of POOL_CONNECTIONS connections, rather than
    failing when a burst of offers wants more at once."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=POOL_CONNECTIONS,
        timeout=POOL_WAIT,
        socket_timeout=5,
        socket_connect_timeout=5,
    )
    return Redis(connection_pool=pool)


class Heartbeat:
    """A worker's registration: its status written every second, and at once on `poke`."""

    def __init__(
        self,
        redis: Redis,
        worker_id: str,
        status: Callable[[], dict[str, Any]],
        dead_after: float = DEAD_AFTER,
    ) -> None:
        self._redis = redis
        self._id = worker_id
        self._status = status
        self._dead_after = dead_after
        self._script = redis.register_script(HEARTBEAT)
        self._wake = asyncio.Event()
        self._last: set[str] = set()
        self._beats = 0
        self._task: asyncio.Task[None] | None = None

    def poke(self) -> None:
        """Beat now (a session started or ended)."""
        self._wake.set()

    async def start(self) -> None:
        await self.beat()
        self._task = asyncio.create_task(self._run(), name="heartbeat")

    async def stop(self) -> None:
        """Stop beating and leave the registry at once."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self._redis.delete(f"{PREFIX}worker:{self._id}")
            await self._redis.srem(f"{PREFIX}workers", self._id)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HEARTBEAT_SECONDS):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.beat()
            except Exception as exc:  # Redis away for a moment: the next beat retries
                log.warning("heartbeat failed: %r", exc)

    async def beat(self) -> None:
        """Write the status; add the sessions begun since the last beat and remove the ones
        ended; every RENEW_BEATS beats, renew all their leases. Reservations that front doors
        hold meanwhile are left alone: they are what keeps concurrent offers from
        overshooting."""
        status = self._status()
        live = set(status["session_ids"])
        renew = self._beats % RENEW_BEATS == 0
        added = live if renew else live - self._last
        ended = self._last - live
        await self._script(
            keys=[f"{PREFIX}workers", f"{PREFIX}worker:{self._id}", f"{PREFIX}slots:{self._id}"],
            args=[
                self._id,
                json.dumps(status),
                status["state"],
                status["capacity"],
                status["engine"],
                int(self._dead_after * 1000),
                int(SESSION_LEASE * 1000),
                PREFIX,
                int(self._beats == 0),
                len(added),
                *sorted(added),
                *sorted(ended),
            ],
        )
        self._last = live
        self._beats += 1


class RedisCluster:
    """The front door's view of the workers registered in Redis."""

    def __init__(self, redis: Redis, secret: str) -> None:
        self._redis = redis
        self._secret = secret
        self._reserve = redis.register_script(RESERVE)
        self._release = redis.register_script(RELEASE)
        self._view: list[dict[str, Any]] = []  # live workers' statuses, with last_seen_s
        self._read = 0.0  # time.monotonic() of the last reading
        self._clients: dict[str, HttpWorker] = {}
        self._http: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._http = aiohttp.ClientSession()
        await self._refresh()
        self._task = asyncio.create_task(self._refresh_forever(), name="cluster-view")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._http is not None:
            await self._http.close()

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(VIEW_SECONDS)
            try:
                await self._refresh()
            except Exception as exc:
                log.warning("cannot read the workers from Redis: %r", exc)

    async def _fresh(self) -> None:
        """Reread the workers if the view is older than FRESH_SECONDS: health sees a
        session's start or end (which its worker reports at once) almost at once."""
        if time.monotonic() - self._read > FRESH_SECONDS:
            async with _registry():
                await self._refresh()

    async def _refresh(self) -> None:
        self._read = time.monotonic()
        ids = [_text(i) for i in await self._redis.smembers(f"{PREFIX}workers")]
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.time()
            for worker_id in ids:
                pipe.hmget(f"{PREFIX}worker:{worker_id}", "status", "seen")
            now_parts, *records = await pipe.execute()
        now = now_parts[0] * 1000 + now_parts[1] // 1000
        view, gone = [], []
        for worker_id, (status, seen) in zip(ids, records):
            if status is None:
                gone.append(worker_id)
                continue
            entry = json.loads(status)
            entry["last_seen_s"] = round((now - int(seen)) / 1000, 1)
            view.append(entry)
        if gone:
            await self._redis.srem(f"{PREFIX}workers", *gone)
        self._view = view

    def _client(self, status: dict[str, Any]) -> HttpWorker:
        url = str(status["url"])
        client = self._clients.get(url)
        if client is None:
            assert self._http is not None
            client = self._clients[url] = HttpWorker(url, self._secret, self._http)
        return client

    async def workers(self) -> list[dict[str, Any]]:
        await self._fresh()
        keys = ("id", "url", "engine", "device", "state", "sessions", "max_sessions",
                "headroom", "last_seen_s", "backend", "max_batch", "capacity", "device_fps",
                "reason")  # fmt: skip
        return [{k: status[k] for k in keys if k in status} for status in self._view]

    async def any_worker(self) -> WorkerClient | None:
        await self._fresh()
        serving = [s for s in self._view if s["state"] == "serving"]
        if not serving:
            return None
        return self._client(max(serving, key=lambda s: int(s["headroom"])))

    async def reserve(self, session_id: str) -> tuple[str, WorkerClient] | None:
        """The script chooses among CANDIDATES workers at a time, those with the most headroom
        as last read (ties in random order, so that offers spread), and counts their slots
        exactly; the next few are asked only if all of those are full."""
        serving = [s for s in self._view if s["state"] == "serving"]
        random.shuffle(serving)
        ordered = sorted(serving, key=lambda s: int(s["headroom"]), reverse=True)
        lease = int(RESERVATION_SECONDS * 1000)
        for first in range(0, len(ordered), CANDIDATES):
            candidates = ordered[first : first + CANDIDATES]
            keys = []
            for status in candidates:
                keys += [f"{PREFIX}worker:{status['id']}", f"{PREFIX}slots:{status['id']}"]
            async with _registry():
                chosen = await self._reserve(
                    keys=keys, args=[session_id, lease, int(SESSION_LEASE * 1000)]
                )
            if chosen is not None:
                status = candidates[int(chosen) - 1]
                return str(status["id"]), self._client(status)
        return None

    async def placed(self, session_id: str, worker_id: str) -> None:
        async with _registry():
            await self._redis.set(
                f"{PREFIX}session:{session_id}", worker_id, px=int(SESSION_LEASE * 1000)
            )

    async def release(self, session_id: str, worker_id: str) -> None:
        async with _registry():
            await self._release(
                keys=[f"{PREFIX}slots:{worker_id}", f"{PREFIX}session:{session_id}"],
                args=[session_id, worker_id],
            )

    async def locate(self, session_id: str) -> WorkerClient | None:
        async with _registry():
            worker_id = await self._redis.get(f"{PREFIX}session:{session_id}")
            if worker_id is None:
                return None
            status = await self._redis.hget(f"{PREFIX}worker:{_text(worker_id)}", "status")
        if status is None:  # its worker died: the session died with it
            return None
        return self._client(json.loads(status))


class RedisPhotos:
    """Photos in Redis, shared by every front door: each expires `ttl` seconds after its last
    use, and beyond `limit` photos the least recently used go."""

    def __init__(self, redis: Redis, limit: int, ttl: int = PHOTO_TTL) -> None:
        self._redis = redis
        self._limit = limit
        self._ttl = ttl

    def _key(self, avatar_id: str) -> str:
        return f"{PREFIX}avatar:{avatar_id}"

    async def _touch(self, avatar_id: str) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.expire(self._key(avatar_id), self._ttl)
            pipe.zadd(f"{PREFIX}avatars", {avatar_id: time.time()})
            await pipe.execute()

    async def get(self, avatar_id: str) -> StoredAvatar | None:
        async with _registry():
            info, preview = await self._redis.hmget(self._key(avatar_id), "info", "preview")
            if info is None or preview is None:
                return None
            await self._touch(avatar_id)
        return StoredAvatar(json.loads(info), _bytes(preview))

    async def photo(self, avatar_id: str) -> bytes | None:
        async with _registry():
            photo = await self._redis.hget(self._key(avatar_id), "photo")
        return None if photo is None else _bytes(photo)

    async def put(self, avatar_id: str, photo: bytes, analysis: Analysis) -> None:
        async with _registry():
            await self._put(avatar_id, photo, analysis)

    async def _put(self, avatar_id: str, photo: bytes, analysis: Analysis) -> None:
        key = self._key(avatar_id)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hset(
                key,
                mapping={
                    "photo": photo,
                    "info": json.dumps(analysis.info),
                    "preview": analysis.preview,
                },
            )
            pipe.expire(key, self._ttl)
            pipe.zadd(f"{PREFIX}avatars", {avatar_id: time.time()})
            await pipe.execute()
        extra = await self._redis.zcard(f"{PREFIX}avatars") - self._limit
        if extra > 0:
            for dropped in await self._redis.zpopmin(f"{PREFIX}avatars", extra):
                member = dropped[0] if isinstance(dropped, tuple | list) else dropped
                await self._redis.delete(self._key(_text(member)))

    async def count(self) -> int:
        async with _registry():
            return int(await self._redis.zcard(f"{PREFIX}avatars"))


def _text(value: bytes | str) -> str:
    """A Redis reply as text (replies are bytes: the connection does not decode them)."""
    return value.decode() if isinstance(value, bytes) else value


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()
