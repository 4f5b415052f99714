"""Settings as a new user meets them: the command line's switches and help, the messages of a wrong
MODEL_KIND, and refusals that name the setting that would allow what was refused."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from embedding_api.cli import build_parser, parse_overrides
from embedding_api.settings import Settings

from .util import ROOT

PY = sys.executable


# --------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("argv, expected", [
    (["--allow-private-image-urls"], {"allow_private_image_urls": "true"}),
    (["--no-allow-private-image-urls"], {"allow_private_image_urls": "false"}),
    (["--allow-private-image-urls", "false"], {"allow_private_image_urls": "false"}),  # as before
    (["--allow-private-image-urls", "true", "--port", "7"], {"allow_private_image_urls": "true", "port": "7"}),
    (["--no-model-process", "--allow-image-urls"], {"model_process": "false", "allow_image_urls": "true"}),
    (["--allow-private-image-urls", "--port", "7"], {"allow_private_image_urls": "true", "port": "7"}),
])
def test_boolean_flags_are_switches(argv, expected):
    overrides = parse_overrides(argv)
    assert overrides == expected
    settings = Settings(**overrides)
    for name, value in expected.items():
        assert str(getattr(settings, name)).lower() == value


def test_every_flag_has_a_description_and_device_lists_its_forms():
    fields = Settings.model_fields
    assert [name for name, field in fields.items() if not (field.description or "").strip()] == []
    helps = {option: " ".join((action.help or "").split())
             for action in build_parser()._actions for option in action.option_strings}
    for name, field in fields.items():
        assert helps["--" + name.replace("_", "-")].startswith(field.description), name
    helps["device"] = helps["--device"]
    assert "cuda:0,cuda:1" in helps["device"] and "cuda:all" in helps["device"], helps["device"]
    out = subprocess.run([PY, "-m", "embedding_api", "--help"], capture_output=True, text=True, timeout=60,
                         cwd=str(ROOT))
    text = " ".join(out.stdout.split())
    assert out.returncode == 0 and "--no-allow-private-image-urls" in text
    assert re.search(r"--allow-private-image-urls \[true\|false\] allow image and video URLs", text), text
