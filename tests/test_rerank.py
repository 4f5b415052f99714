"""Reranking against the official procedures, computed here on the tests' own checkpoints.

- Qwen3-Reranker (model card of Qwen/Qwen3-Reranker-0.6B, "Transformers Usage"): prefix + the
  `<Instruct>/<Query>/<Document>` text tokenized with truncation + suffix, left padding, P("yes") from
  the log-softmax over the ("no", "yes") logits of the last position.
- Qwen3-VL-Reranker (QwenLM/Qwen3-VL-Embedding, src/models/qwen3_vl_reranker.py): the conversation of
  `format_mm_instruction`, the chat template, images resized the qwen-vl-utils way then processed with
  do_resize=False, the special-token-keeping truncation of all but the last 5 tokens, one pair per
  forward, sigmoid of (lm_head[yes] - lm_head[no]) . last_hidden_state[:, -1].

Both are written here from those sources and share no code with the server. One server serves an
embedder and both rerankers (MODELS), so the multi-model routing is checked on the same server.
"""

from __future__ import annotations

import base64
import json
import re
import shutil

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
import torch

from embedding_api.runners import detect_kind
from embedding_api.settings import parse_models

from .test_reference import _official_resize
from .util import API_KEY, png_bytes, sample_image

MAX_TOKENS = 300  # MAX_RERANK_TOKENS of the test server: long documents really get truncated


class OfficialTextReranker:
    def __init__(self, model_dir, max_length: int):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.token_false_id = self.tokenizer.convert_tokens_to_ids("no")
        self.token_true_id = self.tokenizer.convert_tokens_to_ids("yes")
        self.max_length = max_length
        prefix = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and "
                  "the Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n"
                  "<|im_start|>user\n")
        suffix = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        self.prefix_tokens = self.tokenizer.encode(prefix, add_special_tokens=False)
        self.suffix_tokens = self.tokenizer.encode(suffix, add_special_tokens=False)

    @staticmethod
    def format_instruction(instruction, query, doc):
        if instruction is None:
            instruction = "Given a web search query, retrieve relevant passages that answer the query"
        return "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}".format(
            instruction=instruction, query=query, doc=doc)

    @torch.no_grad()
    def scores(self, query: str, docs: list[str], instruction: str | None = None) -> np.ndarray:
        pairs = [self.format_instruction(instruction, query, d) for d in docs]
        inputs = self.tokenizer(
            pairs, padding=False, truncation="longest_first", return_attention_mask=False,
            max_length=self.max_length - len(self.prefix_tokens) - len(self.suffix_tokens),
        )
        for i, ele in enumerate(inputs["input_ids"]):
            inputs["input_ids"][i] = self.prefix_tokens + ele + self.suffix_tokens
        inputs = self.tokenizer.pad(inputs, padding=True, return_tensors="pt", max_length=self.max_length)
        batch_scores = self.model(**inputs).logits[:, -1, :]
        true_vector = batch_scores[:, self.token_true_id]
        false_vector = batch_scores[:, self.token_false_id]
        batch_scores = torch.stack([false_vector, true_vector], dim=1)
        batch_scores = torch.nn.functional.log_softmax(batch_scores, dim=1)
        return batch_scores[:, 1].exp().numpy()


