"""Listening sockets bound to one address: torch's TCPStore server listens on every interface of
the machine and takes no bind address, but accepts a socket that is already listening."""

from __future__ import annotations

import socket


def bound_listener(host: str, port: int) -> tuple[int, int]:
    """(file descriptor, port) of a TCP socket listening on `host`'s address only; with port 0 the
    system picks the port. The caller owns the descriptor (TCPStore's `master_listen_fd` takes it)."""
    listener = socket.create_server((host, port), backlog=512)
    chosen = listener.getsockname()[1]
    return listener.detach(), chosen
