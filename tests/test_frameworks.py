"""The RAG frameworks against a real server: LangChain (`langchain-openai`'s OpenAIEmbeddings, the
package's reranking document compressor, ContextualCompressionRetriever), LlamaIndex
(OpenAILikeEmbedding) and Qdrant's local mode holding texts and images embedded by the server.

The checkpoints have random weights, so no order here is semantic; each expected order is derived:
every framework's vector equals what /v1/embeddings answers for the same input, every reranked order
is the order of the scores /v1/rerank gives each pair on its own, the vector store's ranking is a
brute-force cosine ranking in numpy, and a query that is one of the corpus items finds it first."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from langchain_classic.retrievers import ContextualCompressionRetriever
from langchain_core.documents import Document
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_openai import OpenAIEmbeddings
from llama_index.embeddings.openai_like import OpenAILikeEmbedding
from qdrant_client import QdrantClient, models

from embedding_api.integrations.langchain import EmbeddingAPIReranker

from .util import API_KEY, png_bytes, sample_image

ROOT = Path(__file__).resolve().parent.parent
EMB = "Qwen3-VL-Embedding-2B"
RR = "Qwen3-VL-Reranker-2B"
TEXTS = [
    "The capital of China is Beijing.",
    "A red ball rolls across a green lawn.",
    "The capital of the United States is Washington.",
    "Today is Friday.",
    "Bread needs flour, water, salt and yeast.",
]
SCORE_TOL = 1e-4  # a score alone vs. in a batch (padding changes float sums); a tie within it is a tie


@pytest.fixture(scope="module")
def server(start_server, tiny_vl, tiny_vl_reranker):
    models_ = [{"name": EMB, "path": str(tiny_vl)}, {"name": RR, "path": str(tiny_vl_reranker), "kind": "reranker"}]
    return start_server({"MODELS": json.dumps(models_), "API_KEY": API_KEY, "MAX_INPUTS_PER_REQUEST": "64",
                         "TORCH_THREADS": "1"})


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def api_base(server) -> str:
    return server.base_url + "/v1"


def reference(client, inputs, **extra) -> np.ndarray:
    """What /v1/embeddings answers for the same inputs."""
    response = client.post("/v1/embeddings", json={"model": EMB, "input": inputs, "encoding_format": "float", **extra})
    assert response.status_code == 200, response.text
    return np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float64)


def rerank(client, query, documents, **extra) -> list[dict]:
    response = client.post("/v1/rerank", json={"model": RR, "query": query, "documents": documents, **extra})
    assert response.status_code == 200, response.text
    return response.json()["results"]


def scores_alone(client, query, documents) -> list[float]:
    """Each document's score from a /v1/rerank request of its own."""
    return [rerank(client, query, [document])[0]["relevance_score"] for document in documents]


def assert_same_vectors(got, want):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)


def assert_ranked_by(order: list, score: dict, tol: float):
    """`order` is sorted by `score`, highest first, up to ties within `tol` (which may go either way)."""
    for a, b in zip(order, order[1:]):
        assert score[a] >= score[b] - tol, (order, score)


def data_uri(path: Path) -> str:
    mime = "image/png" if path.suffix == ".png" else "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


# --------------------------------------------------------------------------- LangChain embeddings


class Recorder:
    """The JSON bodies an SDK sends, read from its own HTTP client."""

    def __init__(self):
        self.bodies: list[dict] = []

    def client(self) -> httpx.Client:
        return httpx.Client(event_hooks={"request": [self._record]}, timeout=120)

    def _record(self, request: httpx.Request):
        self.bodies.append(json.loads(request.content))


def test_langchain_embeddings_equal_v1_embeddings(client, api_base):
    recorder = Recorder()
    emb = OpenAIEmbeddings(model=EMB, base_url=api_base, api_key=API_KEY, check_embedding_ctx_length=False,
                           http_client=recorder.client())
    docs = emb.embed_documents(TEXTS)
    query = emb.embed_query(TEXTS[0])
    # What LangChain sends without the tiktoken path: the texts as they are, one list per call.
    assert [b["input"] for b in recorder.bodies] == [TEXTS, [TEXTS[0]]]
    assert all(b["model"] == EMB for b in recorder.bodies)
    want = reference(client, TEXTS)
    assert_same_vectors(docs, want)
    assert_same_vectors([query], want[:1])  # embed_query sends the text as a document
    assert np.allclose(np.linalg.norm(docs, axis=1), 1.0, atol=1e-5)


