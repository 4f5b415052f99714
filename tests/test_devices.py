"""Several devices in one server: one model copy and one model worker per device, one queue.

On this CPU-only host the devices are `cpu,cpu` with one torch thread each: the code path is the one
`cuda:0,cuda:1` takes (one runner per device, one worker thread per runner)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from embedding_api.engine.batcher import Batcher
from embedding_api.runners import ModelLoadError, load_runners
from embedding_api.settings import Settings

from .test_batching import COSINE, assert_same, cosine, text
from .util import API_KEY, png_bytes, sample_image


@pytest.fixture(scope="module")
def runners(tiny_vl):
    return load_runners(Settings(_env_file=None, model_path=str(tiny_vl), device="cpu,cpu", torch_threads=1))


class Gated:
    """A forward that waits for a permit per call, so a test decides which worker holds which batch."""

    def __init__(self, runner, fail_first: bool = False):
        self.runner = runner
        self.fail_first = fail_first
        self.batches: list[list] = []
        self.permits = threading.Semaphore(0)

    def __call__(self, batch):
        self.batches.append(list(batch))
        assert self.permits.acquire(timeout=30)
        if self.fail_first and len(self.batches) == 1:
            raise RuntimeError("boom: this device failed")
        return self.runner.forward(batch)


def test_device_setting_forms(tiny_vl):
    assert Settings(_env_file=None, device=" CPU , cpu ").device == "cpu,cpu"
    assert Settings(_env_file=None, device="cuda:0,cuda:1").device == "cuda:0,cuda:1"
    assert Settings(_env_file=None, device="cuda:all").device == "cuda:all"
    for bad in ("cpu,gpu", "cuda:x", "cpu,,cpu", "auto,cpu"):
        with pytest.raises(ValidationError, match="DEVICE must be"):
            Settings(_env_file=None, device=bad)
    import torch

    if not torch.cuda.is_available():
        for setting in ("cuda:all", "cpu,cuda:0"):
            with pytest.raises(ModelLoadError, match="CUDA is not available"):
                load_runners(Settings(_env_file=None, model_path=str(tiny_vl), device=setting))


def test_one_model_copy_per_device(runners):
    assert len(runners) == 2 and runners[0].model is not runners[1].model
    assert [str(r.device) for r in runners] == ["cpu", "cpu"]


def test_a_failing_forward_fails_only_its_batch_and_its_worker_goes_on(runners):
    f0, f1 = Gated(runners[0], fail_first=True), Gated(runners[1])
    batcher = Batcher([f0, f1], max_batch_size=8, max_batch_tokens=16384, max_queued=1024, devices=["cpu", "cpu"])
    batcher.start()
    # x and y are single inputs: a failed batch of several is retried in parts (test_batching.py).
    x = [runners[0].prepare([text(4, 1)], [], None, None)]
    y = [runners[0].prepare([text(6, 3)], [], None, None)]
    z = [runners[0].prepare([text(7, 4)], [], None, None)]
    w = [runners[0].prepare([text(3, 5)], [], None, None)]

    async def entries(n: int) -> None:
        for _ in range(3000):
            if len(f0.batches) + len(f1.batches) >= n:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"the workers did not take {n} batches")

    async def both_hold(a, b) -> tuple:
        """a and b each go to a different worker: the second is submitted while the first is held."""
        before = len(f0.batches) + len(f1.batches)
        fa = batcher.submit(a)
        await entries(before + 1)
        fb = batcher.submit(b)
        await entries(before + 2)
        f0.permits.release()
        f1.permits.release()
        return (await asyncio.gather(*fa, return_exceptions=True),
                await asyncio.gather(*fb, return_exceptions=True))

    async def main():
        first = await both_hold(x, y)
        second = await both_hold(z, w)
        return first, second

    try:
        (rx, ry), (rz, rw) = asyncio.run(main())
        assert batcher.alive()
    finally:
        batcher.stop()
    assert not batcher.alive()
    failed, ok, ok_prepared = (rx, ry, y) if f0.batches[0] == x else (ry, rx, x)
    assert [type(r) for r in failed] == [RuntimeError] * len(failed) and "boom" in str(failed[0])
    assert_same(runners[1], ok_prepared, ok)
    # The worker whose batch failed goes on: in the second round each worker ran one batch, both fine.
    assert len(f0.batches) == 2 and len(f1.batches) == 2
    assert_same(runners[0], z, rz)
    assert_same(runners[0], w, rw)
    stats = {s.index: s for s in batcher.workers}
    assert (stats[0].batches, stats[0].failed_batches, stats[1].batches, stats[1].failed_batches) == (1, 1, 2, 0)
    assert batcher.batches_run == 3 and batcher.inputs_run == 1 + len(ok_prepared) + 1
    assert batcher.idle()


# --------------------------------------------------------------------------- the real server


@pytest.fixture(scope="module")
def two_worker_server(start_server, tiny_vl):
    return start_server({
        "MODEL_PATH": str(tiny_vl),
        "MODEL_NAME": "Qwen3-VL-Embedding-2B",
        "API_KEY": API_KEY,
        "ALLOW_PRIVATE_IMAGE_URLS": "true",
        "DEVICE": "cpu,cpu",
        "TORCH_THREADS": "1",
        "MAX_BATCH_SIZE": "4",
    })


def embed(base_url: str, inputs, client: httpx.Client | None = None) -> list[np.ndarray]:
    c = client or httpx.Client(timeout=60)
    r = c.post(base_url + "/v1/embeddings", json={"input": inputs},
               headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200, r.text
    return [np.asarray(d["embedding"]) for d in r.json()["data"]]


def test_health_reports_each_worker(two_worker_server):
    body = httpx.get(two_worker_server.base_url + "/health").json()
    assert body["status"] == "ok" and body["device"] == "cpu" and body["device_name"] == "cpu,cpu"
    assert [(w["worker"], w["device"]) for w in body["workers"]] == [(0, "cpu"), (1, "cpu")]
    assert all(set(w) == {"worker", "device", "state", "stuck", "restarts", "batches", "inputs", "busy"}
               for w in body["workers"])
    assert [(w["state"], w["stuck"], w["restarts"]) for w in body["workers"]] == [("up", False, 0)] * 2


def test_vectors_equal_a_single_workers(two_worker_server, vl_server, image_server):
    url = image_server.add("/devices.png", png_bytes(sample_image(80, 64, seed=11)))
    inputs = [text(5, 1), text(40, 2), {"type": "image", "data": url}, {"text": text(3, 4), "image": url}]
    two = embed(two_worker_server.base_url, inputs)
    one = embed(vl_server.base_url, inputs)
    for k, (a, b) in enumerate(zip(two, one, strict=True)):
        assert cosine(a, b) >= COSINE, f"input {k}"


def test_both_workers_take_batches_under_load(two_worker_server, vl_server):
    base = two_worker_server.base_url
    before = {w["worker"]: w["batches"] for w in httpx.get(base + "/health").json()["workers"]}
    texts = [text(4 + k % 20, k) for k in range(64)]
    with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=16)) as client, \
            ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda t: embed(base, t, client)[0], texts))
    workers = httpx.get(base + "/health").json()["workers"]
    taken = {w["worker"]: w["batches"] - before[w["worker"]] for w in workers}
    assert taken[0] > 0 and taken[1] > 0, taken
    # Every answer is its own text's vector, whichever worker ran it.
    reference = embed(vl_server.base_url, texts[:8])
    for k in range(8):
        assert cosine(got[k], reference[k]) >= COSINE, f"text {k}"
