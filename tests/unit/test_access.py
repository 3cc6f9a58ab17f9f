"""The allow-list checks the calling AE title and the address it comes from."""

from __future__ import annotations

from dicomai.config import Peer
from dicomai.ingest.access import HEALTH_AE_TITLE, VERIFICATION, AccessPolicy, is_health_probe

PEERS = [Peer(ae_title="CT1", hosts=["10.1.2.3"]), Peer(ae_title="CR", hosts=["10.9.0.0/16"])]


def test_listed_title_from_its_host_is_allowed() -> None:
    policy = AccessPolicy(PEERS, allow_any=False)
    assert policy.check("CT1", "10.1.2.3").allowed
    assert policy.check("CR", "10.9.200.1").allowed


def test_listed_title_from_another_host_is_refused() -> None:
    decision = AccessPolicy(PEERS, allow_any=False).check("CT1", "10.1.2.4")
    assert not decision.allowed
    assert "address" in decision.reason


def test_unknown_title_is_refused() -> None:
    assert not AccessPolicy(PEERS, allow_any=False).check("EVIL", "10.1.2.3").allowed


def test_allow_any_lets_everyone_in() -> None:
    assert AccessPolicy([], allow_any=True).check("ANYONE", "192.0.2.1").allowed


def test_an_ipv4_sender_on_a_dual_stack_listener_is_its_ipv4_address() -> None:
    """With `host = "::"` an IPv4 peer arrives as ::ffff:a.b.c.d."""
    policy = AccessPolicy(PEERS, allow_any=False)
    assert policy.check("CT1", "::ffff:10.1.2.3").allowed
    assert not policy.check("CT1", "::ffff:10.1.2.4").allowed
    assert is_health_probe(HEALTH_AE_TITLE, "::ffff:127.0.0.1", [VERIFICATION])


def test_a_host_name_allows_every_address_it_resolves_to(monkeypatch) -> None:
    # gethostbyname gave one IPv4 address: the modality's second one, or IPv6, was refused.
    import socket

    def resolve(host, port, *args, **kwargs):
        assert host == "ct-scanner.hospital.example"
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.2.3", 0)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.2.4", 0)),
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fd00::7", 0, 0, 0)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    policy = AccessPolicy([Peer(ae_title="CT1", hosts=["ct-scanner.hospital.example"])], False)
    for address in ("10.1.2.3", "10.1.2.4", "fd00::7"):
        assert policy.check("CT1", address).allowed, address
    assert not policy.check("CT1", "10.1.2.5").allowed
