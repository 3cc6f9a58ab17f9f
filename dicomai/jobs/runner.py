"""Running one job: read the study's images, classify, explain, encode results, deliver."""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import os
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from pydicom import Dataset
from sqlalchemy import ColumnElement, and_, delete, or_, select, true, update
from sqlalchemy.orm import Session, sessionmaker

from dicomai.audit import Action, record
from dicomai.config import Destination, Settings
from dicomai.db.clock import database_now
from dicomai.db.models import (
    RUNNING_STATES,
    Delivery,
    Instance,
    Job,
    JobState,
    ModelVersion,
    OutputObject,
    Prediction,
    Study,
)
from dicomai.db.session import TRANSIENT_DATABASE_ERRORS
from dicomai.delivery.dispatch import (
    attempt_deliveries,
    attempt_delivery,
    has_deliveries,
    pending_for_job,
)
from dicomai.errors import DicomaiError, ModelPackageError, StorageUnavailable
from dicomai.inference.precision import autocast_dtype
from dicomai.inference.runner import Classifier
from dicomai.inference.types import ImagePrediction
from dicomai.ingest.spool import Spool
from dicomai.jobs.assembler import lock_studies
from dicomai.jobs.batching import Classified, classify
from dicomai.jobs.claims import WORKER, Claim, claim_job, gather_companions
from dicomai.jobs.reading import Reader
from dicomai.metrics import JOBS, JobOutcome
from dicomai.models.package import load_model
from dicomai.results.context import ModelIdentity, ResultContext, SourceImage
from dicomai.results.pmap import build_heatmap_pmap, supports_pmap
from dicomai.results.sc import OverlayBuilder
from dicomai.results.seg import build_seg, has_mask
from dicomai.results.sr import build_sr
from dicomai.rollout.canary import report_instead, sends_results

log = logging.getLogger(__name__)

__all__ = ["WORKER", "Claim", "JobRunner"]


@dataclass(frozen=True)
class Output:
    kind: str
    dataset: Dataset
    path: str


@dataclass(frozen=True)
class Report:
    """A job whose SR is written and recorded: what its overlays are built from."""

    job: Classified
    predictions: list[ImagePrediction]
    context: ResultContext | None  # None when no source image could be read
    reports: int  # SR objects written (0 or 1)
    deliveries: list[int]  # the SR's delivery ids
    held: _Held  # the run's claims: the overlays are written only while it holds the job


class _ClaimLost(Exception):
    """The run no longer holds its job: another run took it over after its heartbeat lease."""

    def __init__(self, claim: Claim) -> None:
        super().__init__(f"job {claim.job_id}: attempt {claim.attempt} no longer holds it")
        self.claim = claim


class _Held:
    """The claims a run holds, kept alive by its heartbeat: a beat that finds a job no longer
    running the claim's attempt marks it lost, and the run does no more work for it."""

    def __init__(self, leader: Claim) -> None:
        self._lock = threading.Lock()
        self._claims = {leader.job_id: leader}
        self._lost: set[int] = set()

    def add(self, claim: Claim) -> None:
        with self._lock:
            self._claims[claim.job_id] = claim

    def release(self, claim: Claim) -> None:
        """Stop beating for `claim`: its run is finishing or failing it."""
        with self._lock:
            self._claims.pop(claim.job_id, None)

    def claims(self) -> list[Claim]:
        with self._lock:
            return list(self._claims.values())

    def lose(self, claims: list[Claim]) -> None:
        """Mark `claims` taken over, those not released meanwhile (finished by this run)."""
        with self._lock:
            lost = [c for c in claims if self._claims.pop(c.job_id, None) is not None]
            self._lost.update(claim.job_id for claim in lost)
        for claim in lost:
            log.warning(
                "job %d was taken over by another run after its heartbeat lease: attempt %d "
                "stops, its results are neither recorded nor sent",
                claim.job_id,
                claim.attempt,
            )

    def keeps(self, claim: Claim) -> bool:
        with self._lock:
            return claim.job_id not in self._lost


