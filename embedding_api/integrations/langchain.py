"""A LangChain document compressor that reranks documents with the server's `/v1/rerank`.

Needs only `langchain-core` and `httpx` (this module imports nothing else of the package, so a client
project may also copy it). Embeddings need no adapter: `langchain_openai.OpenAIEmbeddings` with
`check_embedding_ctx_length=False` calls `/v1/embeddings` (see the README).

    reranker = EmbeddingAPIReranker(base_url="http://localhost:6008/v1", model="Qwen3-VL-Reranker-2B")
    retriever = ContextualCompressionRetriever(base_compressor=reranker, base_retriever=...)

A document is sent as its text; a document whose metadata has an image (`image_key`, a URL or data URI)
is sent as that image, fused with its text when it has any (the VL rerankers take both).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx
from langchain_core.callbacks import Callbacks
from langchain_core.documents import BaseDocumentCompressor, Document


class EmbeddingAPIReranker(BaseDocumentCompressor):
    """Reorders documents by the server's relevance score, highest first, each with its score in
    `metadata["relevance_score"]`; `top_n` keeps the best n (None: all)."""

    base_url: str = "http://localhost:6008/v1"
    """The API's base URL, as for the OpenAI SDK: `/rerank` is appended."""
    model: str | None = None
    """A reranker served by the server (None: the server's first reranker)."""
    api_key: str | None = None
    top_n: int | None = None
    instruction: str | None = None
    """A task instruction (None: the model's default)."""
    image_key: str = "image"
    timeout: float = 120.0

    def _body(self, documents: Sequence[Document], query: str) -> dict[str, Any]:
        body: dict[str, Any] = {"query": query, "documents": [self._document(d) for d in documents]}
        if self.model is not None:
            body["model"] = self.model
        if self.top_n is not None:
            body["top_n"] = self.top_n
        if self.instruction is not None:
            body["instruction"] = self.instruction
        return body

    def _document(self, document: Document) -> Any:
        image = document.metadata.get(self.image_key)
        if not image:
            return document.page_content
        if document.page_content:
            return {"text": document.page_content, "image": image}
        return {"type": "image", "data": image}

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @staticmethod
    def _ranked(documents: Sequence[Document], response: httpx.Response) -> list[Document]:
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text
            raise ValueError(f"rerank failed with HTTP {response.status_code}: {message}")
        ranked = []
        for result in response.json()["results"]:
            document = documents[result["index"]]
            metadata = {**document.metadata, "relevance_score": result["relevance_score"]}
            ranked.append(Document(page_content=document.page_content, metadata=metadata, id=document.id))
        return ranked

    def compress_documents(self, documents: Sequence[Document], query: str,
                           callbacks: Callbacks | None = None) -> Sequence[Document]:
        if not documents:
            return []
        response = httpx.post(self.base_url.rstrip("/") + "/rerank", json=self._body(documents, query),
                              headers=self._headers(), timeout=self.timeout)
        return self._ranked(documents, response)

    async def acompress_documents(self, documents: Sequence[Document], query: str,
                                  callbacks: Callbacks | None = None) -> Sequence[Document]:
        if not documents:
            return []
        async with httpx.AsyncClient(timeout=self.timeout) as client:
            response = await client.post(self.base_url.rstrip("/") + "/rerank",
                                         json=self._body(documents, query), headers=self._headers())
        return self._ranked(documents, response)
