"""Which waiting inputs a free model worker runs next: cheap requests before heavy ones, fairly.

A forward pass that has started cannot be preempted. With one model worker (the default: one model
process per device), a short text that arrives while a batch of videos runs waits for that batch, and
before this scheduling it also waited for every heavy batch queued before it, or rode along inside one.
So the queue is split by cost, and heavy work is cut into short forwards:

- **Two lanes.** A request is *cheap* when it is text only (no image, no video) and all its inputs
  together hold at most `CHEAP_REQUEST_TOKENS` tokens: a short query, a few short passages, a rerank
  of a few short documents. Every other request is *heavy*: images, videos, long texts, and requests
  of many inputs (so that a big request of short texts cannot stand in front of the cheap ones
  either). Each request's inputs all go to one lane, in arrival order. Cheap and heavy inputs never
  share a batch: a short text is never padded to a long one nor waits for a vision encoder.
- **Short heavy forwards.** While cheap requests are about (below), a heavy batch is cut to the
  smallest cost that still spends `HEAVY_BATCH_EFFICIENCY` (default 0.8) of its forward on its
  inputs rather than on the forward's fixed cost, so the forward a cheap input may find running is
  short (a few images, one video) while heavy work keeps about that share of its throughput. The
  cost of a batch is its padded tokens plus its vision patches (the vision encoder's work); a
  forward's seconds are modelled as
  `fixed + per_unit x cost`, fitted on the recent forwards of both lanes (weighted least squares:
  cheap forwards pin the fixed part, heavy ones the part per unit), so the cut follows the device,
  the model and the machine's load. The cut is `fixed x E / ((1 - E) x per_unit)`; an input
  costlier than it runs alone. Without cheap requests about, heavy batches fill up to
  `max_batch_tokens` as before: no throughput is given up when nobody is waiting.
- **About** means that the latest cheap request arrived within `CHEAP_GAP_FACTOR` times the
  longest of the last `CHEAP_GAPS` gaps between cheap arrivals, and within `CHEAP_RECENT_S`
  seconds at most, `CHEAP_RECENT_MIN_S` at least: a sparse stream of queries (one every few
  seconds) stays protected between its arrivals, and when a dense stream of texts stops (a load of
  many clients, whose gaps are a forward long), heavy batches fill up again a second later rather
  than after `CHEAP_RECENT_S` of throughput given away.
- **Cheap first, heavy never starved.** Each lane has a virtual time, the forward-pass seconds it has
  used. A free worker serves the non-empty lane whose virtual time is lower (the cheap lane on a tie):
  when both lanes are busy they share the workers' time half and half, whatever their batch sizes.
  A lane that goes from empty to waiting starts level with the other lane's virtual time, so idle time
  banks no credit; the cheap lane starts `CHEAP_CREDIT_S` below it, so that a cheap request arriving
  during heavy load is served at the next free worker, before the next heavy batch, unless cheap work
  has already taken more than half of the recent time. Over any stretch longer than that credit,
  heavy work gets at least half of the workers' time; a cheap input waits for at most the heavy
  forward that is running (with several workers: the one that ends first) plus the cheap batches
  queued before it.

Within a lane, batches are filled as before: the oldest input anchors the batch, and the inputs in a
bounded window after it join (those of about its length in arrival order, then the others closest in
length first) within `max_batch_size` inputs, `max_batch_tokens` padded tokens and, for a heavy
batch, the cut.

The queue is used with the batcher's lock held; it never blocks and never calls out.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Iterable, Protocol, Sequence

from ..runners import PreparedInput

CHEAP, HEAVY = 0, 1

# Inputs whose lengths differ by at most this much (a fraction of the anchor's length, or a number
# of tokens, whichever is larger) count as the same length when a batch is filled.
LENGTH_TOLERANCE = 0.25
LENGTH_TOLERANCE_TOKENS = 8
# How far ahead of the heavy lane's virtual time (forward seconds) a cheap lane that starts waiting
# is placed: the cheap work it may run before the next heavy batch when cheap work had been idle.
CHEAP_CREDIT_S = 0.5
# Heavy batches are cut short while cheap requests are about: the latest arrived within
# CHEAP_GAP_FACTOR x the longest of the last CHEAP_GAPS gaps between cheap arrivals, bounded to
# [CHEAP_RECENT_MIN_S, CHEAP_RECENT_S] seconds (CHEAP_RECENT_S until a gap is known).
CHEAP_RECENT_S = 10.0
CHEAP_RECENT_MIN_S = 1.0
CHEAP_GAP_FACTOR = 2.0
CHEAP_GAPS = 64
COST_DECAY = 0.97  # weight of a forward in the cost model after each newer one (~30 forwards remembered)


class Queued(Protocol):
    prepared: PreparedInput
    lane: int

    @property
    def future(self): ...


def request_lane(items: Sequence[PreparedInput], cheap_request_tokens: int) -> int:
    """CHEAP for a text-only request of at most `cheap_request_tokens` tokens in all, else HEAVY."""
    total = 0
    for p in items:
        if p.pixel_values is not None or p.video_pixel_values is not None:
            return HEAVY
        total += p.n_tokens
    return CHEAP if total <= cheap_request_tokens else HEAVY


def cost(p: PreparedInput) -> int:
    """An input's own cost: its tokens plus its vision patches (what the vision encoder runs on)."""
    patches = 0 if p.pixel_values is None else len(p.pixel_values)
    if p.video_pixel_values is not None:
        patches += len(p.video_pixel_values)
    return p.n_tokens + patches


