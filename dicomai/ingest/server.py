"""The listening socket: pynetdicom's threaded server, shareable by several processes.

With `listener_processes > 1` the main process binds the port and its listener children
inherit that one socket (`LISTEN_FD_ENV` names its descriptor), so every process accepts from
one queue. Before accepting, a process waits a little for each association it already serves,
which lets a less busy process take the connection first. SO_REUSEPORT, used before, gave each
process its own queue chosen by a hash of the peer's address: four senders landed 4-0 or 3-1 on
two processes in five of six runs, and the busy process bounded the rate.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from ssl import SSLContext
from typing import Any

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer

from dicomai.ingest.reactor import WakingRequestHandler

LISTEN_FD_ENV = "DICOMAI_LISTEN_FD"
# Per association a process already serves; capped so a busy process still takes connections
# that nobody else does.
ACCEPT_DELAY_S = 0.005
MAX_ACCEPT_DELAY_S = 0.025


class SharedPortServer(ThreadedAssociationServer):
    """pynetdicom's server on an inherited listening socket (`LISTEN_FD_ENV`), else on its own.

    Its own socket is bound without SO_REUSEPORT: a second `serve` started on a port in use
    (an old one left running while an administrator edits the allow-list) fails with
    "address already in use" rather than quietly taking half the associations under its
    own rules. `share` turns a bound server into one that others may inherit.
    """

    shared = False
    dicomai_on_refused: Callable[[str, str], None] | None = None

    def server_bind(self) -> None:
        inherited = os.environ.get(LISTEN_FD_ENV)
        if inherited is None:
            super().server_bind()
            return
        if self.socket is not None:
            self.socket.close()
        self.socket = socket.socket(fileno=int(inherited))
        self.server_address = self.socket.getsockname()
        self._accept_from_one_queue()

    def server_activate(self) -> None:
        if not self.shared:  # an inherited socket is listening already
            super().server_activate()

    def share(self) -> int:
        """Let other processes accept from this server's socket; return its descriptor."""
        assert self.socket is not None
        self._accept_from_one_queue()
        self.socket.set_inheritable(True)
        return self.socket.fileno()

    def _accept_from_one_queue(self) -> None:
        # Non-blocking: when another process took the connection first, accept() fails at
        # once (socketserver ignores the OSError) instead of waiting for the next one.
        assert self.socket is not None
        self.socket.setblocking(False)
        self.shared = True

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection; its TLS handshake is left to its own thread (`tls.handshake`)."""
        if self.shared:
            busy = len(self.ae.active_associations)
            if busy:
                time.sleep(min(busy * ACCEPT_DELAY_S, MAX_ACCEPT_DELAY_S))
        assert self.socket is not None
        connection, address = self.socket.accept()
        if self.ssl_context:
            connection = self.ssl_context.wrap_socket(
                connection, server_side=True, do_handshake_on_connect=False
            )
        return connection, address

    def server_close(self) -> None:
        # pynetdicom shuts the socket down first, which would stop every process sharing it.
        if self.shared and self.socket is not None:
            self.socket.close()
            return
        super().server_close()


def serve_in_thread(
    ae: AE,
    address: tuple[str, int],
    ssl_context: SSLContext | None,
    evt_handlers: list[tuple[Any, ...]],
    on_refused: Callable[[str, str], None] | None = None,
) -> SharedPortServer:
    """Start serving associations on `address` in a daemon thread; return the server.

    Associations run `reactor.WakingAssociation`: pynetdicom's reactors without their 1 ms sleeps.
    `on_refused(peer address, reason)` hears of connections refused before any association
    (a failed TLS handshake).
    """
    server: SharedPortServer = ae.make_server(  # type: ignore[assignment]
        address,
        ssl_context=ssl_context,
        evt_handlers=evt_handlers,  # type: ignore[arg-type]
        server_class=SharedPortServer,
        request_handler=WakingRequestHandler,
    )
    server.dicomai_on_refused = on_refused
    threading.Thread(target=server.serve_forever, name="dicom-listener", daemon=True).start()
    # As AE.start_server does: server.shutdown() removes itself from this list.
    ae._servers.append(server)
    return server
