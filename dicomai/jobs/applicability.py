"""Which instances a model applies to, from its manifest's `[applies_to]` (no torch needed)."""

from __future__ import annotations

from typing import Any

from dicomai.db.models import Instance


def applies(manifest: dict[str, Any], instance: Instance) -> bool:
    """Whether a model with `manifest` applies to `instance` (an empty list matches anything)."""
    rules = manifest.get("applies_to") or {}
    checks = (
        ("modalities", instance.modality),
        ("body_parts", instance.body_part),
        ("sop_classes", instance.sop_class_uid),
    )
    for key, value in checks:
        allowed = [str(v).upper() for v in rules.get(key) or []]
        if allowed and (value or "").upper() not in allowed:
            return False
    return True
