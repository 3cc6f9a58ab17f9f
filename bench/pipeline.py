"""Pipeline throughput: images/s through dicomai's worker inference path against plain torch.

Part 1, preprocessed tensors, the same ones and the same batch for every path: plain torch
forward (``model(x)`` under ``torch.inference_mode()``, default memory format) and a textbook
Grad-CAM (hooks, a full backward with the parameters' gradients, whose forward also gives the
scores) against `Classifier.predict` without and with a finding class (forward only; forward +
Grad-CAM). Also the GFLOP/s each path achieves (FLOPs counted by
``torch.utils.flop_counter.FlopCounterMode``) against a 4096² fp32 matrix product measured in
the same run, the machine's practical peak.

Part 2, DICOM files through `JobRunner.run_job` (read from the spool, decode, preprocess,
classify, Grad-CAM, SR and overlay encoded and written, SQL state): 1-image studies run one
job at a time against the same studies batched across jobs, and one study of `batch` images
decoded serially against on `[worker] decode_threads` threads. Delivery is not configured.

    .venv/bin/python bench/pipeline.py                      # resnet50 at 224² and the demo
    .venv/bin/python bench/pipeline.py --models tinycnn --threads 2 --batch 8
    .venv/bin/python bench/pipeline.py --device cuda --batch 64    # on a GPU, bf16 autocast
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pydicom
import torch
from sqlalchemy import select, update
from torch.utils.flop_counter import FlopCounterMode

from dicomai.audit import Operator, os_user
from dicomai.config import load_settings
from dicomai.db.migrate import upgrade
from dicomai.db.models import Job, JobState
from dicomai.db.session import make_engine, make_sessionmaker
from dicomai.explain import find_target_layer
from dicomai.inference.runner import Classifier
from dicomai.ingest.spool import Spool
from dicomai.jobs.assembler import complete_quiet_studies
from dicomai.jobs.runner import JobRunner
from dicomai.models.architectures import build
from dicomai.models.package import ClassSpec, LoadedModel, load_model, write_package
from dicomai.rollout.deployment import activate
from dicomai.rollout.registry import register
from dicomai.training.synthetic import write_dicom_images

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from inference import textbook_gradcam
from recording import record_dataset

PEAK = "fp32 matmul 4096² (peak)"
REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "models" / "demo-chest-nodule"


def interleaved(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each of `runs` after one warm-up each, taken in rounds of one run
    of each, so that a change in the load of a shared machine falls on all of them alike."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def flops(run: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        run()
    return int(counter.get_total_flops())


def matmul(n: int = 4096, device: str = "cpu") -> Callable[[], object]:
    """An n-by-n fp32 matrix product: what this machine's cores (or its GPU) can do at best."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return lambda: a @ b


def synced(run: Callable[[], object], device: str) -> Callable[[], object]:
    """`run`, returning only when the GPU has finished it (CUDA calls return at once)."""
    if not device.startswith("cuda"):
        return run

    def run_and_wait() -> object:
        result = run()
        torch.cuda.synchronize(device)
        return result

    return run_and_wait


def demo_package(architecture: str, folder: Path) -> Path:
    """The demo package, or the demo's manifest on `architecture` at 224² (random weights)."""
    if architecture == "tinycnn":
        return DEMO
    demo = load_model(DEMO).manifest
    manifest = replace(
        demo,
        name=f"bench-{architecture}",
        architecture=architecture,
        options={},
        input=replace(demo.input, size=(224, 224)),
    )
    torch.manual_seed(0)
    write_package(folder, manifest, build(architecture, len(demo.classes)).state_dict())
    return folder


def without_findings(loaded: LoadedModel) -> LoadedModel:
    classes = tuple(ClassSpec(c.name, c.code, c.threshold, False) for c in loaded.manifest.classes)
    return replace(loaded, manifest=replace(loaded.manifest, classes=classes))


