"""The embed path once a request is validated: images -> model inputs -> batches -> vectors."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Awaitable, Callable, Sequence, Union

import numpy as np

from .batcher import Batcher, InputFailed, QueueFull, WorkerUnavailable
from .calibration import Calibration
from .timing import StageTimes
from ..errors import APIError, invalid
from ..formats import OutputFormat, encode_rows
from ..inputs import EmbedInput, EmbedRequest, InputRules, VideoRef
from ..media import ImageLoader, MediaError, MediaPolicy
from ..media.memory import release_freed_memory
from ..media.video import VideoLimits, VideoLoader, decode_video
from ..normalize import finalize
from ..runners import InputTooLong, PreparedInput, Runner
from ..settings import Settings

log = logging.getLogger("embedding_api")

# Text-only requests up to this many characters (token ids count one each) are tokenized on the
# event loop, under ~0.5 ms; longer ones in a preparation thread.
INLINE_PREPARE_CHARS = 1024


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


def video_limits(settings: Settings) -> VideoLimits:
    return VideoLimits(
        max_bytes=settings.max_video_bytes,
        max_seconds=settings.max_video_seconds,
        max_frames=settings.max_video_frames,
        max_frame_pixels=settings.max_video_frame_pixels,
        decode_timeout=settings.video_decode_timeout,
        fetch_timeout=settings.video_fetch_timeout,
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
        reserved_strings=runner.reserved_strings(),
        default_instruction=settings.default_instruction if info.family == "qwen3_vl" else None,
        query_instruction=settings.query_instruction or info.default_query_instruction,
        # Rerankers score text and images; video pairs are not prepared for them.
        takes_videos=hasattr(runner, "video_plan") and info.kind == "embedding",
    )


async def _settled(futures: list[asyncio.Future]) -> None:
    """Until every future is done, whatever its outcome (read afterwards). Awaiting each in turn costs
    a fraction of `asyncio.wait`'s waiter and callbacks, per request on the event loop."""
    for future in futures:
        if not future.done():
            try:
                await future
            except Exception:  # noqa: BLE001 - the outcomes are read by the caller
                pass


