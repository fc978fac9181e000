"""Native names for the server's threads.

Before Python 3.14 every thread keeps the process's name in the operating system, so `top -H`
and the benchmark could not tell the event loop from inference, compositing or the encoders.
Threads that native libraries start take the name of the thread that starts them.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

_PR_SET_NAME = 15  # prctl(2)


def name_this_thread(name: str) -> None:
    """Name the calling thread as the OS sees it (Linux; elsewhere nothing happens)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def in_named_thread(name: str, make: Callable[[], T]) -> T:
    """`make()`, called on a new thread named `name`, so that the threads a native library
    starts inside it (ONNX Runtime's workers) carry that name too."""
    with ThreadPoolExecutor(1, initializer=name_this_thread, initargs=(name,)) as pool:
        return pool.submit(make).result()
