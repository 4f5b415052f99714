"""`python -m embedding_api.bulk INPUT OUTPUT_DIR [options]`: embed a corpus into Parquet shards.

Exit status: 0 done (also when OUTPUT_DIR already holds the finished job), 1 the model or the input
cannot be used, 2 bad arguments or settings, 3 stopped by --max-errors, 130 interrupted (run the same
command again to resume).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

from pydantic import ValidationError

from ..model_paths import ModelLoadError, hidden_size, read_config
from ..settings import Settings, settings_error_message
from .reading import Columns, InputError, check_columns, count_rows, discover, iter_rows

# Flags that set a server setting; each overrides the environment and .env.
_SETTING_FLAGS = {
    "model_path": ("--model-path", str, "MODEL_PATH: the checkpoint directory"),
    "device": ("--device", str, "DEVICE: auto, cpu, cuda, cuda:N"),
    "dtype": ("--dtype", str, "DTYPE: auto, float32, bfloat16, float16, int8 (CPU)"),
    "torch_threads": ("--torch-threads", int, "TORCH_THREADS: torch CPU threads (0 = one per core)"),
    "max_batch_size": ("--batch-size", int, "MAX_BATCH_SIZE: inputs per forward pass"),
    "max_batch_tokens": ("--max-batch-tokens", int, "MAX_BATCH_TOKENS: padded tokens per forward pass"),
    "max_input_tokens": ("--max-input-tokens", int, "MAX_INPUT_TOKENS: longer inputs are truncated"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m embedding_api.bulk",
        description="Embed every row of INPUT into Parquet shards in OUTPUT_DIR (columns id, embedding), with "
        "the server's model, input rules and normalisation. Rows that fail go to OUTPUT_DIR/_errors.jsonl. "
        "Running the same command again resumes after the last finished shard. Model and image settings "
        "(MODEL_PATH, DEVICE, ALLOW_PRIVATE_IMAGE_URLS, ...) are read from the environment and .env as by "
        "the server; the flags below override them.",
    )
    p.add_argument("input", metavar="INPUT", help="a .jsonl, .csv or .parquet file, a directory of them, or a glob")
    p.add_argument("output", metavar="OUTPUT_DIR",
                   help="where the shards (part-*.parquet), _manifest.json and _errors.jsonl go")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this process (default); ray: Ray Data with an actor pool of model replicas "
                   "(a local Ray, or the cluster at RAY_ADDRESS)")
    cols = p.add_argument_group("columns")
    cols.add_argument("--id-column", default="id", help="ids (default: id; missing: the row number)")
    cols.add_argument("--text-column", default="text", help="text (default: text)")
    cols.add_argument("--image-column", default="image",
                      help="image: a local path, an http(s) URL, a data URI or base64 (default: image)")
    cols.add_argument("--video-column", default="video",
                      help="video: a local path, an http(s) URL, a data URI or base64; in JSONL also a list of "
                      "frames or an object as the API takes ({\"data\" | \"frames\", \"fps\", \"max_frames\"}) "
                      "(default: video)")
    cols.add_argument("--instruction-column", default="instruction", help="per-row instruction (default: instruction)")
    emb = p.add_argument_group("embedding")
    emb.add_argument("--dimensions", type=int, help="output size (default: EMBEDDING_DIMENSION or the model's)")
    emb.add_argument("--input-type", choices=("query", "document"), help="query: apply the query instruction")
    emb.add_argument("--instruction", help="instruction for every row without its own")
    job = p.add_argument_group("job")
    job.add_argument("--shard-rows", type=int, default=10000, help="input rows per output shard (default 10000)")
    job.add_argument("--window", type=int, default=512,
                     help="rows read, prepared and sorted by length together (default 512)")
    job.add_argument("--max-errors", type=int, default=None, help="stop when more rows than this have failed")
    job.add_argument("--no-progress", action="store_true", help="no progress bar")
    ray = p.add_argument_group("ray engine")
    ray.add_argument("--concurrency", type=int, default=None,
                     help="model replicas (actors); default: the cluster's GPUs, or 1 without GPUs")
    ray.add_argument("--num-gpus", type=float, default=None,
                     help="GPUs per replica; default 1 when the cluster has GPUs, else 0")
    ray.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica (default 1)")
    model = p.add_argument_group("model settings (override the environment and .env)")
    for name, (flag, kind, text) in _SETTING_FLAGS.items():
        model.add_argument(flag, dest=name, type=kind, help=text)
    return p


def _fail(status: int, message: str) -> int:
    print(f"embedding_api.bulk: {message}", file=sys.stderr, flush=True)
    return status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {name: getattr(args, name) for name in _SETTING_FLAGS if getattr(args, name) is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        return _fail(2, settings_error_message(exc))
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name, value in (("--shard-rows", args.shard_rows), ("--window", args.window)):
        if value < 1:
            return _fail(2, f"{name} must be at least 1")

    columns = Columns(id=args.id_column, text=args.text_column, image=args.image_column,
                      instruction=args.instruction_column, video=args.video_column)
    try:
        native = hidden_size(read_config(settings.model_path))
        files = discover(args.input)
        check_columns(files, columns)
    except (ModelLoadError, InputError) as exc:
        return _fail(1, str(exc))
    dimensions = args.dimensions or settings.embedding_dimension or native
    if not 1 <= dimensions <= native:
        return _fail(2, f"--dimensions must be between 1 and {native} for this model, got {dimensions}")
    # torch and transformers (seconds to import) only once the settings, the model directory and the
    # input files have been checked.
    from .embedder import DimensionError, JobOptions
    from .writing import Output, OutputError, TooManyErrors

    options = JobOptions(dimensions=dimensions, input_type=args.input_type, instruction=args.instruction,
                         columns=columns)
    job = {"input": [str(f) for f in files], "columns": asdict(columns), "dimensions": dimensions,
           "input_type": args.input_type, "instruction": args.instruction,
           "model_path": str(Path(settings.model_path).resolve()), "shard_rows": args.shard_rows}
    try:
        output = Output(args.output, job, dimensions, args.shard_rows, args.max_errors)
    except (OutputError, OSError) as exc:
        return _fail(1, str(exc))
    if output.complete:
        print(json.dumps({"complete": True, "output": str(output.dir), "rows": output.manifest["rows"],
                          "errors": output.manifest["errors"], "note": "already finished; nothing to do"}))
        return 0

    from .progress import Progress

    start = output.next_row
    total = count_rows(files)
    status, progress = 0, Progress(None, 0, enabled=False)
    try:
        if args.engine == "ray":
            from .ray_engine import run_ray

            progress = Progress(total, start, enabled=not args.no_progress)
            end_row = run_ray(settings, options, output, files, start, args, progress)
        else:
            from .embedder import WindowEmbedder
            from .local import run_local

            embedder = WindowEmbedder(settings, options)  # the model loads before the clock starts
            progress = Progress(total, start, enabled=not args.no_progress)
            try:
                end_row = run_local(embedder, output, iter_rows(files, columns, start), args.window, progress)
            finally:
                embedder.close()
        output.finish(end_row)
    except TooManyErrors as exc:
        output.abort(show_errors=True)
        status = _fail(3, f"stopped: {exc}")
    except KeyboardInterrupt:
        output.abort()
        status = _fail(130, f"interrupted; rows before {output.next_row} are finished: run the same command "
                            "again to resume")
    except (ModelLoadError, DimensionError, InputError) as exc:
        output.abort()
        status = _fail(1, str(exc))
    finally:
        progress.close()
    summary = {**progress.summary(), "resumed_at_row": start, "complete": output.complete,
               "output": str(output.dir), "total_rows": output.manifest["rows"],
               "total_errors": output.manifest["errors"]}
    print(json.dumps(summary), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
