"""Settings as a new user meets them: the command line's switches and help, the messages of a wrong
MODEL_KIND, and refusals that name the setting that would allow what was refused."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from embedding_api.cli import build_parser, parse_overrides
from embedding_api.settings import Settings

from .util import ROOT, child_env, free_port, png_bytes, sample_image

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


# --------------------------------------------------------------------------- MODEL_KIND against the checkpoint


def _serve(env: dict[str, str], cwd) -> tuple[int, str]:
    proc = subprocess.run([PY, "-m", "embedding_api", "--port", str(free_port()), "--host", "127.0.0.1"],
                          env=child_env(env), cwd=str(cwd), capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("checkpoint, model_process", [("tiny_vl", "true"), ("tiny_text", "false")])
def test_reranker_kind_on_an_embedding_checkpoint_is_one_line(request, tmp_path, checkpoint, model_process):
    """MODEL_KIND=reranker on an embedder: exit 1 with one line naming the setting (in the model process too)."""
    path = request.getfixturevalue(checkpoint)
    rc, out = _serve({"MODEL_PATH": str(path), "MODEL_KIND": "reranker", "MODEL_PROCESS": model_process,
                      "TORCH_THREADS": "1"}, tmp_path)
    assert rc == 1, out
    assert "Traceback" not in out and "KeyError" not in out, out
    critical = [line for line in out.splitlines() if "CRITICAL" in line]
    assert len(critical) == 1, out
    assert "cannot be served as a reranker" in critical[0] and "MODEL_KIND=embedding or auto" in critical[0], out


def test_a_kind_the_checkpoint_contradicts_is_a_warning(tiny_vl, tiny_text, tiny_text_reranker, tiny_vl_reranker):
    from embedding_api.runners.kinds import contradiction

    def check(path, setting):
        return contradiction(str(path), json.loads((path / "config.json").read_text()), setting)

    # the reverse: a reranker served as an embedder loads, with a warning that names the setting to change
    warning = check(tiny_text_reranker, "embedding")
    assert warning and "MODEL_KIND=reranker or auto" in warning and "lm_head.weight" in warning, warning
    assert "MODEL_KIND=reranker or auto" in check(tiny_vl_reranker, "embedding")
    assert "MODEL_KIND=embedding or auto" in check(tiny_text, "reranker")
    # agreement, auto, and a checkpoint with no decisive sign (a tied VL reranker is one) give none
    assert check(tiny_text_reranker, "reranker") is None and check(tiny_text, "auto") is None
    assert check(tiny_vl, "reranker") is None


# --------------------------------------------------------------------------- refusals name the setting; the opt-in shrink


@pytest.fixture(scope="module")
def shrink_server(start_server, tiny_vl):
    """Default URL policy (no private addresses) and the opt-in pre-shrink at 512."""
    return start_server({"MODEL_PATH": str(tiny_vl), "MAX_IMAGE_SIZE": "512", "MAX_IMAGE_WIDTH": "512",
                         "MAX_IMAGE_HEIGHT": "512", "TORCH_THREADS": "1"})


def test_private_urls_are_refused_naming_the_setting(shrink_server, image_server):
    import httpx

    url = image_server.add("/hint.png", png_bytes(sample_image(40, 30)))
    inputs = [{"type": "image", "data": url}, {"type": "video_url", "video_url": {"url": url + ".mp4"}},
              {"type": "video", "frames": [url, url]}]
    with httpx.Client(base_url=shrink_server.base_url, timeout=60) as c:
        for item in inputs:
            response = c.post("/v1/embeddings", json={"input": [item]})
            assert response.status_code == 400, response.text
            message = response.json()["error"]["message"]
            assert "ALLOW_PRIVATE_IMAGE_URLS=true" in message and "non-public" in message, message


def test_the_opt_in_shrink_is_reported_as_not_official(shrink_server):
    import httpx

    with httpx.Client(base_url=shrink_server.base_url, timeout=60) as c:
        health = c.get("/health").json()
        card = c.get("/v1/models").json()["data"][0]
    shrink = {"max_image_size": 512, "max_image_width": 512, "max_image_height": 512}
    assert health["image_preprocessing"]["pre_shrink"] == shrink and health["image_preprocessing"]["official"] is False
    assert card["image_preprocessing"] == health["image_preprocessing"]
    assert "image_resizing=pre-shrink(size=512,width=512,height=512) pixels=4096..1843200" in shrink_server.output()
