"""The embed path once a request is validated: images -> model inputs -> batches -> vectors."""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .batcher import Batcher, InputFailed, QueueFull
from ..api.errors import APIError, invalid
from ..inputs import EmbedInput, EmbedRequest, InputRules
from ..media import ImageLoader, MediaError, MediaPolicy
from ..normalize import finalize
from ..runners import VISION_TOKENS, InputTooLong, PreparedInput, Runner
from ..settings import Settings

log = logging.getLogger("embedding_api")


def media_policy(settings: Settings) -> MediaPolicy:
    return MediaPolicy(
        allow_urls=settings.allow_image_urls,
        allow_private=settings.allow_private_image_urls,
        allowed_domains=settings.image_domains,
        fetch_timeout=settings.image_fetch_timeout,
        max_image_bytes=settings.max_image_bytes,
        max_image_pixels=settings.max_image_pixels,
        max_concurrent_fetches=settings.max_concurrent_fetches,
        max_width=settings.max_image_width,
        max_height=settings.max_image_height,
        max_size=settings.max_image_size,
    )


def input_rules(settings: Settings, runner: Runner) -> InputRules:
    """What the served model and the settings allow (shared with the bulk jobs)."""
    info = runner.info()
    return InputRules(
        max_inputs=settings.max_inputs_per_request,
        native_dimension=info.dimension,
        default_dimension=settings.embedding_dimension or info.dimension,
        takes_images=info.takes_images,
        vocab_size=info.vocab_size,
        reserved_token_ids=runner.reserved_token_ids(),
        reserved_strings=VISION_TOKENS,
        default_instruction=settings.default_instruction if info.family == "qwen3_vl" else None,
        query_instruction=settings.query_instruction or info.default_query_instruction,
    )


class Service:
    """Owns the runner, the batcher, the image loader and the preparation threads."""

    def __init__(self, settings: Settings, runner: Runner):
        self.settings = settings
        self.runner = runner
        self.info = runner.info()
        self.rules = input_rules(settings, runner)
        self.images = ImageLoader(media_policy(settings))
        self.prep_pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="prepare")
        self.batcher = Batcher(
            runner.forward,
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.max_batch_tokens,
            max_queued=settings.max_queued_inputs,
            on_oom=_empty_cuda_cache if runner.device.type == "cuda" else None,
        )
        self.batcher.start()

    async def close(self) -> None:
        self.batcher.stop()
        self.prep_pool.shutdown(wait=False, cancel_futures=True)
        await self.images.aclose()

    async def _load_images(self, item: EmbedInput) -> list:
        async def one(k: int, ref: str):
            try:
                return await self.images.load(ref)
            except MediaError as exc:
                param = item.param if len(item.images) == 1 else f"{item.param} (image {k})"
                raise invalid(f"{param}: {exc.message}", item.param, "invalid_image") from None

        return list(await asyncio.gather(*(one(k, ref) for k, ref in enumerate(item.images))))

    def _prepare(self, item: EmbedInput, images: list) -> PreparedInput:
        try:
            return self.runner.prepare(item.texts, images, item.token_ids, item.instruction)
        except InputTooLong as exc:
            raise invalid(f"{item.param}: {exc}.", item.param, "input_too_long") from None
        except ValueError as exc:  # e.g. an aspect ratio the model refuses
            raise invalid(f"{item.param}: {exc}.", item.param, "invalid_image") from None

    async def _prepare_one(self, item: EmbedInput) -> PreparedInput:
        images = await self._load_images(item) if item.images else []
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.prep_pool, self._prepare, item, images)

    async def _prepare_all(self, items: list[EmbedInput]) -> list[PreparedInput]:
        if any(item.images for item in items):
            return list(await asyncio.gather(*(self._prepare_one(item) for item in items)))
        # Text only: one hop to a preparation thread for the whole request.
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.prep_pool, lambda: [self._prepare(i, []) for i in items])

    async def embed(self, request: EmbedRequest) -> tuple[np.ndarray, int]:
        """Returns the finished vectors (one row per input, in order) and the tokens fed to the model.

        Cancelling the caller cancels the inputs still queued: they never reach the model.
        """
        prepared = await self._prepare_all(request.inputs)
        try:
            futures = self.batcher.submit(prepared)
        except QueueFull:
            raise APIError(
                429,
                "The server is at capacity; retry shortly.",
                code="server_overloaded",
                headers={"Retry-After": "1"},
            ) from None
        try:
            await asyncio.wait(futures)  # the route bounds the whole request by REQUEST_TIMEOUT
            # Read every outcome, so no failed future is left unretrieved.
            outcomes = [(item, f.exception()) for item, f in zip(request.inputs, futures)]
            for item, error in outcomes:
                if isinstance(error, InputFailed):
                    raise invalid(f"{item.param}: {error}.", item.param, "input_too_large") from None
            for _, error in outcomes:
                if error is not None:
                    raise error
            rows = [f.result() for f in futures]
        finally:
            for future in futures:
                future.cancel()  # no-op for finished ones; drops the rest from the queue
        vectors = finalize(np.stack(rows), request.dimensions)
        return vectors, sum(p.n_tokens for p in prepared)


def _empty_cuda_cache() -> None:
    import torch

    torch.cuda.empty_cache()
