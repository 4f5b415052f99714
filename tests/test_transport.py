"""How a batch reaches its model process (engine/transport.py): the images' and clips' patches through
a shared memory file, the rest pickled; every batch arrives whole and equal, the file grows to the
largest batch (and shrinks back past KEEP_BYTES) and no decoded batch shares memory with it."""

from __future__ import annotations

import os

import numpy as np
import pytest

from embedding_api.engine import transport
from embedding_api.engine.transport import Inbox, Outbox
from embedding_api.runners.base import PreparedInput


@pytest.fixture
def pair():
    outbox = Outbox()
    if outbox.fd < 0:
        pytest.skip("no memfd_create on this platform: every batch goes through the socket")
    inbox = Inbox(os.dup(outbox.fd))  # the model process gets its own descriptor of the same file
    yield outbox, inbox
    outbox.close()


def _image(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 1536), dtype=np.float32)


def _same(a: list[PreparedInput], b: list[PreparedInput]) -> bool:
    def eq(x, y):
        return (x is None and y is None) or (x is not None and y is not None and np.array_equal(x, y))
    return len(a) == len(b) and all(
        p.input_ids == q.input_ids and p.image_grid_thw == q.image_grid_thw and p.video_grid_thw == q.video_grid_thw
        and eq(p.pixel_values, q.pixel_values) and eq(p.video_pixel_values, q.video_pixel_values)
        for p, q in zip(a, b))


def test_patches_go_through_the_shared_file_and_arrive_equal(pair):
    outbox, inbox = pair
    batch = [PreparedInput(input_ids=[1, 2, 3], pixel_values=_image(200, 0), image_grid_thw=[(1, 10, 20)]),
             PreparedInput(input_ids=[7, 8]),
             PreparedInput(input_ids=[4], video_pixel_values=_image(96, 1), video_grid_thw=[(2, 6, 8)])]
    message = outbox.encode(batch)
    assert len(message) < 4096  # the patches (1.8 MB) are not in the message
    assert outbox.size == transport.GROWTH_BYTES
    got = transport.decode(message, [inbox])
    assert _same(got, batch)
    assert got[0].pixel_values.flags.writeable and got[0].pixel_values.dtype == np.float32


def test_the_file_grows_to_the_largest_batch_and_earlier_batches_keep_their_values(pair):
    outbox, inbox = pair
    first = [PreparedInput(input_ids=[1], pixel_values=_image(300, 2), image_grid_thw=[(1, 10, 30)])]
    got_first = transport.decode(outbox.encode(first), [inbox])
    big = [PreparedInput(input_ids=[2], pixel_values=_image(3000, 3), image_grid_thw=[(1, 50, 60)])]  # 18 MB
    got_big = transport.decode(outbox.encode(big), [inbox])
    assert outbox.size == inbox.size == 3 * transport.GROWTH_BYTES
    assert _same(got_big, big)
    # The next batch overwrites the file; what was decoded before is a copy of its own.
    again = [PreparedInput(input_ids=[3], pixel_values=_image(300, 4), image_grid_thw=[(1, 10, 30)])]
    assert _same(transport.decode(outbox.encode(again), [inbox]), again)
    assert _same(got_first, first) and _same(got_big, big)
    assert outbox.size == 3 * transport.GROWTH_BYTES  # within KEEP_BYTES it does not shrink back


def test_past_keep_bytes_the_next_batch_that_fits_shrinks_the_file(pair, monkeypatch):
    outbox, inbox = pair
    monkeypatch.setattr(transport, "KEEP_BYTES", transport.GROWTH_BYTES)
    big = [PreparedInput(input_ids=[1], pixel_values=_image(3000, 8), image_grid_thw=[(1, 50, 60)])]  # 18 MB
    assert _same(transport.decode(outbox.encode(big), [inbox]), big) and outbox.size == 3 * transport.GROWTH_BYTES
    small = [PreparedInput(input_ids=[2], pixel_values=_image(300, 9), image_grid_thw=[(1, 10, 30)])]
    assert _same(transport.decode(outbox.encode(small), [inbox]), small)
    assert outbox.size == inbox.size == transport.GROWTH_BYTES == os.fstat(outbox.fd).st_size
    assert _same(transport.decode(outbox.encode(big), [inbox]), big) and inbox.size == 3 * transport.GROWTH_BYTES


def test_small_arrays_and_batches_past_the_cap_go_through_the_socket(pair, monkeypatch):
    outbox, inbox = pair
    small = [PreparedInput(input_ids=[1], pixel_values=_image(4, 5), image_grid_thw=[(1, 2, 2)])]  # 24 KB
    message = outbox.encode(small)
    assert len(message) > small[0].pixel_values.nbytes and outbox.size == 0  # in the pickle, no file yet
    assert _same(transport.decode(message, [inbox]), small)
    monkeypatch.setattr(transport, "MAX_SHARED_BYTES", 1 << 20)
    large = [PreparedInput(input_ids=[2], pixel_values=_image(400, 6), image_grid_thw=[(1, 20, 20)])]  # 2.4 MB
    message = outbox.encode(large)
    assert len(message) > large[0].pixel_values.nbytes and outbox.size == 0
    assert _same(transport.decode(message, [inbox]), large)


def test_a_closed_outbox_sends_through_the_socket(pair):
    """The server closing a model process while a forward is being encoded: no error of its own (the
    socket's, already closed, then tells the forward that the process is gone)."""
    outbox, inbox = pair
    batch = [PreparedInput(input_ids=[1], pixel_values=_image(200, 7), image_grid_thw=[(1, 10, 20)])]
    outbox.encode(batch)
    outbox.close()
    assert outbox.fd == -1
    message = outbox.encode(batch)
    assert _same(transport.decode(message, [inbox]), batch) and _same(transport.decode(message, [Inbox(-1)]), batch)


def test_two_batches_in_flight_each_in_a_file_of_its_own():
    # The model process has a batch sent ahead while it runs another (engine/prefetch.py): both written
    # before either is read, each decodes whole by its slot's Inbox.
    outboxes = [Outbox(0), Outbox(1)]
    if any(o.fd < 0 for o in outboxes):
        pytest.skip("no memfd_create on this platform: every batch goes through the socket")
    inboxes = [Inbox(os.dup(o.fd)) for o in outboxes]
    try:
        first = [PreparedInput(input_ids=[1, 2], pixel_values=_image(120, 3), image_grid_thw=[(1, 10, 12)])]
        second = [PreparedInput(input_ids=[5], pixel_values=_image(160, 4), image_grid_thw=[(1, 10, 16)])]
        messages = [outboxes[0].encode(first), outboxes[1].encode(second)]
        assert _same(transport.decode(messages[0], inboxes), first)
        assert _same(transport.decode(messages[1], inboxes), second)
    finally:
        for o in outboxes:
            o.close()
