"""The local engine: one process, one model. A reader thread reads rows, loads their images and
prepares them one window ahead (a queue of two windows at most, so memory stays flat whatever the
input size) while this thread runs the model on length-sorted batches and writes the shards."""

from __future__ import annotations

import queue
import threading
from typing import Iterator

from .embedder import WindowEmbedder
from .progress import Progress
from .reading import Row, windows
from .writing import Output

_AHEAD = 2


def error_records(errors) -> list[dict]:
    return [{"row": row.row, "id": row.id, "error": reason} for row, reason in errors]


def run_local(embedder: WindowEmbedder, output: Output, rows: Iterator[Row], window: int, progress: Progress) -> int:
    """Embeds every row; returns the end row (one past the last row read)."""
    ahead: queue.Queue = queue.Queue(maxsize=_AHEAD)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ahead.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for w in windows(rows, window, output.shard_rows):
                if not put((w, *embedder.prepare(w))):
                    return
            put(None)
        except BaseException as exc:  # handed to the main thread, which raises it
            put(exc)

    reader = threading.Thread(target=produce, name="bulk-reader", daemon=True)
    reader.start()
    end_row = output.next_row
    try:
        while (item := ahead.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            w, ready, errors = item
            result = embedder.forward(ready)
            errors = sorted(errors + result.errors, key=lambda e: e[0].row)
            end_row = w[-1].row + 1
            output.add(end_row, [r.row for r in result.rows], [r.id for r in result.rows], result.vectors,
                       error_records(errors))
            progress.update(len(w), len(errors))
    finally:
        stop.set()
        reader.join(timeout=5)
    return end_row
