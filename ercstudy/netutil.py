"""Free TCP ports on loopback, for the processes ercstudy starts itself (a private Ray, a one-rank
torch.distributed world for tests and benchmarks). Neither plane's concern, so it lives here."""

from __future__ import annotations

import socket


def free_ports(count: int = 1, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports that were free on `host` a moment ago (held together, so they differ)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]