class Service:
    """Owns the runners (one model copy per device), the batcher, the image and video loaders and
    the preparation threads. The first runner prepares inputs; every runner runs batches.

    `on_batch(inputs, padded_tokens, forward_s)` is called by a model worker after each batch;
    `on_fetch(seconds, failure_reason_or_None)` after each image URL fetch (metrics).
    """

    def __init__(
        self,
        settings: Settings,
        runner: Union[Runner, Sequence[Runner]],
        on_batch: Callable[[int, int, float], None] | Sequence | None = None,
        on_fetch: Callable[[float, str | None], None] | None = None,
    ):
        self.settings = settings
        self.runners = list(runner) if isinstance(runner, (list, tuple)) else [runner]
        self.runner = runner = self.runners[0]
        self.info = runner.info()
        if len(self.runners) > 1:
            self.info = dataclasses.replace(self.info, device=",".join(str(r.device) for r in self.runners))
        self.rules = input_rules(settings, runner)
        self.modalities = ["text"] + (["image"] if self.rules.takes_images else []) + (
            ["video"] if self.rules.takes_videos else [])
        self.images = ImageLoader(media_policy(settings))
        self.videos = VideoLoader(media_policy(settings), video_limits(settings))
        self.images.fetcher.on_fetch = on_fetch
        self.prep_pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="prepare")
        self.batcher = Batcher(
            [r.forward for r in self.runners],
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.max_batch_tokens,
            max_queued=settings.max_queued_inputs,
            # A model process empties its own CUDA cache; a model worker thread needs it done here.
            on_oom=_empty_cuda_cache if any(r.device.type == "cuda" and getattr(r, "process", None) is None
                                            for r in self.runners) else None,
            devices=[str(r.device) for r in self.runners],
            on_batch=on_batch,
            # A model process that ends is started again by its worker (with backoff, and a limit).
            recover=[_process(r).restart if _process(r) is not None else None for r in self.runners],
            restart_attempts=settings.model_restart_attempts,
            stuck_after=settings.stuck_forward_seconds,
            cheap_request_tokens=settings.cheap_request_tokens or None,
            heavy_batch_efficiency=settings.heavy_batch_efficiency or None,
            pipelines=[_process(r) for r in self.runners],  # sends each model process its next batch ahead
        )
        self.batcher.start()
        self._closing = threading.Event()
        if settings.stuck_forward_seconds:
            threading.Thread(target=self._watch_stuck, name="stuck-watch", daemon=True).start()
        self.calibration = Calibration(self) if self.info.kind == "embedding" else None

    def alive(self) -> bool:
        """The model can serve, or may again: not every model worker has failed for good."""
        return self.batcher.alive() and not self.batcher.failed()

    def state(self) -> str:
        """ok (every worker serves), degraded (some do), unavailable (none does now: restarting or
        stuck), or failed (every worker gave up: only a restart of the server helps)."""
        workers = self.batcher.workers
        serving = sum(w.serving for w in workers)
        if serving == len(workers):
            return "ok"
        if serving:
            return "degraded"
        return "failed" if not self.alive() else "unavailable"

    def _watch_stuck(self) -> None:
        """Logs a worker stuck in one forward pass; past STUCK_RESTART_SECONDS kills its model process
        (the worker then restarts it, and the batch goes to another worker)."""
        reported: dict[int, float] = {}  # worker -> busy_since of the forward reported stuck
        killed: set[float] = set()  # busy_since of the forwards whose process was killed
        kill_after = self.settings.stuck_restart_seconds
        while not self._closing.wait(1.0):
            for stats, runner in zip(self.batcher.workers, self.runners):
                k, since, running, process = stats.index, stats.busy_since, stats.running_for(), _process(runner)
                if k in reported and reported[k] != since and reported.pop(k) not in killed:
                    log.warning("model worker %d (%s): the stuck forward pass has ended after all", k, stats.device)
                if not stats.stuck:
                    continue
                if reported.get(k) != since:
                    reported[k] = since
                    log.error("model worker %d (%s) is stuck: one forward pass has run %.0f s (limit %.0f s)%s",
                              k, stats.device, running, stats.stuck_limit(),
                              f"; its model process is killed at {kill_after:g} s"
                              if kill_after and process is not None else "")
                if kill_after and process is not None and running > kill_after and since not in killed:
                    killed.add(since)
                    log.error("model worker %d (%s): killing its model process (pid %d), stuck for %.0f s",
                              k, stats.device, process.pid, running)
                    process.kill()

    async def close(self) -> None:
        self._closing.set()
        if self.calibration is not None:
            self.calibration.cancel()
        self.batcher.stop(timeout=0)  # no new batches, and no restarts, from here on
        for runner in self.runners:
            if _process(runner) is not None:
                await asyncio.to_thread(runner.process.close, 2.0)  # a stopped (hung) one is killed
        await asyncio.to_thread(self.batcher.stop)
        self.prep_pool.shutdown(wait=False, cancel_futures=True)
        await self.images.aclose()
        await self.videos.aclose()

    async def _load_images(self, item: EmbedInput) -> list:
        async def one(k: int, ref: str):
            try:
                return await self.images.load(ref)
            except MediaError as exc:
                param = item.param if len(item.images) == 1 else f"{item.param} (image {k})"
                raise invalid(f"{param}: {exc.message}", item.param, "invalid_image") from None

        return list(await asyncio.gather(*(one(k, ref) for k, ref in enumerate(item.images))))

    async def _load_video(self, item: EmbedInput, k: int, video: VideoRef):
        """One video, decoded (files) or loaded (frames) and sized for the model, off the event loop."""
        where = item.param if len(item.videos) == 1 else f"{item.param} (video {k})"
        try:
            return await load_video(video, self.runner, self.videos.load_bytes, self.images.load,
                                    self.videos.limits, self.prep_pool)
        except InputTooLong as exc:
            refusal = invalid(f"{where}: {exc}.", item.param, "input_too_long")
        except (MediaError, ValueError) as exc:
            refusal = invalid(f"{where}: {exc}", item.param, "invalid_video")
        # Raised outside the except clause: the refusal keeps no traceback of the loader (its frames).
        raise refusal

    def release_after_failure(self, items: list) -> None:
        """After a request with images or videos failed: hand the memory its media took back to the
        system, once the request's objects are gone."""
        if any(item.images or item.videos for item in items):
            asyncio.get_running_loop().call_later(0.2, self.prep_pool.submit, release_freed_memory)

    def _prepare(self, item: EmbedInput, images: list, videos: list = ()) -> PreparedInput:
        try:
            return self.runner.prepare(item.texts, images, item.token_ids, item.instruction,
                                       truncate=item.truncate, videos=videos)
        except InputTooLong as exc:
            raise invalid(f"{item.param}: {exc}.", item.param, "input_too_long") from None
        except ValueError as exc:  # e.g. an aspect ratio the model refuses
            raise invalid(f"{item.param}: {exc}.", item.param, "invalid_image") from None

    async def _prepare_one(self, item: EmbedInput) -> PreparedInput:
        images = await self._load_images(item) if item.images else []
        videos = list(await asyncio.gather(*(self._load_video(item, k, v) for k, v in enumerate(item.videos))))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.prep_pool, self._prepare, item, images, videos)

    async def _prepare_all(self, items: list[EmbedInput]) -> list[PreparedInput]:
        if any(item.images or item.videos for item in items):
            return list(await asyncio.gather(*(self._prepare_one(item) for item in items)))
        # Text only. A short request is tokenized right here: that costs less than the two thread
        # hops that handing it to a preparation thread takes. Longer ones take one hop, all inputs together.
        size = sum(len(t) for item in items for t in item.texts) + sum(len(i.token_ids or ()) for i in items)
        if size <= INLINE_PREPARE_CHARS:
            return [self._prepare(item, []) for item in items]
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.prep_pool, lambda: [self._prepare(i, []) for i in items])

    async def embed(self, request: EmbedRequest, times: StageTimes | None = None) -> tuple[np.ndarray, int]:
        """Returns the finished vectors (one row per input, in order) and the tokens fed to the model.

        With `times`, records where the time went (preparation, queue, forward) and how many
        inputs were truncated. Cancelling the caller cancels the inputs still queued: they never
        reach the model.
        """
        started = time.perf_counter()
        try:
            prepared = await self._prepare_all(request.inputs)
        except Exception:
            self.release_after_failure(request.inputs)
            raise
        if times is not None:
            times.prepare_s = time.perf_counter() - started
            times.truncated = sum(p.truncated for p in prepared)
            _count_media(times, prepared, self.runner)
        try:
            futures = self.batcher.submit(prepared, times)
        except WorkerUnavailable as exc:
            raise model_failure(exc) from None
        except QueueFull:
            raise capacity_error() from None
        try:
            await _settled(futures)  # the route bounds the whole request by REQUEST_TIMEOUT
            # Read every outcome, so no failed future is left unretrieved.
            outcomes = [(item, f.exception()) for item, f in zip(request.inputs, futures)]
            for item, error in outcomes:
                if isinstance(error, InputFailed):
                    raise invalid(f"{item.param}: {error}.", item.param, "input_too_large") from None
            for _, error in outcomes:
                if error is not None:
                    raise model_failure(error)
            rows = [f.result() for f in futures]
        finally:
            for future in futures:
                future.cancel()  # no-op for finished ones; drops the rest from the queue
        vectors = finalize(np.stack(rows), request.dimensions)
        return vectors, sum(p.n_tokens for p in prepared)

    async def embed_output(self, request: EmbedRequest, times: StageTimes | None = None) -> tuple[object, int]:
        """`embed`, with the vectors in the request's output format: the float32 array itself for
        float/base64 float32, else one encoded value per row (formats.encode_rows)."""
        vectors, tokens = await self.embed(request, times)
        return await self.encode(vectors, request.output, request.dimensions), tokens

    async def embed_outputs(self, request: EmbedRequest, outputs: dict[str, OutputFormat],
                            times: StageTimes | None = None) -> tuple[dict[str, object], int]:
        """`embed` once, the vectors in each of several output formats (Cohere's `embedding_types`)."""
        vectors, tokens = await self.embed(request, times)
        encoded = {name: await self.encode(vectors, output, request.dimensions) for name, output in outputs.items()}
        return encoded, tokens

    async def encode(self, vectors: np.ndarray, output: OutputFormat, dimensions: int) -> object:
        """The finished float32 rows in `output`: themselves when plain, else formats.encode_rows, with
        the calibrated ranges of `dimensions` for int8 and uint8."""
        if output.plain:
            return vectors
        ranges = await self.calibration.ranges(dimensions) if output.calibrated else None
        return encode_rows(vectors, output, ranges)


