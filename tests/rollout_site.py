"""A site for rollout tests: a real database, the CLI on it, model versions and studies to run."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pydicom
from daemon import REPO, dicomai, write_config
from recording import record_dataset
from sqlalchemy import select

from dicomai.config import load_settings
from dicomai.db.migrate import upgrade
from dicomai.db.models import Job, ModelVersion
from dicomai.db.session import make_engine, make_sessionmaker
from dicomai.ingest.spool import Spool
from dicomai.jobs.assembler import complete_quiet_studies
from dicomai.jobs.runner import JobRunner
from dicomai.training.synthetic import write_dicom_images

DEMO = REPO / "models" / "demo-chest-nodule"
NAME = "demo-chest-nodule"


def package(tmp: Path, version: str, **metrics: float) -> Path:
    """The demo package as another version, with some `[metrics]` values replaced."""
    folder = tmp / f"pkg-{version}"
    shutil.copytree(DEMO, folder)
    text = (folder / "model.toml").read_text()
    text = text.replace('version = "1.0.0"', f'version = "{version}"', 1)
    for key, value in metrics.items():
        text = re.sub(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
    (folder / "model.toml").write_text(text)
    return folder


class Site:
    """dicomai's database and storage under `root`, with a folder destination."""

    def __init__(
        self, root: Path, database_url: str | None = None, destinations: bool = True
    ) -> None:
        self.root = root
        self.delivered = root / "delivered"
        tables = {
            "storage": {"dir": str(root / "var"), "min_free_mb": 0},
            "rollout": {"gate_tolerance": 0.02},
        }
        if database_url:
            tables["database"] = {"url": database_url}
        self.config = write_config(
            root / "dicomai.toml",
            tables,
            {"destinations": [{"name": "folder", "path": str(self.delivered)}]}
            if destinations
            else {},
        )
        self.settings = load_settings(self.config)
        upgrade(self.settings.database_url)
        self.engine = make_engine(self.settings.database_url)
        self.sessions = make_sessionmaker(self.engine)
        self.runner = JobRunner(self.settings, self.sessions, device="cpu")
        self._count = 0

    def cli(self, *args: str, check: bool = True):
        return dicomai(self.config, *args, check=check)

    def ingest_studies(self, n: int, seed: int = 1) -> list[str]:
        """`n` one-image studies (DX, synthetic), recorded as the listener would; their UIDs."""
        written = write_dicom_images(self.root / f"in-{seed}", n, seed=seed, size=128)
        spool = Spool(self.settings.spool_dir)
        for item in written:
            record_dataset(spool, self.sessions, pydicom.dcmread(item.path))
        return [str(pydicom.dcmread(w.path).StudyInstanceUID) for w in written]

    def run_jobs(self) -> list[int]:
        """Complete the waiting studies and run their jobs in this process, as a worker would."""
        job_ids = complete_quiet_studies(self.sessions, 0)
        for job_id in job_ids:
            self.runner.run_job(job_id)
        return job_ids

    def version_id(self, version: str) -> int:
        with self.sessions() as session:
            return session.scalars(
                select(ModelVersion.id).where(
                    ModelVersion.name == NAME, ModelVersion.version == version
                )
            ).one()

    def jobs(self, version: str) -> list[Job]:
        with self.sessions() as session:
            rows = session.scalars(
                select(Job).where(Job.model_version_id == self.version_id(version)).order_by(Job.id)
            ).all()
            for job in rows:
                _ = job.study.study_uid, [d for o in job.outputs for d in o.deliveries]
            return list(rows)

    def register(self, folder: Path) -> None:
        """Register a package in this process (the CLI's `models register` pays torch's import)."""
        from dicomai.audit import Operator
        from dicomai.rollout.registry import register

        with self.sessions() as session, session.begin():
            register(session, folder, self.settings.registry_dir, Operator("tester", "test"))

    def close(self) -> None:
        self.engine.dispose()


def demo_site(root: Path, destinations: bool = True) -> Site:
    """A site with the demo package registered and active, as an operator would leave it."""
    site = Site(root, destinations=destinations)
    site.register(DEMO)
    site.cli("models", "activate", NAME, "1.0.0", "--reason", "first model")
    return site
