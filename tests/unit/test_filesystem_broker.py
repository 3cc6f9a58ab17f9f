"""The embedded broker's messages appear in the queue folder whole, never half written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from kombu import Connection

from dicomai.config import load_settings
from workers.app import make_app


def test_a_message_is_in_the_queue_folder_only_once_written_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # kombu wrote the message file in place: a worker listing the folder meanwhile took it
    # empty, failed to parse it and stopped (JSONDecodeError).
    settings = load_settings(None, storage={"dir": tmp_path / "var"})
    app = make_app(settings)
    queue_folder = settings.broker_dir / "queue"
    seen: list[list[str]] = []
    replace = os.replace

    def watched(source: str, target: str) -> None:
        seen.append([n for n in os.listdir(queue_folder) if n.endswith(".msg")])
        json.loads(Path(source).read_bytes())  # the file to be renamed is complete
        replace(source, target)

    monkeypatch.setattr(os, "replace", watched)
    with app.connection_for_write() as connection:
        assert isinstance(connection, Connection)
        queue = connection.SimpleQueue("dicomai.test")
        queue.put({"job": 1})
        monkeypatch.setattr(os, "replace", replace)
        assert queue.get(timeout=5).payload == {"job": 1}
        queue.close()
    assert seen == [[]], "a message file was visible before it was complete"
