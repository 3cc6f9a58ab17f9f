"""Running dicomai itself in tests: the CLI as a subprocess and `dicomai serve` as a daemon."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from servers import echoscu, free_port, log_tail, spawn, stop_process, wait_for

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "models" / "demo-chest-nodule"


def any_modality_package(tmp: Path) -> Path:
    """The demo package renamed and opened to every modality, so pydicom's samples apply."""
    folder = tmp / "demo-any"
    shutil.copytree(DEMO, folder)
    manifest = (folder / "model.toml").read_text()
    manifest = manifest.replace('name = "demo-chest-nodule"', 'name = "demo-any"', 1)
    lines = [line for line in manifest.splitlines() if not line.startswith("modalities")]
    (folder / "model.toml").write_text("\n".join(lines) + "\n")
    return folder


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(
    path: Path, tables: dict[str, dict[str, Any]], arrays: dict[str, list[dict[str, Any]]]
) -> Path:
    """Write a TOML file from plain tables (`[name]`) and arrays of tables (`[[name]]`)."""
    lines: list[str] = []
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    for name, items in arrays.items():
        for item in items:
            lines.append(f"[[{name}]]")
            lines += [f"{k} = {toml_value(v)}" for k, v in item.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def dicomai(
    config: Path,
    *args: str,
    check: bool = True,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Run the `dicomai` command with `config`; fail the test with its output if it fails."""
    result = subprocess.run(
        [sys.executable, "-m", "dicomai", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if check and result.returncode != 0:
        pytest.fail(
            f"dicomai {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}"
        )
    return result


class Daemon:
    """`dicomai serve` (or `dicomai worker`) as a child process, with its log in a file."""

    def __init__(self, config: Path, log_path: Path, command: str = "serve") -> None:
        self.config = config
        self.log_path = log_path
        self.command = command
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = spawn(
            [sys.executable, "-m", "dicomai", "--config", str(self.config), self.command],
            self.log_path,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def wait_listening(self, port: int, aet: str, aec: str, timeout: float = 90) -> None:
        def answers() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                pytest.fail(
                    f"dicomai {self.command} exited {self.process.returncode}:\n"
                    f"{log_tail(self.log_path)}"
                )
            return echoscu(port, aet=aet, aec=aec, timeout=10).returncode == 0

        wait_for(answers, timeout, f"dicomai {self.command} answering C-ECHO on port {port}")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Listener(Daemon):
    """`dicomai serve` without models or worker: only the listener and study assembly."""

    def __init__(self, root: Path, aet: str, peers: list[dict[str, Any]], **ingest: Any) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.aet = aet
        self.peers = peers
        self.processes = int(ingest.get("listener_processes", 1))
        config = write_config(
            root / "dicomai.toml",
            {
                "ingest": {
                    "ae_title": aet,
                    "host": "127.0.0.1",
                    "port": self.port,
                    "study_quiet_seconds": 0.5,
                    **ingest,
                },
                "storage": {"dir": str(root / "var"), "min_free_mb": 0},
                "worker": {"embedded": False},
            },
            {"ingest.peers": peers},
        )
        super().__init__(config, root / "serve.log")

    def __enter__(self) -> Listener:
        self._context = self.started()
        return self._context.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._context.__exit__(*exc)

    @contextmanager
    def started(self, ready: Callable[[], bool] | None = None) -> Iterator[Listener]:
        """Upgrade the database, start serving, and wait until `ready` (default: C-ECHO)."""
        dicomai(self.config, "db", "upgrade")
        self.start()
        try:
            if ready is None:
                self.wait_listening(self.port, self.peers[0]["ae_title"], self.aet)
                # C-ECHO is answered by the first process up; each logs when it listens.
                processes = self.processes
                wait_for(
                    lambda: self.log().count("listening as") >= processes,
                    90,
                    f"all {processes} listener processes to listen",
                    details=self.log,
                )
            else:
                wait_for(ready, 90, "the listener to accept a store", details=self.log)
            yield self
        finally:
            self.stop()

    def query(self, sql: str, **params: object) -> list[tuple[Any, ...]]:
        from sqlalchemy import create_engine, text

        engine = create_engine(f"sqlite:///{self.root / 'var' / 'dicomai.db'}")
        try:
            with engine.connect() as connection:
                return [tuple(row) for row in connection.execute(text(sql), params)]
        finally:
            engine.dispose()

    def spool_files(self) -> list[Path]:
        return sorted(p for p in (self.root / "var" / "spool").rglob("*") if p.is_file())


__all__ = ["Daemon", "Listener", "dicomai", "free_port", "write_config"]


def accepted_by_process(parent: int, port: int) -> dict[int, int]:
    """Established connections on local `port`, counted by the process holding each (the
    serve process `parent` and its listener children)."""
    pids = [parent]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == parent and b"--listener-only" in cmdline:
            pids.append(int(stat.parent.name))
    owner = {}
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                owner[target[8:-1]] = pid
    counts = dict.fromkeys(pids, 0)
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        columns = line.split()
        local_port = int(columns[1].split(":")[1], 16)
        if local_port == port and columns[3] == "01" and columns[9] in owner:
            counts[owner[columns[9]]] += 1
    return counts
