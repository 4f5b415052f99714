"""The side-by-side benchmarks' parts that need no peer installed. Infinity: the sentence-transformers
wrapper directory it writes over a checkpoint, and what it says when Infinity is not set up. vLLM: its
command line and environment, the requests it is sent, the vector check and the choice of its fastest
setting on given vectors, the torchvision start-up hook, and what it says when vLLM is not set up.
The in-turns comparisons of this server with itself: the settings of benchmarks.settings_ab, and the
dtype of an in-process limit (benchmarks.versus pins it to its server's)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from benchmarks import peer, peer_vllm, settings_ab, vllm_peer
from benchmarks.run import LimitProcess


@pytest.fixture(scope="module")
def wrapper(tiny_text: Path, tmp_path_factory) -> Path:
    return peer.write_st_wrapper(tiny_text, tmp_path_factory.mktemp("peer") / "st")


def test_modules_are_transformer_then_last_token_pooling_then_normalize(wrapper: Path):
    modules = json.loads((wrapper / "modules.json").read_text())
    assert [(m["idx"], m["path"], m["type"]) for m in modules] == [
        (0, "", "sentence_transformers.models.Transformer"),
        (1, "1_Pooling", "sentence_transformers.models.Pooling"),
        (2, "2_Normalize", "sentence_transformers.models.Normalize"),
    ]
    assert (wrapper / "2_Normalize").is_dir()
    assert json.loads((wrapper / "sentence_bert_config.json").read_text())["do_lower_case"] is False


def test_pooling_is_last_token_only_at_the_model_width(wrapper: Path, tiny_text: Path):
    pooling = json.loads((wrapper / "1_Pooling" / "config.json").read_text())
    modes = {k: v for k, v in pooling.items() if k.startswith("pooling_mode_")}
    assert [k for k, v in modes.items() if v] == ["pooling_mode_lasttoken"]
    assert len(modes) == 6  # cls, mean, max, mean_sqrt_len, weightedmean, lasttoken: all named
    assert pooling["word_embedding_dimension"] == json.loads((tiny_text / "config.json").read_text())["hidden_size"]


def test_weights_and_tokenizer_resolve_to_the_checkpoint(wrapper: Path, tiny_text: Path):
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        link = wrapper / name
        assert link.is_symlink() and not Path(link.readlink()).is_absolute()  # the cache can move
        assert link.resolve() == (tiny_text / name).resolve()
    with safe_open(str(wrapper / "model.safetensors"), "pt") as via_link, \
            safe_open(str(tiny_text / "model.safetensors"), "pt") as original:
        assert sorted(via_link.keys()) == sorted(original.keys())
        key = sorted(original.keys())[0]
        assert via_link.get_tensor(key).equal(original.get_tensor(key))


def test_config_carries_the_rope_base_where_transformers_4_reads_it(wrapper: Path, tiny_text: Path):
    original = json.loads((tiny_text / "config.json").read_text())
    written = json.loads((wrapper / "config.json").read_text())
    assert not (wrapper / "config.json").is_symlink()
    assert written["rope_theta"] == original["rope_parameters"]["rope_theta"] == 1_000_000.0
    assert {k: v for k, v in written.items() if k != "rope_theta"} == original


def test_transformers4_config_maps_scaled_rope_and_keeps_explicit_fields():
    config = {"rope_parameters": {"rope_theta": 5e5, "rope_type": "yarn", "factor": 4.0}}
    out = peer.transformers4_config(config)
    assert out["rope_theta"] == 5e5
    assert out["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0}
    assert peer.transformers4_config({"rope_theta": 1.0, "rope_parameters": {"rope_theta": 2.0}})["rope_theta"] == 1.0


def test_rewriting_replaces_the_old_wrapper(tiny_text: Path, tmp_path: Path):
    out = tmp_path / "st"
    peer.write_st_wrapper(tiny_text, out)
    (out / "stale.txt").write_text("x")
    assert peer.write_st_wrapper(tiny_text, out) == out.resolve()
    assert not (out / "stale.txt").exists() and (out / "modules.json").exists()


def test_default_wrapper_sits_beside_the_checkpoint(tiny_text: Path, tmp_path: Path):
    model = tmp_path / "qwen3-tiny-abc"
    model.mkdir()
    for f in tiny_text.iterdir():
        if f.is_file():
            (model / f.name).write_bytes(f.read_bytes())
    assert peer.write_st_wrapper(model) == (tmp_path / "qwen3-tiny-abc-st").resolve()


def test_without_infinity_it_says_how_to_set_it_up_and_exits_2(tmp_path: Path, capsys):
    missing = tmp_path / "no-venv"
    assert peer.main(["--venv", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"-m benchmarks.peer --setup --venv {missing}" in err
    assert "make bench-peer-setup" in err
    assert not missing.exists()


# ---------------------------------------------------------------------- vLLM (benchmarks/peer_vllm.py)



def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_vllm_command_serves_an_embedding_model_from_its_own_environment(tmp_path: Path):
    venv, model = tmp_path / "venv", tmp_path / "qwen3-wide"
    command = vllm_peer.server_command(venv, model, 8123, "bfloat16", "qwen3")
    # The module, not the `vllm` console script (which looks up a distribution named `vllm`).
    assert command[:3] == [str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server"]
    assert _flag(command, "--model") == str(model) and _flag(command, "--port") == "8123"
    assert (_flag(command, "--runner"), _flag(command, "--convert"), _flag(command, "--dtype")) == (
        "pooling", "embed", "bfloat16")
    assert json.loads(_flag(command, "--pooler-config")) == {"pooling_type": "LAST", "use_activation": True}
    assert json.loads(_flag(command, "--hf-overrides")) == {"is_matryoshka": True}
    assert _flag(command, "--max-model-len") == "8192"  # the official truncation; bounds the KV cache too
    assert "--mm-processor-kwargs" not in command


def test_vllm_command_for_qwen3_vl_carries_the_official_pixel_bounds(tmp_path: Path):
    command = vllm_peer.server_command(tmp_path, tmp_path / "m", 1, "float32", "qwen3_vl")
    size = json.loads(_flag(command, "--mm-processor-kwargs"))["size"]
    assert size == {"shortest_edge": 4 * 32 * 32, "longest_edge": 1800 * 32 * 32}


def test_vllm_environment_is_bounded_and_offline(tmp_path: Path):
    env = vllm_peer.server_env(tmp_path, threads=1, kv_cache_gib=1, base={"PYTHONPATH": "/x", "HOME": "/h"})
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1" and env["OMP_NUM_THREADS"] == "1"
    assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_NO_USAGE_STATS"] == "1"
    assert "PYTHONPATH" not in env and env["HOME"] == "/h"


def test_vllm_constraints_pin_the_cpu_torch_and_its_torchvision():
    assert vllm_peer.constraints().split() == ["torch==2.13.0+cpu", "torchvision==0.28.0"]


def test_vllm_text_family_requests_are_plain_documents():
    body = vllm_peer.peer_body("qwen3", "a document", "float")
    assert body == {"model": vllm_peer.MODEL_NAME, "input": "a document", "encoding_format": "float"}
    assert vllm_peer.our_body("a document", "base64") == {"input": "a document", "encoding_format": "base64"}


def test_vllm_qwen3_vl_requests_are_chats_rendered_as_the_official_code_does():
    body = vllm_peer.peer_body("qwen3_vl", "a query")
    assert body["add_generation_prompt"] is True and body["add_special_tokens"] is True
    system, user = body["messages"]
    assert system == {"role": "system", "content": [{"type": "text", "text": "Represent the user's input."}]}
    assert user == {"role": "user", "content": [{"type": "text", "text": "a query"}]}
    png = b"\x89PNG\r\n\x1a\nrest"
    image = vllm_peer.peer_body("qwen3_vl", png)["messages"][1]["content"]
    assert image == [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}]
    ours = vllm_peer.our_body(png)["input"]
    assert ours == [{"image": image[0]["image_url"]["url"]}]  # the same image, in this server's form


def test_vllm_load_bodies_are_one_input_each():
    bodies, inputs = vllm_peer.bodies(["a b", "c d"], "qwen3_vl", peer=True)
    assert inputs == [1, 1] and [json.loads(b)["messages"][1]["content"][0]["text"] for b in bodies] == ["a b", "c d"]


def test_vector_check_passes_only_when_every_input_is_within_the_threshold():
    ref = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    same = vllm_peer.compare(ref, [[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]])  # scale does not matter
    assert same["ok"] and same["min_cosine"] == pytest.approx(1.0) and same["max_cosine_other_inputs"] == 0.0
    drifted = vllm_peer.compare(ref, [[1.0, 0.0, 0.0], [0.0, 1.0, 0.1]])  # cos = 0.995
    assert not drifted["ok"] and drifted["min_cosine"] == pytest.approx(1 / 1.01 ** 0.5)
    assert drifted["cosines"][0] == pytest.approx(1.0)
    assert not vllm_peer.compare(ref, [[1.0, 0.0], [0.0, 1.0]])["ok"]  # different widths never pass
    assert not vllm_peer.compare([[0.0, 0.0]], [[1.0, 0.0]])["ok"]  # a zero vector (NaN cosine) fails
    with pytest.raises(ValueError):
        vllm_peer.compare(ref, ref[:1])


def test_fastest_setting_is_the_quickest_whose_vectors_passed():
    both = {"float32": {"inputs_per_s": 150.0, "ok": True}, "bfloat16": {"inputs_per_s": 236.0, "ok": True}}
    assert vllm_peer.fastest(both) == "bfloat16"
    both["bfloat16"]["ok"] = False
    assert vllm_peer.fastest(both) == "float32"
    assert vllm_peer.fastest({"bfloat16": {"inputs_per_s": 1.0, "ok": False}}) is None


def test_rows_pair_float32_and_the_fastest_eligible_settings():
    def stats(rate, p50):
        return {"inputs_per_s": rate, "p50_ms": p50, "p99_ms": 2 * p50, "peak_rss_mb": 1.0, "loadavg": 2.0}

    measured = {"ours-float32/text": stats(150, 200), "vllm-float32/text": stats(150, 200),
                "ours-auto/text": stats(300, 100), "vllm-bfloat16/text": stats(200, 150)}
    ok = {"text": {"ok": True}}
    checks = {"ours-auto": ok, "vllm-float32": ok, "vllm-bfloat16": ok}
    f32, best = peer_vllm.rows_for("text", measured, checks)
    assert (f32["row"], f32["vllm"], f32["ratio_inputs_per_s"]) == ("float32", "vllm-float32", 1.0)
    assert (best["row"], best["ours"], best["vllm"]) == ("fastest", "ours-auto", "vllm-bfloat16")
    assert best["ratio_inputs_per_s"] == 1.5 and best["ratio_p50"] == pytest.approx(100 / 150)
    checks["vllm-bfloat16"] = {"text": {"ok": False}}  # bf16 drifted: vLLM's fastest is its float32
    assert peer_vllm.rows_for("text", measured, checks)[1]["vllm"] == "vllm-float32"
    assert len(peer_vllm.rows_for("text", measured, checks)) == 2  # no int8 row unless it ran
    measured["ours-int8/text"] = stats(450, 80)  # --int8: a row of its own, against vLLM's fastest
    checks["ours-int8"] = {"text": {"ok": False}}
    int8 = peer_vllm.rows_for("text", measured, checks)[2]
    assert (int8["row"], int8["ours"], int8["vllm"]) == ("int8", "ours-int8", "vllm-float32")
    assert int8["ratio_inputs_per_s"] == 3.0 and int8["ours_vectors_ok"] is False


def test_without_vllm_it_says_how_to_set_it_up_and_exits_2(tmp_path: Path, capsys):
    missing = tmp_path / "no-vllm-venv"
    assert peer_vllm.main(["--venv", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"-m benchmarks.peer_vllm --setup --venv {missing}" in err
    assert "make bench-vllm-setup" in err
    assert not missing.exists()


def test_unknown_family_or_dtype_is_refused():
    with pytest.raises(SystemExit):
        peer_vllm.parse_args(["--families", "text,audio"])
    with pytest.raises(SystemExit):
        peer_vllm.parse_args(["--dtypes", "float16"])


def test_torchvision_hook_declares_the_operators_its_library_cannot_provide(tmp_path: Path):
    """A torchvision whose compiled library does not load (as the index's CUDA build beside a CPU torch)
    and which registers a fake kernel for torchvision::nms at import, as torchvision does: without the
    hook the import fails on the missing operator; with it the import works and the operator raises
    NotImplementedError when called."""
    fake = tmp_path / "pkgs" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "_C.so").write_bytes(b"not a shared library")
    (fake / "__init__.py").write_text(
        "import torch\n"
        "@torch.library.register_fake('torchvision::nms')\n"
        "def meta_nms(dets, scores, iou_threshold):\n"
        "    return dets.new_empty(0, dtype=torch.long)\n")
    (tmp_path / "pkgs" / f"{vllm_peer.SHIM_MODULE}.py").write_text(vllm_peer.shim_source())
    probe = ("import sys; {hook}import torchvision, torch\n"
             "try:\n    torch.ops.torchvision.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)\n"
             "except NotImplementedError as e:\n    print('raised', e)\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "pkgs")}
    without = subprocess.run([sys.executable, "-c", probe.format(hook="")], env=env, capture_output=True, text=True)
    assert without.returncode != 0 and "torchvision::nms" in without.stderr
    hooked = subprocess.run([sys.executable, "-c", probe.format(hook=f"import {vllm_peer.SHIM_MODULE}; ")],
                            env=env, capture_output=True, text=True)
    assert hooked.returncode == 0, hooked.stderr
    assert hooked.stdout.startswith("raised torchvision::nms")


def test_vllm_families_use_checkpoints_whose_heads_vllm_cpu_attention_supports():
    from embedding_api.tools.checkpoint import SPECS

    for family, size, _ in peer_vllm.FAMILIES.values():
        assert SPECS[(family, size)].text["head_dim"] in vllm_peer.CPU_HEAD_SIZES, (family, size)
    assert SPECS[("qwen3_vl", "cpu")].text["head_dim"] not in vllm_peer.CPU_HEAD_SIZES  # why not `cpu`


# --------------------------------------------------------------------------- comparisons with itself


def test_settings_ab_takes_one_server_per_argument():
    assert settings_ab.parse("DTYPE=float32  cpu_allocator=/usr/lib/x.so") == {
        "DTYPE": "float32", "CPU_ALLOCATOR": "/usr/lib/x.so"}
    assert settings_ab.parse("PREFIX_CACHE=") == {"PREFIX_CACHE": ""}
    for bad in ("DTYPE", "=float32", "DTYPE=float32 oops"):
        with pytest.raises(SystemExit, match="not NAME=VALUE"):
            settings_ab.parse(bad)


def test_a_limit_process_loads_in_the_dtype_it_is_given(tiny_text: Path):
    # Its server's DTYPE and CPU_PREPACK: left to `auto`, each is decided by a probe that might choose otherwise.
    for dtype, prepacked in (("bfloat16", True), ("float32", False)):
        limit = LimitProcess.like({"dtype": dtype, "prepacked": prepacked}, tiny_text, 1, 8)  # a server's /health
        try:
            assert (limit.dtype, limit.prepacked) == (dtype, prepacked)
            # What pins a bulk job or a server to this limit's choices (benchmarks.bulk, benchmarks.mixed).
            assert limit.settings() == {"DTYPE": dtype, "CPU_PREPACK": str(prepacked).lower()}
            assert limit.ask({"kind": "text", "batch_size": 8, "seconds": 0.2})["inputs_per_s"] > 0
        finally:
            limit.close()