def test_langchain_query_instruction_and_dimensions_pass_through(client, api_base):
    emb = OpenAIEmbeddings(model=EMB, base_url=api_base, api_key=API_KEY, check_embedding_ctx_length=False,
                           dimensions=64, model_kwargs={"extra_body": {"input_type": "query"}})
    got = emb.embed_documents(TEXTS[:2])
    assert len(got[0]) == 64
    want = reference(client, TEXTS[:2], dimensions=64, input_type="query")
    assert_same_vectors(got, want)
    plain = reference(client, TEXTS[:2], dimensions=64)
    assert np.abs(want - plain).max() > 1e-3  # the query instruction changed the vectors


def test_langchain_async_embeddings_equal_v1_embeddings(client, api_base):
    emb = OpenAIEmbeddings(model=EMB, base_url=api_base, api_key=API_KEY, check_embedding_ctx_length=False)
    got = asyncio.run(emb.aembed_documents(TEXTS[:3]))
    assert_same_vectors(got, reference(client, TEXTS[:3]))


# --------------------------------------------------------------------------- LangChain reranking


def corpus_documents() -> list[Document]:
    docs = [Document(page_content=t, metadata={"n": i}, id=f"t{i}") for i, t in enumerate(TEXTS)]
    ball = data_uri(ROOT / "examples" / "ball.png")
    docs.append(Document(page_content="", metadata={"n": len(docs), "image": ball}, id="img"))
    docs.append(Document(page_content="my ball", metadata={"n": len(docs), "image": ball}, id="fused"))
    return docs


def as_rerank_input(document: Document):
    """What the compressor is documented to send for a document."""
    image = document.metadata.get("image")
    if not image:
        return document.page_content
    return {"text": document.page_content, "image": image} if document.page_content else {"type": "image", "data": image}


def test_langchain_reranker_orders_as_v1_rerank(client, api_base):
    docs = corpus_documents()
    query = "Where is the red ball?"
    reranker = EmbeddingAPIReranker(base_url=api_base, model=RR, api_key=API_KEY)
    ranked = reranker.compress_documents(docs, query)
    assert sorted(d.id for d in ranked) == sorted(d.id for d in docs)
    # Exactly /v1/rerank's answer for the same request: the same order and scores ...
    want = rerank(client, query, [as_rerank_input(d) for d in docs])
    assert [d.metadata["n"] for d in ranked] == [r["index"] for r in want]
    np.testing.assert_allclose([d.metadata["relevance_score"] for d in ranked],
                               [r["relevance_score"] for r in want], atol=1e-6)
    # ... which is the order of each pair's score alone; the documents keep their text and metadata.
    alone = dict(zip(range(len(docs)), scores_alone(client, query, [as_rerank_input(d) for d in docs])))
    assert_ranked_by([d.metadata["n"] for d in ranked], alone, SCORE_TOL)
    for d in ranked:
        assert abs(d.metadata["relevance_score"] - alone[d.metadata["n"]]) <= SCORE_TOL
        original = docs[d.metadata["n"]]
        assert (d.page_content, d.id, d.metadata.get("image")) == (original.page_content, original.id,
                                                                    original.metadata.get("image"))
    # top_n keeps the best ones; the async path answers the same.
    top = EmbeddingAPIReranker(base_url=api_base, model=RR, api_key=API_KEY, top_n=2).compress_documents(docs, query)
    assert [d.id for d in top] == [d.id for d in ranked[:2]]
    again = asyncio.run(reranker.acompress_documents(docs, query))
    assert [d.id for d in again] == [d.id for d in ranked]
    assert reranker.compress_documents([], query) == []


