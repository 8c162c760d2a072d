"""A free TCP port on the loopback interface for a single-process rendezvous (tests, the GPU
proof's child runs). Standard library only: the GPU proof imports it before megatron-core."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port the kernel just handed out; another process may take it before it is bound
    again, so only single-machine launches that bind it at once use it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
