"""How a batch crosses from the HTTP process to its model process (engine/model_process.py).

A batch is pickled (protocol 5). Its large arrays, the images' and clips' patches (float32, about
200 KB an image at the benchmark's sizes, 3.3 MB for 16), do not go through the socket: written
through the socket pair, whose kernel buffer holds a few hundred kilobytes, a 3.3 MB batch took
about 4 ms of back-and-forth between the two processes, while the model process waited for it
(5-6 ms between its forwards under an image load). Instead they are pickled out of band (pickle's
`buffer_callback`) and copied into a shared memory file (Linux `memfd_create`), made once per model
process and passed to it when it starts; the message carries the pickle and where each array lies
in the file. The model process copies each array out before unpickling (so no array of a batch
refers to the file the next batch overwrites). Up to two batches are in flight per model process (the
next one sent while a forward runs: ModelProcess.submit), each in a file of its own (a "slot": one
Outbox each, its number in the message), and a slot takes a new batch only once the reply to its
last one has come.

The file grows to hold a batch's arrays (up to MAX_SHARED_BYTES; a larger batch goes through the
socket) and keeps that size for the batches after it, up to KEEP_BYTES: past that, the next batch
that fits in KEEP_BYTES shrinks it back (its memory is the host's shared memory, counted in both
processes). It is not a file in /dev/shm, so a container's small /dev/shm does not limit it. Where
the platform has no memfd_create, every batch goes through the socket.
"""

from __future__ import annotations

import mmap
import os
import pickle

# The shared file grows in steps of this many bytes, to at most MAX_SHARED_BYTES; above KEEP_BYTES it
# shrinks back at the next batch that fits in KEEP_BYTES (a batch of 32 small images takes ~7 MB).
GROWTH_BYTES = 8 << 20
KEEP_BYTES = 32 << 20
MAX_SHARED_BYTES = 512 << 20
# Arrays smaller than this stay in the pickle (copying them twice costs more than the socket does).
OUT_OF_BAND_BYTES = 64 << 10


class Outbox:
    """The HTTP process's side: encodes each batch for one model process. `fd` is the shared file's
    descriptor to pass to the model process (-1: none, every batch through the socket)."""

    def __init__(self, slot: int = 0):
        self.slot = slot  # which of the model process's Inboxes decodes its messages (`decode`)
        try:
            self.fd = os.memfd_create("embedding-api-batches", os.MFD_CLOEXEC)
        except (AttributeError, OSError):  # not Linux, or no memfd here: the socket only
            self.fd = -1
        self._map: mmap.mmap | None = None
        self.size = 0

    def encode(self, batch) -> bytes:
        """The message for `batch`: (pickle, spans, file size, slot), spans None where it is all in the pickle."""
        buffers: list[pickle.PickleBuffer] = []

        def out_of_band(buffer: pickle.PickleBuffer) -> bool:
            if self.fd < 0 or buffer.raw().nbytes < OUT_OF_BAND_BYTES:
                return True  # true: pickled in band
            buffers.append(buffer)
            return False

        data = pickle.dumps(batch, protocol=5, buffer_callback=out_of_band)
        if not buffers:
            return pickle.dumps((data, None, 0, self.slot), protocol=5)
        views = [b.raw() for b in buffers]
        total = sum(v.nbytes for v in views)
        if total > MAX_SHARED_BYTES:  # too large for the file: the whole batch through the socket
            return pickle.dumps((pickle.dumps(batch, protocol=5), None, 0, self.slot), protocol=5)
        region = self._fit(total)
        spans, offset = [], 0
        for view in views:
            region[offset:offset + view.nbytes] = view
            spans.append((offset, view.nbytes))
            offset += view.nbytes
        return pickle.dumps((data, spans, self.size, self.slot), protocol=5)

    def _fit(self, total: int) -> mmap.mmap:
        """The file's mapping, grown to hold `total` bytes, or shrunk back to KEEP_BYTES' reach (OSError
        once closed). The last batch is done with (its reply has come), so its part may go."""
        region = self._map
        if region is None or total > self.size or total <= KEEP_BYTES < self.size:
            size = min(MAX_SHARED_BYTES, -(-total // GROWTH_BYTES) * GROWTH_BYTES)
            os.ftruncate(self.fd, size)
            region = self._map = mmap.mmap(self.fd, size)  # the old mapping goes with its last reference
            self.size = size
        return region

    def close(self) -> None:
        """Close the file (its memory is freed once neither process maps it). Safe beside an `encode`
        on another thread: that one finishes on its own reference to the mapping, or fails with OSError."""
        self._map, fd, self.fd = None, self.fd, -1
        if fd >= 0:
            os.close(fd)


class Inbox:
    """The model process's side: reads the batches of one Outbox (`fd`: its shared file, or -1), by
    `decode`."""

    def __init__(self, fd: int):
        self.fd = fd
        self._map: mmap.mmap | None = None
        self.size = 0

    def read(self, data: bytes, spans: list | None, size: int):
        """The batch of a message's parts, as `decode` unpickles them."""
        if spans is None:
            return pickle.loads(data)
        if size != self.size:  # the file has grown since the last batch: map it again
            if self._map is not None:
                self._map.close()
            self._map = mmap.mmap(self.fd, size, prot=mmap.PROT_READ)
            self.size = size
        view = memoryview(self._map)
        try:
            buffers = [bytearray(view[offset:offset + length]) for offset, length in spans]
        finally:
            view.release()
        return pickle.loads(data, buffers=buffers)


def decode(message: bytes, inboxes: list[Inbox]):
    """A message of any of a model process's Outboxes, by the Inbox of its slot."""
    data, spans, size, slot = pickle.loads(message)
    return inboxes[slot].read(data, spans, size)
