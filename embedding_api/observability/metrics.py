"""Prometheus metrics: one registry per app (never the global default), so that several apps in one
process, and the tests, never share counters.

Recording is cheap on purpose: the series are lock-free single-writer counters and histograms
(series.py) bound once, requests by (route, status) are cached in a plain dict, and everything that
is a level rather than an event (queued inputs, requests in flight, the model worker's busy share,
model_info) is read only when Prometheus scrapes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from .series import FamiliesCollector, Family

PREFIX = "embedding_api_"
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
FETCH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
BATCH_TOKEN_BUCKETS = tuple(2**k for k in range(4, 18))  # 16 .. 131072
INPUT_KINDS = ("text", "image", "video", "fused", "token_ids")
# How often at most the busy share is recomputed; scrapes closer together see the previous value.
BUSY_WINDOW_MIN_S = 1.0

__all__ = ["CONTENT_TYPE_LATEST", "INPUT_KINDS", "Metrics"]


class Metrics:
    """Every metric of one server. `model` is the served model name (the `model` label).

    Request, embedding and fetch metrics are written by the event loop only; batch metrics by the
    model-worker thread that owns the observer from `batch_observer()`.
    """

    def __init__(self, model: str):
        self.model = model
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self._requests = Family(PREFIX + "requests", "HTTP requests answered, by route template and status code",
                                ["route", "status"])
        self._request_seconds = Family(
            PREFIX + "request_duration_seconds", "Time from the request's arrival to the end of its answer",
            ["route"], REQUEST_BUCKETS,
        )
        self._request_cache: dict = {}
        self._prepare = Family(
            PREFIX + "preparation_seconds",
            "Per embedding request: image loading (fetch and decode) and model-input preparation "
            "(tokenising, resizing, patches)", ["model"], STAGE_BUCKETS,
        )
        self._queue = Family(
            PREFIX + "queue_wait_seconds",
            "Per embedding request: time its inputs waited for the model (queue to last vector, "
            "less the forward passes)", ["model"], STAGE_BUCKETS,
        )
        self._forward = Family(PREFIX + "forward_seconds", "Per batch: duration of the model's forward pass",
                               ["model"], STAGE_BUCKETS)
        self._batch_size = Family(PREFIX + "batch_size", "Per batch: inputs in the batch", ["model"],
                                  BATCH_SIZE_BUCKETS)
        self._batch_tokens = Family(PREFIX + "batch_padded_tokens",
                                    "Per batch: padded tokens (longest input x inputs)", ["model"], BATCH_TOKEN_BUCKETS)
        self._prompt_tokens = Family(PREFIX + "prompt_tokens", "Tokens fed to the model for answered requests",
                                     ["model"])
        self._truncated = Family(PREFIX + "truncated_inputs", "Inputs cut at MAX_INPUT_TOKENS", ["model"])
        self._inputs = Family(PREFIX + "inputs", "Inputs embedded (answered with a vector), by kind",
                              ["model", "kind"])
        self._fetch = Family(PREFIX + "image_fetch_seconds", "Duration of image URL fetches, failed ones included",
                             (), FETCH_BUCKETS)
        self._fetch_failures = Family(PREFIX + "image_fetch_failures", "Image URL fetches that failed, by reason",
                                      ["reason"])
        self._failure_cache: dict = {}
        self._per_model: dict[str, _ModelSeries] = {}
        self._model_series(model)  # the default model's series exist (at zero) from the start
        self.fetch_seconds = self._fetch.child()
        registry.register(FamiliesCollector([
            self._requests, self._request_seconds, self._prepare, self._queue, self._forward, self._batch_size,
            self._batch_tokens, self._prompt_tokens, self._truncated, self._inputs, self._fetch, self._fetch_failures,
        ]))
        self.inflight = 0  # HTTP requests being answered now (kept by the middleware)
        self._state = _StateCollector(self)
        registry.register(self._state)
        ProcessCollector(registry=registry)

    # ------------------------------------------------------------------ recording

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        children = self._request_cache.get((route, status))
        if children is None:
            per_route = self._request_seconds.series.get((route,))
            duration = per_route[0] if per_route else self._request_seconds.child(route)
            children = self._request_cache[(route, status)] = (self._requests.child(route, str(status)), duration)
        children[0].value += 1
        children[1].observe(seconds)

    def _model_series(self, model: str) -> "_ModelSeries":
        series = self._per_model.get(model)
        if series is None:
            series = self._per_model[model] = _ModelSeries(
                prepare_seconds=self._prepare.child(model),
                queue_seconds=self._queue.child(model),
                prompt_tokens=self._prompt_tokens.child(model),
                truncated=self._truncated.child(model),
                inputs={kind: self._inputs.child(model, kind) for kind in INPUT_KINDS},
            )
        return series

    def observe_embedding(self, kinds: dict[str, int], tokens: int, times, model: str | None = None) -> None:
        """An answered /v1/embeddings request for `model` (default: the default model): `times` is its
        engine.timing.StageTimes."""
        series = self._model_series(model or self.model)
        for kind, count in kinds.items():
            series.inputs[kind].value += count
        series.prompt_tokens.value += tokens
        series.prepare_seconds.observe(times.prepare_s)
        series.queue_seconds.observe(times.queue_s)
        if times.truncated:
            series.truncated.value += times.truncated

    def batch_observer(self, model: str | None = None) -> Callable[[int, int, float], None]:
        """`observe(inputs, padded_tokens, forward_seconds)` for ONE model-worker thread (its own series)."""
        model = model or self.model
        size, tokens, forward = (f.child(model) for f in (self._batch_size, self._batch_tokens, self._forward))

        def observe(inputs: int, padded_tokens: int, seconds: float) -> None:
            size.observe(inputs)
            tokens.observe(padded_tokens)
            forward.observe(seconds)

        return observe

    def observe_fetch(self, seconds: float, failure: str | None) -> None:
        self.fetch_seconds.observe(seconds)
        if failure is not None:
            counter = self._failure_cache.get(failure)
            if counter is None:
                counter = self._failure_cache[failure] = self._fetch_failures.child(failure)
            counter.value += 1

    def watch(self, services: Callable[[], list]) -> None:
        """Where the scrape-time gauges read the served models' state: a callable returning
        (model name, engine Service) for each loaded model."""
        self._state.services = services

    # ------------------------------------------------------------------ exposition

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class _ModelSeries:
    """The per-request series of one model (written by the event loop only)."""

    prepare_seconds: object
    queue_seconds: object
    prompt_tokens: object
    truncated: object
    inputs: dict


class _StateCollector:
    """Levels read at scrape time: nothing is recorded for them on the request path."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.services: Callable[[], list] = lambda: []
        self._busy_last: dict[tuple[str, str], tuple[float, float, float]] = {}  # (model, worker): (time, busy s, share)

    def describe(self) -> Iterable:
        return []  # collected afresh each scrape: no fixed description

    def collect(self) -> Iterable:
        in_flight = GaugeMetricFamily(PREFIX + "requests_in_flight", "HTTP requests being answered now")
        in_flight.add_metric([], self.metrics.inflight)
        yield in_flight
        services = self.services()
        queued = GaugeMetricFamily(PREFIX + "queued_inputs", "Inputs waiting for the model", labels=["model"])
        busy_share = GaugeMetricFamily(
            PREFIX + "model_worker_busy_ratio",
            "Share of wall time the model worker spent running batches since the previous scrape "
            "(use rate() of model_worker_busy_seconds_total for exact windows)",
            labels=["model", "worker"],
        )
        busy_total = CounterMetricFamily(
            PREFIX + "model_worker_busy_seconds", "Seconds the model worker has spent running batches",
            labels=["model", "worker"],
        )
        up = GaugeMetricFamily(
            PREFIX + "model_worker_up",
            "1 while the model worker's model copy runs; 0 while its model process is being restarted or "
            "after it gave up", labels=["model", "worker"],
        )
        stuck = GaugeMetricFamily(
            PREFIX + "model_worker_stuck",
            "1 while the model worker is inside one forward pass far longer than a forward takes "
            "(STUCK_FORWARD_SECONDS)", labels=["model", "worker"],
        )
        restarts = CounterMetricFamily(
            PREFIX + "model_process_restarts", "Times the model worker's model process was started again",
            labels=["model", "worker"],
        )
        ready = GaugeMetricFamily(
            PREFIX + "model_ready", "1 while at least one model worker of the model serves (not down, not stuck)",
            labels=["model"],
        )
        info = GaugeMetricFamily(
            PREFIX + "model_info", "The served model (value 1)",
            labels=["model", "family", "device", "dtype", "dimension"],
        )
        prefixes = GaugeMetricFamily(
            PREFIX + "prefix_cache_entries",
            "Prompt prefixes whose keys and values the model copy holds (PREFIX_CACHE_SIZE at most)",
            labels=["model", "worker"],
        )
        now = time.perf_counter()
        for model, service in services:
            batcher = service.batcher
            for stats in batcher.workers:  # one model worker per device
                worker = str(stats.index)
                busy = stats.busy_total()
                busy_total.add_metric([model, worker], busy)
                busy_share.add_metric([model, worker], self._share((model, worker), batcher, now, busy))
                up.add_metric([model, worker], 0 if stats.down else 1)
                stuck.add_metric([model, worker], 1 if stats.stuck else 0)
                restarts.add_metric([model, worker], stats.restarts)
            ready.add_metric([model], 1 if any(w.serving for w in batcher.workers) else 0)
            for worker, runner in enumerate(getattr(service, "runners", [])):
                prefixes.add_metric([model, str(worker)], runner.prefix_cache_entries())
            queued.add_metric([model], batcher.queued)
            model_info = service.info
            info.add_metric(
                [model, model_info.family, model_info.device, model_info.dtype, str(model_info.dimension)], 1
            )
        yield queued
        yield busy_share
        yield busy_total
        yield up
        yield stuck
        yield restarts
        yield ready
        yield prefixes
        yield info

    def _share(self, worker: tuple[str, str], batcher, now: float, busy: float) -> float:
        last = self._busy_last.get(worker)
        if last is None:
            since = getattr(batcher, "started_at", now)
            last = (since, 0.0, 0.0)
        then, busy_then, share = last
        if now - then >= BUSY_WINDOW_MIN_S:
            share = min(1.0, max(0.0, (busy - busy_then) / (now - then)))
            self._busy_last[worker] = (now, busy, share)
        elif worker not in self._busy_last:
            self._busy_last[worker] = last
        return share
