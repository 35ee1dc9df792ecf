"""Block reconstruction (``prune(reconstruct=...)``): after a block's units are selected and re-fitted by LS,
a bounded number of optimizer steps fit the pruned block (or each of its sublayers) to the dense network's
output on the cached calibration inputs, starting from the LS solution (docs/design.md, "Block
reconstruction").

Per window (:mod:`.windows`): the window's inputs on the pruned stream and its targets are cached; a private
copy of the window's module (float32 master weights when the model is bf16/fp16) is trained on minibatches of
calibration sequences with the mean squared error, masked padding excluded; the calibration loss of the
real module (model dtype) is measured at the LS start and at ``EVALUATIONS`` checkpoints, and the best of those
iterates is installed (so the loss never ends above the LS start). Parameters are *replaced*, never written
in place, so the session's backup restores an in-place prune that fails or is interrupted. A loss that turns
non-finite stops the window, keeps its LS weights and warns with :class:`ReconstructionWarning`.
"""
from __future__ import annotations

import copy
import math
import numbers
import time
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .blockwise import BlockCall
from .layouts import Unit
from .report import WindowReport
from .windows import (Window, block_windows, call_order, capture_calls, capture_outputs, cast_call, minibatches,
                      rows_of, run_window, slice_call)

#: ``ReconstructOptions.window``: one window per block, or attention and MLP separately.
WINDOWS = ("block", "sublayer")
#: ``ReconstructOptions.targets``: the dense block's output on the dense stream, or the dense block (sublayer)
#: applied to the pruned stream's input.
RECONSTRUCT_TARGETS = ("dense", "pruned_stream")
OPTIMIZERS = ("adam", "sgd")
#: Calibration-loss checkpoints per window besides the LS start, evenly spaced (the best one is kept); each costs
#: one pass of the window over the calibration set.
EVALUATIONS = 1


class ReconstructionWarning(RuntimeWarning):
    """A block's reconstruction stopped on a non-finite loss; the block keeps its LS weights (the message names
    the block and the window)."""


def _bad(name: str, v, what: str) -> ValueError:
    return ValueError(f"reconstruct {name}={v!r}: {what}")


