"""The server's vectors against the official Qwen3-VL-Embedding procedure, computed here on the same weights.

The reference below is written from the official embedder's procedure (QwenLM/Qwen3-VL-Embedding):
the checkpoint's chat template with the instruction as the system turn, images before text, Qwen's
smart resize (factor 32, official pixel bounds) then the image processor with do_resize=False, the
tokenizer with truncation at 8192, right padding, `last_hidden_state` of the last real token, then
truncate-then-L2-normalise. It shares no code with the server.
"""

from __future__ import annotations

import base64
import unicodedata

import numpy as np
import pytest
import torch
from PIL import Image

from .util import official_smart_resize, png_bytes, sample_image

MIN_PIXELS = 4 * 32 * 32
MAX_PIXELS = 1800 * 32 * 32


def _official_resize(image: Image.Image, factor: int = 32) -> Image.Image:
    width, height = image.size
    h_bar, w_bar = official_smart_resize(height, width, MIN_PIXELS, MAX_PIXELS, factor)
    return image.resize((w_bar, h_bar))


class OfficialEmbedder:
    def __init__(self, model_dir):
        from transformers import AutoTokenizer, Qwen2VLImageProcessorPil
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="right")
        self.image_processor = Qwen2VLImageProcessorPil(
            patch_size=16, merge_size=2, temporal_patch_size=2,
            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        )
        self.model = Qwen3VLModel.from_pretrained(model_dir, dtype=torch.float32).eval()

    @staticmethod
    def _instruction(text: str | None) -> str:
        text = (text or "Represent the user's input.").strip()
        if text and not unicodedata.category(text[-1]).startswith("P"):
            text += "."
        return text

    @torch.no_grad()
    def embed(self, items: list[dict], dim: int | None = None) -> np.ndarray:
        prompts, images = [], []
        for item in items:
            content = []
            if item.get("image") is not None:
                content.append({"type": "image", "image": "img"})
                images.append(_official_resize(item["image"].convert("RGB")))
            if item.get("text"):
                content.append({"type": "text", "text": item["text"]})
            if not content:
                content.append({"type": "text", "text": "NULL"})
            conversation = [
                {"role": "system", "content": [{"type": "text", "text": self._instruction(item.get("instruction"))}]},
                {"role": "user", "content": content},
            ]
            prompts.append(
                self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
            )
        kwargs = {}
        if images:
            vision = self.image_processor(images=images, do_resize=False, return_tensors="pt")
            grids = iter(vision["image_grid_thw"])
            expanded = []
            for prompt in prompts:
                while "<|image_pad|>" in prompt:
                    n = int(next(grids).prod()) // 4
                    prompt = prompt.replace("<|image_pad|>", "<|placeholder|>" * n, 1)
                expanded.append(prompt.replace("<|placeholder|>", "<|image_pad|>"))
            prompts = expanded
            kwargs = dict(vision)
        enc = self.tokenizer(prompts, padding=True, truncation=True, max_length=8192, return_tensors="pt")
        if images:
            pad_id = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
            kwargs["mm_token_type_ids"] = (enc["input_ids"] == pad_id).int()
        out = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **kwargs)
        mask = enc["attention_mask"]
        last = mask.shape[1] - mask.flip(dims=[1]).argmax(dim=1) - 1
        pooled = out.last_hidden_state[torch.arange(mask.shape[0]), last]
        if dim is not None:
            pooled = pooled[:, :dim]
        return torch.nn.functional.normalize(pooled, p=2, dim=-1).numpy()


@pytest.fixture(scope="module")
def official(tiny_vl):
    return OfficialEmbedder(tiny_vl)


def _vectors(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    return np.array([d["embedding"] for d in data], dtype=np.float32)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_text_matches_official(client, official):
    texts = ["The capital of China is Beijing.", "Today is Friday.", "混合 text with ünïcödé and emoji 🚀"]
    got = _vectors(client.post("/v1/embeddings", json={"input": texts}))
    want = official.embed([{"text": t} for t in texts])
    assert np.all(_cos(got, want) >= 0.9999), _cos(got, want)
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)


def test_instruction_matches_official(client, official):
    instruction = "  Retrieve images or text relevant to the user's query  "
    got = _vectors(client.post("/v1/embeddings", json={"input": "a red bicycle", "instruction": instruction}))
    want = official.embed([{"text": "a red bicycle", "instruction": instruction}])
    assert _cos(got, want)[0] >= 0.9999
    plain = _vectors(client.post("/v1/embeddings", json={"input": "a red bicycle"}))
    assert _cos(got, plain)[0] < 0.9999  # the instruction really changes the vector


def test_image_and_fused_match_official(client, official, image_server):
    image_a, image_b = sample_image(96, 64, seed=1), sample_image(300, 200, seed=2)
    url = image_server.add("/ref-a.png", png_bytes(image_a))
    b64 = base64.b64encode(png_bytes(image_b)).decode()
    body = {"input": [
        {"type": "image", "data": url},
        {"text": "a photo of noise", "image": f"data:image/png;base64,{b64}"},
        {"content": [{"type": "text", "text": "caption"}, {"type": "image_url", "image_url": {"url": url}}],
         "instruction": "Find the picture"},
    ]}
    got = _vectors(client.post("/v1/embeddings", json=body))
    want = official.embed([
        {"image": image_a},
        {"image": image_b, "text": "a photo of noise"},
        {"image": image_a, "text": "caption", "instruction": "Find the picture"},
    ])
    assert np.all(_cos(got, want) >= 0.9999), _cos(got, want)


def test_dimensions_truncate_then_normalise(client, official):
    got = _vectors(client.post("/v1/embeddings", json={"input": "hello there", "dimensions": 16}))
    assert got.shape == (1, 16)
    want = official.embed([{"text": "hello there"}], dim=16)
    assert _cos(got, want)[0] >= 0.9999
    assert abs(np.linalg.norm(got[0]) - 1) < 1e-5


def test_large_image_matches_official_on_the_default_path(client, official, image_server):
    """An image larger than 512 px goes through the official resizing alone (no shrinking before it)."""
    large = sample_image(800, 600, seed=5)
    url = image_server.add("/ref-large.png", png_bytes(large))
    got = _vectors(client.post("/v1/embeddings", json={"input": [{"type": "image", "data": url}]}))
    want = official.embed([{"image": large}])
    assert _cos(got, want)[0] >= 0.9999, _cos(got, want)
    usage = client.post("/v1/embeddings", json={"input": {"type": "image", "data": url}}).json()["usage"]
    assert usage["prompt_tokens"] > (800 // 32) * (608 // 32)  # the 800x608 grid's tokens, not a 512x384 one's
