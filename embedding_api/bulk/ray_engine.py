"""The Ray engine (`--engine ray`): the same job on Ray Data. Imported only for that engine.

Read: one streaming read task runs the job's reader (same files, same row numbers) and emits windows
of rows. Embed: `map_batches` over an actor pool of model replicas (`--concurrency`, `--num-gpus` per
replica: one GPU each on a GPU cluster), each a `WindowEmbedder`, so images are fetched and decoded,
inputs prepared and batches run on the replicas, exactly as the local engine does. Write: with the
order preserved, the driver streams the results into the same `Output` (same shards, manifest,
errors and resume). Ray is the local one started here, or the cluster at RAY_ADDRESS; MODEL_PATH and
local image paths must then be readable on every node.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..settings import Settings
from .embedder import JobOptions
from .progress import Progress
from .reading import Columns, Row, iter_rows, windows
from .writing import Output


def _source(files: list[str], columns: Columns, start_row: int, window: int, shard_rows: int):
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class RowSource(Datasource):
        """The job's rows, in order, as blocks of `window` rows: columns `row` and `payload` (JSON)."""

        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            def read():
                import pyarrow as pa

                rows = iter_rows([Path(f) for f in files], columns, start_row)
                for w in windows(rows, window, shard_rows):
                    yield pa.table({"row": pa.array([r.row for r in w], pa.int64()),
                                    "payload": pa.array([r.to_json() for r in w], pa.string())})

            meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=tuple(files))
            return [ReadTask(read, meta)]

    return RowSource()


class Replica:
    """One model replica of the actor pool: a window of rows in, one output row per input row out."""

    def __init__(self, settings: dict, options: JobOptions):
        from .embedder import WindowEmbedder

        self.embedder = WindowEmbedder(Settings(_env_file=None, **settings), options)

    def __call__(self, batch) -> dict:
        rows = [Row.from_json(p) for p in batch.column("payload").to_pylist()]
        result = self.embedder.embed(rows)
        where = {r.row: k for k, r in enumerate(rows)}
        vectors = np.zeros((len(rows), self.embedder.dimensions), np.float32)
        errors = np.full(len(rows), "", dtype=object)
        for row, vector in zip(result.rows, result.vectors):
            vectors[where[row.row]] = vector
        for row, reason in result.errors:
            errors[where[row.row]] = reason
        return {"row": np.array([r.row for r in rows], np.int64), "id": np.array([r.id for r in rows], dtype=object),
                "embedding": vectors, "error": errors}


def run_ray(settings: Settings, options: JobOptions, output: Output, files: list[Path], start_row: int,
            args, progress: Progress) -> int:
    """Embeds every row from `start_row` on; returns the end row (one past the last row read)."""
    import ray

    started_here = not ray.is_initialized()
    package = Path(__file__).resolve().parents[1]  # shipped to the workers, installed there or not
    address = os.environ.get("RAY_ADDRESS") or None
    local = {} if address else {"include_dashboard": False}
    ray.init(address=address, runtime_env={"py_modules": [str(package)]}, ignore_reinit_error=True,
             log_to_driver=False, **local)
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        num_gpus = args.num_gpus if args.num_gpus is not None else (1.0 if gpus else 0.0)
        concurrency = args.concurrency or (max(1, int(gpus // num_gpus)) if num_gpus else 1)
        replica_settings = settings.model_dump()
        if not num_gpus and not settings.torch_threads:
            replica_settings["torch_threads"] = max(1, int(args.num_cpus))  # not one per core in every replica

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # the shards are cut by row number, in order
        ctx.enable_progress_bars = False
        ds = ray.data.read_datasource(
            _source([str(f) for f in files], options.columns, start_row, args.window, output.shard_rows),
            override_num_blocks=1, num_cpus=0,  # reading is light; the replicas hold the CPUs
        )
        ds = ds.map_batches(
            Replica, fn_constructor_kwargs={"settings": replica_settings, "options": options},
            batch_size=args.window, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=concurrency),
            num_gpus=num_gpus, num_cpus=args.num_cpus,
        )
        end_row = output.next_row
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            rows, errors = batch["row"], batch["error"]
            ok = np.array([not e for e in errors], dtype=bool)
            failed = [{"row": int(r), "id": str(i), "error": str(e)}
                      for r, i, e in zip(rows, batch["id"], errors) if e]
            end_row = int(rows[-1]) + 1
            output.add(end_row, rows[ok].tolist(), [str(i) for i in batch["id"][ok]], batch["embedding"][ok],
                       failed)
            progress.update(len(rows), len(failed))
        return end_row
    finally:
        if started_here:
            ray.shutdown()
