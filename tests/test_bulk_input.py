"""Bulk jobs on awkward inputs and outputs: Excel CSVs (byte order mark), CSVs with quoted newlines
over many blocks (and their resume, also from the earlier output layout), unreadable image files,
empty texts, texts far longer than MAX_INPUT_TOKENS, the output directory read by dataset readers,
and the progress bar's counts. Real jobs on the tiny checkpoints; the long-text cut in process."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from embedding_api.bulk.embedder import CUT_MARGIN, JobOptions, WindowEmbedder, bounded_text
from embedding_api.bulk.progress import Progress
from embedding_api.bulk.reading import Row
from embedding_api.inputs import parse_item
from embedding_api.settings import Settings

from .test_bulk import job_env, read_directory, read_output, run_job
from .util import png_bytes, sample_image


def test_excel_csv_with_a_byte_order_mark_keeps_its_id_column(tmp_path, tiny_text):
    """Excel's "CSV UTF-8" starts with a byte order mark: the first header name must still be found."""
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.csv").write_text("id,text\r\nk0,first passage\r\nk1,second passage\r\n", encoding="utf-8-sig")
    (src / "b.csv").write_text("text,id\r\nthird passage,k2\r\n,k3\r\n", encoding="utf-8-sig")
    out = tmp_path / "out"
    result = run_job([src, out], job_env(tiny_text), tmp_path)
    assert result.returncode == 0, result.stderr
    ids, vectors, errors, _ = read_output(out)
    assert ids == ["k0", "k1", "k2"] and vectors.shape[0] == 3
    assert [e["id"] for e in errors] == ["k3"]
    assert "'text' is empty" in errors[0]["error"] and "has no 'text'" not in errors[0]["error"]


def _write_multiline_csv(path, n: int, empty_at: int) -> list[str]:
    ids = []
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "text"])
        for i in range(n):
            text = "" if i == empty_at else f'passage {i}, "quoted"\nits second line\n\nand a last one'
            writer.writerow([f"q{i}", text])
            ids.append(f"q{i}")
    return ids


def test_csv_with_quoted_newlines_over_many_blocks_finishes_and_resumes(tmp_path, tiny_text):
    """25,000 rows with newlines inside quoted values (1.5 MB: more than one 1 MB block of pyarrow's
    reader). --max-errors 0 stops the job at the empty row 22,222, after four finished shards; the
    second run resumes at row 20,000 (past the first block) from a directory put back in the earlier
    layout (manifest.json, errors.jsonl, an unsuffixed .tmp shard), and finishes with every id once."""
    src = tmp_path / "multiline.csv"
    n, empty_at = 25_000, 22_222
    ids = _write_multiline_csv(src, n, empty_at)
    assert src.stat().st_size > 1 << 20
    out = tmp_path / "out"
    env = job_env(tiny_text)
    args = ["--shard-rows", 5000, "--window", 1000, "--batch-size", 256]
    first = run_job([src, out, *args, "--max-errors", 0], env, tmp_path, timeout=600)
    assert first.returncode == 3, first.stderr
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["next_row"] == 20_000 and len(manifest["shards"]) == 4
    finished, _ = read_directory(out)  # while unfinished: the finished shards only
    assert finished == ids[:20_000]

    # The earlier layout, as a job of the previous version would have left it.
    os.replace(out / "_manifest.json", out / "manifest.json")
    os.replace(out / "_errors.jsonl", out / "errors.jsonl")
    (out / "part-00004.parquet.tmp").write_bytes(b"an interrupted shard")
    second = run_job([src, out, *args], env, tmp_path, timeout=600)
    assert second.returncode == 0, second.stderr
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary["resumed_at_row"] == 20_000 and summary["rows"] == n - 20_000
    side = sorted(p.name for p in out.iterdir() if not (p.name.startswith("part-") and p.suffix == ".parquet"))
    assert side == ["_errors.jsonl", "_manifest.json"]  # renamed; the stale shard removed
    got, vectors, errors, manifest = read_output(out)
    expected = [i for k, i in enumerate(ids) if k != empty_at]
    assert got == expected and manifest["complete"] and len(manifest["shards"]) == 5
    assert [(e["row"], e["id"]) for e in errors] == [(empty_at, f"q{empty_at}")]
    assert "'text' is empty" in errors[0]["error"]
    directory_ids, directory_vectors = read_directory(out)
    assert directory_ids == expected
    np.testing.assert_array_equal(directory_vectors, vectors)