class JobRunner:
    """Runs jobs in one worker process; keeps each loaded model version for the next job,
    until that version is retired."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], device: str) -> None:
        self.settings = settings
        self.sessions = sessions
        self.device = device
        # A precision the device cannot run fails the worker's start, not each job after.
        autocast_dtype(settings.worker.precision, torch.device(device))
        self.spool = Spool(settings.spool_dir)
        self.outputs = Spool(settings.outputs_dir)
        self.reader = Reader(settings.worker.decode_threads)
        self._classifiers: dict[int, Classifier] = {}

    def run_job(self, job_id: int) -> None:
        """Run job `job_id` unless it is finished or being run; idempotent, so a redelivered
        task is harmless.

        Queued jobs of the same model version that arrive within `[worker]
        batch_window_seconds` share its forward passes; each is then finished or failed, and
        delivered, on its own, as if it had run alone (their own tasks find them done).
        """
        worker = self.settings.worker
        with self.sessions() as session, session.begin():
            leader = claim_job(session, job_id, worker.heartbeat_lease_seconds, worker.max_attempts)
        if leader is None:
            return
        held = _Held(leader)
        with self._heartbeat(held):
            try:
                self._drop_retired()
                classifier = self._classifier(leader)
            except Exception as exc:
                self._fail(leader, exc)
                return
            claims = [leader, *self._companions(leader, held)]
            times = _Stopwatch()
            try:
                classified = classify(classifier, self.reader, self.spool, claims)
            except Exception as exc:  # an error no single job can be blamed for
                for claim in claims:
                    self._fail(claim, exc)
                return
            times.lap("read and classified")
            # Every job's SR first, sent at once: the report is what the radiologist waits
            # for; the overlays of a 100-image study take seconds more to build and write.
            reports = [r for job in classified if (r := self._report(classifier, job, held))]
            times.lap("SR written")
            sent_early = {i for report in reports for i in report.deliveries}
            attempt_deliveries(self.sessions, self.settings, sorted(sent_early))
            times.lap("SR sent")
            done = [r.job.claim.job_id for r in reports if self._conclude(r)]
            times.lap("other objects written")
        for job_id in done:
            pending = [i for i in pending_for_job(self.sessions, job_id) if i not in sent_early]
            attempt_deliveries(self.sessions, self.settings, pending)
        times.lap("sent")
        images = sum(len(job.images) for job in classified)
        log.info("jobs %s, %d images: %s", [c.job_id for c in claims], images, times)

    def deliver(self, delivery_id: int) -> None:
        attempt_delivery(self.sessions, self.settings, delivery_id)

    def _companions(self, leader: Claim, held: _Held) -> list[Claim]:
        """Queued jobs to batch with `leader`, each beating its heartbeat from its claim on."""
        worker = self.settings.worker
        if worker.batch_window_seconds <= 0:
            return []
        companions = gather_companions(
            self.sessions,
            leader,
            worker.batch_window_seconds,
            worker.max_batch_images,
            held.add,
        )
        if companions:
            log.info("job %d batched with %d queued jobs", leader.job_id, len(companions))
        return companions

    @contextmanager
    def _heartbeat(self, held: _Held) -> Iterator[None]:
        """Refresh the heartbeat of the claims `held` holds (read at each beat, so a batch may
        grow) while they run, so a long job is not taken for abandoned; a job whose claim was
        taken over meanwhile is marked lost.

        Four beats per lease: a beat delayed by a busy database still lands inside the lease.
        """
        interval = self.settings.worker.heartbeat_lease_seconds / 4
        stop = threading.Event()
        name = f"heartbeat-{held.claims()[0].job_id}"

        def beat() -> None:
            while not stop.wait(interval):
                claims = held.claims()
                if not claims:
                    continue
                try:
                    with self.sessions() as session, session.begin():
                        kept = set(
                            session.scalars(
                                update(Job)
                                .where(_running(*claims))
                                .values(heartbeat_at=database_now())
                                .returning(Job.id)
                                .execution_options(synchronize_session=False)
                            )
                        )
                except Exception as exc:  # a missed beat only risks a run taken over
                    ids = [claim.job_id for claim in claims]
                    log.warning("jobs %s heartbeat: %s", ids, type(exc).__name__)
                    continue
                held.lose([claim for claim in claims if claim.job_id not in kept])

        thread = threading.Thread(target=beat, name=name, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def _drop_retired(self) -> None:
        """Drop the loaded models of versions no longer in service (retired, rolled back):
        kept, each rollout left one more model in the GPU's memory until it ran out."""
        if not self._classifiers:
            return
        with self.sessions() as session:
            serving = set(
                session.scalars(
                    select(ModelVersion.id).where(
                        ModelVersion.id.in_(list(self._classifiers)),
                        ModelVersion.state.in_(RUNNING_STATES),
                    )
                )
            )
        on_gpu = [self._unload(i) for i in list(self._classifiers) if i not in serving]
        if any(on_gpu):
            # A reference cycle (a hook's closure, a traceback) would hold the weights until
            # the collector's next pass; the cache then gives their blocks back to the GPU.
            gc.collect()
            torch.cuda.empty_cache()

    def _unload(self, version_id: int) -> bool:
        """Forget version `version_id`'s model; whether it was on a GPU."""
        classifier = self._classifiers.pop(version_id)
        manifest = classifier.loaded.manifest
        log.info("model %s %s unloaded: no longer in service", manifest.name, manifest.version)
        return classifier.device.type == "cuda"

    def load_models_in_service(self) -> None:
        """Load (and warm up) every model version in service now, before the first job: a
        worker's first study otherwise waited for its model to load. A version that cannot be
        loaded is logged and left to its first job, which fails with the reason."""
        with self.sessions() as session:
            versions = session.scalars(
                select(ModelVersion).where(ModelVersion.state.in_(RUNNING_STATES))
            ).all()
            wanted = [(v.id, v.path, v.weights_sha256, v.manifest, v.label) for v in versions]
        for version_id, path, sha256, manifest, label in wanted:
            try:
                self._load(version_id, path, sha256, manifest)
            except Exception as exc:  # the version's first job fails with the reason
                log.error("model %s not loaded at start: %s: %s", label, type(exc).__name__, exc)

    def _classifier(self, claim: Claim) -> Classifier:
        return self._load(
            claim.model_version_id, claim.model_path, claim.weights_sha256, claim.manifest
        )

    def _load(
        self,
        version_id: int,
        model_path: str,
        registered: str,
        manifest: dict[str, Any] | None,
    ) -> Classifier:
        classifier = self._classifiers.get(version_id)
        if classifier is None:
            path = Path(model_path)
            if not path.is_absolute():
                path = self.settings.registry_dir / path
            loaded = load_model(path)
            if registered and loaded.manifest.weights_sha256 != registered:
                # A registry folder changed under its row (by hand, or a registration
                # before this version's fix): never run other weights under this label.
                raise ModelPackageError(
                    f"{path} holds weights {loaded.manifest.weights_sha256[:12]}, not the "
                    f"registered {registered[:12]}: register the package again as a new version"
                )
            _as_registered(path, manifest)
            classifier = Classifier(
                loaded,
                device=self.device,
                batch_size=self.settings.worker.max_batch_images,
                precision=self.settings.worker.precision,
            )
            dtype = classifier.autocast_dtype
            log.info(
                "model %s %s loaded on %s, %s",
                loaded.manifest.name,
                loaded.manifest.version,
                classifier.device,
                "fp32" if dtype is None else f"autocast {str(dtype).removeprefix('torch.')}",
            )
            self._classifiers[version_id] = classifier
        return classifier

    def _report(self, classifier: Classifier, job: Classified, held: _Held) -> Report | None:
        """Build and write the job's SR, and record it with the predictions (the job still
        running); None when that cannot be done (the job failed) or the job was taken over."""
        try:
            if job.error is not None:
                raise job.error
            predictions = job.predictions()
            sources = job.sources
            patients = {str(source.dataset.get("PatientID", "")) for source in sources}
            if len(patients) > 1:
                # A mis-filed image; the IDs themselves stay out of the log.
                log.warning(
                    "job %d: the study's images name %d different Patient IDs: the SR carries "
                    "the first image's patient, each overlay its own image's",
                    job.claim.job_id,
                    len(patients),
                )
            readable = {_uid(source) for source in sources}
            in_sr = [p for p in predictions if p.sop_instance_uid in readable]
            context = self._context(job.claim, classifier, sources, in_sr) if sources else None
            outputs = []
            if context is not None:
                datasets = [("sr", build_sr(context))]
                outputs = self._write_if_held(held, job.claim, datasets)
            deliveries = self._record_report(job.claim, predictions, outputs)
        except _ClaimLost:
            held.lose([job.claim])
            return None
        except Exception as exc:
            held.release(job.claim)
            self._fail(job.claim, exc)
            return None
        return Report(job, predictions, context, len(outputs), deliveries, held)

    def _conclude(self, report: Report) -> bool:
        """Build, write and record the job's other objects and finish it, or fail it; True
        when it is done (False also when it was taken over)."""
        claim, held = report.job.claim, report.held
        try:
            outputs = self._overlays(held, claim, report.context) if report.context else []
            total = report.reports + len(outputs)
            self._finish(claim, outputs, total, len(report.predictions))
        except _ClaimLost:
            held.lose([claim])
            return False
        except Exception as exc:
            self._fail(claim, exc)
            return False
        finally:
            held.release(claim)
        return True

    def _write_if_held(
        self, held: _Held, claim: Claim, datasets: list[tuple[str, Dataset]]
    ) -> list[Output]:
        """`_write_outputs` into the study's folder, if the run still holds `claim`: the files
        of a run taken over would replace those of the run that took it (the same names,
        the UIDs being deterministic), maybe while they are sent.

        Raises
        ------
        _ClaimLost
            Its heartbeat, or the job's row, says another run holds the job now.
        """
        if held.keeps(claim):
            with self.sessions() as session:
                if session.scalar(select(Job.id).where(_running(claim))) is not None:
                    return _write_outputs(self.outputs, claim.study_uid, datasets)
        raise _ClaimLost(claim)

    def _context(
        self,
        claim: Claim,
        classifier: Classifier,
        sources: list[SourceImage],
        predictions: list[ImagePrediction],
    ) -> ResultContext:
        manifest = classifier.loaded.manifest
        return ResultContext(
            sources=tuple(sources),
            predictions=tuple(predictions),
            model=ModelIdentity(
                name=manifest.name,
                version=manifest.version,
                architecture=manifest.architecture,
                weights_sha256=manifest.weights_sha256,
                multi_label=manifest.multi_label,
                explanation=(
                    classifier.cam_method if any(p.heatmap is not None for p in predictions) else ""
                ),
            ),
            input_digest=claim.input_digest,
            uid_root=self.settings.uid_root,
            **self._predecessors(claim, manifest.name),
            # In the server's local time, as the captions say.
            created=_local(claim.created_at) if claim.created_at else datetime.now(),
        )

    def _overlays(self, held: _Held, claim: Claim, context: ResultContext) -> list[Output]:
        """The objects that follow the SR. One that cannot be built for one image (a source
        whose geometry highdicom rejects, say) is left out, and the rest are sent: the SR
        is already out, and failing the job would withhold every other image's overlay."""
        datasets: list[tuple[str, Dataset]] = []
        overlays = OverlayBuilder(context)
        for i, prediction in enumerate(context.predictions):
            wanted: list[tuple[str, bool, Callable[[int], Dataset]]] = [
                ("sc", prediction.evaluated and prediction.heatmap is not None, overlays.build),
                ("seg", has_mask(context, i), functools.partial(build_seg, context)),
                ("pmap", supports_pmap(context, i), functools.partial(build_heatmap_pmap, context)),
            ]
            for kind, applies, build in wanted:
                if not applies:
                    continue
                try:
                    datasets.append((kind, build(i)))
                except Exception as exc:
                    log.error(
                        "job %d: no %s for %s: %s",
                        claim.job_id,
                        kind,
                        prediction.sop_instance_uid,
                        exc if isinstance(exc, DicomaiError) else type(exc).__name__,
                        exc_info=not isinstance(exc, DicomaiError),
                    )
        return self._write_if_held(held, claim, datasets)

    def _predecessors(self, claim: Claim, model_name: str) -> dict[str, Any]:
        """`predecessor`: the (study, series, SOP) UIDs of the SR that the latest earlier job
        of the same model name made for the study, before more images arrived (None for the
        first); `revision`: how many such SRs came before this one, plus one.

        Only SRs that were sent (given deliveries), where results are sent at all: a
        shadow's or a canary's silent SR never reached the PACS, and a reader told that it
        replaces it would look for the report there in vain.
        """
        sent = select(Delivery.id).where(Delivery.output_id == OutputObject.id).exists()
        with self.sessions() as session:
            rows = session.execute(
                select(OutputObject.series_uid, OutputObject.sop_instance_uid)
                .join(Job, OutputObject.job_id == Job.id)
                .join(ModelVersion, Job.model_version_id == ModelVersion.id)
                .join(Study, Job.study_id == Study.id)
                .where(
                    Study.study_uid == claim.study_uid,
                    ModelVersion.name == model_name,
                    OutputObject.kind == "sr",
                    # Earlier jobs only, so that a re-run of this job names the same one.
                    Job.id < claim.job_id,
                    sent if self.settings.destinations else true(),
                )
                .order_by(Job.id.desc(), OutputObject.id.desc())
            ).all()
        if not rows:
            return {"predecessor": None, "revision": 1}
        latest = rows[0]
        return {
            "predecessor": (claim.study_uid, latest.series_uid, latest.sop_instance_uid),
            "revision": len(rows) + 1,
        }

    def _record_report(
        self, claim: Claim, predictions: list[ImagePrediction], outputs: list[Output]
    ) -> list[int]:
        """Store the predictions and the SR with its deliveries; their ids.

        Raises
        ------
        _ClaimLost
            Another run holds the job now; nothing is stored.
        """
        with self.sessions() as session, session.begin():
            job = session.get_one(Job, claim.job_id)
            # The version's share lock before any row that references the job: a retirement
            # holds the versions, then locks the running jobs, so a prediction's insert (its
            # key-share lock on the job) before it deadlocked with one (PostgreSQL).
            _version_shared(session, job)
            if not _hold(session, claim):
                raise _ClaimLost(claim)
            _store_predictions(session, job, predictions)
            return self._record_outputs(session, job, claim, outputs)

    def _record_outputs(
        self, session: Session, job: Job, claim: Claim, outputs: list[Output]
    ) -> list[int]:
        version = _version_shared(session, job)
        # Whether it sends is decided under the study's lock, as a failing job's hand-over
        # (`report_instead`) decides under it: both at once, each saw the other's job still
        # running, and neither reported.
        lock_studies(session, [job.study_id])
        # Once the SR went out the overlays follow it, whatever changed since.
        sends = (
            job.reported
            or has_deliveries(session, job.id)
            or sends_results(session, version, claim.study_uid)
        )
        job.reported = sends
        deliveries: list[Delivery] = []
        for output in outputs:
            row = _upsert_output(session, job, output)
            if sends:
                deliveries += _add_deliveries(session, row, self.settings.destinations)
        session.flush()
        return [delivery.id for delivery in deliveries]

    def _finish(self, claim: Claim, outputs: list[Output], total: int, images: int) -> None:
        """Record the job's other objects and set it done, if the run still holds it.

        Raises
        ------
        _ClaimLost
            Another run holds the job now, or the reconciler failed it: nothing is recorded.
        """
        with self.sessions() as session, session.begin():
            job = session.get_one(Job, claim.job_id)
            _version_shared(session, job)  # before the job's lock, as in `_record_report`
            if not _hold(session, claim):
                raise _ClaimLost(claim)
            self._record_outputs(session, job, claim, outputs)
            job.state = JobState.DONE
            job.finished_at = database_now()
            job.error = None
            record(
                session,
                Action.JOB_DONE,
                actor=WORKER,
                object_type="job",
                object_id=job.id,
                study_uid=claim.study_uid,
                images=images,
                outputs=total,
                shadow=claim.shadow,
                sent=sends_results(session, job.model_version, claim.study_uid),
            )
        # Counted once committed: a rolled-back finish is failed instead, and counted there.
        JOBS.labels(state=JobOutcome.DONE).inc()

    def _fail(self, claim: Claim, exc: Exception) -> None:
        reason = str(exc) if isinstance(exc, DicomaiError) else type(exc).__name__
        expected = isinstance(exc, (DicomaiError, *TRANSIENT_DATABASE_ERRORS))
        log.error("job %d failed: %s", claim.job_id, reason, exc_info=not expected)
        permanent = isinstance(exc, ModelPackageError)
        with self.sessions() as session, session.begin():
            if not _hold(session, claim):
                # Its state is the run's that took it over (or the reconciler's failed).
                log.warning(
                    "job %d: attempt %d was taken over, not failed", claim.job_id, claim.attempt
                )
                return
            job = session.get_one(Job, claim.job_id)
            job.error = reason
            failed = permanent or job.attempts >= self.settings.worker.max_attempts
            if failed:
                lock_studies(session, [job.study_id])  # before the audit rows: see there
                job.state = JobState.FAILED
                job.finished_at = database_now()
                outcome, action = JobOutcome.FAILED, Action.JOB_FAILED
            else:
                # Back to the queue; the reconciler rings it again after its lease.
                job.state = JobState.QUEUED
                job.enqueued_at = database_now()
                outcome, action = JobOutcome.RETRYING, Action.JOB_ENQUEUED
            record(
                session,
                action,
                actor=WORKER,
                object_type="job",
                object_id=job.id,
                study_uid=claim.study_uid,
                reason=reason,
                attempt=job.attempts,
            )
            if failed and report_instead(session, job, WORKER):
                log.warning("job %d failed for good: another version reports instead", job.id)
        JOBS.labels(state=outcome).inc()