class OfficialVLReranker:
    SYSTEM = ("Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
              "Note that the answer can only be \"yes\" or \"no\".")
    DEFAULT = "Given a search query, retrieve relevant candidates that answer the query."

    def __init__(self, model_dir, max_length: int):
        from transformers import AutoTokenizer, Qwen2VLImageProcessorPil, Qwen3VLForConditionalGeneration

        lm = Qwen3VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.model = lm.model
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        self.image_processor = Qwen2VLImageProcessorPil(
            patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        vocab = self.tokenizer.get_vocab()
        weights = lm.lm_head.weight.data
        self.score_linear = torch.nn.Linear(weights.shape[1], 1, bias=False)
        with torch.no_grad():
            self.score_linear.weight[0] = weights[vocab["yes"]] - weights[vocab["no"]]
        self.max_length = max_length

    @staticmethod
    def _content(side: dict, prefix: str) -> list[dict]:
        content = [{"type": "text", "text": prefix}]
        texts, images = side.get("text", []), side.get("image", [])
        texts = [texts] if isinstance(texts, str) else texts
        if not texts and not images:
            return content + [{"type": "text", "text": "NULL"}]
        content += [{"type": "image", "image": im} for im in images]
        content += [{"type": "text", "text": t} for t in texts]
        return content

    def _truncate(self, tokens: list[int], special: list[int]) -> list[int]:
        if len(tokens) <= self.max_length:
            return tokens
        special = set(special)
        keep = self.max_length - sum(1 for t in tokens if t in special)
        out, kept = [], 0
        for t in tokens:
            if t in special:
                out.append(t)
            elif kept < keep:
                out.append(t)
                kept += 1
        return out

    @torch.no_grad()
    def scores(self, query: dict, docs: list[dict], instruction: str | None = None) -> np.ndarray:
        out = []
        for doc in docs:  # one pair per forward, as the official `process`
            pair = [
                {"role": "system", "content": [{"type": "text", "text": self.SYSTEM}]},
                {"role": "user", "content": [{"type": "text", "text": "<Instruct>: " + (instruction or self.DEFAULT)}]
                 + self._content(query, "<Query>:") + self._content(doc, "\n<Document>:")},
            ]
            text = self.tokenizer.apply_chat_template([pair], tokenize=False, add_generation_prompt=True)[0]
            images = [_official_resize(p["image"].convert("RGB")) for p in pair[1]["content"] if p["type"] == "image"]
            kwargs = {}
            if images:
                vision = self.image_processor(images=images, do_resize=False, return_tensors="pt")
                for grid in vision["image_grid_thw"]:
                    text = text.replace("<|image_pad|>", "<|placeholder|>" * (int(grid.prod()) // 4), 1)
                text = text.replace("<|placeholder|>", "<|image_pad|>")
                kwargs = dict(vision)
            ids = self.tokenizer([text], truncation=False, padding=False)["input_ids"][0]
            ids = self._truncate(ids[:-5], self.tokenizer.all_special_ids) + ids[-5:]
            batch = self.tokenizer.pad({"input_ids": [ids]}, padding=True, return_tensors="pt")
            if images:
                kwargs["mm_token_type_ids"] = (batch["input_ids"] == self.tokenizer.convert_tokens_to_ids("<|image_pad|>")).int()
            hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
            out.append(torch.sigmoid(self.score_linear(hidden.last_hidden_state[:, -1])).item())
        return np.array(out)


@pytest.fixture(scope="module")
def server(start_server, tiny_vl, tiny_text_reranker, tiny_vl_reranker):
    models = [
        {"name": "emb", "path": str(tiny_vl)},
        {"name": "rr-text", "path": str(tiny_text_reranker), "aliases": ["Qwen/Qwen3-Reranker-0.6B"]},
        {"name": "rr-vl", "path": str(tiny_vl_reranker)},
    ]
    return start_server({
        "MODELS": json.dumps(models), "API_KEY": API_KEY, "ALLOW_PRIVATE_IMAGE_URLS": "true",
        "MAX_RERANK_TOKENS": str(MAX_TOKENS), "MAX_RERANK_DOCUMENTS": "8", "TORCH_THREADS": "1",
    })


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def official_text(tiny_text_reranker):
    return OfficialTextReranker(tiny_text_reranker, MAX_TOKENS)


@pytest.fixture(scope="module")
def official_vl(tiny_vl_reranker):
    return OfficialVLReranker(tiny_vl_reranker, MAX_TOKENS)


LONG = " ".join(["The museum will be closed on Monday for maintenance and will open again on Tuesday."] * 12)
DOCS = ["The capital of China is Beijing.", "Today is Friday.", "Gravity pulls bodies together.", LONG]


def _by_index(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)  # highest first
    out = np.full(len(results), np.nan)
    for r in results:
        out[r["index"]] = r["relevance_score"]
    return out


def test_text_reranker_matches_official(http, official_text):
    query = "What is the capital of China?"
    response = http.post("/v1/rerank", json={"model": "rr-text", "query": query, "documents": DOCS})
    got = _by_index(response)
    want = official_text.scores(query, DOCS)
    assert np.abs(got - want).max() <= 1e-4, (got, want)
    assert np.ptp(want) > 0.01  # the scores really tell the documents apart
    body = response.json()
    assert body["model"] == "rr-text" and body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    # the long document was truncated the official way: at MAX_TOKENS in all
    assert body["usage"]["prompt_tokens"] <= 3 * MAX_TOKENS + MAX_TOKENS


def test_text_reranker_instruction(http, official_text):
    instruction = "Given a question, find the passage with the answer"
    got = _by_index(http.post("/rerank", json={
        "model": "Qwen/Qwen3-Reranker-0.6B", "query": "capital?", "documents": DOCS[:3], "instruction": instruction}))
    want = official_text.scores("capital?", DOCS[:3], instruction)
    assert np.abs(got - want).max() <= 1e-4
    default = official_text.scores("capital?", DOCS[:3])
    assert np.abs(default - want).max() > 1e-4  # the instruction really changes the scores


def test_vl_reranker_matches_official_for_every_form(http, official_vl, image_server):
    image_a, image_b = sample_image(96, 64, seed=3), sample_image(200, 120, seed=4)
    url = image_server.add("/rr-a.png", png_bytes(image_a))
    b64 = base64.b64encode(png_bytes(image_b)).decode()
    documents = [
        "a plain text document",
        {"type": "image", "data": url},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}},
        {"text": "a noisy picture", "image": url},
        {"content": [{"type": "text", "text": "caption"}, {"type": "image_url", "image_url": {"url": url}}]},
        {"type": "text", "text": LONG},
    ]
    want_docs = [
        {"text": "a plain text document"}, {"image": [image_a]}, {"image": [image_b]},
        {"text": "a noisy picture", "image": [image_a]}, {"text": "caption", "image": [image_a]}, {"text": LONG},
    ]
    got = _by_index(http.post("/v1/rerank", json={"model": "rr-vl", "query": "a cat", "documents": documents}))
    want = official_vl.scores({"text": "a cat"}, want_docs)
    assert np.abs(got - want).max() <= 1e-4, (got, want)
    # an image query with an instruction
    query = {"text": "like this one", "image": f"data:image/png;base64,{b64}"}
    got = _by_index(http.post("/v1/rerank", json={
        "model": "rr-vl", "query": query, "documents": documents[:4], "instruction": "Find the same scene"}))
    want = official_vl.scores({"text": "like this one", "image": [image_b]}, want_docs[:4], "Find the same scene")
    assert np.abs(got - want).max() <= 1e-4, (got, want)


def test_vl_reranker_large_image_matches_official(http, official_vl, image_server):
    """The default path scores an image larger than 512 px exactly as the official procedure does."""
    large = sample_image(800, 600, seed=6)
    url = image_server.add("/rr-large.png", png_bytes(large))
    got = _by_index(http.post("/v1/rerank", json={
        "model": "rr-vl", "query": "a cat", "documents": [{"type": "image", "data": url}, "a dog"]}))
    want = official_vl.scores({"text": "a cat"}, [{"image": [large]}, {"text": "a dog"}])
    assert np.abs(got - want).max() <= 1e-4, (got, want)


def test_empty_instruction_is_what_each_official_code_makes_of_it(http, official_text, official_vl):
    """Qwen3-Reranker's format_instruction takes the default only for None: "" is an empty instruction.
    Qwen3VLReranker uses `instruct or default_instruction`: "" is the default."""
    got = _by_index(http.post("/v1/rerank", json={"model": "rr-text", "query": "capital?", "documents": DOCS[:3],
                                                  "instruction": ""}))
    want = official_text.scores("capital?", DOCS[:3], "")
    assert np.abs(got - want).max() <= 1e-4, (got, want)
    assert np.abs(official_text.scores("capital?", DOCS[:3]) - want).max() > 1e-4  # "" is not the default here
    got = _by_index(http.post("/v1/rerank", json={"model": "rr-vl", "query": "a cat", "documents": DOCS[:2],
                                                  "instruction": ""}))
    want = official_vl.scores({"text": "a cat"}, [{"text": d} for d in DOCS[:2]], "")
    assert np.abs(got - want).max() <= 1e-4, (got, want)


def test_tei_rerank_body_and_answer(http, official_text):
    """TEI's body {"query", "texts"} is answered in TEI's shape: a list of {"index", "score", "text"?}."""
    texts = DOCS[:3]
    response = http.post("/rerank", json={"model": "rr-text", "query": "capital?", "texts": texts,
                                          "return_text": True, "truncate": True, "truncation_direction": "Right"})
    assert response.status_code == 200, response.text
    ranks = response.json()
    assert isinstance(ranks, list) and [set(r) for r in ranks] == [{"index", "score", "text"}] * 3
    want = official_text.scores("capital?", texts)
    assert [r["index"] for r in ranks] == sorted(range(3), key=lambda i: -want[i])  # highest score first
    assert all(abs(r["score"] - want[r["index"]]) <= 1e-4 and r["text"] == texts[r["index"]] for r in ranks)
    raw = http.post("/rerank", json={"model": "rr-text", "query": "capital?", "texts": texts, "raw_scores": True})
    logits = {r["index"]: r["score"] for r in raw.json()}
    assert all("text" not in r for r in raw.json())
    # raw scores are the log-odds of "yes": their sigmoid is the score
    assert all(abs(1 / (1 + np.exp(-logits[i])) - want[i]) <= 1e-4 for i in range(3)), (logits, want)


def test_rerank_on_an_embedding_model_names_the_kind_setting(http):
    message = http.post("/v1/rerank", json={"model": "emb", "query": "q", "documents": ["a"]}).json()["error"]["message"]
    assert "is an embedding model" in message and "MODEL_KIND=reranker" in message, message
    assert '"kind": "reranker" in its MODELS entry' in message, message


def test_top_n_return_documents_and_score(http):
    documents = DOCS[:3] + [{"text": "an object document"}]
    full = http.post("/v1/rerank", json={"model": "rr-text", "query": "capital", "documents": documents}).json()
    top = http.post("/v2/rerank", json={"model": "rr-text", "query": "capital", "documents": documents,
                                        "top_n": 2, "return_documents": True}).json()
    assert [r["index"] for r in top["results"]] == [r["index"] for r in full["results"][:2]]
    for r in top["results"]:
        raw = documents[r["index"]]
        assert r["document"] == ({"text": raw} if isinstance(raw, str) else raw)
    assert "document" not in full["results"][0]
    scores = {r["index"]: r["relevance_score"] for r in full["results"]}
    many = http.post("/v1/score", json={"model": "rr-text", "text_1": "capital", "text_2": DOCS[:3]}).json()
    assert [d["index"] for d in many["data"]] == [0, 1, 2] and many["object"] == "list"
    assert all(abs(d["score"] - scores[d["index"]]) <= 1e-5 for d in many["data"])
    pairwise = http.post("/score", json={"model": "rr-text", "text_1": ["capital"] * 2, "text_2": DOCS[:2]}).json()
    assert all(abs(d["score"] - scores[d["index"]]) <= 1e-5 for d in pairwise["data"])


def test_pairs_of_a_request_share_one_batch(http):
    def batches():
        models = http.get("/health").json()["models"]
        return next(m for m in models if m["name"] == "rr-text")["batches_run"]

    before = batches()
    assert http.post("/v1/rerank", json={"model": "rr-text", "query": "q", "documents": DOCS[:3] * 2}).status_code == 200
    assert batches() == before + 1


@pytest.mark.parametrize("body, status, param, code", [
    ({"query": "", "documents": ["a"]}, 400, "query", "empty_input"),
    ({"documents": ["a"]}, 400, "query", "missing_required_parameter"),
    ({"query": "q"}, 400, "documents", "missing_required_parameter"),
    ({"query": "q", "documents": []}, 400, "documents", "empty_input"),
    ({"query": "q", "documents": ["a"] * 9}, 400, "documents", "too_many_documents"),
    ({"query": "q", "documents": ["a", " "]}, 400, "documents[1]", "empty_input"),
    ({"query": "q", "documents": [[1, 2]]}, 400, "documents[0]", "invalid_type"),
    ({"query": "q", "documents": ["a"], "top_n": 0}, 400, "top_n", "invalid_value"),
    ({"query": "q", "documents": ["a"], "top_n": "2"}, 400, "top_n", "invalid_value"),
    ({"query": "q", "documents": ["a"], "return_documents": "yes"}, 400, "return_documents", "invalid_type"),
    ({"query": "q", "documents": ["a", {"type": "image", "data": "aGVsbG8="}]}, 400, "documents[1]",
     "images_not_supported"),
    ({"query": "q", "documents": [LONG], "truncate": False}, 400, "documents[0]", "input_too_long"),
    ({"query": LONG + " " + LONG, "documents": ["a"], "truncate": False}, 400, "query", "input_too_long"),
    ({"query": "q", "texts": ["a"], "truncation_direction": "left"}, 400, "truncation_direction", "invalid_value"),
    ({"query": "q", "texts": ["a", 3]}, 400, "texts[1]", "invalid_type"),
    ({"query": "q", "documents": ["a"], "instruction": 3}, 400, "instruction", "invalid_type"),
    ({"model": "emb", "query": "q", "documents": ["a"]}, 400, "model", "wrong_model_kind"),
    ({"model": "nope", "query": "q", "documents": ["a"]}, 404, "model", "model_not_found"),
])
def test_bad_rerank_requests(http, body, status, param, code):
    response = http.post("/v1/rerank", json={"model": "rr-text", **body})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, code), error


