"""Request and response ids: 128 random bits as 32 hex digits.

From a generator seeded once from the system (and again in a forked child) rather than a system
call per id: ids only have to be unique, and `os.urandom` releases Python's lock around its system
call, handing the event loop's turn to any other thread waiting for it, twice per request."""

from __future__ import annotations

import os
import random

_generator = random.Random()  # seeded from os.urandom


def _reseed() -> None:
    _generator.seed(os.urandom(32))


os.register_at_fork(after_in_child=_reseed)


def random_id() -> str:
    """32 lower-case hex digits."""
    return f"{_generator.getrandbits(128):032x}"
