"""OUTPUT_DIR: Parquet shards of vectors, `_errors.jsonl` and `_manifest.json`; resumable, crash-safe.

Shard k holds the vectors of input rows [k * shard_rows, (k + 1) * shard_rows) that embedded, in input
order, as `part-0000k.parquet` with columns `id` (string) and `embedding` (fixed-size list of float32,
the requested size). Every other file starts with `_`, which Parquet dataset readers skip (pyarrow's
and pandas' `ignore_prefixes`, Spark, Hive), so the directory reads as one table of the finished
shards. A shard is written to a temporary file (`_part-0000k.parquet.tmp`) and renamed into place only
when it is complete (after an fsync); then its rows' errors are appended to `_errors.jsonl`; then the
manifest is replaced (write, fsync, rename). The manifest is the record of what is finished: on a
second run with the same job the output goes on at the first row after the last finished shard,
_errors.jsonl is cut back to its recorded length and leftovers of an interrupted shard are
overwritten. A Ctrl-C or a kill at any moment therefore leaves every shard the manifest names valid,
with no duplicate and no missing id after the resume. An output directory of the earlier layout
(`manifest.json`, `errors.jsonl`) is renamed to this one when its job is run again.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

MANIFEST = "_manifest.json"
ERRORS = "_errors.jsonl"
_OLD_NAMES = {"errors.jsonl": ERRORS, "manifest.json": MANIFEST}  # the earlier layout; the manifest last
FORMAT = 1


class OutputError(Exception):
    """OUTPUT_DIR holds another job's output, or cannot be written."""


