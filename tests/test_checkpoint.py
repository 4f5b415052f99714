"""Tests for embedding_api.tools.checkpoint (random-weight checkpoints in the real on-disk format).

Only the "tiny" sizes are written here; the whole file runs in well under 30 s on 2 CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from embedding_api.tools import checkpoint as ck

SYSTEM_AND_IMAGE = [
    {"role": "system", "content": [{"type": "text", "text": "Represent the user's input."}]},
    {"role": "user", "content": [{"type": "image", "image": "x"}, {"type": "text", "text": "hi"}]},
]
EXPECTED_PROMPT = (
    "<|im_start|>system\nRepresent the user's input.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n"
    "<|im_start|>assistant\n"
)
UNICODE_SAMPLES = [
    "hello world",
    "The capital of China is Beijing.",
    "Grüße aus Köln — naïve café, 東京 と 北京, 서울, Ελληνικά, עברית, العربية",
    "emoji 🎉👍🏽 family 👨\u200d👩\u200d👧 flags 🇫🇷",
    "  leading spaces\ttabs\nnew\r\nlines  \n\n",
    "math ∑∫√∞ ≠ ≤ 3.14159 1,000,000 $5 €7 ¥9",
    "code: def f(x): return {'a': [1, 2]} # comment",
    "\x00\x01 control \x7f and <|not_a_special|> token",
]


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory) -> Path:
    return ck.write_checkpoint(tmp_path_factory.mktemp("ck") / "vl_tiny", family="qwen3_vl", size="tiny", seed=0)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    return ck.write_checkpoint(tmp_path_factory.mktemp("ck") / "text_tiny", family="qwen3", size="tiny", seed=0)


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# ----------------------------------------------------------------------------- Qwen3-VL


def test_vl_files_and_config(vl_dir: Path):
    names = {p.name for p in vl_dir.iterdir()}
    for required in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "preprocessor_config.json",
        "RANDOM_WEIGHTS.txt",
    ):
        assert required in names
    assert not any(n.startswith(".") for n in names)
    assert "random" in (vl_dir / "RANDOM_WEIGHTS.txt").read_text().lower()

    cfg = json.loads((vl_dir / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_vl"
    assert cfg["architectures"] == ["Qwen3VLForConditionalGeneration"]
    assert cfg["tie_word_embeddings"] is True
    text = cfg["text_config"]
    assert (text["hidden_size"], text["num_hidden_layers"], text["head_dim"]) == (64, 2, 16)
    assert text["max_position_embeddings"] >= 8192
    rope = text["rope_parameters"]
    assert sum(rope["mrope_section"]) == text["head_dim"] // 2 and rope["mrope_interleaved"] is True
    vision = cfg["vision_config"]
    assert vision["out_hidden_size"] == text["hidden_size"]
    assert (vision["patch_size"], vision["spatial_merge_size"], vision["temporal_patch_size"]) == (16, 2, 2)

    pre = json.loads((vl_dir / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "Qwen2VLImageProcessor"
    assert (pre["patch_size"], pre["merge_size"], pre["temporal_patch_size"]) == (16, 2, 2)
    assert pre["image_mean"] == [0.5, 0.5, 0.5] and pre["image_std"] == [0.5, 0.5, 0.5]
    assert pre["size"] == {"shortest_edge": 65536, "longest_edge": 16777216}
    assert pre["rescale_factor"] == pytest.approx(1 / 255)


def test_vl_tokenizer_and_chat_template(vl_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(vl_dir)
    cfg = json.loads((vl_dir / "config.json").read_text())
    ids = {t: tok.convert_tokens_to_ids(t) for t in ck.SPECIAL_TOKENS}
    # Qwen's order, consecutive, right after the base vocabulary; not the real 151643.. ids.
    base = ids["<|endoftext|>"]
    assert base > 256
    assert [ids[t] for t in ck.SPECIAL_TOKENS] == list(range(base, base + len(ck.SPECIAL_TOKENS)))
    assert len(tok) == base + len(ck.SPECIAL_TOKENS) <= cfg["text_config"]["vocab_size"]
    assert cfg["image_token_id"] == ids["<|image_pad|>"]
    assert cfg["video_token_id"] == ids["<|video_pad|>"]
    assert cfg["vision_start_token_id"] == ids["<|vision_start|>"]
    assert cfg["vision_end_token_id"] == ids["<|vision_end|>"]
    assert cfg["text_config"]["eos_token_id"] == ids["<|im_end|>"]
    assert cfg["text_config"]["pad_token_id"] == ids["<|endoftext|>"]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.padding_side == "right"

    rendered = tok.apply_chat_template(SYSTEM_AND_IMAGE, tokenize=False, add_generation_prompt=True)
    assert rendered == EXPECTED_PROMPT
    # Other part shapes: string content, image_url, video, no generation prompt.
    other = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}, {"video": "v"}, {"text": "t"}]},
        {"role": "assistant", "content": "ok"},
    ]
    assert tok.apply_chat_template(other, tokenize=False) == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "<|vision_start|><|video_pad|><|vision_end|>t<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n"
    )

    # The VL tokenizer adds nothing; special tokens in the text map to single ids.
    enc = tok(rendered)["input_ids"]
    assert enc[0] == ids["<|im_start|>"] and enc[-1] == tok.convert_tokens_to_ids("\u010a")  # "\n"
    assert enc.count(ids["<|image_pad|>"]) == 1
    assert tok("hello")["input_ids"][-1] != ids["<|endoftext|>"]
    for text in UNICODE_SAMPLES:
        assert tok.decode(tok(text)["input_ids"]) == text


def test_vl_loads_with_all_weights(vl_dir: Path):
    from safetensors import safe_open
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLForConditionalGeneration, Qwen3VLModel

    with safe_open(str(vl_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    # The real layout: model.language_model.* and model.visual.*; tied lm_head not stored.
    assert "model.language_model.embed_tokens.weight" in keys
    assert "model.visual.patch_embed.proj.weight" in keys
    assert "model.visual.deepstack_merger_list.0.linear_fc1.weight" in keys
    assert all(k.startswith(("model.language_model.", "model.visual.")) for k in keys)
    assert "lm_head.weight" not in keys

    model, info = Qwen3VLModel.from_pretrained(vl_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    stored = _safetensors(vl_dir)
    state = model.state_dict()
    assert len(state) == len(stored)
    assert torch.equal(state["language_model.embed_tokens.weight"], stored["model.language_model.embed_tokens.weight"])
    assert torch.equal(state["visual.pos_embed.weight"], stored["model.visual.pos_embed.weight"])

    full, info = Qwen3VLForConditionalGeneration.from_pretrained(vl_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert full.lm_head.weight.data_ptr() == full.model.language_model.embed_tokens.weight.data_ptr()


def test_vl_forward_text_and_image(vl_dir: Path):
    from PIL import Image
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

    tok = AutoTokenizer.from_pretrained(vl_dir)
    model = Qwen3VLModel.from_pretrained(vl_dir).eval()
    cfg = model.config
    hidden = cfg.text_config.hidden_size

    # Text only.
    text_msgs = [
        {"role": "system", "content": "Represent the user's input."},
        {"role": "user", "content": [{"type": "text", "text": "The capital of China is Beijing."}]},
    ]
    prompt = tok.apply_chat_template(text_msgs, tokenize=False, add_generation_prompt=True)
    enc = tok([prompt], return_tensors="pt")
    with torch.inference_mode():
        out = model(**enc, use_cache=False)
    assert out.last_hidden_state.shape == (1, enc["input_ids"].shape[1], hidden)
    assert torch.isfinite(out.last_hidden_state).all()

    # One 64x64 image: 4x4 patches of 16 px -> 16 patches -> 4 merged tokens.
    proc = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, do_resize=False)
    image = Image.new("RGB", (64, 64))
    image.putdata([((x * 4) % 256, (y * 4) % 256, 128) for y in range(64) for x in range(64)])
    pix = proc(images=[image], return_tensors="pt")
    grid = pix["image_grid_thw"]
    assert grid.tolist() == [[1, 4, 4]]
    n_image_tokens = int(grid.prod()) // 4
    prompt = tok.apply_chat_template(SYSTEM_AND_IMAGE, tokenize=False, add_generation_prompt=True)
    prompt = prompt.replace("<|image_pad|>", "<|image_pad|>" * n_image_tokens)
    enc = tok([prompt], return_tensors="pt")
    ids = enc["input_ids"]
    assert int((ids == cfg.image_token_id).sum()) == n_image_tokens
    mm = (ids == cfg.image_token_id).long()
    with torch.inference_mode():
        out_img = model(
            input_ids=ids,
            attention_mask=enc["attention_mask"],
            pixel_values=pix["pixel_values"],
            image_grid_thw=grid,
            mm_token_type_ids=mm,
            use_cache=False,
        )
    assert out_img.last_hidden_state.shape == (1, ids.shape[1], hidden)
    assert torch.isfinite(out_img.last_hidden_state).all()


# ----------------------------------------------------------------------------- Qwen3 (text)


def test_text_tokenizer_appends_endoftext(text_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(text_dir)
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    assert [tok.convert_tokens_to_ids(t) for t in ck.SPECIAL_TOKENS] == list(range(eot, eot + len(ck.SPECIAL_TOKENS)))
    ids = tok("hello")["input_ids"]
    assert ids[-1] == eot and ids.count(eot) == 1
    assert tok("a", "b")["input_ids"].count(eot) == 2
    assert tok("hello", add_special_tokens=False)["input_ids"][-1] != eot
    assert tok.padding_side == "left"
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|endoftext|>"
    batch = tok(["hi", "a longer sentence here"], padding=True)
    assert all(row[-1] == eot for row in batch["input_ids"])
    assert batch["attention_mask"][0][0] == 0  # left padding
    for text in UNICODE_SAMPLES:
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text

    cfg = json.loads((text_dir / "config.json").read_text())
    assert cfg["model_type"] == "qwen3" and cfg["architectures"] == ["Qwen3ForCausalLM"]
    assert cfg["bos_token_id"] == eot and cfg["eos_token_id"] == eot
    assert cfg["vocab_size"] >= len(tok) and cfg["max_position_embeddings"] >= 8192
    assert cfg["tie_word_embeddings"] is True
    assert not (text_dir / "preprocessor_config.json").exists()


def test_text_model_loads_and_runs(text_dir: Path):
    from safetensors import safe_open
    from transformers import AutoModel, AutoTokenizer

    with safe_open(str(text_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "embed_tokens.weight" in keys and "norm.weight" in keys  # Qwen3Model layout, no "model." prefix
    model, info = AutoModel.from_pretrained(text_dir, output_loading_info=True)
    assert type(model).__name__ == "Qwen3Model"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tok = AutoTokenizer.from_pretrained(text_dir)
    enc = tok(["Instruct: find it\nQuery:hello", "x"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        out = model(**enc, use_cache=False).last_hidden_state
    assert out.shape == (2, enc["input_ids"].shape[1], model.config.hidden_size)
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------- behaviour


def test_deterministic_and_seed_dependent(tmp_path: Path, text_dir: Path, vl_dir: Path):
    again = ck.write_checkpoint(tmp_path / "again", family="qwen3", size="tiny", seed=0)
    other = ck.write_checkpoint(tmp_path / "other", family="qwen3", size="tiny", seed=1)
    a, b, c = _safetensors(text_dir), _safetensors(again), _safetensors(other)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (text_dir / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    assert (text_dir / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()
    assert not torch.equal(a["embed_tokens.weight"], c["embed_tokens.weight"])

    vl_again = ck.write_checkpoint(tmp_path / "vl_again", family="qwen3_vl", size="tiny", seed=0)
    x, y = _safetensors(vl_dir), _safetensors(vl_again)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_refuses_non_empty_dir_unless_overwrite(tmp_path: Path):
    out = tmp_path / "ck"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        ck.write_checkpoint(out, family="qwen3", size="tiny")
    assert (out / "keep.txt").exists()
    path = ck.write_checkpoint(out, family="qwen3", size="tiny", overwrite=True)
    assert path == out.resolve()
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    # An existing empty directory is fine.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (ck.write_checkpoint(empty, family="qwen3", size="tiny") / "config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_bad_arguments(tmp_path: Path):
    with pytest.raises(ValueError):
        ck.write_checkpoint(tmp_path / "a", family="llama")
    with pytest.raises(ValueError):
        ck.write_checkpoint(tmp_path / "b", family="qwen3", size="2b")
    with pytest.raises(ValueError):
        ck.write_checkpoint(tmp_path / "c", family="qwen3_vl", size="0.6b")
    assert not (tmp_path / "a").exists()


def test_cli(tmp_path: Path, capsys):
    out = tmp_path / "cli"
    assert ck.main([str(out), "--family", "qwen3", "--size", "tiny", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert str(out.resolve()) in printed
    n = ck.count_parameters(out)
    assert str(n) in printed and n > 0
    assert ck.main([str(out), "--family", "qwen3"]) == 1  # non-empty, no --overwrite
    assert ck.main([str(out), "--family", "qwen3", "--overwrite"]) == 0


def test_size_table_matches_real_configs():
    """The real-size configurations (never instantiated in tests) match the reference facts."""
    vl = ck.SPECS[("qwen3_vl", "2b")]
    assert vl.vocab_size == 151936 and vl.dtype == "bfloat16"
    assert vl.text["hidden_size"] == 2048 and vl.text["num_hidden_layers"] == 28
    assert (vl.text["num_attention_heads"], vl.text["num_key_value_heads"], vl.text["head_dim"]) == (16, 8, 128)
    assert vl.text["intermediate_size"] == 6144
    assert vl.text["rope_parameters"]["mrope_section"] == [24, 20, 20]
    assert vl.text["rope_parameters"]["rope_theta"] == 5e6
    assert vl.vision["depth"] == 24 and vl.vision["deepstack_visual_indexes"] == [5, 11, 17]
    assert vl.vision["out_hidden_size"] == 2048 and vl.vision["num_position_embeddings"] == 2304
    t = ck.SPECS[("qwen3", "0.6b")]
    assert t.vocab_size == 151669 and t.dtype == "bfloat16"
    assert (t.text["hidden_size"], t.text["num_hidden_layers"], t.text["intermediate_size"]) == (1024, 28, 3072)
    assert t.text["rope_parameters"]["rope_theta"] == 1e6 and t.text["max_position_embeddings"] == 32768
    for spec in ck.SPECS.values():
        assert spec.text["max_position_embeddings"] >= 8192
        if spec.family == "qwen3_vl":
            assert sum(spec.text["rope_parameters"]["mrope_section"]) == spec.text["head_dim"] // 2
            assert spec.vision["out_hidden_size"] == spec.text["hidden_size"]


@pytest.mark.parametrize("family,size", list(ck.SPECS))
def test_every_size_builds_a_consistent_config(family: str, size: str):
    """Each row of the size table gives a config the model classes accept (heads, rope sections, vision
    width and grid agree), in the family's real layout, without writing any weights."""
    from embedding_api.tools.checkpoint_sizes import build_config

    spec = ck.SPECS[(family, size)]
    assert size in ck.SIZES[family]
    ids = {token: 1000 + i for i, token in enumerate(ck.SPECIAL_TOKENS)}
    config = build_config(spec, ids, spec.vocab_size or 1088)
    text = config.text_config if family == "qwen3_vl" else config
    assert (text.hidden_size, text.num_hidden_layers, text.head_dim) == (
        spec.text["hidden_size"], spec.text["num_hidden_layers"], spec.text["head_dim"])
    assert text.max_position_embeddings == (262144 if family == "qwen3_vl" else 32768)
    if family == "qwen3_vl":
        assert config.vision_config.out_hidden_size == text.hidden_size
        assert config.image_token_id == ids["<|image_pad|>"] and config.architectures == ["Qwen3VLForConditionalGeneration"]
    else:
        assert spec.vision is None and config.architectures == ["Qwen3ForCausalLM"]