def test_langchain_reranker_says_the_servers_refusal(api_base):
    with pytest.raises(ValueError, match=r"HTTP 404.*no-such-model"):
        EmbeddingAPIReranker(base_url=api_base, model="no-such-model", api_key=API_KEY).compress_documents(
            [Document(page_content="a")], "q")
    with pytest.raises(ValueError, match="HTTP 401"):
        EmbeddingAPIReranker(base_url=api_base, model=RR, api_key="wrong").compress_documents(
            [Document(page_content="a")], "q")


def test_contextual_compression_retriever_reranks_the_vector_hits(client, api_base):
    emb = OpenAIEmbeddings(model=EMB, base_url=api_base, api_key=API_KEY, check_embedding_ctx_length=False)
    store = InMemoryVectorStore(embedding=emb)
    store.add_texts(TEXTS, ids=[f"t{i}" for i in range(len(TEXTS))])
    k = 3
    retriever = ContextualCompressionRetriever(
        base_compressor=EmbeddingAPIReranker(base_url=api_base, model=RR, api_key=API_KEY),
        base_retriever=store.as_retriever(search_kwargs={"k": k}))
    query = TEXTS[2]
    got = retriever.invoke(query)
    # The vector hits: the brute-force cosine top k of /v1/embeddings' vectors, the query itself first.
    vectors = reference(client, TEXTS)
    cos = vectors @ reference(client, [query])[0]
    hits = [int(i) for i in np.argsort(-cos)[:k]]
    assert hits[0] == 2 and cos[2] > 0.9999
    assert sorted(d.page_content for d in got) == sorted(TEXTS[i] for i in hits)
    # Reranked: /v1/rerank's order for those hits.
    want = rerank(client, query, [TEXTS[i] for i in hits])
    assert [d.page_content for d in got] == [TEXTS[hits[r["index"]]] for r in want]
    assert [d.metadata["relevance_score"] for d in got] == pytest.approx([r["relevance_score"] for r in want],
                                                                         abs=1e-6)


# --------------------------------------------------------------------------- LlamaIndex


def test_llamaindex_embeddings_equal_v1_embeddings(client, api_base):
    emb = OpenAILikeEmbedding(model_name=EMB, api_base=api_base, api_key=API_KEY, embed_batch_size=2)
    assert_same_vectors(emb.get_text_embedding_batch(TEXTS), reference(client, TEXTS))
    assert_same_vectors([emb.get_query_embedding(TEXTS[1])], reference(client, [TEXTS[1]]))
    assert_same_vectors([emb.get_text_embedding(TEXTS[3])], reference(client, [TEXTS[3]]))
    # LlamaIndex sends a newline as a space (its OpenAI client does so for every text).
    assert_same_vectors([emb.get_text_embedding("Beijing\nis large")], reference(client, ["Beijing is large"]))


def test_llamaindex_extra_fields_and_dimensions_pass_through(client, api_base):
    emb = OpenAILikeEmbedding(model_name=EMB, api_base=api_base, api_key=API_KEY, dimensions=32,
                              additional_kwargs={"extra_body": {"input_type": "query"}})
    got = emb.get_query_embedding(TEXTS[0])
    assert len(got) == 32
    assert_same_vectors([got], reference(client, [TEXTS[0]], dimensions=32, input_type="query"))


# --------------------------------------------------------------------------- Qdrant (local mode)


def image_corpus() -> list[tuple[str, str]]:
    """(name, data URI): the repository's sample images (each picture once) and two generated ones."""
    samples = {}
    for path in sorted((ROOT / "examples").glob("ball*")):
        if path.suffix in (".png", ".jpg"):
            samples.setdefault(path.read_bytes(), (path.name, data_uri(path)))
    samples = list(samples.values())
    generated = [(f"generated-{seed}.png",
                  "data:image/png;base64," + base64.b64encode(png_bytes(sample_image(64, 64, seed=seed))).decode())
                 for seed in (1, 2)]
    return samples + generated


def as_input(item: dict):
    return item["text"] if item["kind"] == "text" else {"type": "image", "data": item["image"]}


