"""Helpers shared by the lsprune.torch tests."""
from __future__ import annotations

import copy

import numpy as np

import torch
import torch.nn as nn


def batches(shape, n=4, seed=0, scale=1.0):
    """``n`` random calibration batches of ``shape`` (never zeros)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) * scale for _ in range(n)]


_SIZE_ATTRS = ("in_channels", "out_channels", "in_features", "out_features", "num_features", "groups")


def snapshot(model: nn.Module) -> dict:
    """Everything that must be bit-identical after a prune that did not opt into ``inplace``."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "ids": {k: id(v) for k, v in model.state_dict(keep_vars=True).items()},
        "training": {n: m.training for n, m in model.named_modules()},
        "attrs": {n: {a: getattr(m, a) for a in _SIZE_ATTRS if a in m.__dict__} for n, m in model.named_modules()},
    }


def assert_unchanged(model: nn.Module, snap: dict) -> None:
    state = model.state_dict(keep_vars=True)
    assert set(state) == set(snap["state"]), "parameters/buffers were added or removed"
    for k, v in state.items():
        ref = snap["state"][k]
        assert v.dtype == ref.dtype and v.shape == ref.shape, k
        assert torch.equal(_bits(v), _bits(ref)), f"{k} changed"  # bit for bit (NaN included)
        assert id(v) == snap["ids"][k], f"{k} was replaced"
    assert {n: m.training for n, m in model.named_modules()} == snap["training"]
    for n, m in model.named_modules():
        for a, v in snap["attrs"][n].items():
            assert getattr(m, a) == v, f"{n}.{a} changed"


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a - b‖² / ‖b‖² in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float(((a - b) ** 2).sum() / (b ** 2).sum())


@torch.no_grad()
def output_error(pruned: nn.Module, original: nn.Module, data) -> float:
    """Relative output error of ``pruned`` against ``original`` (both in eval mode) over batches."""
    num = den = 0.0
    for x in data:
        o, p = original(x).double(), pruned(x).double()
        num += float(((p - o) ** 2).sum())
        den += float((o ** 2).sum())
    return num / den


def no_refit_copy(model: nn.Module, report) -> nn.Module:
    """The original model with the report's channels removed but no re-fit: the consumers' (a coupled
    group's readers') original weights are sliced to the kept channels (their original biases stay)."""
    from lsprune.torch.surgery import shrink_channels, shrink_in, shrink_out

    m = copy.deepcopy(model)
    mods = dict(m.named_modules())
    with torch.no_grad():
        for p in report.pairs:
            if p.status != "pruned":
                continue
            for w in p.writers or [p.producer]:  # a coupled group: every writer and reader
                shrink_out(mods[w], p.kept)
            for b in p.between:
                shrink_channels(mods[b], p.kept)
            for c, g in zip(p.readers or [p.consumer], p.group_sizes or [p.group_size]):
                shrink_in(mods[c], p.kept, g)
    return m


def digits_data(seed: int = 0):
    """sklearn's 8x8 digits as (N, 1, 8, 8) float32 in [0, 1] and labels, split 1,297 train / 500 test
    (shuffled with ``seed``)."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    X = torch.as_tensor(X, dtype=torch.float32)[perm].reshape(-1, 1, 8, 8) / 16.0
    y = torch.as_tensor(y)[perm]
    return (X[:1297], y[:1297]), (X[1297:], y[1297:])


def train_briefly(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 8, seed: int = 0,
                  lr: float = 3e-3) -> nn.Module:
    """A few epochs of Adam on (x, y) with cross-entropy; returns the model in eval mode."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


# ---------------------------------------------------------------------------------------------- coupled groups
def _removed(model: nn.Module, report):
    """Per module, the original output rows and input indices (weight dim 1) the report removed."""
    mods = dict(model.named_modules())
    rows, ins = {}, {}
    for r in report.pairs:
        if r.status != "pruned":
            continue
        units = np.setdiff1d(np.arange(r.channels_before), r.kept)
        gone = (units[:, None] * r.unit + np.arange(r.unit)).reshape(-1)  # a unit's channels (whole groups)
        strided = (np.arange(r.unit)[:, None] * r.channels_before + units[None, :]).reshape(-1)  # before a shuffle
        for w in r.writers or [r.producer]:
            rows.setdefault(w, set()).update((strided if w in r.interleaved else gone).tolist())
        for b, name in enumerate(r.between):
            off = r.between_offsets[b] if r.between_offsets else 0
            rows.setdefault(name, set()).update((off + (strided if name in r.interleaved else gone)).tolist())
        readers = r.readers or [r.consumer]
        for i, (c, g) in enumerate(zip(readers, r.group_sizes or [r.group_size])):
            if isinstance(mods[c], nn.Conv2d):
                gone_c, per = gone, 1
            else:
                gone_c, per = units, g
            off = r.offsets[i] if r.offsets else 0
            ins.setdefault(c, set()).update((off + gone_c[:, None] * per + np.arange(per)).reshape(-1).tolist())
    return rows, ins