def tensor_paths(
    package: Path, batch: int, repeats: int, device: str = "cpu", precision: str = "auto"
) -> dict[str, tuple[float, int]]:
    """(seconds per batch, FLOPs per batch) of each path on one batch of random tensors.

    Plain torch runs in fp32 in the default memory format on `device`; the Classifier with
    `precision` (autocast on a GPU by default) and its own memory format.
    """
    loaded = load_model(package)
    # Classifier makes its own channels_last copy
    plain = copy.deepcopy(loaded.module).eval().to(device)
    rows, cols = loaded.manifest.input.size
    torch.manual_seed(1)
    x = torch.randn(batch, 3, rows, cols)
    images = [(str(i), x[i].numpy()) for i in range(batch)]
    x = x.to(device)
    layer = find_target_layer(plain, x)
    options: dict[str, Any] = {"batch_size": batch, "device": device, "precision": precision}
    forward_only = Classifier(without_findings(loaded), **options)
    with_cam = Classifier(loaded, **options)

    def plain_forward() -> None:
        with torch.inference_mode():
            plain(x)

    paths: dict[str, Callable[[], object]] = {
        PEAK: matmul(device=device),
        "plain fwd": plain_forward,
        "plain fwd+CAM": lambda: textbook_gradcam(plain, layer, x),
        "dicomai fwd": lambda: forward_only.predict(images),
        "dicomai fwd+CAM": lambda: with_cam.predict(images),
    }
    paths = {name: synced(run, device) for name, run in paths.items()}
    seconds = interleaved(paths, repeats)
    return {name: (seconds[name], flops(run)) for name, run in paths.items()}


class Site:
    """A database, spool and registry in a temporary folder, with one model active
    (`create` False: the site another process made there)."""

    def __init__(
        self,
        root: Path,
        package: Path,
        image_size: int = 1024,
        create: bool = True,
        device: str = "cpu",
    ) -> None:
        self.root = root
        self.device = device
        self.image_size = image_size
        self.settings = load_settings(None, storage={"dir": root / "var", "min_free_mb": 0})
        self.sessions = make_sessionmaker(make_engine(self.settings.database_url))
        self.spool = Spool(self.settings.spool_dir)
        if create:
            upgrade(self.settings.database_url)
            with self.sessions() as session, session.begin():
                operator = Operator(os_user(), "bench")
                version = register(session, package, self.settings.registry_dir, operator)
                activate(session, version.name, version.version, operator)
        self._seed = 0

    def ingest(self, studies: int, images: int, size: int) -> list[int]:
        """Store `studies` studies of `images` DX images each; return their queued jobs."""
        self._seed += 1
        written = write_dicom_images(
            self.root / f"in-{self._seed}", studies * images, seed=self._seed, size=size
        )
        for n, item in enumerate(written):
            ds = pydicom.dcmread(item.path)
            study = written[n - n % images].study_uid
            ds.StudyInstanceUID = study
            record_dataset(self.spool, self.sessions, ds, "BENCH")
        return complete_quiet_studies(self.sessions, 0)

    def runner(self, **worker: object) -> JobRunner:
        """A runner with `[worker]` options `worker`, its model loaded and warmed up."""
        settings = self.settings.model_copy(
            update={"worker": self.settings.worker.model_copy(update=worker)}
        )
        runner = JobRunner(settings, self.sessions, device=self.device)
        self._requeue([])
        runner.run_job(self._warm_up_job)
        return runner

    def run_jobs(self, runner: JobRunner, job_ids: list[int]) -> None:
        """Run `job_ids` again, as their doorbells would (a job batched earlier is skipped)."""
        self._requeue(job_ids)
        for job_id in job_ids:
            runner.run_job(job_id)
        with self.sessions() as session:
            states = session.scalars(select(Job.state).where(Job.id.in_(job_ids))).all()
        assert set(states) == {JobState.DONE}, states

    def prepare_warm_up(self, size: int) -> None:
        (self._warm_up_job,) = self.ingest(1, 1, size)

    def _requeue(self, job_ids: list[int]) -> None:
        with self.sessions() as session, session.begin():
            session.execute(
                update(Job)
                .where(Job.id.in_(job_ids or [self._warm_up_job]))
                .values(state=JobState.QUEUED, attempts=0)
            )


