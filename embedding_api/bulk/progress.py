"""The progress bar (rows/s, time left) and the end-of-job summary."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int | None, initial: int, enabled: bool = True):
        self.started = time.perf_counter()
        self.rows = 0
        self.errors = 0
        self.bar = None
        self._first: tuple[float, int] | None = None  # after the first window: start-up excluded
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="rows", dynamic_ncols=True,
                            smoothing=0.1, file=sys.stderr, desc="embedding")

    def update(self, rows: int, errors: int) -> None:
        if self._first is None:
            self._first = (time.perf_counter(), rows)
        self.rows += rows
        self.errors += errors
        if self.bar is not None:
            self.bar.update(rows)
            if errors:
                self.bar.set_postfix(errors=self.errors, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def summary(self) -> dict:
        now = time.perf_counter()
        seconds = now - self.started
        steady = None
        if self._first is not None and now > self._first[0] and self.rows > self._first[1]:
            steady = round((self.rows - self._first[1]) / (now - self._first[0]), 1)
        return {"rows": self.rows, "embedded": self.rows - self.errors, "errors": self.errors,
                "seconds": round(seconds, 3), "rows_per_s": round(self.rows / seconds, 1) if seconds else None,
                "rows_per_s_after_first_window": steady}
