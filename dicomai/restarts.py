"""How soon `serve` starts a child process again after it exited."""

from __future__ import annotations


class RestartBackoff:
    """Restart at once a child that ran a while; one that keeps exiting soon after it
    started (a GPU it cannot open, a model it cannot load) waits twice as long each time,
    up to `most` seconds, instead of reloading torch every few seconds on the cores the
    listener needs.

    Parameters
    ----------
    quick
        A child that exits sooner than this after its start counts as failing to start.
    first, most
        The first and the longest wait, in seconds.
    """

    def __init__(self, quick: float = 30.0, first: float = 1.0, most: float = 60.0) -> None:
        self.quick, self.first, self.most = quick, first, most
        self._started: dict[str, float] = {}
        self._wait: dict[str, float] = {}

    def started(self, name: str, now: float) -> None:
        self._started[name] = now

    def exited(self, name: str, now: float) -> float:
        """Seconds to wait before starting `name` again, which exited at `now`."""
        if now - self._started.get(name, now) >= self.quick:
            self._wait.pop(name, None)
            return 0.0
        wait = min(self.most, 2 * self._wait[name]) if name in self._wait else self.first
        self._wait[name] = wait
        return wait