def masked_reference(model: nn.Module, pruned: nn.Module, report) -> nn.Module:
    """The unpruned architecture with every removed channel zeroed and the pruned weights scattered back."""
    rows, ins = _removed(model, report)
    ref = copy.deepcopy(model)
    small = dict(pruned.named_modules())
    with torch.no_grad():
        for name, m in ref.named_modules():
            if name not in rows and name not in ins:
                continue
            s = small[name]
            if isinstance(m, nn.BatchNorm2d):
                keep = torch.as_tensor(sorted(set(range(m.num_features)) - rows[name]))
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
                for t in ("weight", "bias"):
                    getattr(m, t).zero_()
                for t in ("weight", "bias", "running_mean", "running_var"):
                    getattr(m, t)[keep] = getattr(s, t)
                continue
            r = torch.as_tensor(sorted(set(range(m.weight.shape[0])) - rows.get(name, set())))
            c = torch.as_tensor(sorted(set(range(m.weight.shape[1])) - ins.get(name, set())))
            w = torch.zeros_like(m.weight)
            w[r[:, None], c[None, :]] = s.weight
            m.weight.copy_(w)
            if s.bias is not None:
                b = torch.zeros(m.weight.shape[0])
                b[r] = s.bias
                m.bias = nn.Parameter(b)
    return ref


def build_model(models: dict, name: str):
    """``models[name]`` = (constructor, calibration shape): the model built under seed 0, and the shape."""
    torch.manual_seed(0)
    ctor, shape = models[name]
    return ctor(), shape


def skip_reasons(search) -> dict:
    """{producer: reason} of a :class:`PairSearch`'s skipped candidates."""
    return {s.producer: s.reason for s in search.skipped}


def prune_checked(prune, model: nn.Module, shape, *, rtol: float, **kw):
    """``prune(model, calibration, ratio=0.5, **kw)`` on three batches of ``shape``, with the checks every
    coupled-group test makes: the user's model is bit-identical, the pruned model equals the masked reference
    on a fresh batch (``rtol``, relative to its largest output), and in sequential mode the reported output
    error is the measured one. Returns (pruned, report, {pruned unit: channels after})."""
    import pytest

    snap = snapshot(model)
    cal = batches(shape, n=3, seed=1)
    pruned, report = prune(model, cal, ratio=0.5, **kw)
    assert_unchanged(model, snap)
    x = torch.randn(*shape)
    with torch.no_grad():
        out, ref = pruned(x), masked_reference(model, pruned, report)(x)
    torch.testing.assert_close(out, ref, rtol=rtol, atol=rtol * float(ref.abs().max()))
    if kw.get("mode", "sequential") == "sequential":
        assert report.output_relative_error == pytest.approx(output_error(pruned, model, cal), rel=1e-4)
    return pruned, report, {r.producer: r.channels_after for r in report.pairs if r.status == "pruned"}


def module_io(model: nn.Module, data, names) -> dict:
    """{module name: [(input, output) of each batch of ``data``]} of the unpruned ``model``."""
    mods = dict(model.named_modules())
    seen = {n: [] for n in names}
    hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n: seen[n].append((i[0], o))) for n in names]
    with torch.no_grad():
        for x in data:
            model(x)
    for h in hooks:
        h.remove()
    return seen


def reader_rows(model: nn.Module, data, names):
    """Per module name, its input and output rows on ``data`` (float64 NumPy, one row per position: the
    channels last), for 1x1 conv / Linear readers."""
    seen = module_io(model, data, names)
    rows = lambda t: torch.cat([v.movedim(1, -1).reshape(-1, v.shape[1]) for v in t]).double().numpy()  # noqa: E731
    return [(rows([x for x, _ in seen[n]]), rows([y for _, y in seen[n]])) for n in names]


def lstsq_error(X: np.ndarray, Y: np.ndarray, cols) -> float:
    """Relative error of the plain LS fit (with intercept) of ``Y`` on columns ``cols`` of ``X``."""
    A = np.hstack([X[:, cols], np.ones((X.shape[0], 1))])
    coef, *_ = np.linalg.lstsq(A, Y, rcond=None)
    return float(((Y - A @ coef) ** 2).sum()) / float(((Y - Y.mean(0)) ** 2).sum())