def capacity_error() -> APIError:
    return APIError(429, "The server is at capacity; retry shortly.", code="server_overloaded",
                    headers={"Retry-After": "1"})


def _count_media(times: StageTimes, prepared: list[PreparedInput], runner) -> None:
    """Pixels and tokens of the images and videos as the model saw them (a grid is (t, h, w) patches)."""
    patch, merge = getattr(runner, "patch_size", 0), getattr(runner, "merge_size", 1)
    temporal = getattr(runner, "temporal_patch", 1)
    for p in prepared:
        for t, h, w in p.image_grid_thw:
            times.image_pixels += h * w * patch * patch
            times.vision_tokens += t * h * w // (merge * merge)
        for t, h, w in p.video_grid_thw:
            times.video_pixels += t * temporal * h * w * patch * patch
            times.vision_tokens += t * h * w // (merge * merge)


def model_failure(error: BaseException) -> BaseException:
    """What a failed forward pass answers: 503 when no model worker could run it (its model process
    ended more than WORKER_RETRIES times, or every worker has failed); otherwise the error itself."""
    if isinstance(error, WorkerUnavailable):
        return APIError(503, "The model is not running; retry shortly or on another replica.",
                        code="model_unavailable", headers={"Retry-After": "2"})
    return error


def _process(runner):
    """The model process running this runner's forward passes (None: they run in this process)."""
    return getattr(runner, "process", None)