def batch_cost(batch: Sequence[Queued]) -> int:
    """Padded tokens plus vision patches."""
    width = max(e.prepared.n_tokens for e in batch)
    return width * len(batch) + sum(cost(e.prepared) - e.prepared.n_tokens for e in batch)


class ForwardCost:
    """A forward's seconds as `fixed + per_unit x cost`, by exponentially weighted least squares."""

    def __init__(self):
        self.n = self.sx = self.sy = self.sxx = self.sxy = 0.0

    def add(self, units: float, seconds: float) -> None:
        d = COST_DECAY
        self.n = self.n * d + 1.0
        self.sx = self.sx * d + units
        self.sy = self.sy * d + seconds
        self.sxx = self.sxx * d + units * units
        self.sxy = self.sxy * d + units * seconds

    def fit(self) -> tuple[float, float] | None:
        """(fixed seconds, seconds per unit), or None until forwards of different costs were seen."""
        det = self.n * self.sxx - self.sx * self.sx
        if self.n < 1.9 or det <= 1e-6 * self.n * self.sxx:  # two forwards at least
            return None
        per_unit = (self.n * self.sxy - self.sx * self.sy) / det
        if per_unit <= 0:
            return None
        return max(0.0, (self.sy - per_unit * self.sx) / self.n), per_unit


