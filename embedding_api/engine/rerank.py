"""The rerank path once a request is validated: images -> prepared pairs -> batches -> scores.

A reranker's pairs from all requests go through its own Batcher, exactly as embedding inputs do;
the runner's forward returns one relevance score per pair.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from ..errors import APIError, invalid
from ..inputs import RerankRequest
from ..runners import InputTooLong, PreparedInput
from .batcher import InputFailed, QueueFull, WorkerUnavailable
from .service import Service, model_failure


@dataclass
class _Side:
    """A query or a document with its images decoded."""

    texts: list[str]
    images: list


class RerankService(Service):
    def _prepare_pairs(self, request: RerankRequest, sides: list[_Side]) -> list[PreparedInput]:
        cache: dict = {}
        n_queries = len(request.queries)
        prepared = []
        for qi, di in request.pairs:
            doc = request.documents[di]
            try:
                prepared.append(self.runner.prepare_pair(
                    sides[qi], sides[n_queries + di], request.instruction, request.truncate, cache))
            except InputTooLong as exc:
                param = request.queries[qi].param if self._query_too_long(sides[qi], request, cache) else doc.param
                raise invalid(f"{param}: {exc}; send shorter texts or \"truncate\": true.", param,
                              "input_too_long") from None
            except ValueError as exc:  # e.g. an aspect ratio the model refuses
                raise invalid(f"{doc.param}: {exc}.", doc.param, "invalid_image") from None
        return prepared

    def _query_too_long(self, query: _Side, request: RerankRequest, cache: dict) -> bool:
        """Whether the query does not fit even with an empty document: then the query is what is too long."""
        try:
            self.runner.prepare_pair(query, _Side([], []), request.instruction, False, cache)
        except InputTooLong:
            return True
        return False

    async def score(self, request: RerankRequest) -> tuple[np.ndarray, int]:
        """One value per pair of `request.pairs`, in order: the log-odds of "yes", whose sigmoid is the
        relevance score (runners/scoring.py `relevance_scores`); and the tokens fed to the model."""
        items = request.queries + request.documents
        try:
            images = await asyncio.gather(*(self._load_images(item) if item.images else _none() for item in items))
            sides = [_Side(item.texts, imgs) for item, imgs in zip(items, images)]
            del images
            loop = asyncio.get_running_loop()
            prepared = await loop.run_in_executor(self.prep_pool, self._prepare_pairs, request, sides)
        except Exception:
            self.release_after_failure(items)
            raise
        try:
            futures = self.batcher.submit(prepared)
        except WorkerUnavailable as exc:
            raise model_failure(exc) from None
        except QueueFull:
            raise APIError(429, "The server is at capacity; retry shortly.", code="server_overloaded",
                           headers={"Retry-After": "1"}) from None
        try:
            await asyncio.wait(futures)
            outcomes = [f.exception() for f in futures]
            for (_, di), error in zip(request.pairs, outcomes):
                if isinstance(error, InputFailed):
                    param = request.documents[di].param
                    raise invalid(f"{param}: {error}.", param, "input_too_large") from None
            for error in outcomes:
                if error is not None:
                    raise model_failure(error)
            scores = np.array([float(f.result()) for f in futures], dtype=np.float64)
        finally:
            for future in futures:
                future.cancel()
        return scores, sum(p.n_tokens for p in prepared)


async def _none() -> list:
    return []
