"""Hostile statistics files: Statistics.load either reads a file identically or raises ValueError
(never another exception type, never a crash)."""
import os
import pathlib
import shutil
import tempfile

import numpy as np
import pytest

import lsprune


def _same(a, b):
    return a.count == b.count and all(np.array_equal(getattr(a, k), getattr(b, k))
                                      for k in ("gram", "cross", "sum_x", "sum_y", "sum_y_sq"))


@pytest.fixture
def scratch(tmp_path):
    """A memory-backed directory when there is one: the test rewrites a file ~6,000 times, which
    some disks make slow (milliseconds per rewrite)."""
    shm = pathlib.Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    d = tempfile.mkdtemp(prefix="lsprune-test-", dir=shm)
    try:
        yield pathlib.Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_item09_truncated_or_bit_flipped_file_loads_identically_or_raises_valueerror(tmp_path, scratch):
    rng = np.random.default_rng(9)
    st = lsprune.Statistics(2, 1).update(rng.random((6, 2)), rng.random((6, 1)))
    good = tmp_path / "good.npz"
    st.save(good)
    raw = good.read_bytes()
    bad = scratch / "bad.npz"
    outcomes = {"identical": 0, "ValueError": 0}

    def attempt(data, what):
        bad.write_bytes(data)
        try:
            back = lsprune.Statistics.load(bad)
        except ValueError:
            outcomes["ValueError"] += 1
            return
        except Exception as e:  # noqa: BLE001 - the point of the test: report any other type
            pytest.fail(f"{what}: {type(e).__name__}: {e}")
        assert _same(back, st), f"{what}: loaded different statistics"
        outcomes["identical"] += 1

    for i in range(len(raw)):
        attempt(raw[:i], f"truncated to {i} bytes")
        flipped = bytearray(raw)
        flipped[i] ^= 1 << (i % 8)  # a different bit at successive bytes: every bit position is hit
        attempt(bytes(flipped), f"bit {i % 8} of byte {i} flipped")
    assert outcomes["ValueError"] > len(raw)  # every truncation, and most flips, are refused


def test_item10_npy_file_is_not_a_statistics_file(tmp_path):
    p = tmp_path / "array.npy"
    np.save(p, np.eye(3))
    with pytest.raises(ValueError, match="not an lsprune statistics file"):
        lsprune.Statistics.load(p)
    with pytest.raises(FileNotFoundError):
        lsprune.Statistics.load(tmp_path / "missing.npz")
