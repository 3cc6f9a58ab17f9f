"""pynetdicom's two reactor threads, made to block on what they wait for instead of polling.

pynetdicom 3.0 runs two loops per association: the DUL thread sleeps 1 ms whenever the socket
has no data, and the association thread sleeps 1 ms before every look at its message queue.
Each C-STORE waits on both more than once (a 512² CT slice is several PDUs), so at hundreds of
instances a second the sleeps are a large share of the time. Here the DUL waits in `poll` on
its socket and a wake-up pipe that every queue it reads rings, and the association thread
waits on an `Event` that its queues set. Both still wake every `_TICK` seconds for what no
queue announces (the ARTIM and idle timers, a dead DUL thread), as pynetdicom's loops did
every millisecond.

The loops below are pynetdicom 3.0.4's `DULServiceProvider.run_reactor` and
`Association._run_reactor` (pinned in pyproject.toml) with the sleeps replaced; the state
machine, ACSE and DIMSE handling are pynetdicom's own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import ssl
import threading
import time
from datetime import datetime
from typing import Any, cast

from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket, RequestHandler

from dicomai.ingest.store_response import StoreResponseDIMSE
from dicomai.ingest.tls import CLOSED_UNSPOKEN, handshake

log = logging.getLogger(__name__)

# Longest wait of either loop: how late a timer expiry or a dead DUL is noticed.
_TICK = 0.05


class _Waker:
    """A non-blocking pipe: `ring` from any thread makes the reader's `poll` return."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.read_fd, self._write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._closed = False

    def ring(self) -> None:
        with self._lock:
            if self._closed:
                return
            # A full pipe already holds a pending wake-up.
            with contextlib.suppress(BlockingIOError):
                os.write(self._write_fd, b"\0")

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.read_fd, 4096):
                pass

    def close(self) -> None:
        # Under the lock: a late ring must never write to a descriptor number reused since.
        if not hasattr(self, "_closed"):  # os.pipe failed in __init__ (EMFILE)
            return
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self.read_fd)
                os.close(self._write_fd)

    def __del__(self) -> None:
        self.close()


