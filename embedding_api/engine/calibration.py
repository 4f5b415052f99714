"""The int8/uint8 ranges: a fixed, built-in calibration set embedded once by the served model.

The set is part of the code (no file, no randomness): CALIBRATION_TEXTS documents and queries,
and for models that take images a few generated pictures. Each input is embedded alone (a batch
of one), so its vector does not depend on the traffic or the batch settings: replicas that serve
the same checkpoint on the same kind of device and dtype compute the same ranges.

The raw (native-width) vectors are kept; the ranges for a requested `dimensions` are the
per-component minimum and maximum of those vectors after the same Matryoshka truncation and
normalisation as every response (formats.ranges_of), computed on first use and cached.

The set is embedded on the first int8/uint8 request or ranges query, or before the server
reports ready with CALIBRATE_AT_STARTUP=true.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from .batcher import QueueFull
from ..formats import ranges_of
from ..normalize import finalize

if TYPE_CHECKING:
    from .service import Service

log = logging.getLogger("embedding_api")
CHUNK = 16  # inputs queued at a time, so calibration never fills the queue ahead of live requests
CACHED_DIMENSIONS = 64

_SUBJECTS = (
    "The committee", "A small bakery", "Our new database", "The river", "My grandmother", "The orchestra",
    "A delivery drone", "The city council", "This algorithm", "The museum", "A stray cat", "The startup",
    "The hospital", "An old lighthouse", "The football team", "The spacecraft", "A local farmer", "The library",
    "The volcano", "Your invoice",
)
_PREDICATES = (
    "approved the budget for next year", "sells sourdough bread every morning", "stores vectors on disk",
    "floods the valley each spring", "told stories about the war", "played Beethoven's ninth symphony",
    "dropped a parcel in the garden", "voted to close the bridge", "sorts a million numbers in seconds",
    "opened a new wing for modern art", "sleeps on the warm car bonnet", "raised twelve million dollars",
    "hired forty nurses last month", "guided ships along the rocky coast", "lost the final on penalties",
    "entered orbit around Mars", "grows tomatoes without pesticides", "lends e-books for free",
    "erupted after two centuries of silence", "is due at the end of the quarter",
)
_QUERIES = (
    "how do I reset my password", "best pizza near the station", "symptoms of iron deficiency",
    "what is the capital of Australia", "python read csv file", "weather tomorrow in Lisbon",
    "cheap flights to Tokyo in April", "how long to boil an egg", "who wrote War and Peace",
    "difference between TCP and UDP", "train schedule Paris Lyon", "how to fix a leaking tap",
    "exchange rate euro dollar", "vegetarian lasagna recipe", "when was the Eiffel Tower built",
    "install numpy on windows", "side effects of ibuprofen", "translate thank you into Japanese",
    "how many moons does Jupiter have", "return policy for online orders", "what causes the northern lights",
    "open source vector database", "symptoms of burnout at work", "tallest mountain in Africa",
    "how to write a cover letter", "convert miles to kilometres", "why is the sky blue",
    "quarterly revenue report 2023", "how to train a puppy", "mortgage interest calculator",
    "history of the printing press", "healthy breakfast ideas",
)
_OTHERS = (
    "def add(a, b):\n    return a + b", "SELECT name, price FROM products WHERE price > 10 ORDER BY price;",
    "for (int i = 0; i < n; ++i) { sum += x[i]; }", "{\"id\": 42, \"tags\": [\"red\", \"blue\"]}",
    "3.14159 2.71828 1.41421 1.73205", "Invoice #2024-117: 3 x widgets at 19.99 EUR, total 59.97 EUR",
    "Le chat dort sur le canapé depuis ce matin.", "Der Zug nach Berlin hat zehn Minuten Verspätung.",
    "El mercado abre a las ocho de la mañana.", "Il museo è chiuso il lunedì.",
    "東京の天気は明日晴れです。", "北京是中国的首都。", "Москва — столица России.", "서울은 한국의 수도입니다.",
    "ok", "yes please", "404 not found", "Terms and conditions apply.", "Chapter 1", "Q3 results",
    "- milk\n- eggs\n- flour\n- butter", "BREAKING: markets close higher after a volatile week",
    "Patient reports mild headache and fatigue for three days.", "Kernel panic - not syncing: VFS",
    "Once upon a time, in a kingdom by the sea, there lived a princess who could talk to birds. Every "
    "morning she climbed the tallest tower and listened to the gulls tell stories of distant lands.",
    "The mitochondrion is the powerhouse of the cell: it produces most of the chemical energy needed "
    "to power the cell's biochemical reactions, stored in adenosine triphosphate.",
    "Shipping is free for orders over fifty dollars. Items can be returned within thirty days of "
    "delivery if they are unused and in their original packaging.",
    "Mix the flour and the salt, add the water slowly, knead for ten minutes, then let the dough rest "
    "under a damp cloth for an hour before shaping the loaves.",
)


def calibration_texts() -> tuple[list[str], list[str]]:
    """(documents, queries): 20 x 10 generated sentences, 28 others (code, numbers, several
    languages, short and long), and 32 search queries; the same on every run and every host."""
    documents = [f"{s} {_PREDICATES[(i * 7 + j * 3) % len(_PREDICATES)]}."
                 for i, s in enumerate(_SUBJECTS) for j in range(10)]
    return documents + list(_OTHERS), list(_QUERIES)


def calibration_images() -> list[Image.Image]:
    """Twelve drawn RGB pictures: gradients, stripes, checkers, shapes, in several sizes."""
    images = []
    sizes = ((96, 64), (64, 96), (128, 128), (160, 96))
    for k in range(12):
        width, height = sizes[k % len(sizes)]
        x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
        y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
        kind = k % 4
        if kind == 0:
            planes = (x + 0 * y, y + 0 * x, (x + y) / 2)
        elif kind == 1:
            stripes = ((x * (4 + k)) % 1 < 0.5) + 0 * y
            planes = (stripes, 1 - stripes, 0.5 + 0 * stripes)
        elif kind == 2:
            checks = (((x * 6).astype(int) + (y * 6).astype(int)) % 2).astype(np.float32)
            planes = (checks * (k / 12), checks, 1 - checks)
        else:
            planes = (0.2 + 0 * x * y, (k / 12) + 0 * x * y, 0.8 + 0 * x * y)
        pixels = (np.stack([np.broadcast_to(p, (height, width)) for p in planes], axis=-1) * 255).astype(np.uint8)
        image = Image.fromarray(pixels, "RGB")
        if kind == 3:
            draw = ImageDraw.Draw(image)
            draw.ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=(240, 200, 40))
            draw.rectangle((2, 2, width // 3, height // 3), fill=(30, 90, 200))
        images.append(image)
    return images


class Calibration:
    """The calibration vectors of one served model, embedded once, and the ranges per dimension."""

    def __init__(self, service: "Service"):
        self.service = service
        self.texts, self.queries = calibration_texts()
        self.images = calibration_images() if service.rules.takes_images else []
        self._task: asyncio.Future | None = None
        self._ranges: OrderedDict[int, np.ndarray] = OrderedDict()

    @property
    def size(self) -> dict[str, int]:
        return {"texts": len(self.texts), "queries": len(self.queries), "images": len(self.images)}

    async def vectors(self) -> np.ndarray:
        """The raw calibration vectors (one row per input); embedded on the first call, shared by
        every caller. A failed attempt (e.g. the model process ended) is retried by the next call."""
        if self._task is None or (self._task.done() and (self._task.cancelled() or self._task.exception())):
            self._task = asyncio.ensure_future(self._embed())
        return await asyncio.shield(self._task)

    async def ranges(self, dimensions: int) -> np.ndarray:
        """(2, dimensions) float32: per-component minimum and maximum at this output size."""
        cached = self._ranges.get(dimensions)
        if cached is None:
            cached = ranges_of(finalize(await self.vectors(), dimensions))
            self._ranges[dimensions] = cached
            while len(self._ranges) > CACHED_DIMENSIONS:
                self._ranges.popitem(last=False)
        return cached

    def cancel(self) -> None:
        """Stop embedding the set (the server is closing)."""
        if self._task is not None:
            self._task.cancel()

    @staticmethod
    def digest(ranges: np.ndarray) -> str:
        """A short fingerprint of the ranges: equal on replicas that compute the same ranges."""
        return hashlib.sha256(np.ascontiguousarray(ranges, dtype="<f4").tobytes()).hexdigest()[:16]

    def _prepare_all(self) -> list:
        service = self.service
        rules, runner = service.rules, service.runner
        document, query = rules.default_instruction, rules.query_instruction
        prepared = [runner.prepare([t], [], None, document) for t in self.texts]
        prepared += [runner.prepare([q], [], None, query) for q in self.queries]
        prepared += [runner.prepare([], [image], None, document) for image in self.images]
        return prepared

    async def _embed(self) -> np.ndarray:
        from .service import capacity_error, model_failure

        service = self.service
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        prepared = await loop.run_in_executor(service.prep_pool, self._prepare_all)
        rows: list[np.ndarray] = []
        for start in range(0, len(prepared), CHUNK):
            try:
                futures = service.batcher.submit(prepared[start:start + CHUNK], alone=True)
            except QueueFull:
                raise capacity_error() from None
            try:
                await asyncio.wait(futures)
                for future in futures:
                    if future.exception() is not None:
                        raise model_failure(future.exception())
                rows.extend(f.result() for f in futures)
            finally:
                for future in futures:
                    future.cancel()
        log.info("int8/uint8 calibration: %d inputs embedded in %.1f s", len(rows), time.perf_counter() - started)
        return np.stack(rows).astype(np.float32)
