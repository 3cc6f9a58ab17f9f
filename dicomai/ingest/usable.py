"""Which received instances no model can use: stored and recorded like any other, marked not
applicable, and never handed to a model whatever its `applies_to` says."""

from __future__ import annotations

import functools

from pydicom.uid import UID

# The Manufacturer (0008,0070) of every object dicomai writes (`dicomai.results.codes`).
OWN_MANUFACTURER = "dicomai"

_STORAGE_ROOT = "1.2.840.10008.5.1.4.1.1."


def not_applicable(sop_class_uid: str, manufacturer: str | None) -> str | None:
    """Why no model may process this instance, or None if a model's scope decides.

    A storage SOP class that holds no image (SR, encapsulated documents, presentation states,
    waveforms, RT plans and structures, segmentations, key objects) has nothing to classify.
    dicomai's own results are refused too: a PACS that forwards every new object to dicomai
    sends its SR and heat maps back, and each would reopen the study and give it another job,
    without end. A private or unknown SOP class is left to the model's scope.
    """
    if (manufacturer or "").strip() == OWN_MANUFACTURER:
        return "dicomai's own result"
    name = _storage_class_name(sop_class_uid)
    if name is not None and "Image Storage" not in name:
        return f"not an image ({name})"
    return None


@functools.cache
def _storage_class_name(sop_class_uid: str) -> str | None:
    uid = UID(sop_class_uid)
    if not uid.startswith(_STORAGE_ROOT) or uid.type != "SOP Class":
        return None
    return str(uid.name)
