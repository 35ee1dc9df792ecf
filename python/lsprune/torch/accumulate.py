"""Consumer input/target rows and their float64 second-order sums.

A Linear consumer sees one row per sample (or per token of a (B, T, C) input); a
Conv2d consumer one row per output position: the unfolded patch of ``C_in*kh*kw``
values in ``F.unfold`` order (C_in, kh, kw), so channel ``c`` is the column group
``[c*kh*kw, (c+1)*kh*kw)``.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import lsprune

from ._tensors import device_matrix

# Bytes of unfolded patches materialized at once: memory stays O(D^2 + chunk), not O(batch * D * L).
CHUNK_BYTES = 64 << 20


def conv_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Unfolded input patches of ``conv`` for ``x`` (B, C_in, H, W): shape (B, C_in*kh*kw, Ho*Wo).

    Handles stride, dilation, numeric/``"same"``/``"valid"`` padding and non-zero padding modes.
    """
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        return F.unfold(_padded(conv, x), conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    return F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)


def _padded(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``x`` padded the way ``conv`` pads it."""
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        return F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    ph, pw = conv.padding
    return F.pad(x, (pw, pw, ph, ph)) if ph or pw else x


def sampled_patches(conv: nn.Conv2d, x: torch.Tensor, pos: torch.Tensor, out_w: int) -> torch.Tensor:
    """The unfolded patches of ``conv`` at output positions ``pos`` (b, P) (row-major over the
    (Ho, Wo) output grid) only: shape (b*P, C_in*kh*kw), the same rows ``conv_patches`` would give
    but without unfolding every position."""
    b, C = x.shape[0], x.shape[1]
    kh, kw = conv.kernel_size
    (sh, sw), (dh, dw) = conv.stride, conv.dilation
    xp = _padded(conv, x).permute(0, 2, 3, 1)  # (b, Hp, Wp, C): one gather reads a channel vector
    i, j = pos // out_w, pos % out_w
    ki = torch.arange(kh, device=x.device).repeat_interleave(kw) * dh
    kj = torch.arange(kw, device=x.device).repeat(kh) * dw
    rows = i[:, :, None] * sh + ki  # (b, P, kh*kw)
    cols = j[:, :, None] * sw + kj
    g = xp[torch.arange(b, device=x.device)[:, None, None], rows, cols]  # (b, P, kh*kw, C)
    return g.transpose(2, 3).reshape(b * pos.shape[1], C * kh * kw)  # columns in (C, kh, kw) order


def _row_mask(mask: Optional[torch.Tensor], lead: Tuple[int, ...], name: str,
              pooled_ok: bool = True) -> Optional[torch.Tensor]:
    """Flattens a position mask for rows with leading shape ``lead``; None means all rows."""
    if mask is None:
        return None
    shape = tuple(mask.shape)
    if shape == tuple(lead):
        return mask.reshape(-1)
    if len(shape) == 1 and len(lead) >= 1 and shape[0] == lead[0]:  # one flag per sample
        return mask.reshape((-1,) + (1,) * (len(lead) - 1)).expand(lead).reshape(-1)
    if pooled_ok and len(lead) < len(shape) and lead[:1] == shape[:1]:
        return None  # the consumer sees pooled per-sample features: the position mask does not apply
    raise ValueError(f"mask of shape {shape} does not fit the input of consumer {name!r} (rows of shape "
                     f"{tuple(lead)}): return a (batch,) or {tuple(lead)} bool mask")


def iter_rows(consumer: nn.Module, name: str, x: torch.Tensor, y: Optional[torch.Tensor], *,
              mask: Optional[torch.Tensor] = None, max_positions: Optional[int] = None,
              generator: Optional[torch.Generator] = None, chunk_bytes: int = CHUNK_BYTES
              ) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]]:
    """Yields ``(x_rows (n, D), y_rows (n, m) or None, keep (n,) bool or None)`` chunks of one batch.

    Parameters
    ----------
    consumer : nn.Conv2d or nn.Linear
    x : Tensor
        Consumer input, (B, C_in, H, W) for Conv2d, (..., in_features) for Linear.
    y : Tensor or None
        Consumer output (targets), (B, m, Ho, Wo) or (..., m); None for Gram-only statistics.
    mask : bool Tensor, optional
        Positions to use: shape (B,) or, for Linear, ``x.shape[:-1]`` (e.g. (B, T) tokens).
    max_positions : int, optional
        Conv2d only: at most this many output positions per sample, drawn without
        replacement with ``generator``.
    """
    if isinstance(consumer, nn.Conv2d):
        B = x.shape[0]
        smask = _row_mask(mask, (B,), name, pooled_ok=False)
        # the input's channels (a concatenation's reader may be measured after other slices lost inputs)
        D = x.shape[1] * consumer.kernel_size[0] * consumer.kernel_size[1]
        # about D * H * W values per sample once unfolded; take as many samples as fit in chunk_bytes
        per_sample = max(1, D * x.shape[-1] * x.shape[-2] * x.element_size())
        n = max(1, chunk_bytes // per_sample)
        start = 0
        Ho, Wo = _out_size(consumer, x.shape[-2:])
        L = Ho * Wo
        sample = max_positions is not None and L > max_positions
        if sample:  # only the sampled patches are gathered: memory and time O(b * P * D)
            per_sample = max(1, max_positions * D * x.element_size())
            n = max(1, chunk_bytes // per_sample)
        while start < B:
            xc = x[start:start + n]
            b = xc.shape[0]
            Y = y[start:start + n].flatten(2) if y is not None else None  # (b, m, L), row-major positions
            w = smask[start:start + n] if smask is not None else None
            if sample:
                P = max_positions
                pos = torch.rand(b, L, generator=generator).argsort(dim=1)[:, :P].to(x.device)
                xr = sampled_patches(consumer, xc, pos, Wo)
                yr = Y.gather(2, pos[:, None, :].expand(b, Y.shape[1], P)).transpose(1, 2).reshape(b * P, -1) \
                    if Y is not None else None
                rows_per = P
            else:
                xr = conv_patches(consumer, xc).transpose(1, 2).reshape(b * L, D)
                yr = Y.transpose(1, 2).reshape(b * L, -1) if Y is not None else None
                rows_per = L
            wr = w[:, None].expand(b, rows_per).reshape(-1) if w is not None else None
            yield xr, yr, wr
            start += n
        return
    D = x.shape[-1]
    xr = x.reshape(-1, D)
    yr = y.reshape(-1, y.shape[-1]) if y is not None else None
    wr = _row_mask(mask, tuple(x.shape[:-1]), name)
    n = max(1, chunk_bytes // max(1, D * x.element_size()))
    for s in range(0, xr.shape[0], n):
        yield xr[s:s + n], (yr[s:s + n] if yr is not None else None), (wr[s:s + n] if wr is not None else None)


def _out_size(conv: nn.Conv2d, hw) -> Tuple[int, int]:
    """Output height and width of ``conv`` for input spatial size ``hw``."""
    if isinstance(conv.padding, str):
        pad = conv._reversed_padding_repeated_twice  # (w_left, w_right, h_top, h_bottom)
        tot = (pad[2] + pad[3], pad[0] + pad[1])
    else:
        tot = (2 * conv.padding[0], 2 * conv.padding[1])
    return tuple((hw[a] + tot[a] - conv.dilation[a] * (conv.kernel_size[a] - 1) - 1) // conv.stride[a] + 1
                 for a in range(2))


def engine_device(device: torch.device) -> Optional[str]:
    """The CUDA engine device ("cuda:N") for a calibration device, or None when the
    engine has no CUDA (a build without a CUDA compiler, or no such GPU)."""
    if device.type != "cuda":
        return None
    idx = 0 if device.index is None else int(device.index)
    return f"cuda:{idx}" if lsprune.cuda_device_count() > idx else None


class _EngineSums:
    """The engine's CPU statistics: multithreaded float32 products added into float64 sums."""

    def __init__(self, D: int, m: int, stats: Optional[lsprune.Statistics] = None):
        self.stats = stats if stats is not None else lsprune.Statistics(D, m)

    def add(self, x, y, keep) -> None:
        if keep is not None:
            x = x[keep]
            y = y[keep] if y is not None else None
        if x.dtype == torch.bfloat16:
            x = x.float()
        if y is not None and y.dtype == torch.bfloat16:
            y = y.float()
        self.stats.update(x.detach(), y.detach() if y is not None else None)

    def rows(self) -> int:
        return self.stats.count

    @property
    def pending_rows(self) -> int:
        return self.stats.pending_rows

    def snapshot(self) -> lsprune.Statistics:
        return self.stats

    def reduced(self, dist) -> lsprune.Statistics:
        if dist is not None:
            self.stats.all_reduce(dist.sum_arrays)
        return self.stats


class _CudaEngineSums(_EngineSums):
    """The engine's CUDA statistics: no host sync per batch; masked rows are zeroed on the device and
    subtracted from the count when read."""

    def __init__(self, D: int, m: int, engine_dev: str):
        super().__init__(D, m, lsprune.Statistics(D, m, device=engine_dev))
        self.dropped = None  # masked rows: a device counter, read once at the end

    def add(self, x, y, keep) -> None:
        if keep is not None:  # zeroed rows add nothing; boolean indexing would sync the host
            k = keep[:, None]
            x = torch.where(k, x, torch.zeros((), dtype=x.dtype, device=x.device))
            y = torch.where(k, y, torch.zeros((), dtype=y.dtype, device=y.device)) if y is not None else None
            d = (~keep).sum()
            self.dropped = d if self.dropped is None else self.dropped + d
        self.stats.update(device_matrix(x, "x"), device_matrix(y, "y") if y is not None else None)

    def _dropped_rows(self) -> int:
        return int(self.dropped.item()) if self.dropped is not None else 0

    def rows(self) -> int:
        return self.stats.count - self._dropped_rows()

    def snapshot(self) -> lsprune.Statistics:
        """The device sums as CPU statistics, masked rows taken out of the count."""
        s = self.stats
        return lsprune.Statistics.from_sums(s.gram, s.cross, s.sum_x, s.sum_y, s.sum_y_sq,
                                            s.count - self._dropped_rows())

    def reduced(self, dist) -> lsprune.Statistics:
        self.stats, self.dropped = self.snapshot(), None  # device sums -> host (one copy per pair)
        return super().reduced(dist)


_TORCH_SUMS = ("gram", "cross", "sum_x", "sum_y", "sum_yy", "count")


class _TorchSums:
    """Float64 torch tensors on the calibration device (no CUDA engine, or forced)."""

    def __init__(self, D: int, m: int, device: torch.device):
        f64 = dict(dtype=torch.float64, device=device)
        self.t = dict(gram=torch.zeros(D, D, **f64), cross=torch.zeros(D, m, **f64), sum_x=torch.zeros(D, **f64),
                      sum_y=torch.zeros(m, **f64), sum_yy=torch.zeros(m, **f64),
                      count=torch.zeros((), dtype=torch.int64, device=device))

    @classmethod
    def of(cls, stats: lsprune.Statistics, device: torch.device) -> "_TorchSums":
        """Torch sums continuing from ``stats``."""
        out = cls(stats.n_features, stats.n_targets, device)
        for k, v in zip(_TORCH_SUMS, (stats.gram, stats.cross, stats.sum_x, stats.sum_y, stats.sum_y_sq)):
            out.t[k].copy_(torch.from_numpy(np.array(v)))
        out.t["count"].fill_(int(stats.count))
        return out

    def add(self, x, y, keep) -> None:
        t = self.t
        x64 = x.detach().to(torch.float64)
        y64 = y.detach().to(torch.float64) if y is not None else None
        if keep is not None:  # zeroed rows add nothing to any sum; no boolean indexing, so no host sync
            k = keep[:, None]
            x64 = torch.where(k, x64, 0.0)
            y64 = torch.where(k, y64, 0.0) if y64 is not None else None
            t["count"] += keep.sum()
        else:
            t["count"] += x64.shape[0]
        t["gram"].addmm_(x64.T, x64)
        t["sum_x"] += x64.sum(0)
        if y64 is not None:
            t["cross"].addmm_(x64.T, y64)
            t["sum_y"] += y64.sum(0)
            t["sum_yy"] += (y64 * y64).sum(0)

    def rows(self) -> int:
        return int(self.t["count"].item())

    pending_rows = 0

    def snapshot(self) -> lsprune.Statistics:
        t = self.t
        return lsprune.Statistics.from_sums(t["gram"].cpu().numpy(), t["cross"].cpu().numpy(),
                                            t["sum_x"].cpu().numpy(), t["sum_y"].cpu().numpy(),
                                            t["sum_yy"].cpu().numpy(), int(t["count"].item()))

    def reduced(self, dist) -> lsprune.Statistics:
        t = self.t
        if dist is not None:
            dist.sum_([t[k] for k in _TORCH_SUMS])
        if not bool(torch.isfinite(t["gram"]).all()) or not bool(torch.isfinite(t["cross"]).all()):
            raise lsprune.NonFiniteInputError("x or y contains NaN or Inf")
        out = self.snapshot()
        self.t = None  # the device copy is no longer needed
        return out


class Sums:
    """Float64 sums of one consumer's rows, turned into :class:`lsprune.Statistics` at the end.

    One interface over three back-ends, chosen once from the device: on CPU the engine accumulates
    (:class:`_EngineSums`); on a CUDA device the engine's CUDA statistics (:class:`_CudaEngineSums`);
    without the CUDA engine, on other devices, or when forced, float64 torch tensors on the device
    (:class:`_TorchSums`). Either way they are converted once. Nothing is allocated before the first rows
    arrive (the memory guard counts pairs whose sums are alive at once), and :meth:`release` frees the
    sums once the pair is done.

    Parameters
    ----------
    n_features, n_targets : int
        D and m (m = 0: Gram-only statistics).
    device : torch.device
    use_torch : bool, optional
        Force the torch back-end (True) or the engine's (False); the default is torch on non-CPU devices
        without the CUDA engine.
    dist : distributed.Dist, optional
        When active, :meth:`statistics` sums the ranks' sums (once) before returning them.
    """

    def __init__(self, n_features: int, n_targets: int, device: torch.device, use_torch: Optional[bool] = None,
                 dist=None):
        self.D, self.m = int(n_features), int(n_targets)
        self.device = device
        self.dist = dist
        # the CUDA engine takes over the device sums unless a back-end was forced
        self.engine_dev = engine_device(device) if use_torch is None else None
        self.use_torch = self.engine_dev is None and ((device.type != "cpu") if use_torch is None else bool(use_torch))
        self._b = None  # the back-end, allocated with the first rows
        self._result: Optional[lsprune.Statistics] = None  # after statistics(): the (reduced) statistics
        self._local_rows: Optional[int] = None  # rows of this process, frozen by statistics()

    def with_targets(self, n_targets: int, n_features: Optional[int] = None) -> "Sums":
        """Empty sums of the same back-end for ``n_targets`` targets (a consumer that lost output rows) and
        ``n_features`` columns (default: the same; a concatenation's reader that lost other slices' inputs)."""
        if self._b is not None or self._result is not None:
            raise RuntimeError("the targets of sums that already hold rows cannot change")
        out = Sums(self.D if n_features is None else n_features, n_targets, self.device, dist=self.dist)
        out.engine_dev, out.use_torch = self.engine_dev, self.use_torch
        return out

    def _new_backend(self):
        if self.engine_dev is not None:
            return _CudaEngineSums(self.D, self.m, self.engine_dev)
        return _TorchSums(self.D, self.m, self.device) if self.use_torch else _EngineSums(self.D, self.m)

    def _alloc(self) -> None:
        if self._result is not None:
            raise RuntimeError("rows added to the sums of a pair whose statistics were already read")
        if self._b is None:
            self._b = self._new_backend()

    def add(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, keep: Optional[torch.Tensor] = None) -> None:
        """Adds rows ``x`` (n, D) and targets ``y`` (n, m); rows where ``keep`` is False are left out."""
        self._alloc()
        self._b.add(x, y, keep)

    @property
    def n_rows(self) -> int:
        """Rows added on this process."""
        if self._local_rows is not None:
            return self._local_rows
        return self._b.rows() if self._b is not None else 0

    @property
    def pending_rows(self) -> int:
        """Rows whose float32 products the engine has not yet added in float64 (see
        :attr:`lsprune.Statistics.pending_rows`); a snapshot is bit-exact only when 0."""
        return self._b.pending_rows if self._b is not None else 0

    def snapshot(self) -> lsprune.Statistics:
        """The local sums so far as statistics (for a checkpoint; the engine's are not copied)."""
        return self._b.snapshot() if self._b is not None else lsprune.Statistics(self.D, self.m)

    def restore(self, stats: lsprune.Statistics) -> None:
        """Continues from ``stats`` (a snapshot loaded from a checkpoint)."""
        if (stats.n_features, stats.n_targets) != (self.D, self.m):
            raise ValueError(f"saved statistics have shape ({stats.n_features}, {stats.n_targets}), this pair "
                             f"({self.D}, {self.m})")
        if self.engine_dev is not None:  # the CUDA engine cannot load sums: continue with the torch back-end
            self.engine_dev, self.use_torch = None, True
        if self.use_torch:
            if self._result is not None:
                raise RuntimeError("rows added to the sums of a pair whose statistics were already read")
            self._b = _TorchSums.of(stats, self.device)
        else:
            self._b = _EngineSums(self.D, self.m, stats)

    def statistics(self) -> lsprune.Statistics:
        """The statistics of all rows (summed over the ranks when distributed; done once)."""
        if self._result is not None:
            return self._result
        self._local_rows = self.n_rows
        dist = self.dist if self.dist is not None and self.dist.active else None
        if self._b is None:  # no rows here (e.g. an empty shard): zeros still join the reduction
            self._b = _TorchSums(self.D, self.m, self.device) if self.use_torch else _EngineSums(self.D, self.m)
        self._result = self._b.reduced(dist)
        return self._result

    def release(self) -> None:
        """Frees the sums (the pair is finished)."""
        self._b = self._result = None
