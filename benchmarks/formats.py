"""What each compact output format keeps: `python -m benchmarks.formats [--inputs N] [--queries Q]`.

A real server on a random-weight checkpoint (embedding_api/tools/checkpoint.py; the `tiny` VL
checkpoint, 64 dims, and the `demo` one, 2048 dims, at its full size and at 256) embeds N
generated sentences in float32 (once, at full size; a smaller size is truncated and normalised
here exactly as the server does) and publishes its int8/uint8 ranges; each format is made from
those vectors by the server's own encoder (embedding_api.formats.encode_rows, which
tests/test_formats.py checks against the server's responses) and decoded as a client would.
The first Q sentences are the queries, all N the corpus (the query itself left out). For each
format it prints, against the float32 vectors:

- top-10 overlap: |top 10 by the format ∩ top 10 by float32| / 10, averaged over the queries;
- Spearman: the rank correlation of one query's similarities to the whole corpus, format vs
  float32, averaged over the queries.

Similarities: cosine of the decoded vectors for float16/bfloat16; cosine of the dequantized
vectors (min + (code + 0.5) x step, with the ranges of GET /v1/models/{model}/quantization) for
int8/uint8; the number of equal bits for binary/ubinary (the same bits, so one row).

Random weights make these figures indicative only: a trained model's vectors are distributed
differently (and its neighbours mean something). Writes benchmarks/results/formats-<time>.json.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import shutil
import time
import urllib.request
from pathlib import Path

import numpy as np

from embedding_api.formats import OutputFormat, dequantize, encode_rows
from embedding_api.normalize import finalize
from embedding_api.tools import checkpoint as checkpoint_module
from embedding_api.tools.checkpoint import write_checkpoint

from .server import Server
from .workload import short_texts

HERE = Path(__file__).resolve().parent
FORMATS = (  # label, request fields
    ("float16", {"encoding_format": "base64", "embed_dtype": "float16"}),
    ("bfloat16", {"encoding_format": "base64", "embed_dtype": "bfloat16"}),
    ("int8", {"encoding_format": "base64", "output_dtype": "int8"}),
    ("uint8", {"encoding_format": "base64", "output_dtype": "uint8"}),
    ("binary / ubinary", {"encoding_format": "base64", "output_dtype": "ubinary"}),
)
BYTES_PER_DIM = {"float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1, "binary / ubinary": 1 / 8}
_TEMPLATES = (
    "{a} {b}.", "Why does the {a} {b}?", "{a}, said the report, {b} last week.", "Note: {a} {b} again.",
    "In 1999 the {a} {b}, and nobody noticed.",
)


def sentences(n: int, seed: int = 11) -> list[str]:
    """Varied generated inputs: random-word phrases, templated sentences, short and long."""
    rng = random.Random(seed)
    words = short_texts(2 * n, seed=seed)
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            out.append(words[i])
        elif kind == 1:
            out.append(rng.choice(_TEMPLATES).format(a=words[i], b=words[n + i]))
        elif kind == 2:
            out.append(" ".join(words[i:i + rng.randint(2, 5)]) + ".")
        else:
            out.append(words[i].split()[0])
    return out


def checkpoint(cache: Path, size: str) -> Path:
    digest = checkpoint_module.source_digest()[:10]
    path = cache / f"qwen3-vl-{size}-{digest}"
    if not (path / "config.json").exists():
        for old in cache.glob(f"qwen3-vl-{size}-*"):
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
        write_checkpoint(path, family="qwen3_vl", size=size, seed=0, overwrite=True)
    return path


def _call(port: int, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def embed(port: int, texts: list[str], dimensions: int, fields: dict) -> list:
    rows = []
    for start in range(0, len(texts), 64):
        body = {"input": texts[start:start + 64], **fields, **({"dimensions": dimensions} if dimensions else {})}
        rows += [d["embedding"] for d in _call(port, "/v1/embeddings", body)["data"]]
    return rows


def decode(label: str, rows: list[str], ranges: np.ndarray) -> np.ndarray:
    raw = [base64.b64decode(r) for r in rows]
    if label == "float16":
        return np.stack([np.frombuffer(b, dtype="<f2") for b in raw]).astype(np.float32)
    if label == "bfloat16":
        bits = np.stack([np.frombuffer(b, dtype="<u2") for b in raw]).astype(np.uint32)
        return (bits << 16).view(np.float32)
    if label in ("int8", "uint8"):
        codes = np.stack([np.frombuffer(b, dtype=np.int8 if label == "int8" else np.uint8) for b in raw])
        return dequantize(codes, label, ranges)
    return np.stack([np.frombuffer(b, dtype=np.uint8) for b in raw])


def similarities(label: str, queries: np.ndarray, corpus: np.ndarray, dimensions: int) -> np.ndarray:
    if label.startswith("binary"):
        bits_q = np.unpackbits(queries, axis=-1)[:, :dimensions].astype(np.float32) * 2 - 1
        bits_c = np.unpackbits(corpus, axis=-1)[:, :dimensions].astype(np.float32) * 2 - 1
        return (bits_q @ bits_c.T + dimensions) / 2  # equal bits
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    c = corpus / np.linalg.norm(corpus, axis=1, keepdims=True)
    return q @ c.T


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks of a 1-d array (ties share their mean rank), as Spearman needs."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x))
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def compare(reference: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """(mean top-10 overlap, mean Spearman) of `other` against `reference`, one row per query."""
    overlaps, rhos = [], []
    for ref, got in zip(reference, other):
        keep = ~np.isnan(ref)
        ref, got = ref[keep], got[keep]
        top_ref = set(np.argsort(-ref, kind="stable")[:10])
        # ties at the cut (binary): the best case is not assumed, the stable order decides
        top_got = set(np.argsort(-got, kind="stable")[:10])
        overlaps.append(len(top_ref & top_got) / 10)
        rhos.append(np.corrcoef(_ranks(ref), _ranks(got))[0, 1])
    return float(np.mean(overlaps)), float(np.mean(rhos))


def measure(port: int, model: str, native: np.ndarray, n_queries: int, dimensions: int) -> list[dict]:
    reference = finalize(native, dimensions)  # what the server returns for `dimensions` (to float rounding)
    quant = _call(port, f"/v1/models/{model}/quantization?dimensions={dimensions}")
    ranges = np.array(quant["ranges"], dtype=np.float32)
    base = similarities("float", reference[:n_queries], reference, dimensions)
    base[np.arange(n_queries), np.arange(n_queries)] = np.nan  # the query itself is not a result
    spread = {"cosine_mean": float(np.nanmean(base)), "cosine_std": float(np.nanstd(base))}
    print(f"float32 cosine between inputs: mean {spread['cosine_mean']:.3f}, std {spread['cosine_std']:.3f}")
    rows = []
    for label, fields in FORMATS:
        fmt = OutputFormat(**fields)
        vectors = decode(label, encode_rows(reference, fmt, ranges if fmt.calibrated else None), ranges)
        sims = similarities(label, vectors[:n_queries], vectors, dimensions)
        overlap, rho = compare(base, sims)
        inside = float(((reference >= ranges[0]) & (reference <= ranges[1])).mean())
        rows.append({"format": label, "dimensions": dimensions, "bytes": int(np.ceil(dimensions * BYTES_PER_DIM[label])),
                     "top10_overlap": overlap, "spearman": rho, **spread,
                     **({"inside_calibrated_range": inside} if label in ("int8", "uint8") else {})})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--inputs", type=int, default=3000, help="corpus size (generated sentences)")
    p.add_argument("--queries", type=int, default=200, help="the first Q inputs are also the queries")
    p.add_argument("--sizes", default="tiny,demo", help="checkpoint sizes (embedding_api.tools.checkpoint)")
    p.add_argument("--cache", type=Path, default=HERE / ".cache", help="where the checkpoints are written")
    args = p.parse_args(argv)
    texts = sentences(args.inputs)
    results = []
    for size in args.sizes.split(","):
        path = checkpoint(args.cache.resolve(), size)
        run_dir = HERE / "results" / f"formats-{size}"
        # Calibrated before ready: on a busy CPU the demo model's calibration set takes minutes.
        server = Server({"MODEL_PATH": str(path), "MODEL_NAME": "model", "MAX_INPUTS_PER_REQUEST": "64",
                         "CALIBRATE_AT_STARTUP": "true", "REQUEST_TIMEOUT": "600"}, run_dir, size).start()
        try:
            server.wait_ready(timeout=1800)
            native = np.array(embed(server.port, texts, None, {"encoding_format": "float"}), dtype=np.float32)
            for dimensions in sorted({native.shape[1], min(native.shape[1], 256)}, reverse=True):
                for row in measure(server.port, "model", native, args.queries, dimensions):
                    row["checkpoint"] = size
                    results.append(row)
                    print(f"{size:5} {dimensions:5}d {row['format']:17} {row['bytes']:5} B  "
                          f"top-10 overlap {row['top10_overlap']:.3f}  Spearman {row['spearman']:.4f}"
                          + (f"  in range {row['inside_calibrated_range']:.3f}" if "inside_calibrated_range" in row else ""),
                          flush=True)
        finally:
            server.stop()
    out = HERE / "results" / f"formats-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"inputs": args.inputs, "queries": args.queries, "results": results}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
