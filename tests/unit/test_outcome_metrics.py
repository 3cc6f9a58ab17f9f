"""The label series of the listener's store counter stay bounded, whoever calls."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from prometheus_client import REGISTRY

from dicomai.config import Peer, load_settings
from dicomai.db.migrate import upgrade
from dicomai.db.session import make_engine, make_sessionmaker
from dicomai.ingest.access import AccessPolicy
from dicomai.ingest.limits import Limits
from dicomai.ingest.spool import Spool
from dicomai.ingest.store import CANNOT_UNDERSTAND, Storer
from dicomai.metrics import OTHER_SENDERS


def refused_store(calling_ae: str) -> SimpleNamespace:
    """A C-STORE event the Storer refuses before reading anything (the health probe's
    association may not store), from `calling_ae`."""
    assoc = SimpleNamespace(
        requestor=SimpleNamespace(ae_title=calling_ae), dicomai_health_probe=True
    )
    return SimpleNamespace(assoc=assoc, request=SimpleNamespace(AffectedSOPInstanceUID="1.2.3"))


def stores(calling_ae: str) -> float:
    value = REGISTRY.get_sample_value(
        "dicomai_stores_total", {"calling_ae": calling_ae, "status": f"0x{CANNOT_UNDERSTAND:04X}"}
    )
    return value or 0.0


def test_stores_from_titles_the_allow_list_does_not_name_share_one_label(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'dicomai.db'}"
    upgrade(url)
    settings = load_settings(None, storage={"dir": tmp_path / "var", "min_free_mb": 0})
    policy = AccessPolicy([Peer(ae_title="MODALITY ", hosts=["127.0.0.1"])], allow_any=True)
    storer = Storer(
        Spool(settings.spool_dir),
        make_sessionmaker(make_engine(url)),
        Limits(1 << 20, 1 << 30),
        peers=policy.titles,
    )
    before = {title: stores(title) for title in ("MODALITY", OTHER_SENDERS)}

    # A peer with `allow_any` can call itself anything; a configured title may be padded.
    for calling in ("MODALITY  ", "FORGED-1", "FORGED-2", " MODALITY"):
        assert storer(refused_store(calling)) == CANNOT_UNDERSTAND

    assert stores("MODALITY") == before["MODALITY"] + 2
    assert stores(OTHER_SENDERS) == before[OTHER_SENDERS] + 2
    for forged in ("FORGED-1", "FORGED-2", "MODALITY  ", " MODALITY"):
        assert stores(forged) == 0.0, f"{forged!r} got a label series of its own"
