"""End-to-end latency: last image of a study sent -> its SR in Orthanc, minus the quiet period.

Runs `dicomai serve` (embedded broker, SQLite, the demo model, quiet period 1 s) with Orthanc as
the destination, sends studies one after another with dcmtk storescu, and prints p50 and p95 of
(SR indexed in Orthanc - last C-STORE answered - quiet period) for 1-image and 100-image studies,
next to the model's own time for the same images and the time to build and write their results
(SR, overlays, files) without the daemon, both measured in this run, and the load average.

    .venv/bin/python bench/latency.py [--studies 10] [--big-studies 3] [--back-to-back]

Each study is sent once the daemon is idle (no job queued or running, no delivery pending), so
that its latency is its own: sent right after the previous SR, a 100-image study waited on the
previous job's overlays (built and sent after its SR, 2-3 s here). `--back-to-back` sends it
then all the same, as before stop 19.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pydicom

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from daemon import Daemon, dicomai, write_config  # noqa: E402
from servers import OrthancServer, free_port  # noqa: E402

from dicomai.training.synthetic import write_dicom_images  # noqa: E402

QUIET = 1.0


def study_files(folder: Path, images: int, seed: int) -> tuple[str, list[Path]]:
    written = write_dicom_images(folder, images, seed=seed, size=512)
    study = written[0].study_uid
    for item in written[1:]:
        ds = pydicom.dcmread(item.path)
        ds.StudyInstanceUID = study
        ds.save_as(item.path)
    return study, [w.path for w in written]


def sr_arrived(orthanc: OrthancServer, study: str) -> bool:
    found = orthanc.post_json(
        "/tools/find",
        f'{{"Level": "Instance", "Query": {{"StudyInstanceUID": "{study}", "Modality": "SR"}}}}',
    )
    return bool(found)


def run(
    orthanc: OrthancServer,
    port: int,
    folder: Path,
    images: int,
    count: int,
    details: Callable[[], str] | None = None,
    first_seed: int | None = None,
    idle: Callable[[], bool] | None = None,
) -> list[float]:
    latencies = []
    for n in range(count):
        seed = (1000 * images if first_seed is None else first_seed) + n
        study, files = study_files(folder / f"{images}-{n}", images, seed=seed)
        started = time.perf_counter()
        while idle is not None and not idle():
            if time.perf_counter() - started > 300:
                raise SystemExit(f"the daemon was still busy 300 s before study {n}")
            time.sleep(0.05)
        subprocess.run(
            ["storescu", "-aec", "DICOMAI", "127.0.0.1", str(port), *map(str, files)],
            check=True,
            capture_output=True,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        sent = time.perf_counter()
        time.sleep(QUIET)  # nothing can arrive sooner; then look every 10 ms, not backing off
        while not sr_arrived(orthanc, study):
            if time.perf_counter() - sent > 300:
                log = details() if details else ""
                raise SystemExit(f"timed out waiting for the SR of study {n}:\n{log}")
            time.sleep(0.01)
        latencies.append(time.perf_counter() - sent - QUIET)
    return latencies


def daemon_idle(config: Path) -> Callable[[], bool]:
    """Whether the daemon has no job queued or running and no delivery pending."""
    from sqlalchemy import func, select

    from dicomai.config import load_settings
    from dicomai.db.models import Delivery, DeliveryState, Job, JobState
    from dicomai.db.session import make_engine, make_sessionmaker

    sessions = make_sessionmaker(make_engine(load_settings(config).database_url))
    busy = (JobState.QUEUED, JobState.RUNNING)

    def idle() -> bool:
        with sessions() as session:
            jobs = session.scalar(select(func.count()).select_from(Job).where(Job.state.in_(busy)))
            pending = session.scalar(
                select(func.count())
                .select_from(Delivery)
                .where(Delivery.state == DeliveryState.PENDING)
            )
        return not jobs and not pending

    return idle


def model_seconds(images: int) -> float:
    from dicomai.imaging.preprocess import prepare
    from dicomai.inference.runner import Classifier
    from dicomai.models.package import load_model

    classifier = Classifier(load_model(REPO / "models" / "demo-chest-nodule"))
    with tempfile.TemporaryDirectory() as tmp:
        _, files = study_files(Path(tmp), images, seed=7)
        inputs = [
            (str(i), prepare(pydicom.dcmread(f), classifier.loaded.manifest.input)[1])
            for i, f in enumerate(files)
        ]
        start = time.perf_counter()
        classifier.predict(inputs)
        return time.perf_counter() - start


def results_seconds(images: int) -> tuple[float, float, float]:
    """Seconds to build the SR, build the overlays and write them all for one study of
    `images`, on the job runner's path without the daemon (warm: after a 1-image study)."""
    from dicomai.imaging.preprocess import prepare
    from dicomai.inference.runner import Classifier
    from dicomai.ingest.spool import Spool
    from dicomai.jobs.runner import _write_outputs
    from dicomai.models.package import load_model
    from dicomai.results.context import ModelIdentity, ResultContext, SourceImage
    from dicomai.results.sc import OverlayBuilder
    from dicomai.results.sr import build_sr

    classifier = Classifier(load_model(REPO / "models" / "demo-chest-nodule"))
    manifest = classifier.loaded.manifest
    model = ModelIdentity(
        manifest.name, manifest.version, manifest.architecture, manifest.weights_sha256
    )
    with tempfile.TemporaryDirectory() as tmp:
        timings = []
        for count in (1, images):
            study, files = study_files(Path(tmp) / str(count), count, seed=9)
            sources = []
            for file in files:
                dataset = pydicom.dcmread(file)
                sources.append(SourceImage(dataset, prepare(dataset, manifest.input)[0]))
            inputs = [
                (str(s.dataset.SOPInstanceUID), prepare(s.dataset, manifest.input)[1])
                for s in sources
            ]
            found = {p.sop_instance_uid: p for p in classifier.predict(inputs)}
            context = ResultContext(
                sources=tuple(sources),
                predictions=tuple(found[uid] for uid, _ in inputs),
                model=model,
                input_digest="bench",
            )
            start = time.perf_counter()
            datasets = [("sr", build_sr(context))]
            built_sr = time.perf_counter()
            overlays = OverlayBuilder(context)
            datasets += [
                ("sc", overlays.build(i))
                for i, p in enumerate(context.predictions)
                if p.evaluated and p.heatmap is not None
            ]
            built_sc = time.perf_counter()
            _write_outputs(Spool(Path(tmp) / f"outputs-{count}"), study, datasets)
            timings = [built_sr - start, built_sc - built_sr, time.perf_counter() - built_sc]
    return timings[0], timings[1], timings[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--big-studies", type=int, default=3)
    parser.add_argument(
        "--phases", action="store_true", help="print where the worker's time went, per run"
    )
    parser.add_argument(
        "--back-to-back",
        action="store_true",
        help="send each study as soon as the previous SR arrived, not once the daemon is idle",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name, OrthancServer(Path(tmp_name) / "pacs") as pacs:
        tmp = Path(tmp_name)
        port = free_port()
        config = write_config(
            tmp / "dicomai.toml",
            {
                "ingest": {
                    "port": port,
                    "host": "127.0.0.1",
                    "study_quiet_seconds": QUIET,
                    "allow_any": True,
                },
                "storage": {"dir": str(tmp / "var"), "min_free_mb": 0},
                "worker": {"device": "cpu"},
            },
            {
                "destinations": [
                    {
                        "name": "pacs",
                        "ae_title": pacs.aet,
                        "host": "127.0.0.1",
                        "port": pacs.dicom_port,
                    }
                ]
            },
        )
        dicomai(config, "db", "upgrade")
        dicomai(config, "models", "register", str(REPO / "models" / "demo-chest-nodule"))
        dicomai(config, "models", "activate", "demo-chest-nodule", "1.0.0")
        daemon = Daemon(config, tmp / "serve.log")
        daemon.start()
        try:
            daemon.wait_listening(port, "ANY", "DICOMAI")
            # Warm-up: the worker loads the model on its first job (a study of its own).
            run(pacs, port, tmp / "warm-up", 1, 1, details=daemon.log, first_seed=1)
            idle = None if args.back_to_back else daemon_idle(config)
            for images, count in ((1, args.studies), (100, args.big_studies)):
                latencies = sorted(
                    run(pacs, port, tmp, images, count, details=daemon.log, idle=idle)
                )
                p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
                print(
                    f"{images:>3}-image studies (n={count}): overhead beyond the quiet period "
                    f"p50 {statistics.median(latencies):.2f} s, p95 {p95:.2f} s; model alone "
                    f"{model_seconds(images):.2f} s; results alone (SR, overlays, writing) "
                    + ", ".join(f"{seconds:.2f}" for seconds in results_seconds(images))
                    + f" s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
                    flush=True,
                )
            if args.phases:
                for line in daemon.log().splitlines():
                    if "read and classified" in line:
                        print(line)
        finally:
            daemon.stop()


if __name__ == "__main__":
    main()
