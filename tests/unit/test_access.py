"""The allow-list checks the calling AE title and the address it comes from."""

from __future__ import annotations

from dicomai.config import Peer
from dicomai.ingest.access import AccessPolicy

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
