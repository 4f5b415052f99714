"""The download command for a model directory: `python -m embedding_api.tools.download MODEL_PATH`.

Prints `weights_hint` (`embedding_api.model_paths`): how to fill a missing or incomplete model
directory, the same sentence as the server's start-up error. Only the standard library is imported,
so that it answers at once.
"""

from __future__ import annotations

import argparse

from ..model_paths import DEFAULT_REPO, DEMO_COMMAND, KNOWN_REPOS, download_command, repo_for, weights_hint

__all__ = ["DEFAULT_REPO", "DEMO_COMMAND", "KNOWN_REPOS", "download_command", "main", "repo_for", "weights_hint"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m embedding_api.tools.download",
                                     description="Print the command that downloads the weights for MODEL_PATH.")
    parser.add_argument("model_path", metavar="MODEL_PATH")
    parser.add_argument("--bin", default="", help="directory of the pip and hf commands (e.g. .venv/bin)")
    args = parser.parse_args(argv)
    print(weights_hint(args.model_path, args.bin))


if __name__ == "__main__":
    main()