class TooManyErrors(Exception):
    pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class Output:
    """The output directory of one job. `add` takes embedded rows in input order; shards commit as
    the rows pass their end; `finish` commits the last one."""

    def __init__(self, directory: str | Path, job: dict, dimensions: int, shard_rows: int,
                 max_errors: int | None = None):
        import pyarrow as pa

        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shard_rows = shard_rows
        self.dimensions = dimensions
        self.max_errors = max_errors
        self.schema = pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float32(), dimensions))])
        self.manifest = self._open(job)
        self.next_row = self.manifest["next_row"]  # first row not in a finished shard
        self.shard = self.next_row // shard_rows
        self._writer = None
        self._pending_errors: list[dict] = []
        self.rows_done = 0  # this run
        self.errors_done = 0  # this run

    # -- resume ------------------------------------------------------------------------------

    def _open(self, job: dict) -> dict:
        path = self.dir / MANIFEST
        old = self.dir / "manifest.json"
        if path.exists() or old.exists():
            manifest = json.loads((path if path.exists() else old).read_text())
            if manifest.get("job") != job:
                raise OutputError(
                    f"{self.dir} holds the output of a different job (other input, columns, model or options); "
                    "use a new OUTPUT_DIR, or delete this one to start over"
                )
            if not path.exists():  # the earlier layout: renamed, the manifest last, so a crash midway resumes
                for name, new in _OLD_NAMES.items():
                    if (self.dir / name).exists():
                        os.replace(self.dir / name, self.dir / new)
                _fsync_dir(self.dir)
        elif any(self.dir.glob("part-*.parquet")):
            raise OutputError(f"{self.dir} holds shards but no {MANIFEST}; use an empty OUTPUT_DIR")
        else:
            manifest = {"format": FORMAT, "job": job, "dimensions": self.dimensions, "shard_rows": self.shard_rows,
                        "columns": ["id", "embedding"], "shards": [], "next_row": 0, "rows": 0, "errors": 0,
                        "errors_bytes": 0, "complete": False}
            _write_atomic(path, json.dumps(manifest, indent=1).encode())  # the directory is this job's now
        # Leftovers of an interrupted shard: temporary files, shards past the manifest, unrecorded errors.
        for tmp in self.dir.glob("*.tmp"):
            tmp.unlink()
        recorded = {s["file"] for s in manifest["shards"]}
        for part in self.dir.glob("part-*.parquet"):
            if part.name not in recorded:
                part.unlink()
        errors = self.dir / ERRORS
        with open(errors, "ab") as fh:
            fh.truncate(manifest["errors_bytes"])
        return manifest

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    # -- writing -----------------------------------------------------------------------------

    def _name(self, shard: int) -> str:
        return f"part-{shard:05d}.parquet"

    def _tmp(self, shard: int) -> Path:
        return self.dir / f"_{self._name(shard)}.tmp"  # `_`: skipped by dataset readers while being written

    def _open_writer(self):
        import pyarrow.parquet as pq

        if self._writer is None:
            tmp = self._tmp(self.shard)
            self._writer = pq.ParquetWriter(tmp, self.schema, compression="zstd")
            self._shard_rows_written = 0
        return self._writer

    def _write(self, ids: list[str], vectors: np.ndarray) -> None:
        import pyarrow as pa

        if not ids:
            return
        writer = self._open_writer()
        if ids:
            flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
            table = pa.Table.from_arrays(
                [pa.array(ids, pa.string()), pa.FixedSizeListArray.from_arrays(flat, self.dimensions)],
                schema=self.schema,
            )
            writer.write_table(table)
            self._shard_rows_written += len(ids)

    def add(self, end_row: int, rows: list[int], ids: list[str], vectors: np.ndarray, errors: list[dict]) -> None:
        """Rows up to `end_row` (exclusive) are done: `rows`/`ids`/`vectors` embedded, `errors` failed
        (each {"row", "id", "error"}). Calls come in input order."""
        rows_arr = np.asarray(rows, dtype=np.int64)
        start = 0
        while True:
            boundary = (self.shard + 1) * self.shard_rows
            stop = start + int(np.searchsorted(rows_arr[start:], boundary))
            self._write(ids[start:stop], vectors[start:stop])
            self._pending_errors += [e for e in errors if e["row"] < boundary and e["row"] >= self.next_row]
            self.rows_done += stop - start
            start = stop
            if end_row < boundary:
                break
            self._commit(boundary)
        self._check_errors()

    def _check_errors(self) -> None:
        total = self.manifest["errors"] + len(self._pending_errors)
        if self.max_errors is not None and total > self.max_errors:
            raise TooManyErrors(f"{total} rows failed, more than --max-errors {self.max_errors}; see {self.dir / ERRORS}")

    def _commit(self, end_row: int) -> None:
        writer = self._open_writer()  # a shard whose rows all failed is an empty file: every shard exists
        writer.close()
        self._writer = None
        name = self._name(self.shard)
        tmp = self._tmp(self.shard)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.dir / name)
        errors_path = self.dir / ERRORS
        with open(errors_path, "ab") as fh:
            for e in self._pending_errors:
                fh.write(json.dumps(e, ensure_ascii=False).encode() + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
            errors_bytes = fh.tell()
        m = self.manifest
        m["shards"].append({"file": name, "first_row": self.shard * self.shard_rows, "end_row": end_row,
                            "rows": self._shard_rows_written, "errors": len(self._pending_errors)})
        m["rows"] += self._shard_rows_written
        m["errors"] += len(self._pending_errors)
        self.errors_done += len(self._pending_errors)
        m["errors_bytes"] = errors_bytes
        m["next_row"] = end_row
        m["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        _write_atomic(self.dir / MANIFEST, json.dumps(m, indent=1).encode())
        self._pending_errors = []
        self.next_row = end_row
        self.shard += 1

    def finish(self, end_row: int) -> None:
        """The input ended at `end_row`: commit the last (partial) shard and mark the job complete."""
        if end_row > self.next_row:
            self._commit(end_row)
        self.manifest["complete"] = True
        _write_atomic(self.dir / MANIFEST, json.dumps(self.manifest, indent=1).encode())

    def abort(self, show_errors: bool = False) -> None:
        """Stop without committing the shard in progress (its temporary file is removed). With
        `show_errors` its errors so far are appended to _errors.jsonl for reading; a resume cuts them off
        again (the manifest does not count them)."""
        if self._writer is not None:
            try:
                self._writer.close()
            finally:
                self._writer = None
                self._tmp(self.shard).unlink(missing_ok=True)
        if show_errors and self._pending_errors:
            with open(self.dir / ERRORS, "ab") as fh:
                for e in self._pending_errors:
                    fh.write(json.dumps(e, ensure_ascii=False).encode() + b"\n")
