"""Lock-free counters and histograms for single-writer use, exposed through a prometheus collector.

prometheus_client's own metric objects take a lock on every update (a histogram observe costs
several microseconds); on the request path that is paid many times per request. Every series here
has ONE writer: the event loop for request metrics, one model-worker thread for its batch metrics
(each worker gets its own series, summed at scrape time). Python's `+=` on an attribute is then
safe, and a scrape reads plain numbers (a scrape racing an update may see a count one ahead of its
sum, never a lost update).
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Iterable, Sequence

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily


class Counter:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class Histogram:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: the first bound >= value, as Prometheus buckets are "less than or equal".
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class Family:
    """One metric name: its series by label values, created on first use."""

    def __init__(self, name: str, doc: str, labels: Sequence[str] = (), buckets: Sequence[float] | None = None):
        self.name, self.doc, self.labels, self.buckets = name, doc, tuple(labels), buckets
        self.series: dict[tuple[str, ...], list] = {}

    def child(self, *values: str):
        """A new series for these label values (a second writer gets its own; they are summed)."""
        series = Histogram(self.buckets) if self.buckets is not None else Counter()
        self.series.setdefault(tuple(values), []).append(series)
        return series

    def collect(self):
        if self.buckets is None:
            family = CounterMetricFamily(self.name, self.doc, labels=self.labels)
            for values, parts in self.series.items():
                family.add_metric(values, sum(p.value for p in parts))
            return family
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        bounds = [*(_le(b) for b in self.buckets), "+Inf"]
        for values, parts in self.series.items():
            counts = [sum(c) for c in zip(*(p.counts for p in parts))]
            cumulative, running = [], 0
            for bound, count in zip(bounds, counts):
                running += count
                cumulative.append((bound, running))
            family.add_metric(values, cumulative, sum(p.sum for p in parts))
        return family


def _le(bound: float) -> str:
    return repr(float(bound))


class FamiliesCollector:
    """A prometheus collector over Families."""

    def __init__(self, families: Iterable[Family]):
        self.families = list(families)

    def describe(self):
        return []

    def collect(self):
        for family in self.families:
            yield family.collect()
