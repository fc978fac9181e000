"""What the tests and bench/reliability.py measure of a server process, and the upload flood.

Linux only: a process's memory, threads and open files are read from /proc.
"""

from __future__ import annotations

import asyncio
import io
import os
from dataclasses import dataclass

import aiohttp
import numpy as np
from PIL import Image


@dataclass(frozen=True)
class ProcessStatus:
    rss_mb: float  # resident memory now
    peak_mb: float  # the most it has been resident since it started (VmHWM)
    threads: int
    open_files: int


def process_status(pid: int) -> ProcessStatus:
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            fields[name] = value.split()[0] if value.split() else ""
    return ProcessStatus(
        rss_mb=int(fields["VmRSS"]) / 1024,
        peak_mb=int(fields["VmHWM"]) / 1024,
        threads=int(fields["Threads"]),
        open_files=len(os.listdir(f"/proc/{pid}/fd")),
    )


def large_jpeg(side: int = 2200) -> bytes:
    """A JPEG of noise, 9.1 MB at the default size: as large as a phone photo gets."""
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=100)
    return out.getvalue()


async def upload_flood(
    url: str, photo: bytes, count: int, headers: dict[str, str] | None = None
) -> list[int]:
    """`count` uploads of `photo` at once; the status of each answer."""

    async def upload(http: aiohttp.ClientSession) -> int:
        async with http.post(
            f"{url}/api/avatars",
            data=photo,
            headers={"Content-Type": "image/jpeg", **(headers or {})},
        ) as response:
            await response.read()
            return response.status

    limits = aiohttp.TCPConnector(limit=count)
    async with aiohttp.ClientSession(connector=limits) as http:
        return list(await asyncio.gather(*(upload(http) for _ in range(count))))
