"""Checkpoint files: which ones exist, where they are downloaded from and cached, and whether
the cached copy is the right file.

The checkpoints are 90 to 420 MB and come from third-party mirrors that move or vanish, so the
known files (exact size and SHA-256) and their default mirrors are data in `models.toml`, mirrors
can be added without touching code, an interrupted download resumes where it stopped, and a
file enters the cache only after its hash matches.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import sys
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from tqdm import tqdm

State = Literal["verified", "missing", "partial", "corrupt"]

CHUNK = 1 << 20
TIMEOUT_S = 30.0
USER_AGENT = "lipsync-weights/0.1"
# The generators, preferred first, and the face detector, by their file names in models.toml.
GENERATORS = ("wav2lip_gan.pth", "wav2lip.pth")
DETECTOR = "s3fd-619a316812.pth"


class WeightsError(Exception):
    """A checkpoint is unknown, could not be downloaded, or is not the file it should be."""


@dataclass(frozen=True)
class ModelSpec:
    """One known checkpoint: the exact bytes expected and the full URLs that serve them."""

    name: str
    description: str
    size: int
    sha256: str
    urls: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelStatus:
    """What the cache holds for one checkpoint; `path` is the `.part` file while partial."""

    name: str
    description: str
    size: int
    path: Path | None
    state: State


def load_registry() -> dict[str, ModelSpec]:
    """The checkpoints listed in the shipped `models.toml`, in file order."""
    text = resources.files("wav2lip").joinpath("models.toml").read_text(encoding="utf-8")
    return {
        name: ModelSpec(
            name=name,
            description=entry["description"],
            size=entry["size"],
            sha256=entry["sha256"].lower(),
            urls=tuple(entry["urls"]),
        )
        for name, entry in tomllib.loads(text)["models"].items()
    }


def cache_dir(override: str | Path | None = None) -> Path:
    """The checkpoint folder: `override`, else $LIPSYNC_CACHE, else `$XDG_CACHE_HOME/lipsync`
    or `~/.cache/lipsync`. Not created here, so a mere listing leaves no empty folder behind."""
    if override is not None:
        return Path(override).expanduser()
    if env := os.environ.get("LIPSYNC_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "lipsync"


def mirror_urls(spec: ModelSpec, mirrors: Sequence[str] | None = None) -> list[str]:
    """URLs to try, in order: base URLs from `mirrors`, then from $LIPSYNC_MIRRORS (both get
    the file name appended), then the defaults from models.toml. Preferred mirrors go first
    so a local or faster copy is used whenever it works."""
    bases = [*(mirrors or ()), *os.environ.get("LIPSYNC_MIRRORS", "").split()]
    urls = [f"{base.rstrip('/')}/{urllib.parse.quote(spec.name)}" for base in bases]
    return list(dict.fromkeys([*urls, *spec.urls]))


def find_cached(
    name: str, cache: str | Path | None = None, registry: Mapping[str, ModelSpec] | None = None
) -> Path | None:
    """The verified cached file for `name`, or None when it is missing, partial or corrupt."""
    spec = _spec(name, registry)
    path = cache_dir(cache) / name
    return path if path.is_file() and _problem(path, spec) is None else None


def list_models(
    cache: str | Path | None = None, registry: Mapping[str, ModelSpec] | None = None
) -> list[ModelStatus]:
    """The state of every known checkpoint in the cache, without any network access."""
    folder = cache_dir(cache)
    statuses = []
    for spec in _registry(registry).values():
        file, part = folder / spec.name, _part(folder / spec.name)
        found: Path | None
        state: State
        if file.is_file():
            found, state = file, "verified" if _problem(file, spec) is None else "corrupt"
        elif part.is_file():
            found, state = part, "partial"
        else:
            found, state = None, "missing"
        statuses.append(ModelStatus(spec.name, spec.description, spec.size, found, state))
    return statuses


def fetch(
    name: str,
    cache: str | Path | None = None,
    mirrors: Sequence[str] | None = None,
    progress: bool = True,
    registry: Mapping[str, ModelSpec] | None = None,
) -> Path:
    """The verified checkpoint `name`, downloaded into the cache unless already there.

    Mirrors are tried in `mirror_urls` order until one yields the right bytes; the error
    raised when none does lists what went wrong with each. A `.part` left by a cut
    connection is kept and resumed by the next attempt, one with the wrong hash is deleted.
    """
    spec = _spec(name, registry)
    folder = cache_dir(cache)
    path = folder / name
    if path.is_file():
        if _problem(path, spec) is None:
            return path
        path.unlink()
        _marker(path).unlink(missing_ok=True)
    urls = mirror_urls(spec, mirrors)
    if not urls:
        raise WeightsError(f"no mirror known for {name}; set LIPSYNC_MIRRORS to a URL serving it")
    folder.mkdir(parents=True, exist_ok=True)
    failures = []
    for url in urls:
        try:
            _download(url, spec, _part(path), progress)
        except (WeightsError, OSError, http.client.HTTPException) as exc:
            failures.append(f"  {url}: {_reason(exc)}")
            continue
        os.replace(_part(path), path)
        _record(path, spec)
        return path
    raise WeightsError(f"could not download {name} into {folder}:\n" + "\n".join(failures))


def _registry(registry: Mapping[str, ModelSpec] | None) -> Mapping[str, ModelSpec]:
    return load_registry() if registry is None else registry


def _spec(name: str, registry: Mapping[str, ModelSpec] | None) -> ModelSpec:
    models = _registry(registry)
    if name not in models:
        raise WeightsError(f"unknown model {name!r}; known models: {', '.join(models)}")
    return models[name]


def _part(path: Path) -> Path:
    return path.with_name(path.name + ".part")


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _stamp(path: Path, spec: ModelSpec) -> dict[str, str | int]:
    """What a verification vouches for: this hash, at this size and modification time."""
    st = path.stat()
    return {"sha256": spec.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _record(path: Path, spec: ModelSpec) -> None:
    """Remember that `path` is verified. In a read-only cache (say, weights baked into a
    container image) the marker cannot be written and each check just hashes again."""
    with contextlib.suppress(OSError):
        _marker(path).write_text(json.dumps(_stamp(path, spec)))


def _problem(path: Path, spec: ModelSpec) -> str | None:
    """Why `path` is not `spec`'s file, or None when it is. Hashing 400 MB takes about a
    second, so a recorded verification is trusted while the size and mtime are unchanged."""
    stamp = _stamp(path, spec)
    if stamp["size"] != spec.size:
        return f"size is {stamp['size']} bytes, expected {spec.size}"
    with contextlib.suppress(OSError, ValueError):
        if json.loads(_marker(path).read_text()) == stamp:
            return None
    digest = _sha256(path)
    if digest != spec.sha256:
        return f"sha256 is {digest}, expected {spec.sha256}"
    _record(path, spec)
    return None


def _download(url: str, spec: ModelSpec, part: Path, progress: bool) -> None:
    """Complete `part` from `url` and check its hash, deleting it if wrong. Bytes already in
    `part` are kept and only the rest is requested, with an HTTP Range header."""
    have = part.stat().st_size if part.is_file() else 0
    if have == spec.size and _sha256(part) == spec.sha256:
        return  # finished by an attempt that stopped before the rename
    if have >= spec.size:
        have = 0
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if have:
        request.add_header("Range", f"bytes={have}-")
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        if response.status == 206:
            got = response.headers.get("Content-Range", "")
            if not got.startswith(f"bytes {have}-"):
                raise WeightsError(f"asked for bytes {have}- but got {got or 'no range'}")
        else:
            have = 0  # the server ignored Range and sends the whole file
        length = response.headers.get("Content-Length")
        if length is not None and have + int(length) != spec.size:
            raise WeightsError(f"server offers {have + int(length)} bytes, expected {spec.size}")
        with (
            open(part, "ab" if have else "wb") as out,
            tqdm(
                total=spec.size,
                initial=have,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=spec.name,
                disable=not progress,
                file=sys.stderr,
            ) as bar,
        ):
            while chunk := response.read(CHUNK):
                if have + len(chunk) > spec.size:
                    raise WeightsError(f"server sent more than {spec.size} bytes")
                out.write(chunk)
                have += len(chunk)
                bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
    if have < spec.size:
        raise WeightsError(f"connection closed after {have} of {spec.size} bytes")
    digest = _sha256(part)
    if digest != spec.sha256:
        part.unlink()
        raise WeightsError(f"sha256 is {digest}, expected {spec.sha256}; download deleted")


def _reason(exc: Exception) -> str:
    """A one-line cause a person can act on, without urllib's wrapping."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    if isinstance(exc, WeightsError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def find_generator(cache: str | Path | None = None) -> Path | None:
    """The preferred Wav2Lip generator that is cached and verified, if any."""
    for name in GENERATORS:
        path = find_cached(name, cache)
        if path is not None:
            return path
    return None
