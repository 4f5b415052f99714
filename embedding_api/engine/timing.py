"""Where the time of one embedding request went: preparation, queue wait, forward passes.

One `StageTimes` per request. The service records the preparation; the batcher's
model worker records, per batch that carries some of the request's inputs, the
forward time and when the request's last vector was ready. The worker's writes
happen before the vectors are handed to the event loop (call_soon_threadsafe), so
the request reads them safely once its futures are done. No lock, one object per
request, a few float operations per batch.
"""

from __future__ import annotations

import time


class StageTimes:
    __slots__ = ("prepare_s", "submitted", "forward_s", "ready", "last_batch", "truncated", "image_pixels",
                 "video_pixels", "vision_tokens")

    def __init__(self) -> None:
        self.prepare_s = 0.0
        self.submitted = 0.0  # perf_counter() when the inputs joined the queue
        self.forward_s = 0.0  # sum of the forward passes that carried this request's inputs
        self.ready = 0.0  # perf_counter() when the last of its vectors was ready
        self.last_batch = 0  # the batch counted last (a batch is counted once per request)
        self.truncated = 0  # inputs cut at MAX_INPUT_TOKENS
        self.image_pixels = 0  # pixels of the images as the model saw them (resized)
        self.video_pixels = 0  # pixels of the video frames as the model saw them (sampled, resized)
        self.vision_tokens = 0  # of the prompt tokens, those that stand for image and video patches

    @property
    def queue_s(self) -> float:
        """Time waiting for the model: submit to last vector, less the forward passes."""
        if not self.ready:
            return 0.0
        return max(0.0, self.ready - self.submitted - self.forward_s)

    def mark_submitted(self) -> None:
        self.submitted = time.perf_counter()
