"""The command line of `python -m embedding_api`.

Every setting has a flag: `MODEL_PATH` is `--model-path`, `MAX_BATCH_SIZE` is `--max-batch-size`, and
so on. A flag wins over the environment and `.env`, which win over the defaults; a flag that is not
given leaves the setting to them. Values are checked by the same rules as the environment's.
A true/false setting is a switch: `--allow-private-image-urls` turns it on, `--no-allow-private-image-urls`
off, and `--allow-private-image-urls false` (a value after it, as in the environment) still works.
Every flag's help line is the setting's description in `settings.py`.
Only the standard library is imported here, so `--help` answers at once and starts nothing.
"""

from __future__ import annotations

import argparse

# The flags people reach for first, shown in their own group at the top of --help.
MAIN_SETTINGS = ("model_path", "model_name", "host", "port", "device", "dtype", "api_key", "embedding_dimension",
                 "log_level")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_bool(field) -> bool:
    return field.annotation is bool


def build_parser() -> argparse.ArgumentParser:
    from .settings import Settings  # pydantic only: no torch, no server

    parser = argparse.ArgumentParser(
        prog="python -m embedding_api",
        usage="python -m embedding_api [-h] [--model-path DIR] [--port N] [--SETTING VALUE ...]",
        description="Serve Qwen3-VL-Embedding / Qwen3-Embedding (and the Qwen3 rerankers) with an "
        "OpenAI-compatible /v1/embeddings API.",
        epilog="Every flag can also be set as an environment variable or in .env (e.g. --model-path is "
        "MODEL_PATH); a flag wins over both. A true/false setting is a switch: --SETTING turns it on, "
        "--no-SETTING off (--SETTING true|false also works). See .env.example and the README's settings table.",
    )
    main = parser.add_argument_group("main settings")
    other = parser.add_argument_group("other settings (see the README's settings table)")
    fields = Settings.model_fields
    for name in list(MAIN_SETTINGS) + sorted(set(fields) - set(MAIN_SETTINGS)):
        field = fields[name]
        default = field.default
        shown = "empty" if default is None or default == "" else str(default).lower() if _is_bool(field) else repr(default)
        help_text = f"{field.description or ''} (env {name.upper()}, default {shown})".strip()
        group = main if name in MAIN_SETTINGS else other
        if _is_bool(field):
            group.add_argument(flag(name), dest=name, metavar="true|false", nargs="?", const="true", default=None,
                               help=help_text.replace("%", "%%"))
            group.add_argument("--no-" + flag(name)[2:], dest=name, action="store_const", const="false",
                               help=f"the same as {flag(name)} false")
        else:
            group.add_argument(flag(name), dest=name, metavar=name.upper(), default=None,
                               help=help_text.replace("%", "%%"))
    return parser


def parse_overrides(argv: list[str] | None) -> dict[str, str]:
    """The settings given on the command line, by field name (`--help` prints and exits 0)."""
    args = build_parser().parse_args(argv)
    return {name: value for name, value in vars(args).items() if value is not None}
