"""The listening socket: pynetdicom's threaded server, shareable by several processes."""

from __future__ import annotations

import socket
import threading
from ssl import SSLContext
from typing import Any

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer

from dicomai.ingest.reactor import WakingRequestHandler


class SharedPortServer(ThreadedAssociationServer):
    """Binds with SO_REUSEPORT: the kernel spreads new connections over every process
    listening on the port, so several listener processes escape one interpreter's GIL."""

    def server_bind(self) -> None:
        if self.socket is not None:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def serve_in_thread(
    ae: AE,
    address: tuple[str, int],
    ssl_context: SSLContext | None,
    evt_handlers: list[tuple[Any, ...]],
) -> SharedPortServer:
    """Start serving associations on `address` in a daemon thread; return the server.

    Associations run `reactor.WakingAssociation`: pynetdicom's reactors without their 1 ms sleeps.
    """
    server: SharedPortServer = ae.make_server(  # type: ignore[assignment]
        address,
        ssl_context=ssl_context,
        evt_handlers=evt_handlers,  # type: ignore[arg-type]
        server_class=SharedPortServer,
        request_handler=WakingRequestHandler,
    )
    threading.Thread(target=server.serve_forever, name="dicom-listener", daemon=True).start()
    # As AE.start_server does: server.shutdown() removes itself from this list.
    ae._servers.append(server)
    return server