class _RingingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue that calls `ring` after each put, so its reader need not poll it."""

    def __init__(self, ring: Any) -> None:
        super().__init__()
        self._ring = ring

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._ring()


class WakingDUL(DULServiceProvider):
    """The DUL thread, woken by the socket or by a primitive or event queued for it.

    `to_user_queue` (A-ASSOCIATE, A-RELEASE, A-ABORT for the association) sets
    `on_user_primitive`, so the association thread hears of a release or abort at once.
    """

    def __init__(self, assoc: Association, on_user_primitive: Any) -> None:
        self._waker = _Waker()
        super().__init__(assoc)
        self.event_queue = _RingingQueue(self._waker.ring)
        self.to_provider_queue = _RingingQueue(self._waker.ring)
        self.to_user_queue = _RingingQueue(on_user_primitive)

    # pynetdicom sets this flag from other threads (`stop_dul`, `kill_dul`, the association
    # on an exception); a property lets every such stop wake the loop.
    @property  # type: ignore[override]
    def _kill_thread(self) -> bool:
        return self.__dict__.get("_dicomai_kill", False)

    @_kill_thread.setter
    def _kill_thread(self, value: bool) -> None:
        self.__dict__["_dicomai_kill"] = value
        if value:
            self._waker.ring()

    def run_reactor(self) -> None:
        try:
            self._run()
        finally:
            self._waker.close()

    def _run(self) -> None:
        self._idle_timer.start()
        self.socket = cast(AssociationSocket, self.socket)
        idle = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                idle = True
            if idle:
                self._wait()
            if self._kill_thread:
                break
            # The ARTIM event goes on the queue ahead of any other this loop.
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                # Either send one primitive from the user or read one PDU per loop.
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                log.error("DUL failed (%s): aborting the association", type(exc).__name__)
                # As pynetdicom does: the state machine cannot be trusted to send the abort.
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                idle = True
                continue
            self.state_machine.do_action(event)
            idle = False

    def _wait(self) -> None:
        """Block until the socket is readable, a queue rang, or `_TICK` passed."""
        transport = self.socket
        sock = transport.socket if transport is not None and transport._is_connected else None
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # decrypted bytes already buffered: poll would not see them
        poller = select.poll()
        poller.register(self._waker.read_fd, select.POLLIN)
        if sock is not None:
            try:
                poller.register(sock, select.POLLIN)
            except (OSError, ValueError):  # closed under us: pynetdicom's read will say so
                time.sleep(0.001)
                return
        poller.poll(_TICK * 1000)
        self._waker.drain()


class WakingAssociation(Association):
    """An association whose reactor waits on its queues instead of sleeping 1 ms a loop."""

    def __init__(self, ae: Any, mode: str) -> None:
        super().__init__(ae, mode)
        self._activity = threading.Event()
        self.dul = WakingDUL(self, self._activity.set)
        self.dimse = StoreResponseDIMSE(self)
        self.dimse.msg_queue = _RingingQueue(self._activity.set)
        # The timeout setters configure the DUL's timers; apply them to the new one.
        self.acse_timeout = self.acse_timeout
        self.network_timeout = self.network_timeout

    def kill(self) -> None:
        self._kill = True
        self._activity.set()
        super().kill()

    def _run_reactor(self) -> None:
        self._is_paused = False
        handled = False
        while not self._kill:
            # Paused while waiting, so a send_*() from another thread need not wait for the
            # tick: the checkpoint below still keeps this loop off the queues until it is done.
            self._is_paused = True
            if not handled:
                self._activity.wait(_TICK)
            # Cleared before the queues are read: a put after this sets it again.
            self._activity.clear()
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            handled = msg is not None
            if msg:
                self._serve_request(msg, cast(int, context_id))

            if self.is_established and self.acse.is_release_requested():
                # Before the answer: the peer may close the connection at once, and the close
                # handler must leave a released association's studies to EVT_RELEASED.
                self.__dict__["dicomai_releasing"] = True
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                # EVT_ACSE_RECV fires for subscribers.
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                log.warning("network timeout: ending the association")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


class WakingRequestHandler(RequestHandler):
    """pynetdicom's handler, building a `WakingAssociation` (pynetdicom 3.0.4's
    `_create_association` with the class changed and the contexts shared), after the TLS
    handshake, on the connection's own thread, within the ARTIM time."""

    def handle(self) -> None:
        refused = handshake(self.request, self.ae.acse_timeout or 30.0)
        if refused is None:
            super().handle()
            return
        if refused == CLOSED_UNSPOKEN:
            log.debug("connection closed or silent before a TLS handshake (a port check?)")
            return
        address = str(self.client_address[0])
        log.warning("connection refused: %s (from %s)", refused, address)
        on_refused = getattr(self.server, "dicomai_on_refused", None)
        if on_refused is not None:
            on_refused(address, refused)

    def _create_association(self) -> Association:
        assoc = WakingAssociation(self.ae, MODE_ACCEPTOR)
        assoc._server = self.server
        timestamp = datetime.strftime(datetime.now(), "%Y%m%d%H%M%S")
        assoc.name = f"AcceptorThread@{timestamp}"
        assoc.set_socket(AssociationSocket(assoc, client_socket=self.request))
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        # Shared, not deep-copied as pynetdicom does: negotiation only reads them (3.0.4's
        # `negotiate_as_acceptor` builds new contexts for its results), and a copy of our
        # 171 storage contexts of 45 transfer syntaxes took 57 ms of CPU per association.
        assoc.acceptor.supported_contexts = list(self.server.contexts)
        assoc.requestor.address_info = self.remote
        for event, bound in self.server._handlers.items():
            if event.is_intervention and bound:
                assoc.bind(event, *bound)
            elif isinstance(event, evt.NotificationEvent):
                for handler in cast(list[tuple[Any, Any]], bound):
                    assoc.bind(event, handler[0], handler[1])
        return assoc