def test_an_unreadable_image_file_fails_its_row_only(tmp_path, tiny_vl):
    """A local image that cannot be read goes to _errors.jsonl; the good rows of its window are written.
    The I/O error is real: /proc/self/mem is a regular file whose first bytes cannot be read (EIO). As
    root, a chmod 000 file would still be read; EACCES for another user is the same OSError path."""
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "good.png").write_bytes(png_bytes(sample_image(48, 40, seed=2)))
    (tmp_path / "images" / "unreadable.png").symlink_to("/proc/self/mem")
    rows = [{"id": "t1", "text": "a text before"}, {"id": "p1", "image": "images/good.png"},
            {"id": "bad", "image": "images/unreadable.png"}, {"id": "t2", "text": "a text after"},
            {"id": "p2", "text": "fused", "image": "images/good.png"}]
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    result = run_job([src, out, "--window", 8], job_env(tiny_vl), tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    ids, vectors, errors, manifest = read_output(out)
    assert ids == ["t1", "p1", "t2", "p2"] and manifest["complete"]
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert [e["id"] for e in errors] == ["bad"]
    assert errors[0]["error"].startswith("image: image file cannot be read") and "Input/output error" in errors[0]["error"]


LONG_TEXTS = {
    "words": " ".join(f"word{i % 97} and text" for i in range(4000)),
    "cjk": "".join(chr(0x4E00 + (i * 7919) % 20000) for i in range(30000)),
    "spaces": "start" + " " * 50000 + "end",
    "one letter": "a" * 60000,
}


@pytest.fixture(scope="module", params=["tiny_text", "tiny_vl"])
def long_text_embedder(request):
    settings = Settings(_env_file=None, model_path=str(request.getfixturevalue(request.param)),
                        max_input_tokens=64, torch_threads=1)
    embedder = WindowEmbedder(settings, JobOptions())
    yield embedder
    embedder.close()


@pytest.mark.parametrize("kind", list(LONG_TEXTS))
def test_a_long_text_reaches_the_tokenizer_cut_with_the_same_tokens_and_vector(long_text_embedder, kind):
    """The prefix the tokenizer sees is bounded, and the input the model gets (token ids, vector) is
    the one the whole text gives after truncation at MAX_INPUT_TOKENS."""
    embedder, text = long_text_embedder, LONG_TEXTS[kind]
    runner = embedder.runner
    head = bounded_text(text, lambda t: len(runner.encode(t)), runner.max_tokens)
    assert text.startswith(head) and len(head) < len(text) // 4
    assert len(runner.encode(head)) >= runner.max_tokens + CUT_MARGIN

    row = Row(0, "long", text=text)
    ready, errors = embedder.prepare([row])
    assert errors == [] and len(ready) == 1
    item = parse_item({"text": text}, "row", embedder.rules)  # the whole text, uncut
    whole = runner.prepare(item.texts, [], None, item.instruction)
    assert whole.truncated and ready[0][1].input_ids == whole.input_ids
    assert len(whole.input_ids) == runner.max_tokens
    cut = embedder.forward(ready).vectors
    uncut = embedder.forward([(row, whole)]).vectors
    np.testing.assert_array_equal(cut, uncut)


def test_a_short_text_is_not_cut():
    assert bounded_text("short text", lambda t: 1 / 0, 8192) == "short text"  # never even counted


def test_the_progress_bar_counts_rows_in_integers(capsys):
    progress = Progress(20_000, 12_000)  # resumed at row 12,000
    progress.update(8_000, 3)
    progress.close()
    small = Progress(50, 0)
    small.update(50, 0)
    small.close()
    err = capsys.readouterr().err
    assert "20000/20000" in err and "50/50" in err, err
    assert "50.0" not in err and "20.0k" not in err, err
