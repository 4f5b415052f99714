"""Input files -> a stream of numbered rows, never the whole file in memory.

INPUT is a JSONL, CSV or Parquet file, a directory (every such file under it, sorted by path) or a
glob. Rows are numbered from 0 across the files in that order; the number is the default id and the
position the output shards and the resume point are counted in. JSONL is read line by line, CSV with
pyarrow's streaming reader (every column as a string; a UTF-8 byte order mark, as Excel writes, is
skipped; quoted values may hold newlines; a row longer than a block is read with larger blocks),
Parquet batch by batch.
"""

from __future__ import annotations

import csv
import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
_READ_BATCH = 4096
_CSV_BLOCK = 1 << 20  # bytes pyarrow's CSV reader parses at a time; grown for a row that is longer
_CSV_MAX_BLOCK = 1 << 30


class InputError(Exception):
    """The job's input cannot be read at all (no files, an unknown format, no text, image or video column)."""


@dataclass(frozen=True)
class Columns:
    id: str = "id"
    text: str = "text"
    image: str = "image"
    instruction: str = "instruction"
    video: str = "video"


@dataclass
class Row:
    """One input row: `row` is its number in the whole input; `problem` a reason it cannot be used."""

    row: int
    id: str
    text: Any = None
    image: Any = None
    instruction: Any = None
    base_dir: str = ""  # the input file's directory: relative image paths are looked up there first
    problem: str | None = None
    video: Any = None  # a reference string, or (JSONL) a list of frames or an object as the API takes

    def to_json(self) -> str:
        return json.dumps(self.__dict__, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "Row":
        return cls(**json.loads(text))


def discover(spec: str) -> list[Path]:
    """The input files, in the order their rows are numbered."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    elif path.is_file():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
    if not files:
        raise InputError(f"no input files found at {spec!r} (a .jsonl, .csv or .parquet file, a directory or a glob)")
    for f in files:
        if f.suffix.lower() not in SUFFIXES:
            raise InputError(f"{f}: unknown format; use .jsonl, .csv or .parquet")
    return [f.resolve() for f in files]


def _kind(path: Path) -> str:
    return SUFFIXES[path.suffix.lower()]


def _csv_header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as fh:  # -sig: without Excel's byte order mark
        return next(csv.reader(fh), [])


def _names(path: Path) -> list[str] | None:
    """The column names of a CSV or Parquet file (None for JSONL, whose rows each have their own keys)."""
    kind = _kind(path)
    if kind == "csv":
        return _csv_header(path)
    if kind == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).schema_arrow.names
    return None


def check_columns(files: list[Path], columns: Columns) -> None:
    for f in files:
        names = _names(f)
        if names is not None and not {columns.text, columns.image, columns.video} & set(names):
            raise InputError(f"{f}: has no {columns.text!r}, {columns.image!r} or {columns.video!r} column "
                             f"(columns: {names})")


def count_rows(files: list[Path]) -> int:
    """Rows in the input, for the progress bar (exact for Parquet and CSV, lines for JSONL)."""
    total = 0
    for f in files:
        kind = _kind(f)
        if kind == "parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(f).metadata.num_rows
            continue
        if kind == "csv":  # records, not lines: a quoted value may hold newlines
            names = _csv_header(f)
            try:
                total += sum(b.num_rows for b in _csv_batches(f, names, names[:1]))
                continue
            except InputError:  # counted by lines; reading the rows reports the error
                pass
        lines, last = 0, b"\n"
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                lines += chunk.count(b"\n")
                last = chunk[-1:]
        lines += last != b"\n"
        total += max(0, lines - (kind == "csv"))
    return total


def _jsonl_records(path: Path) -> Iterator[dict | str]:
    """Each non-blank line: its object, or a string saying why it is not one."""
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                yield f"line {number} of {path.name} is not valid JSON"
                continue
            yield value if isinstance(value, dict) else f"line {number} of {path.name} is not a JSON object"


def _csv_batches(path: Path, names: list[str], wanted: list[str]):
    """The CSV's records in batches, every column a string. A record longer than a block (pyarrow:
    "straddles two block boundaries") makes the file be read again with blocks four times larger,
    from the first record not yet yielded; any other parse error is an InputError."""
    import pyarrow as pa
    from pyarrow import csv as pacsv

    block, done = _CSV_BLOCK, 0  # records yielded so far
    convert = pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                   include_columns=[n for n in wanted if n in names])
    while True:
        seen = 0  # records of this pass
        try:
            reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=block),
                                    parse_options=pacsv.ParseOptions(newlines_in_values=True),
                                    convert_options=convert)
            for batch in reader:
                seen += batch.num_rows
                if seen > done:
                    fresh = batch.slice(max(0, batch.num_rows - (seen - done)))
                    done = seen
                    yield fresh
            return
        except pa.ArrowInvalid as exc:
            if "straddl" in str(exc) and block < _CSV_MAX_BLOCK:
                block *= 4
                continue
            raise InputError(f"{path}: cannot be read as CSV: {exc}") from None


def _table_records(path: Path, wanted: list[str]) -> Iterator[dict]:
    if _kind(path) == "csv":
        batches = _csv_batches(path, _csv_header(path), wanted)
    else:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        present = [n for n in wanted if n in pf.schema_arrow.names]
        batches = pf.iter_batches(batch_size=_READ_BATCH, columns=present)
    for batch in batches:
        yield from batch.to_pylist()


def _blank(value: Any) -> bool:
    return value is None or value == ""


def iter_rows(files: list[Path], columns: Columns, start_row: int = 0) -> Iterator[Row]:
    """Every row from `start_row` on, numbered across the files."""
    wanted = [columns.id, columns.text, columns.image, columns.instruction, columns.video]
    number = 0
    for path in files:
        kind = _kind(path)
        if kind == "parquet" and start_row > number:
            import pyarrow.parquet as pq

            n = pq.ParquetFile(path).metadata.num_rows
            if number + n <= start_row:  # the whole file is before the resume point
                number += n
                continue
        records = _jsonl_records(path) if kind == "jsonl" else _table_records(path, wanted)
        base_dir = str(path.parent)
        for record in records:
            if number >= start_row:
                yield _row(number, record, columns, base_dir)
            number += 1


def _row(number: int, record: dict | str, columns: Columns, base_dir: str) -> Row:
    if isinstance(record, str):
        return Row(number, str(number), base_dir=base_dir, problem=record)
    raw_id = record.get(columns.id)
    row = Row(
        row=number,
        id=str(number) if _blank(raw_id) else str(raw_id),
        text=None if _blank(record.get(columns.text)) else record.get(columns.text),
        image=None if _blank(record.get(columns.image)) else record.get(columns.image),
        instruction=None if _blank(record.get(columns.instruction)) else record.get(columns.instruction),
        base_dir=base_dir,
        video=None if _blank(record.get(columns.video)) else record.get(columns.video),
    )
    if row.text is None and row.image is None and row.video is None:
        if record.get(columns.text) == "":
            row.problem = (f"empty text: the row's {columns.text!r} is empty, and it has no {columns.image!r} "
                           f"and no {columns.video!r}")
        else:
            row.problem = f"empty text: the row has no {columns.text!r}, no {columns.image!r} and no {columns.video!r}"
    return row


def windows(rows: Iterator[Row], size: int, shard_rows: int) -> Iterator[list[Row]]:
    """Consecutive rows in lists of at most `size`, never crossing a shard boundary."""
    window: list[Row] = []
    for row in rows:
        if window and (len(window) >= size or row.row // shard_rows != window[0].row // shard_rows):
            yield window
            window = []
        window.append(row)
    if window:
        yield window