def worker_paths(
    package: Path,
    root: Path,
    batch: int,
    size: int,
    repeats: int,
    device: str = "cpu",
    precision: str = "auto",
) -> dict[str, float]:
    """Images/s through `JobRunner` for the worker's ways of running jobs."""
    site = Site(root, package, device=device)
    site.prepare_warm_up(size)
    singles = site.ingest(batch, 1, size)
    (study,) = site.ingest(1, batch, size)
    alone = {
        "batch_window_seconds": 0,
        "decode_threads": 2,
        "max_batch_images": batch,
        "precision": precision,
    }
    one_by_one = site.runner(**alone)
    batched = site.runner(**{**alone, "batch_window_seconds": 0.05})
    serial = site.runner(**{**alone, "decode_threads": 0})
    runs: dict[str, Callable[[], object]] = {
        f"{batch} 1-image jobs, one by one": lambda: site.run_jobs(one_by_one, singles),
        f"{batch} 1-image jobs, batched": lambda: site.run_jobs(batched, singles),
        f"1 job of {batch} images, serial decode": lambda: site.run_jobs(serial, [study]),
        f"1 job of {batch} images, 2 decode threads": lambda: site.run_jobs(one_by_one, [study]),
    }
    return {name: batch / seconds for name, seconds in interleaved(runs, repeats).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["resnet50", "tinycnn"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=1024, help="rows = columns of the DX")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="dicomai's [worker] precision (plain torch stays fp32)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(
        f"torch {torch.__version__}, {where}, {args.threads} threads, batch {args.batch}, "
        f"dicomai precision {args.precision}\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for architecture in args.models:
            package = demo_package(architecture, Path(tmp) / architecture)
            reference = report_tensors(architecture, package, args)
            site = Path(tmp) / f"site-{architecture}"
            report_worker(architecture, package, site, args, reference)


def report_tensors(architecture: str, package: Path, args: argparse.Namespace) -> float:
    """Print the tensor paths; return the seconds of a batch through Classifier with CAM."""
    size = load_model(package).manifest.input.size
    r = tensor_paths(package, args.batch, args.repeats, args.device, args.precision)
    peak = r[PEAK][1] / r[PEAK][0]
    torch.set_num_threads(args.threads)  # Classifier set it to the cores of the affinity
    print(f"### {architecture}, {size[0]}², batch {args.batch}, medians of {args.repeats}")
    print("| path | ms/batch | images/s | GFLOP/batch | GFLOP/s | of peak |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, (seconds, count) in r.items():
        if name == PEAK:
            print(f"| {name} | {seconds * 1000:.0f} | | {count / 1e9:.1f} | {peak / 1e9:.0f} | |")
            continue
        print(
            f"| {name} | {seconds * 1000:.0f} | {args.batch / seconds:.1f} | {count / 1e9:.1f} "
            f"| {count / seconds / 1e9:.0f} | {count / seconds / peak:.0%} |"
        )
    fwd = r["plain fwd"][0] / r["dicomai fwd"][0]
    cam = r["plain fwd+CAM"][0] / r["dicomai fwd+CAM"][0]
    own = r["dicomai fwd+CAM"][0] / r["dicomai fwd"][0]
    print(
        f"\nimages/s, dicomai ÷ plain: forward {fwd:.2f}× (goal ≥ 0.9), with Grad-CAM "
        f"{cam:.2f}× (goal ≥ 1.5); dicomai forward+Grad-CAM ÷ forward alone: {own:.2f} "
        "(goal ≤ 2)\n",
        flush=True,
    )
    return r["dicomai fwd+CAM"][0]


def report_worker(
    architecture: str, package: Path, root: Path, args: argparse.Namespace, reference: float
) -> None:
    tensors = args.batch / reference
    print(f"#### {architecture}: JobRunner from {args.image_size}² DX files, images/s")
    print("| path | images/s | ÷ Classifier on tensors |")
    print("| --- | ---: | ---: |")
    print(f"| Classifier fwd+CAM on tensors, batch {args.batch} | {tensors:.1f} | 1.00 |")
    rates = worker_paths(
        package,
        root,
        args.batch,
        args.image_size,
        max(1, args.repeats // 2),
        args.device,
        args.precision,
    )
    for name, rate in rates.items():
        print(f"| {name} | {rate:.1f} | {rate / tensors:.2f} |", flush=True)
    print()


if __name__ == "__main__":
    main()
