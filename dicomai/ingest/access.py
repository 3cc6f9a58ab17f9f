"""Who may associate: calling AE titles tied to the hosts or networks they may come from."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from dicomai.config import Peer
from dicomai.errors import ConfigError

# `dicomai health` calls with this title from the machine itself and asks only for
# Verification: that probe is let in without an allow-list entry (and without an audit row
# per run), and it cannot store anything.
HEALTH_AE_TITLE = "DICOMAI_HEALTH"
VERIFICATION = "1.2.840.10008.1.1"


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
            for host in peer.hosts:
                nets.extend(_networks(host))

    @property
    def titles(self) -> frozenset[str]:
        """The calling AE titles the allow-list names, stripped as `check` strips them."""
        return frozenset(self._networks)

    def check(self, calling_ae: str, address: str) -> Decision:
        """Decide whether `calling_ae` connecting from `address` may associate."""
        if self.allow_any:
            return Decision(True, "allow_any")
        networks = self._networks.get(calling_ae.strip())
        if networks is None:
            return Decision(False, "calling AE title not in allow-list")
        ip = peer_ip(address)
        if ip is None:
            return Decision(False, "peer address not parseable")
        if any(ip in net for net in networks):
            return Decision(True, "allow-list")
        return Decision(False, "peer address not allowed for this AE title")


def is_health_probe(calling_ae: str, address: str, abstract_syntaxes: list[str]) -> bool:
    """`dicomai health`'s C-ECHO: our health title, from a loopback address, Verification only."""
    ip = peer_ip(address)
    return (
        calling_ae.strip() == HEALTH_AE_TITLE
        and ip is not None
        and ip.is_loopback
        and bool(abstract_syntaxes)
        and all(syntax == VERIFICATION for syntax in abstract_syntaxes)
    )


def peer_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The peer's address; an IPv4 sender seen through a dual-stack socket (`host = "::"`)
    as ::ffff:a.b.c.d is the IPv4 address the allow-list names."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _networks(host: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The networks of an address, a network, or every address a host name resolves to."""
    try:
        return [ipaddress.ip_network(host, strict=False)]
    except ValueError:
        # A host name is resolved once at start: the allow-list must not change under us.
        # Every address, IPv6 too (gethostbyname gave one IPv4 address: a modality with two,
        # or an IPv6-only one, was refused).
        try:
            found = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except OSError:
            raise ConfigError(f"ingest.peers: cannot resolve host name {host!r}") from None
        addresses = {str(info[4][0]).split("%")[0] for info in found}
        return [ipaddress.ip_network(address) for address in sorted(addresses)]
