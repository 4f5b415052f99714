"""The side-by-side benchmark's parts that need no Infinity install: the sentence-transformers wrapper
directory it writes over a checkpoint, and what it says when Infinity is not set up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from benchmarks import peer


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