def _local(moment: datetime) -> datetime:
    return moment.astimezone().replace(tzinfo=None)


class _Stopwatch:
    """Seconds per phase of a run, for the worker's log: where a slow study's time went."""

    def __init__(self) -> None:
        self._last = time.perf_counter()
        self._laps: list[tuple[str, float]] = []

    def lap(self, what: str) -> None:
        now = time.perf_counter()
        self._laps.append((what, now - self._last))
        self._last = now

    def __str__(self) -> str:
        return ", ".join(f"{what} {seconds:.2f} s" for what, seconds in self._laps)


def _uid(source: SourceImage) -> str:
    return str(source.dataset.SOPInstanceUID)


def _running(*claims: Claim) -> ColumnElement[bool]:
    """The jobs of `claims` still running the attempt their claim set: still theirs."""
    return and_(
        Job.state == JobState.RUNNING,
        or_(*(and_(Job.id == c.job_id, Job.attempts == c.attempt) for c in claims)),
    )


def _hold(session: Session, claim: Claim) -> bool:
    """Lock the job's row for the transaction if the run still holds `claim` (and refresh
    its heartbeat); whether it does.

    Locked, the job cannot be taken over (the reconciler skips it, a claim waits) before what
    the transaction records is committed; not held, the transaction must write nothing.
    """
    result = session.execute(
        update(Job)
        .where(Job.id == claim.job_id, _running(claim))
        .values(heartbeat_at=database_now())
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def _version_shared(session: Session, job: Job) -> ModelVersion:
    """The job's version, read under a share lock: a retirement committing meanwhile (which
    locks the versions for update) waits, or is seen, never half-seen (PostgreSQL)."""
    return session.scalars(
        select(ModelVersion)
        .where(ModelVersion.id == job.model_version_id)
        .with_for_update(read=True)
    ).one()


def _write_outputs(
    spool: Spool, study_uid: str, datasets: list[tuple[str, Dataset]]
) -> list[Output]:
    """Write a job's objects into the study's folder of `spool`, all on disk when it returns.

    Like `Spool.write`, each file is written under a temporary name, fsynced, renamed, and
    the folder fsynced after the rename, so that nothing is recorded (and so delivered)
    before it is on disk; but the folder is fsynced once for all the job's files rather than
    once per file, and the files' data are fsynced after all are written, which lets the file
    system flush them together (100 overlays: 0.8 s one by one, 0.25 s together).

    Raises
    ------
    StorageUnavailable
        A file could not be written; no temporary file is left behind.
    """
    outputs = [
        Output(kind, dataset, spool.relative_path(study_uid, str(dataset.SOPInstanceUID)))
        for kind, dataset in datasets
    ]
    if not outputs:
        return outputs
    finals = [spool.path(output.path) for output in outputs]
    suffix = f"{os.getpid()}.{threading.get_ident()}.tmp"
    temporaries = [final.with_name(f".{final.name}.{suffix}") for final in finals]
    folder = finals[0].parent
    try:
        created = not folder.exists()
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if created:
            _fsync_path(folder.parent, os.O_RDONLY | os.O_DIRECTORY)
        for output, temporary in zip(outputs, temporaries, strict=True):
            with open(temporary, "wb", opener=_private) as file:
                output.dataset.save_as(file, enforce_file_format=True)
        for temporary in temporaries:
            _fsync_path(temporary, os.O_RDONLY)
        for temporary, final in zip(temporaries, finals, strict=True):
            os.replace(temporary, final)
        _fsync_path(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        for temporary in temporaries:
            with contextlib.suppress(OSError):
                temporary.unlink()
        raise StorageUnavailable(f"output write failed: {exc.strerror or exc}") from None
    return outputs


def _private(path: str, flags: int) -> int:
    """Open as the spool does: readable by the service user only."""
    return os.open(path, flags, 0o600)


def _fsync_path(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _store_predictions(session: Session, job: Job, predictions: list[ImagePrediction]) -> None:
    session.execute(delete(Prediction).where(Prediction.job_id == job.id))
    ids = {
        uid: instance_id
        for uid, instance_id in session.execute(
            select(Instance.sop_instance_uid, Instance.id).where(Instance.study_id == job.study_id)
        )
    }
    for prediction in predictions:
        top = prediction.top_finding
        session.add(
            Prediction(
                job_id=job.id,
                instance_id=ids[prediction.sop_instance_uid],
                label=top.name if top else prediction.predicted,
                probability=top.probability if top else None,
                positive=top.positive if top else None,
                uncertainty=prediction.uncertainty,
                evaluated=prediction.evaluated,
                reason=prediction.reason,
            )
        )


def _upsert_output(session: Session, job: Job, output: Output) -> OutputObject:
    uid = str(output.dataset.SOPInstanceUID)
    row = session.scalar(select(OutputObject).where(OutputObject.sop_instance_uid == uid))
    if row is None:
        row = OutputObject(
            job_id=job.id,
            kind=output.kind,
            sop_instance_uid=uid,
            sop_class_uid=str(output.dataset.SOPClassUID),
            series_uid=str(output.dataset.SeriesInstanceUID),
            path=output.path,
        )
        session.add(row)
        session.flush()
        record(
            session,
            Action.OUTPUT_CREATED,
            actor=WORKER,
            object_type="output",
            object_id=uid,
            study_uid=job.study.study_uid,
            kind=output.kind,
        )
    return row


def _add_deliveries(
    session: Session, output: OutputObject, destinations: list[Destination]
) -> list[Delivery]:
    """Queue `output` for each destination that takes its kind and does not have it yet."""
    existing = set(
        session.scalars(select(Delivery.destination).where(Delivery.output_id == output.id))
    )
    added = []
    for destination in destinations:
        if destination.name not in existing and output.kind in destination.kinds:
            # Due at once on the database's clock, on which attempts claim it.
            delivery = Delivery(
                output_id=output.id, destination=destination.name, next_attempt_at=database_now()
            )
            session.add(delivery)
            added.append(delivery)
    return added


def _as_registered(path: Path, manifest: dict[str, Any] | None) -> None:
    """Refuse a registry folder whose manifest is not the registered one: classes swapped or a
    threshold set to 0 by hand ran under the registered label, while `models show` showed the
    registered manifest."""
    if manifest is None:
        return
    try:
        with open(path / "model.toml", "rb") as handle:
            on_disk = json.loads(json.dumps(tomllib.load(handle)))
    except (OSError, tomllib.TOMLDecodeError, TypeError, ValueError) as error:
        raise ModelPackageError(f"{path}/model.toml cannot be read: {error}") from None
    if on_disk != manifest:
        changed = sorted(
            k for k in set(on_disk) | set(manifest) if on_disk.get(k) != manifest.get(k)
        )
        raise ModelPackageError(
            f"{path}/model.toml differs from the registered manifest ({', '.join(changed)}): "
            "register the package again as a new version"
        )
