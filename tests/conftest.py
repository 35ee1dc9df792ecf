import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def correlated_problem(rng, N, D, m, rank=None, noise=0.3, offset=2.0):
    """Correlated inputs (low-rank + noise, non-zero mean) and noisy linear targets."""
    rank = rank or max(2, D // 3)
    X = rng.normal(size=(N, rank)) @ rng.normal(size=(rank, D)) + noise * rng.normal(size=(N, D)) + offset
    Y = X @ rng.normal(size=(D, m)) + rng.normal(size=(N, m)) + 1.0
    return X, Y


@pytest.fixture
def restore_lsprune_logging():
    """In-process CLI calls install a stderr handler on the ``lsprune`` logger: undo it after the test."""
    import logging

    log = logging.getLogger("lsprune")
    handlers, level, propagate = list(log.handlers), log.level, log.propagate
    yield
    log.handlers[:] = handlers
    log.setLevel(level)
    log.propagate = propagate


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test, restored afterwards: small convs run several times faster so (and
    steadily on a shared machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
