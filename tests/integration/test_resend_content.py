"""A resend of the same image in another transfer syntax, sent by dcmtk storescu."""

from __future__ import annotations

import io

import pydicom
import pytest
from daemon import Listener
from pydicom.uid import RLELossless
from servers import sample_file, storescu, wait_for

AET = "DICOMAI"
MODALITY = "MODALITY"
PACS = "PACS"


@pytest.mark.parametrize("policy", ["keep", "replace"])
def test_the_same_image_forwarded_in_another_syntax_is_an_identical_resend(
    tmp_path, policy: str
) -> None:
    # The modality sends Explicit VR; the PACS forwards the same image as Implicit VR and,
    # from its archive, as RLE: a site routing both to dicomai gets one report, not three.
    original = sample_file("CT_small.dcm")
    source = pydicom.dcmread(original)
    rle = pydicom.dcmread(original)
    rle.compress(RLELossless, generate_instance_uid=False)
    rle_path = tmp_path / "rle.dcm"
    rle.save_as(rle_path, enforce_file_format=True)
    peers = [{"ae_title": MODALITY, "hosts": ["127.0.0.1"]}, {"ae_title": PACS, "hosts": []}]
    with Listener(tmp_path / policy, AET, peers, resend_policy=policy) as daemon:
        assert storescu(daemon.port, [original], aet=MODALITY, extra_args=["-xe"]).returncode == 0

        def completed() -> bool:
            return daemon.query("SELECT state FROM studies") == [("complete",)]

        wait_for(completed, 30, "the study to complete")
        implicit = storescu(daemon.port, [original], aet=MODALITY, extra_args=["-xi"])
        assert implicit.returncode == 0, implicit.stderr
        compressed = storescu(daemon.port, [rle_path], aet=MODALITY, extra_args=["-R", "-xr"])
        assert compressed.returncode == 0, compressed.stderr

        actions = daemon.query(
            "SELECT action FROM audit_events WHERE object_id = :u ORDER BY id",
            u=source.SOPInstanceUID,
        )
        assert [a for (a,) in actions] == [
            "instance.stored",
            "instance.duplicate",
            "instance.duplicate",
        ], f"{policy}: another syntax was taken for other content"
        assert not (daemon.root / "var" / "spool" / "resends").exists()
        (path, syntax), *more = daemon.query("SELECT path, transfer_syntax_uid FROM instances")
        assert not more and syntax == "1.2.840.10008.1.2.1", "the first encoding is the one kept"
        stored = pydicom.dcmread(io.BytesIO((daemon.root / "var" / "spool" / path).read_bytes()))
        assert stored.PixelData == source.PixelData
        # Not reopened: no second job, no second report on the same pixels.
        assert completed()
        assert daemon.query(
            "SELECT count(*) FROM audit_events WHERE action = 'study.completed'"
        ) == [(1,)]
