"""Scheduling by cost (engine/scheduling.py): cheap requests before heavy ones, heavy work never
starved, heavy batches cut short while cheap requests are about. The policy itself on a LaneQueue
driven step by step (no threads, no clock); then a real Batcher on the tiny checkpoint."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np
import pytest

from embedding_api.engine import scheduling
from embedding_api.engine.scheduling import CHEAP, HEAVY, ForwardCost, LaneQueue, batch_cost, request_lane
from embedding_api.runners import PreparedInput

from .test_batching import Forward, assert_same, make_batcher, runner, text, wait_entered  # noqa: F401
from .util import sample_image


class _NotDone:
    def done(self) -> bool:
        return False


@dataclass(eq=False)
class _Entry:
    prepared: PreparedInput
    lane: int
    future: _NotDone = field(default_factory=_NotDone)


def _text(n: int) -> PreparedInput:
    return PreparedInput(input_ids=list(range(n)))


def _video(n: int = 300, patches: int = 1200) -> PreparedInput:
    return PreparedInput(input_ids=list(range(n)), video_pixel_values=np.zeros((patches, 4), np.float32))


def test_request_lane_by_cost():
    assert request_lane([_text(30)], 1024) == CHEAP
    assert request_lane([_text(30)] * 16, 1024) == CHEAP  # a few short texts: cheap
    assert request_lane([_text(30)] * 40, 1024) == HEAVY  # many: heavy, all of them
    assert request_lane([_text(2000)], 1024) == HEAVY  # one long text
    assert request_lane([_text(5), _video(5, 4)], 1024) == HEAVY  # any image or video
    image = PreparedInput(input_ids=[1, 2], pixel_values=np.zeros((4, 4), np.float32))
    assert request_lane([image], 1024) == HEAVY
    assert batch_cost([_Entry(_video(300, 1200), HEAVY), _Entry(_text(10), HEAVY)]) == 300 * 2 + 1200


def test_cheap_lane_first_and_heavy_never_starved():
    q = LaneQueue(max_batch_size=4, max_batch_tokens=100_000)
    q.extend([_Entry(_video(), HEAVY) for _ in range(40)])
    first = q.take()
    assert first[0].lane == HEAVY
    q.charge(first, 1.0)  # a heavy batch of a second
    # Cheap requests keep arriving: each is served before the next heavy batch, until the cheap lane
    # has used its share; from then on the two lanes alternate by forward time, half and half.
    served = {CHEAP: 0.0, HEAVY: 1.0}
    order = []
    for _ in range(400):
        if q.waiting(CHEAP) < 8:
            q.extend([_Entry(_text(20), CHEAP) for _ in range(4)])
        batch = q.take()
        lane = batch[0].lane
        assert {e.lane for e in batch} == {lane}  # the lanes never share a batch
        seconds = 0.01 if lane == CHEAP else 0.2
        q.charge(batch, seconds)
        served[lane] += seconds
        order.append(lane)
        if not q.waiting(HEAVY):
            break
    assert order[:40] == [CHEAP] * 40  # the cheap credit after waking: 0.5 s ahead of 1 s of heavy work
    assert HEAVY in order[:200]
    assert served[HEAVY] / (served[CHEAP] + served[HEAVY]) == pytest.approx(0.5, abs=0.1)
    assert q.waiting(HEAVY) == 0  # every heavy input ran


def test_heavy_lane_waking_into_a_busy_cheap_lane_waits_one_cheap_batch_at_most():
    q = LaneQueue(max_batch_size=2, max_batch_tokens=100_000)
    q.extend([_Entry(_text(20), CHEAP) for _ in range(40)])
    for _ in range(5):
        q.charge(q.take(), 0.05)
    q.extend([_Entry(_video(), HEAVY)])
    lanes = []
    for _ in range(2):
        batch = q.take()
        q.charge(batch, 0.05)
        lanes.append(batch[0].lane)
    assert lanes == [CHEAP, HEAVY]


def test_forward_cost_model_fits_fixed_and_per_unit_parts():
    model = ForwardCost()
    assert model.fit() is None
    model.add(40, 0.1 + 40e-4)
    model.add(40, 0.1 + 40e-4)
    assert model.fit() is None  # one cost seen: nothing to tell the parts apart
    for units in (500, 1500, 3000, 80, 6000):
        model.add(units, 0.1 + units * 1e-4)
    fixed, per_unit = model.fit()
    assert fixed == pytest.approx(0.1, rel=1e-6) and per_unit == pytest.approx(1e-4, rel=1e-6)


def test_heavy_batches_cut_short_only_while_cheap_requests_are_about(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(scheduling.time, "monotonic", lambda: clock[0])
    q = LaneQueue(max_batch_size=32, max_batch_tokens=100_000, heavy_batch_efficiency=0.8)
    videos = [_Entry(_video(300, 1200), HEAVY) for _ in range(12)]
    q.extend(videos)
    assert len(q.take()) == 12  # no cheap request about: a full batch
    # Forwards cost 0.1 s + 1e-4 s a unit: a cheap one (20 units) and the 12 videos (18,000 units).
    q.charge(videos, 0.1 + 18_000e-4)
    q.extend(videos)
    text = [_Entry(_text(20), CHEAP)]
    q.extend(text)
    assert q.take() == text
    q.charge(text, 0.1 + 20e-4)
    batch = q.take()
    # The cut: 0.1 x 0.8 / (0.2 x 1e-4) = 4,000 units, two videos of 1,500: 80% of that forward's
    # 0.4 s goes to the videos, 20% to the fixed part.
    assert batch[0].lane == HEAVY and len(batch) == 2
    clock[0] += scheduling.CHEAP_RECENT_S + 1  # the cheap requests are gone: full batches again
    assert len(q.take()) == 10
    # An input costlier than the cut runs alone.
    q.extend([_Entry(_video(300, 20_000), HEAVY), _Entry(_video(300, 20_000), HEAVY)])
    q.extend([_Entry(_text(20), CHEAP)])
    q.take()
    assert len(q.take()) == 1


def _cut_after(gaps: list[float], quiet: float, monkeypatch) -> bool:
    """Whether a heavy batch is still cut `quiet` seconds after the last of cheap arrivals `gaps` apart."""
    clock = [1000.0]
    monkeypatch.setattr(scheduling.time, "monotonic", lambda: clock[0])
    q = LaneQueue(max_batch_size=32, max_batch_tokens=100_000, heavy_batch_efficiency=0.8)
    for units in (20, 18_000):  # the cost model: 0.1 s + 1e-4 s a unit
        q.forward_cost.add(units, 0.1 + units * 1e-4)
    for gap in [0.0] + gaps:
        clock[0] += gap
        q.extend([_Entry(_text(20), CHEAP) for _ in range(3)])  # one request of three inputs: one arrival
        q.take()
    clock[0] += quiet
    q.extend([_Entry(_video(300, 1200), HEAVY) for _ in range(12)])
    return len(q.take()) < 12


def test_cheap_requests_are_about_for_a_window_learnt_from_their_gaps(monkeypatch):
    # A dense stream (a load of many clients: gaps up to a forward long) that stops: the cut ends
    # CHEAP_RECENT_MIN_S later, not CHEAP_RECENT_S.
    dense = [0.0, 0.002, 0.15, 0.0, 0.01, 0.2] * 20
    assert _cut_after(dense, 0.5, monkeypatch)
    assert not _cut_after(dense, scheduling.CHEAP_RECENT_MIN_S + 0.1, monkeypatch)
    # A sparse stream (a query every few seconds) stays protected between its arrivals:
    # CHEAP_GAP_FACTOR x its longest gap (2 x 4 s).
    sparse = [3.0, 4.0, 2.5, 3.5]
    assert _cut_after(sparse, 7.5, monkeypatch)
    assert not _cut_after(sparse, 8.5, monkeypatch)
    # Never longer than CHEAP_RECENT_S; that long after a single cheap arrival (no gap known yet).
    assert _cut_after([30.0], scheduling.CHEAP_RECENT_S - 0.5, monkeypatch)
    assert not _cut_after([30.0], scheduling.CHEAP_RECENT_S + 0.5, monkeypatch)
    assert _cut_after([], scheduling.CHEAP_RECENT_S - 0.5, monkeypatch)
    assert not _cut_after([], scheduling.CHEAP_RECENT_S + 0.5, monkeypatch)
    # Only the last CHEAP_GAPS gaps count: a long pause long ago no longer widens the window.
    assert not _cut_after([30.0] + [0.1] * scheduling.CHEAP_GAPS, scheduling.CHEAP_RECENT_MIN_S + 0.1, monkeypatch)


def test_requeued_entries_go_back_to_the_front_of_their_lanes():
    q = LaneQueue(max_batch_size=8, max_batch_tokens=100_000)
    a, b, c = (_Entry(_text(20), CHEAP) for _ in range(3))
    v = _Entry(_video(), HEAVY)
    q.extend([c, v])
    q.extendleft(reversed([a, b]))
    assert len(q) == 4 and q.take() == [a, b, c]
    assert q.take() == [v] and not q


def test_cheap_request_is_served_before_queued_heavy_batches_on_a_real_batcher(runner):  # noqa: F811
    images = [[runner.prepare([], [sample_image(96, 64, seed=i)], None, None)] for i in range(6)]
    query = [runner.prepare([text(6, 1)], [], None, None)]
    forward = Forward(runner, hold=True)
    batcher = make_batcher(forward, max_batch_size=2)
    batcher.cheap_request_tokens = 1024  # the server's setting; make_batcher leaves one lane

    async def main():
        first = batcher.submit(images[0])
        await wait_entered(forward)  # a heavy batch runs; more heavy requests queue, then one cheap
        rest = [batcher.submit(items) for items in images[1:]]
        cheap = batcher.submit(query)
        forward.release.set()
        return (await asyncio.gather(*first), [await asyncio.gather(*fs) for fs in rest],
                await asyncio.gather(*cheap))

    try:
        first, rest, cheap = asyncio.run(main())
    finally:
        batcher.stop()
    assert forward.batches[1] == query  # right after the running heavy batch, alone
    assert all(len(b) <= 2 for b in forward.batches)
    assert_same(runner, query, cheap)
    for items, vectors in zip(images, [first, *rest], strict=True):
        assert_same(runner, items, vectors)
