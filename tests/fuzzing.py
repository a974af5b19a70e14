"""What the seeded fuzzers of the test files share.

Every fuzzer is seeded (``TOILCOORD_FUZZ_SEED`` overrides the seed) and
reproducible; the default suite runs small sizes, ``-m slow`` big ones.
"""

from __future__ import annotations

import os
import random

import pytest

SEED = int(os.environ.get("TOILCOORD_FUZZ_SEED", "20261121"))


def sizes(default, slow):
    """Parameters for a fuzzer: *default* in every run, *slow* behind -m slow."""
    return [default, pytest.param(slow, marks=(pytest.mark.slow, pytest.mark.timeout(900)))]


def rng_for(name):
    return random.Random("%d:%s" % (SEED, name))


def random_bytes(rng, count):
    return bytes(rng.getrandbits(8) for _ in range(count))
