"""``cachecoord serve --workers N``: N server processes sharing one port.

One Python process serves about one core. The workers are *spawned* as fresh
interpreters (never forked after gRPC started, which gRPC does not support)
and each binds the port with SO_REUSEPORT, so the kernel spreads connections
over them. The parent only supervises: it forwards SIGTERM/SIGINT, and when
one worker exits it stops the others, so an orchestrator sees the failure
and restarts the whole unit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType


def supervise(serve_args: Sequence[str], workers: int) -> int:
    """Run *workers* ``cachecoord serve`` processes; return the first exit code."""
    env = {**os.environ, "CACHECOORD_SERVER_REUSE_PORT": "true"}
    children = [
        subprocess.Popen([sys.executable, "-m", "cachecoord", "serve", *serve_args], env=env)
        for _ in range(workers)
    ]

    def forward(signum: int, frame: FrameType | None) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while all(child.poll() is None for child in children):
        time.sleep(0.2)
    first = next(child for child in children if child.returncode is not None)
    forward(signal.SIGTERM, None)
    for child in children:
        child.wait()
    return first.returncode
