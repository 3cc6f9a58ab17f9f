"""Who may associate: calling AE titles tied to the hosts or networks they may come from."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from dicomai.config import Peer


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str


class AccessPolicy:
    """The allow-list of `[[ingest.peers]]`; pynetdicom checks AE titles only, we check both."""

    def __init__(self, peers: list[Peer], allow_any: bool) -> None:
        self.allow_any = allow_any
        self._networks: dict[str, list[ipaddress.IPv4Network | ipaddress.IPv6Network]] = {}
        for peer in peers:
            nets = self._networks.setdefault(peer.ae_title.strip(), [])
            nets.extend(_networks(host) for host in peer.hosts)

    def check(self, calling_ae: str, address: str) -> Decision:
        """Decide whether `calling_ae` connecting from `address` may associate."""
        if self.allow_any:
            return Decision(True, "allow_any")
        networks = self._networks.get(calling_ae.strip())
        if networks is None:
            return Decision(False, "calling AE title not in allow-list")
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return Decision(False, "peer address not parseable")
        if any(ip in net for net in networks):
            return Decision(True, "allow-list")
        return Decision(False, "peer address not allowed for this AE title")


def _networks(host: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(host, strict=False)
    except ValueError:
        # A host name is resolved once at start: the allow-list must not change under us.
        return ipaddress.ip_network(socket.gethostbyname(host))
