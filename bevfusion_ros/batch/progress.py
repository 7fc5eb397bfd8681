"""Progress of a batch run across all its workers: bags and frames done, frames/s, ETA."""
from __future__ import annotations

import time
from typing import Callable, Mapping


class FleetProgress:
    """Counts of the whole fleet. ``frames_total``: frames of the bags to run (None: unknown);
    the workers' frame counts come in through :meth:`update` (bag name -> frames so far)."""

    def __init__(self, bags_total: int, frames_total: int | None, skipped: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.bags_total, self.frames_total, self.skipped = bags_total, frames_total, skipped
        self.done = self.failed = 0
        self._frames: dict[str, int] = {}
        self._clock = clock
        self._start = clock()

    def restart(self) -> None:
        """Count the rate from now on (e.g. once the workers are ready)."""
        self._start = self._clock()

    @property
    def frames_done(self) -> int:
        return sum(self._frames.values())

    def update(self, frames_by_bag: Mapping[str, int]) -> None:
        self._frames.update(frames_by_bag)

    def bag_finished(self, ok: bool) -> None:
        if ok:
            self.done += 1
        else:
            self.failed += 1

    def rate(self) -> float:
        """Frames per second since the run started (0 before the first frame)."""
        seconds = self._clock() - self._start
        return self.frames_done / seconds if seconds > 0 else 0.0

    def eta_s(self) -> float | None:
        """Seconds left at the current rate; None when the total or the rate is unknown."""
        rate = self.rate()
        if self.frames_total is None or rate <= 0:
            return None
        return max(self.frames_total - self.frames_done, 0) / rate

    def line(self) -> str:
        """e.g. ``bags 2/4 done (1 skipped, 1 failed), frames 5/8, 1.90 frames/s, ETA 2 s``."""
        notes = [f"{count} {what}" for count, what in ((self.skipped, "skipped"), (self.failed, "failed")) if count]
        total = "?" if self.frames_total is None else str(self.frames_total)
        eta = self.eta_s()
        return (f"bags {self.done + self.skipped}/{self.bags_total} done"
                + (f" ({', '.join(notes)})" if notes else "")
                + f", frames {self.frames_done}/{total}, {self.rate():.2f} frames/s, "
                + ("ETA ?" if eta is None else f"ETA {eta:.0f} s"))
