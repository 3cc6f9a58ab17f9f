"""Which instances a model applies to, from the manifest stored with its version row."""

from __future__ import annotations

from typing import Any

from dicomai.db.models import Instance
from dicomai.models.manifest import Manifest


def applies(manifest: dict[str, Any], instance: Instance) -> bool:
    """Whether a model with `manifest` applies to `instance` (see `AppliesTo.matches`); never
    to one marked not applicable at ingest (`dicomai.ingest.usable`)."""
    if instance.not_applicable:
        return False
    scope = Manifest.from_dict(manifest).applies_to
    return scope.matches(
        instance.modality,
        instance.body_part,
        instance.sop_class_uid,
        instance.view_position,
        instance.series_description,
    )
