"""Streaming float64 second-order statistics of a layer's inputs and targets."""
from __future__ import annotations

import hashlib
import warnings
import os
import zipfile
import zlib

import numpy as np

from . import _arrays
from ._atomic import atomic_write
from ._device import device_name, parse_device
from ._native import _core

FORMAT = "lsprune.statistics"
FORMAT_VERSION = 1
#: Largest |G - Gᵀ| accepted by :meth:`Statistics.from_sums`, relative to max |G| (rounding of sums
#: accumulated elsewhere, e.g. on a GPU; the same bound as raw ``select(gram=...)`` input).
GRAM_SYMMETRY_RTOL = _arrays.GRAM_SYMMETRY_RTOL

# What reading a truncated or bit-flipped archive can raise, besides ValueError: zipfile reports a
# flipped compression method or version as NotImplementedError and a flipped flag bit as
# "encrypted" (RuntimeError); the deflate and the .npy header parser report their own errors.
_CORRUPT_FILE_ERRORS = (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, NotImplementedError,
                        RuntimeError, zlib.error, SyntaxError, OverflowError, MemoryError)


def _read_npz(path) -> dict:
    """The arrays of the ``.npz`` archive at ``path``; ValueError for anything else (a truncated or
    corrupted archive, a bare ``.npy`` array) and FileNotFoundError for a missing file."""
    try:
        with open(path, "rb") as f:
            z = np.load(f, allow_pickle=False)
            if isinstance(z, np.lib.npyio.NpzFile):  # else a bare array: np.load of a .npy file
                with z:
                    return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise
    except _CORRUPT_FILE_ERRORS as e:
        raise ValueError(f"{path} is not a readable lsprune statistics file (truncated or corrupted?): {e}") from e
    raise ValueError(f"{path} is not an lsprune statistics file: it holds a single NumPy array (.npy), not the "
                     ".npz archive Statistics.save writes")


def _header(data: dict, path) -> tuple:
    """(version, n_features, n_targets, count) of a statistics archive's arrays; ValueError when they
    are missing or are not integer scalars (a foreign or corrupted file)."""
    need = {"format", "version", "n_features", "n_targets", "count", "checksum", "gram", "cross", "sum_x",
            "sum_y", "sum_y_sq"}
    if not need <= set(data) or str(data["format"]) != FORMAT:
        raise ValueError(f"{path} is not an lsprune statistics file")
    fields = [data[k] for k in ("version", "n_features", "n_targets", "count")]
    if any(a.shape != () or a.dtype.kind not in "iu" for a in fields):
        raise ValueError(f"{path}: corrupted header (version, n_features, n_targets and count must be integers)")
    version, D, m, count = (int(a) for a in fields)
    if version != FORMAT_VERSION:
        raise ValueError(f"{path} has statistics format version {version}; this lsprune reads {FORMAT_VERSION}")
    return version, D, m, count


