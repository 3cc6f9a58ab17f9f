"""The broker seen from dicomai: a doorbell that says "job N / delivery N is ready"."""

from __future__ import annotations

from typing import Protocol


class Doorbell(Protocol):
    """Tells workers that a row is ready; SQL stays the source of truth (DESIGN.md rule 4)."""

    def ring_job(self, job_id: int) -> None: ...

    def ring_delivery(self, delivery_id: int) -> None: ...