class LaneQueue:
    """The waiting inputs, one deque per lane; deque-like for the batcher (len, bool, iter, clear,
    extend, extendleft), plus `take` (the next batch) and `charge` (a finished forward's seconds)."""

    def __init__(self, max_batch_size: int, max_batch_tokens: int, heavy_batch_efficiency: float | None = None):
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.heavy_batch_efficiency = heavy_batch_efficiency
        self.lanes: tuple[deque, deque] = (deque(), deque())
        self.vtime = [0.0, 0.0]  # forward seconds used by each lane (see the module docstring)
        self.forward_cost = ForwardCost()
        self.cheap_seen = float("-inf")  # time.monotonic() of the latest cheap arrival
        self.cheap_gaps: deque[float] = deque(maxlen=CHEAP_GAPS)  # seconds between the latest cheap arrivals

    def __len__(self) -> int:
        return len(self.lanes[CHEAP]) + len(self.lanes[HEAVY])

    def __bool__(self) -> bool:
        return bool(self.lanes[CHEAP]) or bool(self.lanes[HEAVY])

    def __iter__(self):
        yield from self.lanes[CHEAP]
        yield from self.lanes[HEAVY]

    def clear(self) -> None:
        for queue in self.lanes:
            queue.clear()

    def waiting(self, lane: int) -> int:
        return len(self.lanes[lane])

    def _wake(self, lane: int) -> None:
        """`lane` goes from empty to waiting: level with the other lane (the cheap lane a little ahead)."""
        start = self.vtime[1 - lane] - (CHEAP_CREDIT_S if lane == CHEAP else 0.0)
        self.vtime[lane] = max(self.vtime[lane], start)

    def extend(self, entries: Iterable[Queued]) -> None:
        """Queue entries at the back of their lanes, in order (one request's: one arrival)."""
        arrived = False
        for entry in entries:
            queue = self.lanes[entry.lane]
            if not queue:
                self._wake(entry.lane)
            if entry.lane == CHEAP and not arrived:
                arrived = True
                now = time.monotonic()
                if self.cheap_seen != float("-inf"):
                    self.cheap_gaps.append(now - self.cheap_seen)
                self.cheap_seen = now
            queue.append(entry)

    def extendleft(self, entries: Iterable[Queued]) -> None:
        """As deque.extendleft: each entry in turn goes to the front of its lane (pass
        `reversed(batch)` to put a batch back at the front in its order)."""
        for entry in entries:
            queue = self.lanes[entry.lane]
            if not queue:
                self._wake(entry.lane)
            queue.appendleft(entry)

    def charge(self, batch: Sequence[Queued], seconds: float) -> None:
        """`batch` took `seconds` of a worker (its retries after a failure included)."""
        self.vtime[batch[0].lane] += seconds
        self.forward_cost.add(batch_cost(batch), seconds)

    def cheap_window(self) -> float:
        """Seconds after the latest cheap arrival during which cheap requests count as about."""
        if not self.cheap_gaps:
            return CHEAP_RECENT_S
        return min(CHEAP_RECENT_S, max(CHEAP_RECENT_MIN_S, CHEAP_GAP_FACTOR * max(self.cheap_gaps)))

    def heavy_budget(self) -> float:
        """The cost one heavy batch may have now (see the module docstring)."""
        share = self.heavy_batch_efficiency
        if not share or time.monotonic() - self.cheap_seen > self.cheap_window():
            return float("inf")
        fit = self.forward_cost.fit()
        if fit is None:
            return float("inf")
        fixed, per_unit = fit
        return fixed * share / ((1.0 - share) * per_unit)

    def next_lane(self) -> int | None:
        """The lane the next batch comes from: the waiting one with the lower virtual time, cheap on a tie."""
        for lane in (CHEAP, HEAVY):
            queue = self.lanes[lane]
            while queue and queue[0].future.done():  # cancelled by a disconnected client
                queue.popleft()
        cheap, heavy = self.lanes
        if cheap and heavy:
            return CHEAP if self.vtime[CHEAP] <= self.vtime[HEAVY] else HEAVY
        return CHEAP if cheap else HEAVY if heavy else None

    def take(self) -> list:
        """The next batch (empty when only cancelled inputs were waiting)."""
        lane = self.next_lane()
        if lane is None:
            return []
        return self._fill(self.lanes[lane], self.heavy_budget() if lane == HEAVY else float("inf"))

    def _fill(self, pending: deque, budget: float) -> list:
        """The lane's oldest input anchors the batch. The next `4 x max_batch_size` inputs form the
        window: those within LENGTH_TOLERANCE of the anchor's length join in arrival order, so the
        inputs of one request stay together and finish together; farther ones join closest in length
        first, so a batch of mixed lengths wastes little on padding; within `max_batch_size` inputs,
        `max_batch_tokens` padded tokens and a cost of `budget` (batch_cost). Costs O(window), not O(queue)."""
        anchor = pending.popleft()
        if getattr(anchor, "alone", False):  # runs in a batch of its own (the calibration set)
            return [anchor]
        size = anchor.prepared.n_tokens
        window = []
        for _ in range(min(len(pending), self.max_batch_size * 4)):
            entry = pending.popleft()
            if not entry.future.done():
                window.append(entry)
        tolerance = max(LENGTH_TOLERANCE_TOKENS, int(size * LENGTH_TOLERANCE))
        order = sorted(
            range(len(window)),
            key=lambda i: (max(0, abs(window[i].prepared.n_tokens - size) - tolerance), i),
        )
        batch, longest, chosen = [anchor], size, set()
        patches = cost(anchor.prepared) - size
        for i in order:
            if len(batch) >= self.max_batch_size:
                break
            if getattr(window[i], "alone", False):
                continue
            p = window[i].prepared
            width = max(longest, p.n_tokens)
            more = cost(p) - p.n_tokens
            if width * (len(batch) + 1) > self.max_batch_tokens or width * (len(batch) + 1) + patches + more > budget:
                continue
            batch.append(window[i])
            chosen.add(i)
            longest, patches = width, patches + more
        # The window's leftovers go back to the front of the lane, in arrival order.
        pending.extendleft(reversed([e for i, e in enumerate(window) if i not in chosen]))
        return batch