class Statistics:
    """Float64 sums of a layer's inputs ``x`` (N, n_features) and targets ``y`` (N, n_targets).

    Keeps ``Σ x xᵀ`` (D, D), ``Σ x yᵀ`` (D, m), ``Σ x`` (D,), ``Σ y`` (m,), the
    per-target ``Σ y²`` (m,), ``Σ ‖y‖²`` and the sample count: everything
    :func:`lsprune.select` needs, in O(D² + D m) memory however many batches
    are streamed.

    Precision: float16/float32 batches are multiplied in float32 with one
    multithreaded BLAS SYRK/GEMM per batch (float16 is converted in chunks) into a
    float32 scratch that is added to the float64 sums every 4,096 rows (and
    whenever the sums are read), so the error does not grow with the number of
    batches and small batches do not pay a D x D float64 addition each (measured
    relative error vs a float64 reference: see the README). A batch with a float64
    ``x`` or ``y`` is multiplied in float64. A float16/float32 batch of very small or
    very large values is scaled by a power of two (exact) before its float32 products
    are formed, so they neither underflow nor overflow; float64 data whose sums of
    squares would leave float64's range raises :class:`lsprune.InputRangeError`
    (docs/design.md, "Numerics: scale"). The sums themselves are always the plain
    float64 sums. Concurrent ``update`` calls from several threads are safe and exact
    up to the order of additions; read the sums once they have returned.

    Parameters
    ----------
    n_features : int
        D, the number of input columns (for a conv layer: C_in * kh * kw).
    n_targets : int, default 0
        m, the number of target columns; 0 when only the Gram matrix is needed
        (independent layers, see ``select(weights_in=...)``).
    device : {"cpu", "cuda", "cuda:N", "auto"}, default "cpu"
        Where the sums live. CUDA statistics take objects with
        ``__cuda_array_interface__`` (e.g. torch CUDA tensors; float16/float32/float64,
        any strides), run on the interface's stream (the default stream when it names
        none), or ``lsprune._arrays.DeviceMatrix`` descriptors (the torch front-end's,
        which add bfloat16 and torch's current stream), without host
        synchronisation; a batch with NaN/Inf is not added and reported (as a
        ``RuntimeWarning``) when the sums are next read. Reading a property copies
        the sums to the host. ``merge`` needs CPU statistics (``to_cpu()``).
    sums_dtype : {"float64", "float32"}, default "float64"
        CUDA only: precision of the device sums (float32 halves memory; see the README
        for the accuracy of each).
    """

    def __init__(self, n_features: int, n_targets: int = 0, *, device="cpu", sums_dtype: str = "float64"):
        D = _arrays.check_int(n_features, "n_features", lo=1)
        m = _arrays.check_int(n_targets, "n_targets", lo=0)
        if sums_dtype not in ("float64", "float32"):
            raise ValueError("sums_dtype must be 'float64' or 'float32'")
        self._device = parse_device(device)
        self._dev = None
        self._rows_in = 0          # CUDA: rows submitted (rejected ones are subtracted on read)
        self._rejected_seen = 0
        self._stale = False
        if self._device >= 0:
            self._dev = _core.DeviceStatistics(D, m, self._device, sums_dtype == "float64")
        elif sums_dtype != "float64":
            raise ValueError("sums_dtype='float32' is for CUDA statistics; CPU sums are float64")
        self._acc = _core.Accumulator(D, m)
        self._D, self._m = D, m
        self._gram = np.zeros((D, D))
        self._cross = np.zeros((D, m))
        self._sum_x = np.zeros(D)
        self._sum_y = np.zeros(m)
        self._sum_yy = np.zeros(m)
        self._count = 0
        self._symmetric = True

    # ------------------------------------------------------------------ streaming
    def update(self, x, y=None) -> "Statistics":
        """Adds a batch.

        Parameters
        ----------
        x : array-like, shape (N, n_features)
            float16/float32/float64 NumPy array, CPU torch tensor or any object
            exposing ``__dlpack__``/``__array__``; any strides, read-only is fine.
        y : array-like, shape (N, n_targets), optional
            Required iff ``n_targets > 0``.

        Returns ``self``. A batch holding NaN/Inf raises :class:`lsprune.NonFiniteInputError`
        (a ``ValueError``), one whose sums of squares leave float64's range
        :class:`lsprune.InputRangeError` (a ``ValueError``); the statistics then stay exactly
        as they were.
        """
        if self._dev is not None:
            return self._update_device(x, y)
        xa = _arrays.as_float_matrix(x, "x", self._D)
        ya = None
        if self._m > 0:
            if y is None:
                raise ValueError(f"these statistics have n_targets={self._m}: pass y of shape (N, {self._m})")
            ya = _arrays.as_float_matrix(y, "y", self._m)
            if ya.shape[0] != xa.shape[0]:
                raise ValueError(f"x has {xa.shape[0]} rows but y has {ya.shape[0]}")
        elif y is not None:
            raise ValueError("these statistics were created with n_targets=0: y must be None")
        rows = int(xa.shape[0])
        if rows == 0:
            return self
        # The engine serialises concurrent updates of these sums (it releases the GIL); the count is
        # added after it returns, with the GIL held.
        self._acc.update(xa, ya, self._gram, self._cross, self._sum_x, self._sum_y, self._sum_yy)
        self._count += rows
        self._symmetric = False
        return self

    def _update_device(self, x, y):
        xd, stream, keep_x = _arrays.device_matrix(x, "x", self._D, self._device)
        yd = None
        if self._m > 0:
            if y is None:
                raise ValueError(f"these statistics have n_targets={self._m}: pass y of shape (N, {self._m})")
            yd, _, keep_y = _arrays.device_matrix(y, "y", self._m, self._device)
            if yd[2] != xd[2]:
                raise ValueError(f"x has {xd[2]} rows but y has {yd[2]}")
        elif y is not None:
            raise ValueError("these statistics were created with n_targets=0: y must be None")
        if xd[2] == 0:
            return self
        self._dev.update(xd, yd, stream)
        self._rows_in += int(xd[2])
        self._stale = True
        return self

    def _sync(self):
        """CUDA statistics: copies the device sums to the host arrays (once per change)."""
        if self._dev is None or not self._stale:
            return
        G, B, sx, sy, syy, rej, rej_rows = self._dev.read()
        self._gram, self._cross, self._sum_x, self._sum_y, self._sum_yy = G, B, sx, sy, syy
        self._count = self._rows_in - int(rej_rows)
        self._symmetric = True
        self._stale = False
        if rej > self._rejected_seen:
            warnings.warn(f"{rej - self._rejected_seen} batch(es) with NaN/Inf were not added to the statistics "
                          f"on {device_name(self._device)}", RuntimeWarning, stacklevel=3)
            self._rejected_seen = rej

    @property
    def device(self) -> str:
        """"cpu" or "cuda:N"."""
        return device_name(self._device)

    def to_cpu(self) -> "Statistics":
        """A CPU copy (for CUDA statistics: the device sums copied to the host)."""
        return self.copy()

    def merge(self, other: "Statistics") -> "Statistics":
        """Adds another ``Statistics`` of the same shape (e.g. from another process
        or data shard) into this one; returns ``self``."""
        if not isinstance(other, Statistics):
            raise TypeError(f"can only merge Statistics, got {type(other).__name__}")
        if self._dev is not None:
            raise TypeError("merge into CUDA statistics is not supported: merge their .to_cpu() copies")
        if (other._D, other._m) != (self._D, self._m):
            raise ValueError(
                f"cannot merge statistics of shape (n_features={other._D}, n_targets={other._m}) into "
                f"(n_features={self._D}, n_targets={self._m})"
            )
        self._flush()
        self._gram += other.gram  # only the upper triangle matters until the next mirror
        self._cross += other.cross
        self._sum_x += other._sum_x
        self._sum_y += other._sum_y
        self._sum_yy += other._sum_yy
        self._count += other._count
        self._symmetric = False
        return self

    def all_reduce(self, reduce) -> "Statistics":
        """Sums these statistics over several processes, in place.

        ``reduce(arrays)`` receives the sums as a list of C-contiguous NumPy arrays: the
        float64 ``gram`` (D, D, both triangles), ``cross`` (D, m), ``sum_x``, ``sum_y``,
        ``sum_y_sq`` and the count as a 1-element int64 array; it must replace each one, in
        place, by its element-wise sum over the processes (e.g. ``torch.distributed.all_reduce``
        on ``torch.from_numpy`` views). Every process must hold statistics of the same shape.
        Returns ``self``.
        """
        if self._dev is not None:
            raise TypeError("all_reduce needs CPU statistics: reduce their .to_cpu() copies")
        self.gram  # flushes pending float32 products and mirrors: the sum of symmetric matrices stays symmetric
        count = np.array([self._count], dtype=np.int64)
        reduce([self._gram, self._cross, self._sum_x, self._sum_y, self._sum_yy, count])
        self._count = int(count[0])
        self._symmetric = True
        return self

    @property
    def pending_rows(self) -> int:
        """Rows whose float32 products wait in the engine's scratch for the next float64 add
        (0 right after a flush, and always for float64 batches). Reading any sum flushes them, which
        rounds differently than letting them wait; a snapshot taken when this is 0 resumes bit-exactly."""
        return 0 if self._dev is not None else int(self._acc.pending_rows)

    def _flush(self):
        """Adds the engine's pending float32 products into the float64 sums (CUDA: copies them to the host)."""
        self._sync()
        if self._acc.pending_rows:
            self._acc.flush(self._gram, self._cross)
            self._symmetric = False

    def copy(self) -> "Statistics":
        """An independent copy."""
        out = Statistics(self._D, self._m)
        out._set_state(self.gram.copy(), self.cross.copy(), self._sum_x.copy(), self._sum_y.copy(),
                       self._sum_yy.copy(), self._count)
        return out

    def reset(self) -> None:
        """Zeros all sums (keeps the shapes)."""
        self._acc.discard()
        if self._dev is not None:
            self._dev.reset()
            self._rows_in, self._rejected_seen, self._stale = 0, 0, False
        for a in (self._gram, self._cross, self._sum_x, self._sum_y, self._sum_yy):
            a.fill(0.0)
        self._count = 0
        self._symmetric = True

    @classmethod
    def from_sums(cls, gram, cross, sum_x, sum_y, sum_y_sq, count) -> "Statistics":
        """Builds statistics from sums computed elsewhere (e.g. accumulated on a GPU):
        ``gram`` (D, D) = Σxxᵀ (symmetric), ``cross`` (D, m) = Σxyᵀ, ``sum_x`` (D,),
        ``sum_y`` (m,), ``sum_y_sq`` (m,) = per-target Σy², ``count`` = number of rows.

        Raises ``ValueError`` when ``gram`` is not symmetric within :data:`GRAM_SYMMETRY_RTOL` (relative to
        its largest entry) or a sum of squares (the diagonal of ``gram``, ``sum_y_sq``) is negative."""
        g = np.asarray(gram)
        if g.ndim != 2 or g.shape[0] != g.shape[1]:
            raise ValueError(f"gram must be a square (D, D) matrix; got shape {g.shape}")
        D = g.shape[0]
        c = np.asarray(cross)
        if c.ndim != 2 or c.shape[0] != D:
            raise ValueError(f"cross must have shape ({D}, n_targets); got {c.shape}")
        m = c.shape[1]
        n = _arrays.check_int(count, "count", lo=0)
        # copies: later updates must never write into the caller's arrays
        G = _arrays.as_f64(g, "gram", (D, D)).copy()
        syy = _arrays.as_f64(sum_y_sq, "sum_y_sq", (m,)).copy()
        _arrays.check_gram(G, "gram")
        if (np.diagonal(G) < 0).any() or (syy < 0).any():
            raise ValueError("the diagonal of gram and sum_y_sq are sums of squares: they cannot be negative")
        out = cls(D, m)
        out._set_state(G, _arrays.as_f64(c, "cross", (D, m)).copy(), _arrays.as_f64(sum_x, "sum_x", (D,)).copy(),
                       _arrays.as_f64(sum_y, "sum_y", (m,)).copy(), syy, n)
        return out

    def _set_state(self, gram, cross, sum_x, sum_y, sum_yy, count):
        self._acc.discard()
        self._gram, self._cross = gram, cross
        self._sum_x, self._sum_y, self._sum_yy = sum_x, sum_y, sum_yy
        self._count = int(count)
        self._symmetric = True

    # ------------------------------------------------------------------ read-only views
    @staticmethod
    def _ro(a):
        v = a.view()
        v.flags.writeable = False
        return v

    @property
    def n_features(self) -> int:
        return self._D

    @property
    def n_targets(self) -> int:
        return self._m

    @property
    def count(self) -> int:
        """Number of samples (rows) streamed."""
        self._sync()
        return self._count

    @property
    def gram(self) -> np.ndarray:
        """``Σ x xᵀ``, shape (D, D), float64 (read-only view; ``.copy()`` to keep a snapshot)."""
        self._flush()
        if not self._symmetric:
            _core.mirror_upper(self._gram)
            self._symmetric = True
        return self._ro(self._gram)

    @property
    def cross(self) -> np.ndarray:
        """``Σ x yᵀ``, shape (D, m), float64 (read-only view)."""
        self._flush()
        return self._ro(self._cross)

    @property
    def sum_x(self) -> np.ndarray:
        self._sync()
        return self._ro(self._sum_x)

    @property
    def sum_y(self) -> np.ndarray:
        self._sync()
        return self._ro(self._sum_y)

    @property
    def sum_y_sq(self) -> np.ndarray:
        """Per-target ``Σ y²``, shape (m,)."""
        self._sync()
        return self._ro(self._sum_yy)

    @property
    def target_energy(self) -> float:
        """``Σ ‖y‖²`` over all samples and targets."""
        self._sync()
        return float(self._sum_yy.sum())

    def _n(self):
        self._sync()
        if self._count == 0:
            raise ValueError("the statistics hold no samples yet: call update() first")
        return float(self._count)

    @property
    def mean_x(self) -> np.ndarray:
        """Mean input, shape (D,)."""
        return self._sum_x / self._n()

    @property
    def mean_y(self) -> np.ndarray:
        """Mean target, shape (m,)."""
        return self._sum_y / self._n()

    @property
    def cov_x(self) -> np.ndarray:
        """Centred input covariance ``E[(x-x̄)(x-x̄)ᵀ]`` (divides by N), shape (D, D)."""
        n = self._n()
        mx = self._sum_x / n
        return self.gram / n - np.outer(mx, mx)

    @property
    def cov_xy(self) -> np.ndarray:
        """Centred input/target cross-covariance ``E[(x-x̄)(y-ȳ)ᵀ]``, shape (D, m)."""
        n = self._n()
        return self.cross / n - np.outer(self._sum_x / n, self._sum_y / n)

    @property
    def var_y(self) -> np.ndarray:
        """Per-target variance (divides by N), shape (m,)."""
        n = self._n()
        return self._sum_yy / n - (self._sum_y / n) ** 2

    def __repr__(self):
        dev = "" if self._dev is None else f", device={self.device!r}"
        return f"Statistics(n_features={self._D}, n_targets={self._m}, count={self.count}{dev})"

    # ------------------------------------------------------------------ persistence
    def _arrays(self):
        return {
            "gram": self.gram,
            "cross": self.cross,
            "sum_x": self._sum_x,
            "sum_y": self._sum_y,
            "sum_y_sq": self._sum_yy,
        }

    @staticmethod
    def _digest(arrays, header):
        h = hashlib.sha256(repr(header).encode())
        for k in sorted(arrays):
            h.update(k.encode())
            h.update(np.ascontiguousarray(arrays[k]).tobytes())
        return h.hexdigest()

    def save(self, path) -> None:
        """Writes the statistics to ``path`` (a NumPy ``.npz`` archive with a format
        version and a SHA-256 checksum). The file is written to a temporary name
        and renamed, so an interrupted save never leaves a partial file at ``path``."""
        path = os.fspath(path)
        arrays = self._arrays()
        header = (FORMAT, FORMAT_VERSION, self._D, self._m, self._count)
        meta = dict(
            format=np.array(FORMAT),
            version=np.array(FORMAT_VERSION),
            n_features=np.array(self._D),
            n_targets=np.array(self._m),
            count=np.array(self._count, dtype=np.int64),
            checksum=np.array(self._digest(arrays, header)),
        )

        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, **arrays, **meta)

        atomic_write(path, write, fsync=False)

    @classmethod
    def load(cls, path) -> "Statistics":
        """Reads a file written by :meth:`save`. A truncated, corrupted or foreign
        file, or one of an unknown format version, raises ``ValueError``."""
        path = os.fspath(path)
        data = _read_npz(path)
        version, D, m, count = _header(data, path)
        shapes = {"gram": (D, D), "cross": (D, m), "sum_x": (D,), "sum_y": (m,), "sum_y_sq": (m,)}
        for k, s in shapes.items():
            if data[k].shape != s or data[k].dtype != np.float64:
                raise ValueError(f"{path}: array {k} has shape {data[k].shape}, expected {s} float64 (corrupted?)")
        arrays = {k: data[k] for k in shapes}
        if cls._digest(arrays, (FORMAT, version, D, m, count)) != str(data["checksum"]):
            raise ValueError(f"{path}: checksum mismatch, the file is corrupted")
        out = cls(D, m)
        out._set_state(*(np.ascontiguousarray(arrays[k]) for k in ("gram", "cross", "sum_x", "sum_y", "sum_y_sq")),
                       count)
        return out