@pytest.fixture(scope="module")
def indexed(client):
    """Texts and images embedded by /v1/embeddings in one request, stored in Qdrant's in-process mode."""
    items = [{"kind": "text", "text": t} for t in TEXTS] + [{"kind": "image", "name": n, "image": uri}
                                                             for n, uri in image_corpus()]
    vectors = reference(client, [as_input(item) for item in items])
    qdrant = QdrantClient(":memory:")
    qdrant.create_collection("corpus", vectors_config=models.VectorParams(size=vectors.shape[1],
                                                                            distance=models.Distance.COSINE))
    qdrant.upsert("corpus", points=[models.PointStruct(id=i, vector=v.tolist(), payload=item)
                                    for i, (v, item) in enumerate(zip(vectors, items))])
    yield qdrant, items, vectors
    qdrant.close()


def search(qdrant, vector: np.ndarray, limit: int):
    return qdrant.query_points("corpus", query=vector.tolist(), limit=limit).points


@pytest.mark.parametrize("query_index", [1, 6], ids=["text-query", "image-query"])
def test_qdrant_search_equals_brute_force_and_the_rerank_order(client, indexed, query_index):
    qdrant, items, vectors = indexed
    assert qdrant.count("corpus").count == len(items) >= 10
    query_item = items[query_index]
    assert query_item["kind"] == ("text" if query_index < len(TEXTS) else "image")
    query = reference(client, [as_input(query_item)])[0]  # embedded again, in a request of its own
    # Brute force over the same vectors: cosine = dot of unit vectors.
    cos = vectors @ query / np.linalg.norm(vectors, axis=1) / np.linalg.norm(query)
    points = search(qdrant, query, limit=len(items))
    assert sorted(p.id for p in points) == list(range(len(items)))
    np.testing.assert_allclose([p.score for p in points], cos[[p.id for p in points]], atol=1e-5)
    assert_ranked_by([p.id for p in points], dict(enumerate(cos)), 1e-6)
    assert [p.id for p in points] == [int(i) for i in np.argsort(-cos, kind="stable")] or _near_ties(cos)
    # The query is one of the corpus items: it is its own nearest neighbour.
    assert points[0].id == query_index and points[0].score > 0.9999
    assert points[0].payload == query_item
    # Rerank the top 5 hits (texts and images) with /v1/rerank; the query as text, or as the image.
    hits = points[:5]
    documents = [as_input(p.payload) for p in hits]
    ranked = rerank(client, as_input(query_item), documents)
    assert sorted(r["index"] for r in ranked) == list(range(len(hits)))
    alone = dict(enumerate(scores_alone(client, as_input(query_item), documents)))
    assert_ranked_by([r["index"] for r in ranked], alone, SCORE_TOL)
    for r in ranked:
        assert abs(r["relevance_score"] - alone[r["index"]]) <= SCORE_TOL
    top = rerank(client, as_input(query_item), documents, top_n=2)
    assert [r["index"] for r in top] == [r["index"] for r in ranked[:2]]


def _near_ties(cos: np.ndarray) -> bool:
    """Two corpus items whose cosines to the query differ by less than float32 noise."""
    s = np.sort(cos)
    return bool((np.diff(s) < 1e-6).any())


def test_qdrant_filters_by_kind_and_finds_the_image(client, indexed):
    qdrant, items, vectors = indexed
    image_index = next(i for i, item in enumerate(items) if item["kind"] == "image")
    query = reference(client, [as_input(items[image_index])])[0]
    only_images = models.Filter(must=[models.FieldCondition(key="kind", match=models.MatchValue(value="image"))])
    points = qdrant.query_points("corpus", query=query.tolist(), query_filter=only_images, limit=len(items)).points
    image_ids = [i for i, item in enumerate(items) if item["kind"] == "image"]
    assert sorted(p.id for p in points) == image_ids
    assert points[0].id == image_index
    cos = vectors[image_ids] @ query / np.linalg.norm(vectors[image_ids], axis=1) / np.linalg.norm(query)
    assert_ranked_by([p.id for p in points], dict(zip(image_ids, cos)), 1e-6)
