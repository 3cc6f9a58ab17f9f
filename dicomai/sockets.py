"""Socket options for pynetdicom associations, bound as an EVT_CONN_OPEN handler."""

from __future__ import annotations

import socket

from pynetdicom import evt


def set_nodelay(event: evt.Event) -> None:
    """Turn Nagle's algorithm off on the association's socket.

    FACTS.md: without TCP_NODELAY every DIMSE message waits ~40 ms for a delayed ACK
    (one result object to storescp: 82-96 ms without, 5-9 ms with).
    """
    transport = event.assoc.dul.socket
    sock = transport.socket if transport is not None else None
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
