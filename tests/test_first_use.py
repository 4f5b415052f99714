"""What a new user meets first: the download command, the command line, settings errors, the torch
wheel `make install` picks, and small input gaps (integral float dimensions, `truncate`, local file
paths sent as images, token ids on a checkpoint whose tokenizer appends <|endoftext|>)."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest

from embedding_api.observability.startup import is_loopback, no_key_warning
from embedding_api.tools import torch_wheel
from embedding_api.model_paths import KNOWN_REPOS, repo_for, weights_hint
from embedding_api.tools.checkpoint import write_checkpoint

from .util import ROOT, ImageServer, child_env, free_port, png_bytes, sample_image

PY = sys.executable


def run(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 240) -> tuple[int, str]:
    proc = subprocess.run(args, env=child_env(env), cwd=str(cwd), capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def assert_error(response: httpx.Response, param: str, code: str | None = None) -> str:
    assert response.status_code == 400, response.text
    err = response.json()["error"]
    assert err["param"] == param, err
    if code:
        assert err["code"] == code, err
    return err["message"]


# --------------------------------------------------------------------------- 1. the download command


def test_the_download_command_is_hf_download_everywhere():
    places = {
        "README.md": (ROOT / "README.md").read_text(),
        "models/README.md": (ROOT / "models" / "README.md").read_text(),
        "weights_hint": weights_hint("./models/Qwen3-VL-Embedding-2B"),
    }
    for where, text in places.items():
        assert "huggingface-cli download" not in text, where
        assert re.search(r"\bhf download Qwen/Qwen3-(VL-)?Embedding-", text), where
    # The command exists in the huggingface_hub this project installs and takes --local-dir.
    hf = shutil.which("hf", path=os.path.dirname(PY))
    assert hf, "huggingface_hub's `hf` command is not installed next to this Python"
    out = subprocess.run([hf, "download", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--local-dir" in out.stdout, out.stdout + out.stderr


def test_the_startup_error_prints_hf_download(tmp_path):
    rc, out = run([PY, "-m", "embedding_api", "--model-path", str(tmp_path / "none")], {}, tmp_path)
    assert rc == 1, out
    assert f"hf download Qwen/Qwen3-VL-Embedding-2B --local-dir {tmp_path / 'none'}`" in out, out
    assert "Traceback" not in out, out


@pytest.mark.parametrize("repo", KNOWN_REPOS)
def test_the_download_hint_takes_the_repository_from_the_directory_name(repo):
    name = repo.split("/")[1]
    for path in (f"./models/{name}", f"/data/{name.lower()}/", name):
        assert repo_for(path) == repo, path
        assert f"hf download {repo} --local-dir {path}`" in weights_hint(path), path
    assert repo_for(f"./models/{name}-finetuned") is None


def test_the_download_hint_keeps_an_unknown_directory_and_quotes_it():
    hint = weights_hint("./models/my model")
    assert "hf download Qwen/Qwen3-VL-Embedding-2B --local-dir './models/my model'`" in hint, hint
    assert "Qwen/Qwen3-Embedding-0.6B" in hint  # the other repositories are named


def test_make_run_prints_the_download_command_for_the_configured_path(tmp_path):
    """`MODEL_PATH=./models/Qwen3-Embedding-0.6B make run` names that repository and that directory."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec {PY} "$@"\n')
    python.chmod(0o755)
    (venv / ".installed").touch()
    model = tmp_path / "models" / "Qwen3-Embedding-0.6B"
    env = child_env(drop=("MAKE",))
    proc = subprocess.run(["make", "-s", "run", f"VENV={venv}", f"MODEL_PATH={model}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert f"No model at {model}." in out, out
    assert (f"{venv}/bin/pip install -U huggingface_hub && {venv}/bin/hf download Qwen/Qwen3-Embedding-0.6B "
            f"--local-dir {model}`") in out, out
    assert "Qwen3-VL-Embedding-2B" not in out and "make demo" in out, out


@pytest.mark.parametrize("name", ["Qwen3-Reranker-4B", "Qwen3-VL-Embedding-8B"])
def test_the_server_and_the_bulk_job_name_the_repository_of_the_missing_directory(tmp_path, name):
    model = tmp_path / "models" / name
    want = f"hf download Qwen/{name} --local-dir {model}`"
    rc, out = run([PY, "-m", "embedding_api"], {"MODEL_PATH": str(model)}, tmp_path)
    assert rc == 1 and want in out and "Traceback" not in out, out
    (tmp_path / "in.jsonl").write_text('{"id": 1, "text": "a"}\n')
    rc, out = run([PY, "-m", "embedding_api.bulk", str(tmp_path / "in.jsonl"), str(tmp_path / "out"),
                   "--model-path", str(model)], {}, tmp_path)
    assert rc == 1 and want in out and "Traceback" not in out, out


_WITHOUT_TORCH = """
import atexit, runpy, sys
atexit.register(lambda: print("torch imported:", "torch" in sys.modules, file=sys.stderr))
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("module, flags", [("embedding_api", ["--log-level", "verbose"]), ("embedding_api", []),
                                           ("embedding_api.bulk", []), ("embedding_api.ray_serve", [])])
def test_a_bad_setting_or_a_missing_directory_is_said_before_torch_is_imported(tmp_path, module, flags):
    """The settings and the model directory are checked first: the message comes without the seconds of
    importing torch and transformers."""
    model = tmp_path / "models" / "Qwen3-Embedding-0.6B"
    (tmp_path / "in.jsonl").write_text('{"id": 1, "text": "a"}\n')
    args = [str(tmp_path / "in.jsonl"), str(tmp_path / "out")] if module.endswith("bulk") else []
    rc, out = run([PY, "-c", _WITHOUT_TORCH, module, *args, *flags], {"MODEL_PATH": str(model)}, tmp_path)
    assert rc == 1 and "Traceback" not in out, out
    if flags:
        assert "LOG_LEVEL='verbose'" in out, out
    else:
        assert f"Model directory {str(model)!r} does not exist" in out and "hf download Qwen/Qwen3-Embedding-0.6B" in out, out
    assert "torch imported: False" in out, out


# --------------------------------------------------------------------------- no API key


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True),
                                            ("::1", True), ("0.0.0.0", False), ("::", False),
                                            ("10.1.2.3", False), ("example.internal", False)])
def test_loopback_hosts(host, loopback):
    assert is_loopback(host) is loopback


def test_the_no_key_warning_names_the_address():
    level, message = no_key_warning(("0.0.0.0", 8000))
    assert level == logging.WARNING
    assert message.startswith("listening on 0.0.0.0:8000 with no API_KEY: anyone who can reach this address "
                              "can use the API"), message
    level, message = no_key_warning(("127.0.0.1", 8000))
    assert level == logging.INFO and "only this machine" in message, message
    assert no_key_warning(("::", 8000))[1].startswith("listening on [::]:8000 with no API_KEY: anyone")
    assert no_key_warning(None)[1] == "API_KEY is empty: the API is open to anyone who can reach it"


def test_a_server_on_every_interface_without_a_key_says_so(tiny_vl, tmp_path):
    port = free_port()
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([PY, "-m", "embedding_api"], cwd=str(tmp_path), stdout=log, stderr=subprocess.STDOUT,
                                env=child_env({"MODEL_PATH": str(tiny_vl), "HOST": "0.0.0.0", "PORT": str(port),
                                               "TORCH_THREADS": "1"}))
    want = f"listening on 0.0.0.0:{port} with no API_KEY: anyone who can reach this address can use the API"
    try:
        deadline = time.monotonic() + 600  # a hang guard
        while want not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        assert "WARNING" in next(x for x in log_path.read_text().splitlines() if want in x)
    finally:
        proc.terminate()
        proc.wait(60)


# --------------------------------------------------------------------------- 7. the command line


def test_help_prints_every_main_flag_and_starts_nothing(tmp_path):
    rc, out = run([PY, "-m", "embedding_api", "--help"], {"MODEL_PATH": str(tmp_path / "none")}, tmp_path)
    assert rc == 0, out
    for flag in ("--model-path", "--model-name", "--host", "--port", "--device", "--dtype", "--api-key",
                 "--log-level", "--embedding-dimension", "--max-batch-size", "--max-input-tokens"):
        assert flag in out, flag
    assert "MODEL_PATH" in out  # each flag names its environment variable
    assert "does not exist" not in out and "Uvicorn" not in out  # no settings read, no model, no server


def test_bad_flags_are_one_line_and_exit(tmp_path):
    rc, out = run([PY, "-m", "embedding_api", "--port", "http"], {}, tmp_path)
    assert rc == 1 and "PORT='http'" in out and "Traceback" not in out, out
    rc, out = run([PY, "-m", "embedding_api", "--no-such-flag", "1"], {}, tmp_path)
    assert rc == 2 and "unrecognized arguments: --no-such-flag" in out, out


def test_flags_override_the_environment_and_dotenv(tiny_vl, tmp_path):
    """Env and .env name a wrong model, name and port; the flags win over both."""
    port, env_port = free_port(), free_port()
    (tmp_path / ".env").write_text("MODEL_NAME=name-from-dotenv\nAPI_KEY=key-from-dotenv\n")
    env = {"MODEL_PATH": str(tmp_path / "no-such-model"), "PORT": str(env_port), "HOST": "127.0.0.1",
           "TORCH_THREADS": "1"}
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(
        [PY, "-m", "embedding_api", "--model-path", str(tiny_vl), "--model-name", "name-from-flag",
         "--port", str(port), "--api-key", "key-from-flag", "--log-level", "warning"],
        env=child_env(env), cwd=str(tmp_path), stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600  # a hang guard
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.2)
        health = httpx.get(base + "/health").json()
        assert health["model"] == "name-from-flag" and health["model_path"] == str(tiny_vl)
        assert httpx.get(base + "/v1/models", headers={"Authorization": "Bearer key-from-dotenv"}).status_code == 401
        models = httpx.get(base + "/v1/models", headers={"Authorization": "Bearer key-from-flag"})
        assert [m["id"] for m in models.json()["data"]] == ["name-from-flag"]
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{env_port}/health", timeout=2)
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
        log.close()
    assert rc == 0


# --------------------------------------------------------------------------- 11. LOG_LEVEL


def test_a_bad_log_level_is_one_line_and_exit_1(tiny_vl, tmp_path):
    """Under both start commands, and as a flag; the three processes run at once."""
    env = {"MODEL_PATH": str(tiny_vl), "LOG_LEVEL": "verbose"}
    runs = {
        "module": ([PY, "-m", "embedding_api"], env),
        "uvicorn": ([PY, "-m", "uvicorn", "embedding_api.main:app", "--host", "127.0.0.1", "--port", str(free_port())],
                    env),
        "flag": ([PY, "-m", "embedding_api", "--log-level", "verbose"], {**env, "LOG_LEVEL": "INFO"}),
    }
    procs = {name: subprocess.Popen(args, env=child_env(e), cwd=str(tmp_path), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True) for name, (args, e) in runs.items()}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 1, (name, out)
        assert "LOG_LEVEL='verbose'" in out and "CRITICAL, ERROR, WARNING, INFO, DEBUG" in out, (name, out)
        assert "Traceback" not in out and "Uvicorn running" not in out, (name, out)
        assert len([line for line in out.splitlines() if "LOG_LEVEL" in line]) == 1, (name, out)


def test_log_level_is_case_insensitive():
    from embedding_api.settings import Settings

    assert Settings(_env_file=None, log_level="debug").log_level == "DEBUG"


# --------------------------------------------------------------------------- 8. the torch wheel


def _fake_nvidia_smi(bin_dir: Path, gpu: bool) -> None:
    script = bin_dir / "nvidia-smi"
    body = 'echo "GPU 0: NVIDIA H100 (UUID: GPU-0)"' if gpu else 'echo "NVIDIA-SMI has failed" >&2; exit 9'
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)


def _torch_wheel_args(tmp_path: Path, index: str, gpu: bool | None) -> tuple[list[str], str]:
    bin_dir = tmp_path / ("gpu" if gpu else "nogpu" if gpu is not None else "none")
    bin_dir.mkdir(exist_ok=True)
    if gpu is not None:
        _fake_nvidia_smi(bin_dir, gpu)
    env = {"PATH": str(bin_dir), "TORCH_CPU_INDEX": index, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([PY, "-m", "embedding_api.tools.torch_wheel"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split(), out.stderr


def test_torch_wheel_adds_the_cpu_index_only_without_a_gpu_and_when_reachable(tmp_path):
    server = ImageServer()
    try:
        index = server.add("/whl/cpu/torch/", b"<html>torch-2.13.0+cpu</html>", "text/html")[: -len("/torch/")]
        args, why = _torch_wheel_args(tmp_path, index, gpu=None)  # no nvidia-smi at all
        assert args == ["--extra-index-url", index], why
        args, why = _torch_wheel_args(tmp_path, index, gpu=False)  # nvidia-smi without a GPU
        assert args == ["--extra-index-url", index], why
        args, why = _torch_wheel_args(tmp_path, index, gpu=True)
        assert args == [] and "NVIDIA GPU is present" in why
    finally:
        server.close()
    unreachable = f"http://127.0.0.1:{free_port()}/whl/cpu"
    args, why = _torch_wheel_args(tmp_path, unreachable, gpu=None)
    assert args == [] and "not reachable" in why and "CUDA build" in why
    args, why = _torch_wheel_args(tmp_path, "", gpu=None)
    assert args == []


def _fake_wheel(directory: Path, version: str) -> None:
    """A minimal valid wheel named torch (no code), enough for pip to resolve it."""
    name = f"torch-{version}-py3-none-any.whl"
    dist = f"torch-{version}.dist-info"
    files = {
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{dist}/RECORD,,\n"
    directory.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(directory / name, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)


def _simple_index(root: Path, version: str) -> str:
    _fake_wheel(root / "torch", version)
    wheel = next((root / "torch").iterdir()).name
    (root / "torch" / "index.html").write_text(f'<html><body><a href="{wheel}">{wheel}</a></body></html>')
    (root / "index.html").write_text('<html><body><a href="torch/">torch</a></body></html>')
    return root.as_uri()


def test_pip_takes_the_cpu_wheel_from_the_extra_index(tmp_path):
    """What the Makefile comment claims: with the CPU index as an EXTRA index, `torch==2.13.0` resolves
    to 2.13.0+cpu even though the main index has a plain 2.13.0 (pip, isolated from this host's config)."""
    main = _simple_index(tmp_path / "pypi", "2.13.0")
    cpu = _simple_index(tmp_path / "cpu", "2.13.0+cpu")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull

    def resolve(*extra: str) -> str:
        out = subprocess.run(
            [PY, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps", "--quiet",
             "--report", "-", "--index-url", main, *extra, "torch==2.13.0"],
            env=env, capture_output=True, text=True, timeout=120,
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["install"][0]["metadata"]["version"]

    assert resolve() == "2.13.0"
    assert resolve("--extra-index-url", cpu) == "2.13.0+cpu"
    # ... and the Makefile hands the helper's arguments to exactly that pip command.
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r'pip install -q "\$\(TORCH_SPEC\)" \\\n\s+\$\$\(TORCH_CPU_INDEX="\$\(TORCH_CPU_INDEX\)" '
                     r"\$\(BIN\)/python -m embedding_api\.tools\.torch_wheel\)", makefile)
    assert torch_wheel.DEFAULT_CPU_INDEX in makefile


# --------------------------------------------------------------------------- an HTTP server for 5, 6, 9, 10


@pytest.fixture(scope="module")
def vl_eos(tmp_path_factory) -> Path:
    """A Qwen3-VL checkpoint whose tokenizer appends <|endoftext|>, as Qwen3-Embedding's does."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "vl-eos", family="qwen3_vl", size="tiny",
                            seed=1, append_eos=True)


@pytest.fixture(scope="module")
def eos_client(start_server, vl_eos):
    server = start_server({"MODEL_PATH": str(vl_eos), "MAX_INPUT_TOKENS": "64", "TORCH_THREADS": "1"})
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield client


def vecs(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)


# --------------------------------------------------------------------------- 9. token ids, VL family


def test_vl_token_ids_get_the_post_processor_tokens_like_text(eos_client, vl_eos):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(vl_eos)
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok("hi")["input_ids"][-1] == eot  # the checkpoint's tokenizer does append it
    texts = ["The capital of China is Beijing.", "Today is Friday."]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    by_text = eos_client.post("/v1/embeddings", json={"input": texts})
    by_ids = eos_client.post("/v1/embeddings", json={"input": ids})
    assert by_ids.json()["usage"] == by_text.json()["usage"]  # the same tokens, <|endoftext|> included
    cos = np.sum(vecs(by_text) * vecs(by_ids), axis=1)
    assert np.all(cos > 0.9999), cos
    # with an instruction too
    a = vecs(eos_client.post("/v1/embeddings", json={"input": texts[0], "instruction": "Find it"}))
    b = vecs(eos_client.post("/v1/embeddings", json={"input": ids[0], "instruction": "Find it"}))
    assert float(a[0] @ b[0]) > 0.9999


# --------------------------------------------------------------------------- 10. truncate


LONG = "The capital of China is Beijing. " * 40  # far over MAX_INPUT_TOKENS=64


def test_truncate_false_refuses_the_element_that_is_too_long(eos_client):
    body = {"input": ["short one", LONG], "truncate": False}
    message = assert_error(eos_client.post("/v1/embeddings", json=body), "input[1]", "input_too_long")
    assert "MAX_INPUT_TOKENS=64" in message and "truncate" in message, message
    long_ids = list(range(300, 400))
    r = eos_client.post("/v1/embeddings", json={"input": [[5, 6], long_ids], "truncate": False})
    assert_error(r, "input[1]", "input_too_long")
    image = "data:image/png;base64," + base64.b64encode(png_bytes(sample_image(32, 32))).decode()
    r = eos_client.post("/v1/embeddings", json={"input": {"text": LONG, "image": image}, "truncate": False})
    assert_error(r, "input", "input_too_long")  # text + image
    r = eos_client.post("/v1/embeddings", json={"input": {"text": LONG, "image": image}})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 64, r.text


def test_truncate_default_and_true_cut_the_end(eos_client):
    default = eos_client.post("/v1/embeddings", json={"input": LONG})
    explicit = eos_client.post("/v1/embeddings", json={"input": LONG, "truncate": True})
    assert default.json()["usage"]["prompt_tokens"] == 64
    assert np.allclose(vecs(default), vecs(explicit), atol=1e-6)
    short = eos_client.post("/v1/embeddings", json={"input": "short one", "truncate": False})
    assert np.allclose(vecs(short), vecs(eos_client.post("/v1/embeddings", json={"input": "short one"})), atol=1e-6)


@pytest.mark.parametrize("value", ["no", 0, [], {}])
def test_truncate_must_be_a_boolean(eos_client, value):
    assert_error(eos_client.post("/v1/embeddings", json={"input": "a", "truncate": value}), "truncate")


def test_truncate_false_in_the_text_family(tiny_text):
    """Qwen3-Embedding: the same choice, in the runner the service calls."""
    from embedding_api.runners import InputTooLong, load_runner
    from embedding_api.settings import Settings

    runner = load_runner(Settings(_env_file=None, model_path=str(tiny_text), max_input_tokens=32, torch_threads=1))
    eot = runner.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    cut = runner.prepare([LONG], [], None, None)
    assert len(cut.input_ids) == 32 and cut.input_ids[-1] == eot
    with pytest.raises(InputTooLong, match="MAX_INPUT_TOKENS=32"):
        runner.prepare([LONG], [], None, None, truncate=False)
    with pytest.raises(InputTooLong):
        runner.prepare([], [], list(range(100, 200)), None, truncate=False)
    assert runner.prepare(["short"], [], None, None, truncate=False).input_ids == runner.prepare(
        ["short"], [], None, None).input_ids


# --------------------------------------------------------------------------- 6. dimensions


def test_integral_float_dimensions_are_accepted(eos_client):
    v = vecs(eos_client.post("/v1/embeddings", json={"input": "a", "dimensions": 32.0}))
    assert v.shape == (1, 32)
    assert np.allclose(v, vecs(eos_client.post("/v1/embeddings", json={"input": "a", "dimensions": 32})))
    assert vecs(eos_client.post("/v1/embeddings", json={"input": "a", "dimension": 16.0})).shape == (1, 16)
    assert_error(eos_client.post("/v1/embeddings", json={"input": "a", "dimensions": 32.5}), "dimensions")
    assert_error(eos_client.post("/v1/embeddings", json={"input": "a", "dimensions": 65.0}), "dimensions")


def test_dimensions_and_dimension_must_agree(eos_client):
    r = eos_client.post("/v1/embeddings", json={"input": "a", "dimensions": 32, "dimension": 16})
    message = assert_error(r, "dimensions", "invalid_value")
    assert "dimensions (32)" in message and "dimension (16)" in message, message
    same = eos_client.post("/v1/embeddings", json={"input": "a", "dimensions": 32, "dimension": "32"})
    assert vecs(same).shape == (1, 32)


# --------------------------------------------------------------------------- 5. local file paths


@pytest.mark.parametrize("ref", ["/tmp/cat.png", "./cat.png", "~/Pictures/cat.jpg", "cat.jpeg",
                                 "file:///tmp/cat.png", "C:\\Users\\me\\cat.png"])
def test_a_local_path_as_an_image_says_how_to_send_the_file(eos_client, ref):
    message = assert_error(eos_client.post("/v1/embeddings", json={"input": {"type": "image", "data": ref}}),
                           "input", "invalid_image")
    assert "does not read local files" in message, message
    assert "base64 -w0" in message and "data:image/png;base64," in message, message


def test_base64_that_is_not_a_path_keeps_its_own_message(eos_client):
    broken_jpeg = base64.b64encode(b"\xff\xd8\xff\xe0" + b"\x00" * 30).decode()  # starts with "/9j/"
    assert broken_jpeg.startswith("/9j/")
    message = assert_error(eos_client.post("/v1/embeddings", json={"input": {"type": "image", "data": broken_jpeg}}),
                           "input", "invalid_image")
    assert "local files" not in message, message
    message = assert_error(eos_client.post("/v1/embeddings", json={"input": {"type": "image", "data": "abc$%"}}),
                           "input", "invalid_image")
    assert "not valid base64" in message, message
