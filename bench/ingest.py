"""Ingest benchmark: the same corpus sent with dcmtk storescu into storescp, Orthanc and dicomai.

Prints images/s for each receiver, corpus and number of concurrent senders, and dicomai's ratio
against each reference measured in the same run. Not a test: timings live here, not in tests/.

    .venv/bin/python bench/ingest.py [--ct 500] [--dx 50] [--senders 1 4]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from servers import OrthancServer, free_port, spawn, stop_process, wait_for  # noqa: E402

PDU = 131072
NODELAY = {"TCP_NODELAY": "1"}  # FACTS.md: dcmtk leaves Nagle on; 40 ms a message without it


def write_corpus(folder: Path, kind: str, count: int, side: int, per_study: int) -> list[Path]:
    """`count` uncompressed images of `side`² pixels, `per_study` to a study, random content."""
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    rng = np.random.default_rng(0)
    paths = []
    study = series = ""
    for number in range(count):
        if number % per_study == 0:
            study, series = generate_uid(), generate_uid()
        ds = template.copy()
        ds.file_meta = template.file_meta.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.Rows = ds.Columns = side
        ds.PixelData = rng.integers(0, 4096, (side, side), dtype=np.uint16).tobytes()
        ds.InstanceNumber = number + 1
        if kind == "DX":
            ds.Modality = "DX"
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{kind}_{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def send(port: int, aec: str, files: list[Path], senders: int) -> float:
    """Seconds for `senders` storescu processes to send `files` between them."""
    shares = [files[i::senders] for i in range(senders)]
    start = time.perf_counter()
    processes = [
        subprocess.Popen(
            [
                "storescu",
                "-aet",
                "BENCH",
                "-aec",
                aec,
                "-pdu",
                str(PDU),
                "127.0.0.1",
                str(port),
                *map(str, share),
            ],
            env={**os.environ, **NODELAY},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for share in shares
    ]
    for process in processes:
        _, err = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"storescu failed: {err.decode()[-500:]}")
    return time.perf_counter() - start


@contextmanager
def storescp(tmp: Path) -> Iterator[tuple[int, str]]:
    port = free_port()
    out = tmp / "storescp"
    out.mkdir()
    process = spawn(
        ["storescp", "--fork", "-pdu", str(PDU), "-od", str(out), str(port)],
        tmp / "storescp.log",
        NODELAY,
    )
    wait_for(lambda: _echo(port, "ANY-SCP"), 30, "storescp")
    try:
        yield port, "ANY-SCP"
    finally:
        stop_process(process)


@contextmanager
def orthanc(tmp: Path) -> Iterator[tuple[int, str]]:
    with OrthancServer(tmp / "orthanc", MaximumPduLength=PDU) as server:
        yield server.dicom_port, server.aet


@contextmanager
def dicomai(tmp: Path, processes: int) -> Iterator[tuple[int, str]]:
    port = free_port()
    config = tmp / "dicomai.toml"
    config.write_text(
        f'[ingest]\nae_title = "DICOMAI"\nhost = "127.0.0.1"\nport = {port}\n'
        f"study_quiet_seconds = 3600\nallow_any = true\nmax_pdu = {PDU}\n"
        f"listener_processes = {processes}\n"
        f'[storage]\ndir = "{tmp / "var"}"\nmin_free_mb = 0\n[worker]\nembedded = false\n'
    )
    command = [sys.executable, "-m", "dicomai", "--config", str(config)]
    subprocess.run([*command, "db", "upgrade"], check=True, capture_output=True)
    # INFO: our listener logs nothing per store at INFO (pynetdicom is held at WARNING), and
    # each listener process says "listening as" when it accepts.
    log = tmp / "dicomai.log"
    process = spawn([*command, "serve"], log, {"DICOMAI_LOG_LEVEL": "INFO"})
    wait_for(lambda: _echo(port, "DICOMAI"), 60, "dicomai serve")
    # The children start a second or two after the main process: measured before that, the
    # main process alone would take every sender.
    wait_for(
        lambda: log.read_text(errors="replace").count("listening as") >= processes,
        60,
        f"{processes} dicomai listener processes",
    )
    try:
        yield port, "DICOMAI"
    finally:
        stop_process(process)


def _echo(port: int, aec: str) -> bool:
    result = subprocess.run(
        ["echoscu", "-aec", aec, "127.0.0.1", str(port)],
        capture_output=True,
        env={**os.environ, **NODELAY},
        check=False,
    )
    return result.returncode == 0


def measure(receiver: Callable[[Path], object], files: list[Path], senders: int) -> float:
    with (
        tempfile.TemporaryDirectory(dir=REPO / "var") as tmp,
        receiver(Path(tmp)) as (port, aec),  # type: ignore[attr-defined]
    ):
        seconds = send(port, aec, files, senders)
    return len(files) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", type=int, default=500)
    parser.add_argument("--dx", type=int, default=50)
    parser.add_argument("--senders", type=int, nargs="+", default=[1, 4])
    parser.add_argument(
        "--listener-processes",
        type=int,
        default=0,
        help="dicomai listener processes (default: one per sender, at most one per core)",
    )
    args = parser.parse_args()
    (REPO / "var").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=REPO / "var") as corpus_dir:
        corpus = Path(corpus_dir)
        corpora = {
            f"{args.ct} CT 512²": write_corpus(corpus, "CT", args.ct, 512, 100),
            f"{args.dx} DX 2048²": write_corpus(corpus, "DX", args.dx, 2048, 10),
        }
        print(
            f"{'corpus':<14} {'senders':>7} {'storescp':>9} {'orthanc':>8} {'dicomai':>8}"
            f" {'×storescp':>9} {'×orthanc':>8} {'load':>5}"
        )
        for name, files in corpora.items():
            for senders in args.senders:
                processes = args.listener_processes or min(senders, os.cpu_count() or 1)
                rates = {
                    "storescp": measure(storescp, files, senders),
                    "orthanc": measure(orthanc, files, senders),
                    "dicomai": measure(lambda tmp, p=processes: dicomai(tmp, p), files, senders),
                }
                print(
                    f"{name:<14} {senders:>7} {rates['storescp']:>9.1f} {rates['orthanc']:>8.1f}"
                    f" {rates['dicomai']:>8.1f} {rates['dicomai'] / rates['storescp']:>9.2f}"
                    f" {rates['dicomai'] / rates['orthanc']:>8.2f}"
                    # 1-minute load average: other work on the machine skews every column.
                    f" {os.getloadavg()[0]:>5.1f}",
                    flush=True,
                )
        shutil.rmtree(corpus, ignore_errors=True)


if __name__ == "__main__":
    main()
