"""Bulk embedding jobs: `python -m embedding_api.bulk INPUT OUTPUT_DIR`.

Files of rows in (JSONL, CSV, Parquet), Parquet shards of vectors out, through the same input rules,
runners, media code and normalisation as the server. `reading` streams the rows, `embedder` turns a
window of rows into vectors, `writing` owns the output directory (shards, manifest, errors, resume),
`local` runs it in this process and `ray_engine` on Ray Data (imported only for `--engine ray`).
"""