async def load_video(video: VideoRef, runner: Runner, load_bytes: Callable[[str], Awaitable[bytes]],
                     load_image: Callable[[str], Awaitable], limits: VideoLimits, pool=None):
    """One video, decoded (files) or loaded (frames) and sized for the model, off the event loop.

    Shared with the bulk jobs, which pass loaders that also read local files. Raises MediaError,
    InputTooLong or ValueError (a video the model refuses).
    """
    loop = asyncio.get_running_loop()
    if video.frames is not None:
        if len(video.frames) > limits.max_frames:
            raise MediaError(f"a video may have at most {limits.max_frames} frames")
        keep = runner.frame_indices(len(video.frames), video.max_frames)
        runner.check_frame_count(len(keep))  # before any frame is fetched
        images = await asyncio.gather(*(load_image(video.frames[i]) for i in keep))
        try:
            return await loop.run_in_executor(pool, runner.clip_from_frames, images, video.fps)
        finally:
            del images  # a refusal's traceback keeps this frame: not the decoded frames with it
    data = await load_bytes(video.data)
    plan = partial(_plan, runner, video)
    return await loop.run_in_executor(pool, decode_video, data, limits, plan)


def _plan(runner: Runner, video: VideoRef, header):
    return runner.video_plan(header, video.fps, video.max_frames)


def _empty_cuda_cache() -> None:
    import torch

    torch.cuda.empty_cache()
