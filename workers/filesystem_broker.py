"""The embedded broker: kombu's filesystem transport, with messages that appear whole."""

from __future__ import annotations

import os
import uuid
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        """Write the message aside, then rename it into the queue.

        kombu creates the message file under its final name and then writes it; a worker
        listing the folder in between took the empty file, failed to parse it and stopped
        ("Unrecoverable error: JSONDecodeError"), and its job waited minutes for the
        reconciler. A rename within the folder is atomic: the file appears whole.
        """
        folder = self.data_folder_out
        final = os.path.join(folder, f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg")
        # No "<queue>.msg" after its first dot: the consumer does not take it for a message.
        partial = os.path.join(folder, f".{uuid.uuid4()}.partial")
        try:
            with open(partial, "wb") as handle:
                handle.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as exc:
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


class Transport(filesystem.Transport):
    Channel = Channel