def test_bad_score_requests(http):
    response = http.post("/v1/score", json={"model": "rr-text", "text_1": ["a", "b"], "text_2": ["c", "d", "e"]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "text_2"


def test_models_route_by_kind(http):
    # embeddings on a reranker: 400 naming model; no model: the first embedding model
    response = http.post("/v1/embeddings", json={"model": "rr-vl", "input": "x"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "model"
    response = http.post("/v1/embeddings", json={"input": "x"})
    assert response.status_code == 200 and response.json()["model"] == "emb"
    response = http.post("/v1/rerank", json={"query": "q", "documents": ["a"]})
    assert response.status_code == 200 and response.json()["model"] == "rr-text"
    cards = {c["id"]: c for c in http.get("/v1/models").json()["data"]}
    assert {k: (c["kind"], c["modalities"]) for k, c in cards.items()} == {
        "emb": ("embedding", ["text", "image", "video"]), "rr-text": ("reranker", ["text"]),
        "rr-vl": ("reranker", ["text", "image"])}
    assert "embedding_dimension" in cards["emb"] and "embedding_dimension" not in cards["rr-text"]
    assert http.get("/v1/models/Qwen/Qwen3-Reranker-0.6B").json()["kind"] == "reranker"
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "emb"
    assert [(m["name"], m["kind"], m["status"]) for m in health["models"]] == [
        ("emb", "embedding", "ok"), ("rr-text", "reranker", "ok"), ("rr-vl", "reranker", "ok")]


def test_metrics_carry_each_models_label(http):
    """Every per-model series is labelled with the model that did the work."""
    assert http.post("/v1/embeddings", json={"model": "emb", "input": ["x", "y"]}).status_code == 200
    assert http.post("/v1/rerank", json={"model": "rr-text", "query": "q", "documents": ["a", "b"]}).status_code == 200
    samples = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    info = {dict(labels)["model"] for (name, labels) in samples if name == "embedding_api_model_info"}
    assert info == {"emb", "rr-text", "rr-vl"}
    forward = {dict(labels)["model"]: v for (name, labels), v in samples.items()
               if name == "embedding_api_forward_seconds_count"}
    assert forward["emb"] >= 1 and forward["rr-text"] >= 1
    assert samples[("embedding_api_inputs_total", (("kind", "text"), ("model", "emb")))] >= 2
    busy = {dict(labels)["model"] for (name, labels) in samples if name == "embedding_api_model_worker_busy_seconds_total"}
    assert busy == {"emb", "rr-text", "rr-vl"}


def test_kind_detection(tmp_path, tiny_vl, tiny_text, tiny_text_reranker, tiny_vl_reranker):
    def kind(path):
        return detect_kind(str(path), json.loads((path / "config.json").read_text()))[0]

    assert [kind(p) for p in (tiny_vl, tiny_text, tiny_text_reranker, tiny_vl_reranker)] == [
        "embedding", "embedding", "reranker", "reranker"]
    # a tied Qwen3-Reranker stores no lm_head: its tokenizer (no <|endoftext|> appended) tells
    tied = tmp_path / "tied"
    tied.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(tiny_text_reranker / name, tied / name)
    assert kind(tied) == "reranker"
    shutil.copy(tiny_text / "tokenizer.json", tied / "tokenizer.json")
    assert kind(tied) == "embedding"
    # Sentence-Transformers files come first; the setting before everything
    (tied / "config_sentence_transformers.json").write_text('{"model_type": "CrossEncoder"}')
    assert kind(tied) == "reranker"
    assert detect_kind(str(tied), {}, "embedding")[0] == "embedding"


@pytest.mark.parametrize("value, message", [
    ("not json", "JSON list"),
    ('{"name": "a"}', "JSON list"),
    ('[{"name": "a"}]', "MODELS[0].path"),
    ('[{"name": "a", "path": "p", "kind": "classifier"}]', "MODELS[0].kind"),
    ('[{"name": "a", "path": "p"}, {"name": "b", "path": "q", "aliases": ["a"]}]', "used twice"),
    ('[{"name": "a", "path": "p", "dimension": 0}]', "dimension"),
    ('[{"name": "a", "path": "p", "extra": 1}]', "unknown key"),
])
def test_models_setting_is_validated(value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_models(value)


def test_single_reranker_model(start_server, tiny_text_reranker, official_text):
    """MODEL_PATH alone, its kind read from the checkpoint: the rerank routes serve it, embeddings refuse it."""
    server = start_server({"MODEL_PATH": str(tiny_text_reranker), "MODEL_NAME": "Qwen3-Reranker-0.6B",
                           "TORCH_THREADS": "1"})
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        got = _by_index(c.post("/v1/rerank", json={"query": "capital", "documents": DOCS[:2]}))
        assert np.abs(got - OfficialTextReranker(tiny_text_reranker, 8192).scores("capital", DOCS[:2])).max() <= 1e-4
        response = c.post("/v1/embeddings", json={"input": "x"})
        assert response.status_code == 400 and response.json()["error"]["param"] == "model"
        health = c.get("/health").json()
        assert health["model"] == "Qwen3-Reranker-0.6B" and health["models"][0]["kind"] == "reranker"
