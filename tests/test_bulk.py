"""Bulk embedding jobs: `python -m embedding_api.bulk`, run as a real subprocess on tiny checkpoints.

Vectors are compared with the real server's answers for the same inputs; images come from a local
file, the test image server, data URIs and base64. Resume is tested after a real SIGKILL; memory on
100,000 rows; the Ray engine on the shared local Ray head with 2 CPU actors.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from .util import API_KEY, ROOT, child_env, png_bytes, sample_image


def job_env(model_path: Path, **extra: str) -> dict[str, str]:
    return child_env({"MODEL_PATH": str(model_path), "TORCH_THREADS": "1", **extra})


def start_job(args: list, env: dict, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "embedding_api.bulk", *map(str, args), "--no-progress"],
                            env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_job(args: list, env: dict, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = start_job(args, env, cwd)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def read_output(out_dir: Path) -> tuple[list[str], np.ndarray, list[dict], dict]:
    manifest = json.loads((out_dir / "_manifest.json").read_text())
    tables = [pq.read_table(out_dir / s["file"]) for s in manifest["shards"]]
    table = pa.concat_tables(tables)
    ids = table.column("id").to_pylist()
    vectors = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32).reshape(len(ids), -1)
    errors = [json.loads(line) for line in (out_dir / "_errors.jsonl").read_text().splitlines()]
    return ids, vectors, errors, manifest


def read_directory(out_dir: Path) -> tuple[list[str], np.ndarray]:
    """OUTPUT_DIR read as a user first reads it: the directory itself, by pandas and by pyarrow's
    dataset (both skip the `_` side files and the shard being written)."""
    frame = pd.read_parquet(out_dir)
    table = ds.dataset(out_dir, format="parquet").to_table()
    assert frame["id"].tolist() == table.column("id").to_pylist()
    vectors = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32).reshape(table.num_rows, -1)
    if len(frame):
        np.testing.assert_array_equal(np.stack(frame["embedding"].to_list()).astype(np.float32), vectors)
    return frame["id"].tolist(), vectors


# --------------------------------------------------------------------------------------------
# One corpus of every input form, with rows that must fail.

@pytest.fixture(scope="module")
def corpus(tmp_path_factory, image_server):
    root = tmp_path_factory.mktemp("bulk")
    png = png_bytes(sample_image(80, 56, seed=3))
    other = png_bytes(sample_image(64, 64, seed=4))
    (root / "images").mkdir()
    (root / "images" / "local.png").write_bytes(png)
    url = image_server.add("/bulk/cat.png", other)
    not_image = image_server.add("/bulk/not-image.png", b"plain text, not an image", "text/plain")
    b64 = base64.b64encode(other).decode()
    data_uri = "data:image/png;base64," + base64.b64encode(png).decode()
    good = [
        {"id": "t1", "text": "The capital of China is Beijing."},
        {"id": "t2", "text": "a red bicycle", "instruction": "Find the matching product"},
        {"id": "p1", "image": "images/local.png"},
        {"id": "u1", "image": url},
        {"id": "d1", "image": data_uri},
        {"id": "b1", "image": b64},
        {"id": "f1", "text": "a cat on a sofa", "image": url},
        {"id": "t3", "text": "a much longer text about many things " * 12},
        {"text": "a row without an id"},
    ]
    bad = [
        ({"id": "e1", "text": "   "}, "text must not be empty"),
        ({"id": "e2", "image": "images/missing.png"}, "image file not found"),
        ({"id": "e3", "image": not_image}, "image"),
        ({"id": "e4", "image": "http://0.0.0.0/x.png"}, "refused"),
        ({"id": "e5"}, "the row has no 'text'"),
        ({"id": "e6", "text": ""}, "the row's 'text' is empty"),
    ]
    rows = good[:4] + [bad[0][0], bad[1][0]] + good[4:7] + [b[0] for b in bad[2:]] + good[7:]
    path = root / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # What the server is sent for the same rows: a local file goes as a data URI of the same bytes.
    as_api = {}
    for number, r in enumerate(rows):
        if r in good:
            obj = {k: v for k, v in r.items() if k in ("text", "instruction")}
            if "image" in r:
                obj["image"] = data_uri if r["image"] == "images/local.png" else r["image"]
            as_api[r.get("id", str(number))] = obj
    reasons = {b[0]["id"]: b[1] for b in bad}
    return {"root": root, "path": path, "rows": rows, "as_api": as_api, "reasons": reasons}


def server_vectors(server, objects: list[dict], **body) -> np.ndarray:
    res = httpx.post(server.base_url + "/v1/embeddings", headers={"Authorization": f"Bearer {API_KEY}"},
                     json={"input": objects, **body}, timeout=120)
    assert res.status_code == 200, res.text
    return np.asarray([d["embedding"] for d in res.json()["data"]], dtype=np.float32)


@pytest.fixture(scope="module")
def local_job(corpus, tiny_vl):
    out = corpus["root"] / "out-local"
    env = job_env(tiny_vl, ALLOW_PRIVATE_IMAGE_URLS="true")
    result = run_job([corpus["path"], out, "--shard-rows", 5, "--window", 4], env, corpus["root"])
    assert result.returncode == 0, result.stderr
    return out, result


def test_help_lists_the_options():
    result = subprocess.run([sys.executable, "-m", "embedding_api.bulk", "--help"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert result.returncode == 0
    for option in ("INPUT", "OUTPUT_DIR", "--engine", "--text-column", "--image-column", "--video-column", "--id-column",
                   "--dimensions", "--input-type", "--instruction", "--max-errors", "--concurrency", "--model-path"):
        assert option in result.stdout


def test_local_job_matches_the_server(local_job, corpus, vl_server):
    out, result = local_job
    ids, vectors, errors, manifest = read_output(out)
    expected_ids = list(corpus["as_api"])
    assert ids == expected_ids  # input order, no duplicate, the row number where there is no id
    assert "8" not in ids and str(len(corpus["rows"]) - 1) in ids
    assert vectors.shape == (len(expected_ids), 64) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    expected = server_vectors(vl_server, list(corpus["as_api"].values()))
    cosine = np.sum(vectors * expected, axis=1)
    assert cosine.min() >= 0.9999, dict(zip(ids, cosine))
    np.testing.assert_allclose(vectors, expected, atol=1e-4)
    # The shard layout and the manifest.
    schema = pq.read_schema(out / "part-00000.parquet")
    assert schema.names == ["id", "embedding"]
    assert schema.field("embedding").type == pa.list_(pa.float32(), 64)
    assert manifest["complete"] and manifest["rows"] == len(ids) and manifest["errors"] == len(errors)
    assert [s["first_row"] for s in manifest["shards"]] == [0, 5, 10]
    directory_ids, directory_vectors = read_directory(out)  # the directory reads as one table
    assert directory_ids == ids
    np.testing.assert_array_equal(directory_vectors, vectors)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["rows"] == len(corpus["rows"]) and summary["errors"] == len(errors) and summary["rows_per_s"] > 0


def test_failed_rows_go_to_errors_jsonl(local_job, corpus):
    out, _ = local_job
    _, _, errors, _ = read_output(out)
    assert [e["id"] for e in errors] == list(corpus["reasons"])
    for e in errors:
        assert corpus["reasons"][e["id"]] in e["error"], e
        assert corpus["rows"][e["row"]]["id"] == e["id"]


def test_dimensions_query_and_renamed_columns_on_csv_and_parquet(corpus, tiny_vl, vl_server):
    """Texts in a CSV and a Parquet file of one directory, columns renamed, --dimensions, --input-type."""
    root = corpus["root"] / "renamed"
    root.mkdir()
    texts = ["first passage", "second passage, a bit longer", "third", "fourth: the last one"]
    pacsv.write_csv(pa.table({"key": ["k0", "k1"], "body": texts[:2]}), root / "a.csv")
    pq.write_table(pa.table({"key": ["k2", "k3"], "body": texts[2:], "other": [1, 2]}), root / "b.parquet")
    out = corpus["root"] / "out-renamed"
    result = run_job([root, out, "--text-column", "body", "--id-column", "key", "--dimensions", 16,
                      "--input-type", "query"], job_env(tiny_vl), corpus["root"])
    assert result.returncode == 0, result.stderr
    ids, vectors, errors, _ = read_output(out)
    assert ids == ["k0", "k1", "k2", "k3"] and errors == []
    expected = server_vectors(vl_server, texts, dimensions=16, input_type="query")
    assert vectors.shape == (4, 16)
    np.testing.assert_allclose(vectors, expected, atol=1e-4)


def test_max_errors_stops_the_job_and_refused_urls_fail(corpus, tiny_vl, image_server):
    """With the default policy a loopback URL is refused, as by the server; --max-errors 2 stops at the third."""
    url = image_server.add("/bulk/private.png", png_bytes(sample_image(32, 32)))
    path = corpus["root"] / "refused.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "image": url}) + "\n" for i in range(6)))
    out = corpus["root"] / "out-refused"
    result = run_job([path, out, "--max-errors", 2, "--window", 1], job_env(tiny_vl), corpus["root"])
    assert result.returncode == 3, result.stderr
    assert "--max-errors 2" in result.stderr
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["shards"] == [] and not manifest["complete"] and not list(out.glob("*.tmp"))
    errors = [json.loads(line) for line in (out / "_errors.jsonl").read_text().splitlines()]
    assert [e["id"] for e in errors] == ["r0", "r1", "r2"]  # shown, though not counted as finished
    assert all("refused" in e["error"] for e in errors), errors


def test_resume_after_a_kill_has_no_duplicate_and_no_missing_id(corpus, tiny_text):
    path = corpus["root"] / "many.jsonl"
    n = 3000
    path.write_text("".join(json.dumps({"id": f"n{i}", "text": f"passage number {i} " + "word " * (i % 7)}) + "\n"
                            for i in range(n)))
    env = job_env(tiny_text)
    args = ["--shard-rows", 200, "--window", 50]
    out = corpus["root"] / "out-killed"
    proc = start_job([path, out, *args], env, corpus["root"])
    manifest_path = out / "_manifest.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest_path.exists() and len(json.loads(manifest_path.read_text())["shards"]) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the job ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    manifest = json.loads(manifest_path.read_text())
    assert not manifest["complete"] and 2 <= len(manifest["shards"]) < n // 200
    finished = {}
    for shard in manifest["shards"]:  # every finished shard is a valid Parquet file
        table = pq.read_table(out / shard["file"])
        assert table.num_rows == shard["rows"] == 200
        finished[shard["file"]] = table
    # Read mid-job, the directory is the finished shards (the one being written is skipped). A kill
    # between a shard's rename and the manifest's update leaves that one finished shard in place,
    # unrecorded: read too, and written again by the resume.
    seen = read_directory(out)[0]
    assert seen in ([f"n{i}" for i in range(manifest["next_row"])],
                    [f"n{i}" for i in range(manifest["next_row"] + 200)])
    # Whatever the kill left must not reach the output: a shard the manifest does not name (a stale copy
    # here, with the wrong rows) and a half-written temporary file.
    nxt = manifest["next_row"] // 200
    shutil.copyfile(out / manifest["shards"][0]["file"], out / f"part-{nxt:05d}.parquet")
    (out / f"_part-{nxt + 1:05d}.parquet.tmp").write_bytes(b"PAR1 half a shard")

    result = run_job([path, out, *args], env, corpus["root"])
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["resumed_at_row"] == manifest["next_row"] > 0
    assert summary["rows"] == n - manifest["next_row"]  # nothing finished is embedded again
    ids, vectors, errors, final = read_output(out)
    assert ids == [f"n{i}" for i in range(n)] and errors == [] and final["complete"]
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    for name, table in finished.items():  # the shards finished before the kill are kept as they were
        assert pq.read_table(out / name).equals(table)
    again = run_job([path, out, *args], env, corpus["root"])  # finished: nothing to do
    assert again.returncode == 0 and "already finished" in again.stdout


def test_another_job_in_the_same_output_dir_is_refused(local_job, corpus, tiny_vl):
    out, _ = local_job
    result = run_job([corpus["path"], out, "--dimensions", 8], job_env(tiny_vl), corpus["root"])
    assert result.returncode == 1 and "different job" in result.stderr


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def test_memory_stays_flat_over_100k_rows(tmp_path, tiny_text):
    n = 100_000
    path = tmp_path / "big.jsonl"
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"text": f"doc {i}"}) + "\n")
    out = tmp_path / "out"
    proc = start_job([path, out, "--shard-rows", 10000, "--batch-size", 256, "--window", 2048], job_env(tiny_text), tmp_path)
    samples: list[tuple[int, float]] = []  # (shards finished, RSS MB)
    while proc.poll() is None:
        try:
            rss = _rss_mb(proc.pid)
            shards = len(json.loads((out / "_manifest.json").read_text())["shards"]) if (out / "_manifest.json").exists() else 0
        except (OSError, ValueError):
            continue
        samples.append((shards, rss))
        time.sleep(0.25)
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    ids, vectors, errors, manifest = read_output(out)
    assert len(ids) == n and ids[-1] == str(n - 1) and errors == [] and len(manifest["shards"]) == 10
    after_first = [rss for shards, rss in samples if shards >= 1]
    assert after_first, samples
    growth = max(after_first) - after_first[0]
    print(f"RSS after the first shard {after_first[0]:.0f} MB, peak {max(after_first):.0f} MB (+{growth:.1f} MB)")
    assert growth < 40, samples  # holding the 100,000 rows or their vectors would add far more


def test_ray_engine_gives_the_same_ids_and_vectors(local_job, corpus, tiny_vl, ray_address):
    out = corpus["root"] / "out-ray"
    env = job_env(tiny_vl, ALLOW_PRIVATE_IMAGE_URLS="true", RAY_ADDRESS=ray_address)
    result = run_job([corpus["path"], out, "--engine", "ray", "--concurrency", 2, "--num-cpus", 1,
                      "--shard-rows", 5, "--window", 4], env, corpus["root"], timeout=280)
    assert result.returncode == 0, result.stderr
    ids, vectors, errors, manifest = read_output(out)
    local_ids, local_vectors, local_errors, local_manifest = read_output(local_job[0])
    assert ids == local_ids
    assert [(e["id"], e["row"]) for e in errors] == [(e["id"], e["row"]) for e in local_errors]
    assert np.sum(vectors * local_vectors, axis=1).min() >= 0.9999
    assert [s["first_row"] for s in manifest["shards"]] == [s["first_row"] for s in local_manifest["shards"]]


def test_a_bad_setting_is_one_line_naming_it_and_exit_2(tiny_vl, tmp_path):
    result = run_job([tmp_path / "in.jsonl", tmp_path / "out"], job_env(tiny_vl, LOG_LEVEL="loud"), tmp_path,
                     timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == ("embedding_api.bulk: Invalid settings: LOG_LEVEL='loud': LOG_LEVEL must be "
                                     "one of CRITICAL, ERROR, WARNING, INFO, DEBUG"), result.stderr
    assert not (tmp_path / "out").exists()