@dataclass(frozen=True)
class ReconstructOptions:
    """Settings of block reconstruction (``prune(reconstruct=ReconstructOptions(...))`` or a dict of them).

    Attributes
    ----------
    window : {"block", "sublayer"}
        ``"block"``: one fit per block, to its output hidden states; ``"sublayer"``: attention and MLP
        separately, each to its own output (in call order, the MLP on the reconstructed attention's stream).
    steps : int >= 0
        Optimizer steps per window (0: the LS solution is kept bit for bit; the losses are still reported).
    lr : float > 0
        Learning rate.
    batch_size : int >= 1
        Tokens (rows) per minibatch, rounded to whole calibration sequences (at least one).
    optimizer : {"adam", "sgd"}
        Adam (default betas) or SGD with momentum 0.9.
    targets : {"dense", "pruned_stream"}
        ``"dense"``: the dense network's output of the window on the dense stream (the unpruned network's
        activations: errors of earlier blocks are corrected, a second stream of hidden states is cached);
        ``"pruned_stream"``: the dense window applied to the pruned stream's input.
    norms : bool
        Also tune the scales (``weight``) of the normalization layers inside the window.
    seed : int >= 0
        Seed of the minibatch order.
    """

    window: str = "block"
    steps: int = 25
    lr: float = 1e-3
    batch_size: int = 1024
    optimizer: str = "adam"
    targets: str = "dense"
    norms: bool = False
    seed: int = 0

    def __post_init__(self):
        for name, choices in (("window", WINDOWS), ("optimizer", OPTIMIZERS), ("targets", RECONSTRUCT_TARGETS)):
            if not isinstance(getattr(self, name), str) or getattr(self, name) not in choices:
                raise _bad(name, getattr(self, name), f"must be one of {choices}")
        for name, least in (("steps", 0), ("batch_size", 1), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < least:
                raise _bad(name, v, f"must be an int >= {least}")
            object.__setattr__(self, name, int(v))
        lr = self.lr
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not (math.isfinite(lr) and lr > 0):
            raise _bad("lr", lr, "the learning rate must be a finite number > 0")
        object.__setattr__(self, "lr", float(lr))
        if not isinstance(self.norms, bool):
            raise _bad("norms", self.norms, "must be True or False")

    def to_dict(self) -> dict:
        return asdict(self)


def as_reconstruct(value) -> Optional[ReconstructOptions]:
    """``prune(reconstruct=)``: None (off), a :class:`ReconstructOptions`, or a dict of its fields."""
    if value is None or isinstance(value, ReconstructOptions):
        return value
    if isinstance(value, dict):
        names = {f.name for f in fields(ReconstructOptions)}
        unknown = sorted(str(k) for k in value if k not in names)
        if unknown:
            raise ValueError(f"reconstruct: unknown option(s) {unknown}; options: {sorted(names)}")
        return ReconstructOptions(**value)
    raise TypeError(f"reconstruct must be None, a dict or lsprune.torch.ReconstructOptions, got {type(value).__name__}")


# ---------------------------------------------------------------------------------------------- losses
def _count(target: torch.Tensor, mask: Optional[torch.Tensor]) -> int:
    """Elements of ``target`` (rows, T, H) the loss counts: the unmasked positions' features."""
    if mask is not None and tuple(mask.shape) == tuple(target.shape[:mask.dim()]):
        return int(mask.sum()) * (target[0].numel() // max(1, mask[0].numel()))
    return target.numel()


def _sq_error(out: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    d = out.float() - target.to(out.device).float() if out.dtype != torch.float64 else out - target.to(out)
    if mask is not None and tuple(mask.shape) == tuple(d.shape[:mask.dim()]):
        d = d[mask.to(d.device)]
    return (d * d).sum()


def _mask_rows(mask: Optional[torch.Tensor], rows: torch.Tensor) -> Optional[torch.Tensor]:
    return None if mask is None or mask.dim() < 1 else mask.index_select(0, rows.to(mask.device))


@torch.no_grad()
def window_loss(module: nn.Module, tap: Optional[nn.Module], inputs: Sequence[BlockCall],
                targets: Sequence[torch.Tensor], masks: Sequence[Optional[torch.Tensor]], device,
                keep: bool = False) -> Tuple[float, Optional[List[torch.Tensor]]]:
    """Mean squared error of the window over every cached call (float64 sum), in the module's dtype, and with
    ``keep`` the outputs (stored where the inputs are: a block window's are the next block's inputs)."""
    total, count, outs = 0.0, 0, ([] if keep else None)
    for x, y, m in zip(inputs, targets, masks):
        out = run_window(module, x.to(device), tap)
        total += float(_sq_error(out, y, m))
        count += _count(y, m)
        if keep:
            outs.append(out.to(x.hidden.device))
    return total / max(count, 1), outs


# ---------------------------------------------------------------------------------------------- parameters
def _owner(module: nn.Module, rel: str):
    mod_name, _, pname = rel.rpartition(".")
    return (module.get_submodule(mod_name) if mod_name else module), pname


def install(module: nn.Module, values: Dict[str, torch.Tensor]) -> None:
    """Replaces the named parameters (names relative to ``module``) with new Parameters holding copies of
    ``values`` in the old dtype and device (never in place: a backup of the old objects stays valid)."""
    for rel, v in values.items():
        owner, pname = _owner(module, rel)
        old = owner._parameters[pname]
        owner._parameters[pname] = nn.Parameter(v.detach().to(device=old.device, dtype=old.dtype).clone(),
                                                requires_grad=old.requires_grad)


def put_back(module: nn.Module, params: Dict[str, nn.Parameter]) -> None:
    """Puts these Parameter objects back into ``module`` as they are (the LS solution or the best iterate)."""
    for rel, p in params.items():
        owner, pname = _owner(module, rel)
        owner._parameters[pname] = p


def _master_dtype(params: Sequence[torch.Tensor]) -> Optional[torch.dtype]:
    """float32 for a bf16/fp16 window (master weights), else None (the model's dtype)."""
    return torch.float32 if any(p.dtype in (torch.float16, torch.bfloat16) for p in params) else None


# ---------------------------------------------------------------------------------------------- one block
class BlockReconstructor:
    """``after_block`` of :func:`.blockwise.sweep_blocks`: reconstructs each pruned block; ``reports`` collects
    a :class:`WindowReport` per window.

    Parameters
    ----------
    opts : ReconstructOptions
    ref_modules, pr_modules : dict
        Named modules of the reference (dense) and pruned models.
    block_units : dict
        Block index -> every unit found in the block (pruned or not; sublayers must not hold another unit).
    blocks_name : str
        The name of the model's list of blocks.
    masks : list
        Per calibration batch, the positions that count ((B, T) bool) or None.
    """

    def __init__(self, opts: ReconstructOptions, *, ref_modules, pr_modules, block_units: Dict[int, List[Unit]],
                 blocks_name: str, masks: list, device, progress: bool, timer):
        self.opts, self.ref, self.pr = opts, ref_modules, pr_modules
        self.block_units, self.blocks_name, self.masks = block_units, blocks_name, masks
        self.device, self.progress, self.timer = device, progress, timer
        self.reports: List[WindowReport] = []
        self._n = 0

    def __call__(self, i: int, units: List[Unit], calls: List[BlockCall], dense_in, dense_out
                 ) -> Optional[List[torch.Tensor]]:
        """Reconstructs block ``i``; returns its outputs per call when a block window's last evaluation computed
        them for the kept weights (the sweep then need not run the block again), else None."""
        name = f"{self.blocks_name}.{i}"
        pr_block, ref_block = self.pr[name], self.ref[name]
        with self.timer("reconstruction"):
            with torch.no_grad():
                order = call_order(pr_block, calls[0], self.pr, [u.consumer for u in self.block_units[i]])
            wins = block_windows(self.opts.window, name, units, self.block_units[i], self.pr, order, self.opts.norms)
            dense = self._dense_targets(name, wins, ref_block, dense_in, dense_out) \
                if self.opts.targets == "dense" else None
            outs = None
            for k, w in enumerate(wins):
                rep, outs = self._window(name, w, pr_block, calls, None if dense is None else dense[k])
                self.reports.append(rep)
        return outs

    # -- targets
    def _dense_targets(self, block: str, wins: List[Window], ref_block, dense_in, dense_out
                       ) -> List[List[torch.Tensor]]:
        """Each window's outputs in the dense network on the dense stream (the block's are the stream's next
        hidden states; sublayers' take one more pass of the dense block)."""
        store = dense_in[0].hidden.device
        if all(w.name == block and w.tap is None for w in wins):
            return [[c.hidden for c in dense_out] for _ in wins]
        taps = {str(k): self.ref[w.tap or w.name] for k, w in enumerate(wins)}
        with torch.no_grad():
            got = capture_outputs(ref_block, dense_in, taps, store)
        return [got[str(k)] for k in range(len(wins))]

    def _pruned_stream_targets(self, w: Window, inputs: List[BlockCall]) -> List[torch.Tensor]:
        """The dense window applied to the pruned window's inputs."""
        mod, tap = self.ref[w.name], (self.ref[w.tap] if w.tap else None)
        with torch.no_grad():
            return [run_window(mod, x.to(self.device), tap).detach().to(x.hidden.device) for x in inputs]

    # -- one window
    def _window(self, block: str, w: Window, pr_block, calls, dense: Optional[List[torch.Tensor]]):
        """Fits one window; returns its WindowReport and, for a block window, the block's outputs with the kept
        weights."""
        t0 = time.perf_counter()
        module, tap = self.pr[w.name], (self.pr[w.tap] if w.tap else None)
        store = calls[0].hidden.device
        with torch.no_grad():
            inputs = capture_calls(pr_block, calls, module, store)
        targets = dense if dense is not None else self._pruned_stream_targets(w, inputs)
        rel = [w.relative(p) for p in w.params]
        ls = {r: module.get_parameter(r) for r in rel}
        keep = w.name == block and w.tap is None
        before, outs = window_loss(module, tap, inputs, targets, self.masks, self.device, keep)
        rep = WindowReport(block=block, window=w.name, tap=w.tap, units=list(w.units), params=int(
            sum(p.numel() for p in ls.values())), loss_before=before, loss_after=before,
            target_energy=_energy(targets, self.masks))
        if self.opts.steps > 0 and math.isfinite(before):
            outs = self._fit(w, module, tap, inputs, targets, ls, rep, outs)
        elif not math.isfinite(before):
            self._non_finite(w, rep, "the LS solution's loss")
        self._n += 1
        rep.time_s = time.perf_counter() - t0
        return rep, outs

    def _fit(self, w: Window, module, tap, inputs, targets, ls: Dict[str, nn.Parameter], rep: WindowReport,
             ls_outs: Optional[List[torch.Tensor]]) -> Optional[List[torch.Tensor]]:
        """Trains a private copy of the window's module from the LS solution; installs the best evaluated iterate
        into ``module`` (or puts the LS parameters back) and returns its outputs (``ls_outs``: the LS
        solution's; None unless kept)."""
        from tqdm.auto import tqdm

        o = self.opts
        master = _master_dtype(list(ls.values()))
        work = copy.deepcopy(module)
        if master is not None:
            work.to(master)
        trained = dict(work.named_parameters())
        for n, p in trained.items():
            p.requires_grad_(n in ls)
        params = [trained[r] for r in ls]
        opt = torch.optim.Adam(params, lr=o.lr) if o.optimizer == "adam" else \
            torch.optim.SGD(params, lr=o.lr, momentum=0.9)
        work_tap = work.get_submodule(w.relative(w.tap)) if w.tap else None
        sizes = [rows_of(c) for c in inputs]
        plan = minibatches(sizes, self.per_step(targets), o.steps,
                           torch.Generator().manual_seed(o.seed * 1_000_003 + self._n))
        every = max(1, math.ceil(o.steps / EVALUATIONS))
        best, best_state, best_step, best_outs = rep.loss_before, None, 0, ls_outs
        with tqdm(plan, desc=f"reconstruct {w.name}", disable=not self.progress, leave=False) as bar, \
                torch.enable_grad():
            for step, groups in enumerate(bar, 1):
                loss = self._step(work, work_tap, opt, groups, inputs, targets, master)
                rep.steps = step
                if not math.isfinite(loss):
                    self._non_finite(w, rep, f"the minibatch loss at step {step}", module, ls)
                    return ls_outs
                if step % every == 0 or step == o.steps:
                    install(module, {r: trained[r] for r in ls})
                    val, outs = window_loss(module, tap, inputs, targets, self.masks, self.device,
                                            keep=ls_outs is not None)
                    if not math.isfinite(val):
                        self._non_finite(w, rep, f"the calibration loss at step {step}", module, ls)
                        return ls_outs
                    if val < best:
                        best, best_step, best_outs = val, step, outs
                        best_state = {r: module.get_parameter(r) for r in ls}
                bar.set_postfix(loss=f"{loss:.4g}", best=f"{best:.4g}", refresh=False)
        put_back(module, best_state if best_state is not None else ls)
        rep.loss_after, rep.best_step = best, best_step
        rep.status = "improved" if best_state is not None else "unchanged"
        return best_outs

    def per_step(self, targets: Sequence[torch.Tensor]) -> int:
        """Sequences per minibatch: ``batch_size`` tokens (rows of a target (B, T, H)) in whole sequences."""
        t = targets[0]
        seq_tokens = max(1, t[0].numel() // t.shape[-1]) if t.dim() >= 2 else 1
        return max(1, round(self.opts.batch_size / seq_tokens))

    def _step(self, work, work_tap, opt, groups, inputs, targets, master) -> float:
        """One optimizer step on the sequences ``groups`` [(batch, rows)]; returns the minibatch loss."""
        opt.zero_grad(set_to_none=True)
        masks = [_mask_rows(self.masks[b], rows) for b, rows in groups]
        ys = [targets[b].index_select(0, rows.to(targets[b].device)) for b, rows in groups]
        count = max(1, sum(_count(y, m) for y, m in zip(ys, masks)))
        total = 0.0
        for (b, rows), y, m in zip(groups, ys, masks):
            x = cast_call(slice_call(inputs[b], rows), self.device, master)
            loss = _sq_error(run_window(work, x, work_tap), y, m) / count
            loss.backward()
            total += float(loss.detach())
        if math.isfinite(total):
            opt.step()
        return total

    def _non_finite(self, w: Window, rep: WindowReport, what: str, module=None, ls=None) -> None:
        if module is not None:
            put_back(module, ls)
        rep.status = "non_finite"
        rep.loss_after = rep.loss_before
        warnings.warn(f"block {rep.block}: reconstruction of window {w.name} stopped: {what} is not finite "
                      f"(lr={self.opts.lr:g}); the block keeps its LS weights", ReconstructionWarning, stacklevel=2)


def _energy(targets: Sequence[torch.Tensor], masks) -> float:
    """Mean square of the targets (the loss of a window that outputs zeros): the scale of ``loss_*``."""
    total = sum(float(_sq_error(torch.zeros((), dtype=t.dtype), t, m)) for t, m in zip(targets, masks))
    return total / max(1, sum(_count(t, m) for t, m in zip(targets, masks)))
