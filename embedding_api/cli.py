"""The command line of `python -m embedding_api`.

Every setting has a flag: `MODEL_PATH` is `--model-path`, `MAX_BATCH_SIZE` is `--max-batch-size`, and
so on. A flag wins over the environment and `.env`, which win over the defaults; a flag that is not
given leaves the setting to them. Values are checked by the same rules as the environment's.
Only the standard library is imported here, so `--help` answers at once and starts nothing.
"""

from __future__ import annotations

import argparse

# The flags people reach for first, shown in their own group at the top of --help.
MAIN_SETTINGS = {
    "model_path": "checkpoint directory (Qwen3-VL-Embedding or Qwen3-Embedding)",
    "model_name": "the model id clients send and responses echo",
    "host": "bind address",
    "port": "port",
    "device": "auto, cpu, cuda or cuda:N",
    "dtype": "auto, float32, bfloat16 or float16",
    "api_key": "one key or a comma-separated list; empty = no auth",
    "embedding_dimension": "default output size (1..the model's size)",
    "log_level": "CRITICAL, ERROR, WARNING, INFO or DEBUG",
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    from .settings import Settings  # pydantic only: no torch, no server

    parser = argparse.ArgumentParser(
        prog="python -m embedding_api",
        usage="python -m embedding_api [-h] [--model-path DIR] [--port N] [--SETTING VALUE ...]",
        description="Serve Qwen3-VL-Embedding / Qwen3-Embedding with an OpenAI-compatible /v1/embeddings API.",
        epilog="Every flag can also be set as an environment variable or in .env (e.g. --model-path is "
        "MODEL_PATH); a flag wins over both. See .env.example and the README's settings table.",
    )
    main = parser.add_argument_group("main settings")
    other = parser.add_argument_group("other settings (see the README's settings table)")
    fields = Settings.model_fields
    for name in list(MAIN_SETTINGS) + sorted(set(fields) - set(MAIN_SETTINGS)):
        default = fields[name].default
        shown = "" if default is None else default
        help_text = f"{MAIN_SETTINGS.get(name, '')} (env {name.upper()}, default {shown!r})".strip()
        group = main if name in MAIN_SETTINGS else other
        group.add_argument(flag(name), dest=name, metavar=name.upper(), default=None, help=help_text)
    return parser


def parse_overrides(argv: list[str] | None) -> dict[str, str]:
    """The settings given on the command line, by field name (`--help` prints and exits 0)."""
    args = build_parser().parse_args(argv)
    return {name: value for name, value in vars(args).items() if value is not None}
