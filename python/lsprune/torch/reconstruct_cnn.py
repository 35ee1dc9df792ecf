"""Block reconstruction of CNNs built of residual blocks (``prune(reconstruct=...)`` with the graph or hooks
strategy; docs/design.md, "Block reconstruction of residual CNNs").

After the LS prune of every pair and coupled group, the residual blocks are visited in forward order. Per
block: its inputs on the pruned stream and on the dense stream are cached (chained from the previous block's
outputs when the model feeds one block's output straight into the next), the dense block's outputs are the
targets, restricted to the output channels the block keeps (a coupled residual stream loses channels in every
block of its stage: ``PairReport.kept`` of the stream's group), and :class:`.reconstruct.BlockReconstructor`
fits the block's pruned convolutions (and, with ``norms=True``, its BatchNorm affine parameters) from the LS
solution. The model stays in eval mode throughout: BatchNorm normalizes with its running statistics, which are
never changed.

A *residual block* is a child of an ``nn.Sequential`` / ``nn.ModuleList`` that traces with torch.fx on its own,
takes one tensor and adds two tensors that both depend on its input (``f(x) + x`` or ``f(x) + g(x)``).
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .blockwise import BlockCall, block_output, capture_inputs, run_block
from .graph import NotTraceableError, _is_add, trace
from .memory import MemoryLimitError, gib, resolve_limit
from .reconstruct import BlockReconstructor, ReconstructionWarning, ReconstructOptions, install
from .report import PruneReport, WindowReport
from .surgery import linear_like
from .windows import Window

_CONV = nn.modules.conv._ConvNd
_BN = nn.modules.batchnorm._BatchNorm


# ---------------------------------------------------------------------------------------------- finding blocks
def _is_residual(block: nn.Module) -> bool:
    """One tensor input, and an add of two tensors that both depend on it (fx trace of the block alone)."""
    if not any(isinstance(m, _CONV) or linear_like(m) for m in block.modules()):
        return False
    try:
        graph = trace(block).graph
    except NotTraceableError:
        return False
    nodes = list(graph.nodes)
    if sum(n.op == "placeholder" for n in nodes) != 1:
        return False
    dep = set()
    for n in nodes:  # topological order: a node depends on the input when one of its inputs does
        if n.op == "placeholder" or any(a in dep for a in n.all_input_nodes):
            dep.add(n)
    return any(_is_add(n) and sum(a in dep for a in n.all_input_nodes) >= 2 for n in nodes)


def find_residual_blocks(model: nn.Module) -> List[str]:
    """Names of the residual blocks of a CNN (e.g. ``layer1.0`` ... of a torchvision ResNet): the children of
    ``nn.Sequential`` / ``nn.ModuleList`` containers that are residual (see the module docstring), outermost
    only, in definition order."""
    found: List[str] = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Sequential, nn.ModuleList)):
            continue
        for k, child in m.named_children():
            full = f"{name}.{k}" if name else k
            if not any(full.startswith(f + ".") for f in found) and _is_residual(child):
                found.append(full)
    return found


# ---------------------------------------------------------------------------------------------- probe + guard
@dataclass
class ResidualPlan:
    """The residual blocks as one forward of the dense model runs them.

    Attributes
    ----------
    order : list of str
        The blocks called exactly once, in call order.
    chained : list of bool
        Per block: its input is the previous block's output (its cached inputs are the previous outputs).
    estimate : int
        Bytes the reconstruction holds at once (see :func:`plan_residual`).
    per_block : dict
        Block -> its bytes in that estimate (without the model copy).
    """

    order: List[str]
    chained: List[bool]
    estimate: int = 0
    per_block: Dict[str, int] = field(default_factory=dict)


def _bytes(t) -> int:
    return t.nelement() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _probe(model: nn.Module, names: Sequence[str], batch, run) -> dict:
    """One forward of ``batch`` with hooks on the blocks and their leaf modules: call order, calls per block,
    whether a block's input is the previous block's output, input / output / inner activation bytes."""
    mods = dict(model.named_modules())
    seen: Dict[str, dict] = {}
    order: List[str] = []
    last = {"out": None}
    handles = []

    def pre(name, mod, args):
        rec = seen.setdefault(name, {"calls": 0, "inner": 0})
        rec["calls"] += 1
        rec["chained"] = bool(args) and last["out"] is not None and args[0] is last["out"]
        rec["in"] = _bytes(args[0]) if args else 0
        order.append(name)

    def post(name, mod, args, out):
        seen[name]["out"] = _bytes(block_output(out))
        last["out"] = block_output(out)

    def inner(name, mod, args, out):
        if name in seen:
            seen[name]["inner"] += _bytes(out)

    for n in names:
        handles.append(mods[n].register_forward_pre_hook(lambda m, a, n=n: pre(n, m, a)))
        handles.append(mods[n].register_forward_hook(lambda m, a, o, n=n: post(n, m, a, o)))
        for sub_name, sub in mods[n].named_modules():
            if sub_name and not any(True for _ in sub.children()):
                handles.append(sub.register_forward_hook(lambda m, a, o, n=n: inner(n, m, a, o)))
    try:
        with torch.no_grad():
            run(model, batch)
    finally:
        for h in handles:
            h.remove()
    return {"seen": seen, "order": list(dict.fromkeys(order))}


def plan_residual(model: nn.Module, names: Sequence[str], batch, run, opts: ReconstructOptions, *,
                  scale: float, per_sample: float, memory_limit, model_copy: int) -> ResidualPlan:
    """The blocks in call order and the memory guard of their reconstruction, from one forward of ``batch``
    (``scale``: calibration samples / the batch's; ``per_sample``: 1 / the batch's samples). At once, per block:
    the cached pruned and dense inputs, the dense outputs, the targets and the pruned outputs (about 2 inputs and
    3 outputs of the calibration set), a float32 training copy with gradients and two Adam moments, and the
    activations autograd keeps for one minibatch (every leaf module's outputs, twice).

    Raises
    ------
    MemoryLimitError
        The estimate (with ``model_copy``, the pruned model) exceeds ``memory_limit``; nothing has run but the
        probe's forward pass.
    """
    got = _probe(model, names, batch, run)
    seen = got["seen"]
    order = [n for n in got["order"] if seen[n]["calls"] == 1]  # a block run twice shares its weights: left alone
    mods = dict(model.named_modules())
    per_block = {}
    for n in order:
        s = seen[n]
        params = sum(p.numel() for p in mods[n].parameters())
        rows = min(opts.batch_size, max(1, round(scale / per_sample)))
        per_block[n] = int((2 * s["in"] + 3 * s["out"]) * scale + 16 * params + 2 * s["inner"] * per_sample * rows)
    est = model_copy + max(per_block.values(), default=0)
    limit = resolve_limit(memory_limit)
    if limit.bytes is not None and est > limit.bytes:
        raise MemoryLimitError(f"block reconstruction needs about {gib(est)} (the cached inputs and outputs of the "
                               f"largest residual block over the calibration set, its training copy and one "
                               f"minibatch) but the limit is {gib(limit.bytes)} ({limit.source}); use fewer "
                               "calibration batches, a smaller reconstruct batch_size or memory_limit=None")
    chained = [k > 0 and bool(seen[n].get("chained")) and order[k - 1] == got["order"][got["order"].index(n) - 1]
               for k, n in enumerate(order)]
    return ResidualPlan(order, chained, int(est), per_block)


# ---------------------------------------------------------------------------------------------- one block
class ResidualReconstructor(BlockReconstructor):
    """:class:`.reconstruct.BlockReconstructor` for residual CNN blocks: ``batch_size`` counts samples (images)
    per minibatch."""

    def per_step(self, targets: Sequence[torch.Tensor]) -> int:
        return self.opts.batch_size


def _block_members(block: str, report: PruneReport) -> Dict[str, List[str]]:
    """The modules inside ``block`` that the LS prune changed -> the report entries (producers) that did."""
    out: Dict[str, List[str]] = {}
    for r in report.pairs:
        if r.status != "pruned":
            continue
        for n in r.members:
            if n.startswith(block + "."):
                out.setdefault(n, []).append(r.producer)
    return out


def block_window(block: str, members: Dict[str, List[str]], modules: Dict[str, nn.Module], norms: bool
                 ) -> Window:
    """The block as one window: the weights and biases of its changed convolutions / linears and, with
    ``norms``, the affine parameters of its changed BatchNorms (module order)."""
    params: List[str] = []
    for n in [n for n in modules if n in members]:  # modules is in module order
        m = modules[n]
        if isinstance(m, _CONV) or linear_like(m) or (norms and isinstance(m, _BN) and m.affine):
            params += [f"{n}.{p}" for p, _ in m.named_parameters(recurse=False)]
    units = sorted({u for us in members.values() for u in us})
    return Window(block, None, params, units)


def kept_outputs(block: str, report: PruneReport, dense: int, pruned: int) -> Optional[torch.Tensor]:
    """The original indices of the channels the pruned block outputs (None: all ``dense`` of them): the kept
    channels of the coupled residual group one of the block's modules writes into.

    Raises
    ------
    LookupError
        No single coupled group of ``dense`` -> ``pruned`` channels is written inside the block.
    """
    if dense == pruned:
        return None
    kept = {tuple(r.kept) for r in report.pairs
            if r.writers and r.unit == 1 and not r.interleaved and r.status == "pruned"
            and r.channels_before == dense and r.channels_after == pruned
            and any(w.startswith(block + ".") for w in (*r.writers, *r.between))}
    if len(kept) != 1:
        raise LookupError(f"{len(kept)} coupled groups of {dense} -> {pruned} channels are written in block {block}")
    return torch.tensor(next(iter(kept)), dtype=torch.long)


# ---------------------------------------------------------------------------------------------- the pass
def _warn_skip(block: str, why: str) -> None:
    warnings.warn(f"block {block}: not reconstructed: {why}; the block keeps its LS weights", ReconstructionWarning,
                  stacklevel=3)


def _targets(block: str, dense_out: List[torch.Tensor], report: PruneReport, pruned_width: int
             ) -> Optional[List[torch.Tensor]]:
    """The dense outputs (B, C, ...) restricted to the kept output channels, or None (warned) when they cannot
    be matched."""
    try:
        kept = kept_outputs(block, report, int(dense_out[0].shape[1]), pruned_width)
    except LookupError as e:
        _warn_skip(block, f"its output channels could not be matched to the LS prune ({e})")
        return None
    return dense_out if kept is None else [o.index_select(1, kept.to(o.device)) for o in dense_out]


def reconstruct_residual(ref: nn.Module, pruned: nn.Module, report: PruneReport, batches: list, run, *,
                         plan: ResidualPlan, opts: ReconstructOptions, device, progress: bool, timer,
                         damping: float) -> List[WindowReport]:
    """Reconstructs every residual block of ``pruned`` that the LS prune changed, in forward order (the block's
    inputs on the pruned stream, ``batches`` on ``device``), then, when a block improved, re-fits the Linear
    heads after the blocks (:func:`refit_tail`); returns a :class:`WindowReport` per block and head."""
    ref_mods, pr_mods = dict(ref.named_modules()), dict(pruned.named_modules())
    recon = ResidualReconstructor(opts, ref_modules=ref_mods, pr_modules=pr_mods, block_units={}, blocks_name="",
                                  masks=[None] * len(batches), device=device, progress=progress, timer=timer)
    pr_calls: Optional[List[BlockCall]] = None
    dense_calls: Optional[List[BlockCall]] = None
    with timer("reconstruction"):
        for k, name in enumerate(plan.order):
            if not plan.chained[k] or pr_calls is None:
                pr_calls = capture_inputs(pruned, pr_mods[name], batches, run)
                dense_calls = capture_inputs(ref, ref_mods[name], batches, run)
            with torch.no_grad():
                dense_out = [run_block(ref_mods[name], c) for c in dense_calls]
            outs = _block(recon, name, report, pr_calls, dense_calls, dense_out, opts)
            if outs is None:
                with torch.no_grad():
                    outs = [run_block(pr_mods[name], c) for c in pr_calls]
            pr_calls = [c.with_hidden(o) for c, o in zip(pr_calls, outs)]
            dense_calls = [c.with_hidden(o) for c, o in zip(dense_calls, dense_out)]
    if any(r.status == "improved" for r in recon.reports):  # else the heads' inputs are the LS features still
        recon.reports += refit_tail(ref, pruned, report, batches, run, blocks=plan.order, damping=damping,
                                    timer=timer)
    return recon.reports


def _block(recon: ResidualReconstructor, name: str, report: PruneReport, pr_calls, dense_calls, dense_out,
           opts: ReconstructOptions) -> Optional[List[torch.Tensor]]:
    """Fits one block (if the LS prune changed it); returns its outputs with the kept weights, or None."""
    members = _block_members(name, report)
    if not members:
        return None
    win = block_window(name, members, recon.pr, opts.norms)
    if not win.params:
        return None
    pr_block = recon.pr[name]
    if opts.targets == "pruned_stream":
        if pr_calls[0].hidden.shape != dense_calls[0].hidden.shape:
            _warn_skip(name, "targets='pruned_stream' needs the block's input channels unpruned")
            return None
        targets = None  # the dense block on the pruned stream's inputs (BlockReconstructor)
    else:
        with torch.no_grad():
            width = int(run_block(pr_block, pr_calls[0]).shape[1])
        targets = _targets(name, dense_out, report, width)
        if targets is None:
            return None
    rep, outs = recon._window(name, win, pr_block, pr_calls, targets)
    recon.reports.append(rep)
    return outs


# ---------------------------------------------------------------------------------------------- the head
def _tail_linears(report: PruneReport, blocks: Sequence[str], modules: Dict[str, nn.Module]) -> List[str]:
    """Linear readers outside every block of a pruned entry written inside a reconstructed block (a ResNet's
    fc): their LS fit saw the LS features, which reconstruction changed."""
    inside = lambda n: any(n.startswith(b + ".") for b in blocks)  # noqa: E731
    out: List[str] = []
    for r in report.pairs:
        if r.status == "pruned" and any(inside(w) for w in (r.writers or [r.producer])):
            out += [c for c in (r.readers or [r.consumer]) if not inside(c) and isinstance(modules[c], nn.Linear)]
    return list(dict.fromkeys(out))


def _io(model: nn.Module, module: nn.Module, batches: list, run, what: str) -> torch.Tensor:
    """``module``'s inputs (``what="in"``) or outputs over every batch, rows (N, features) in float64 on the CPU."""
    got: List[torch.Tensor] = []

    def hook(mod, args, out):
        t = args[0] if what == "in" else out
        got.append(t.detach().reshape(-1, t.shape[-1]).to("cpu", torch.float64))

    h = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for b in batches:
                run(model, b)
    finally:
        h.remove()
    return torch.cat(got)


def refit_tail(ref: nn.Module, pruned: nn.Module, report: PruneReport, batches: list, run, *, blocks: Sequence[str],
               damping: float, timer) -> List[WindowReport]:
    """Re-fits the Linear heads after the reconstructed blocks by LS (ridge ``damping`` relative to the mean
    input energy, with an intercept) to the dense head's outputs on the reconstructed features; a fit is kept
    only when it lowers the head's calibration MSE. Returns a :class:`WindowReport` per head."""
    ref_mods, pr_mods = dict(ref.named_modules()), dict(pruned.named_modules())
    reports = []
    with timer("reconstruction"):
        for n in _tail_linears(report, blocks, pr_mods):
            t0 = time.perf_counter()
            lin = pr_mods[n]
            X, Y = _io(pruned, lin, batches, run, "in"), _io(ref, ref_mods[n], batches, run, "out")
            W0 = lin.weight.detach().to("cpu", torch.float64)
            b0 = lin.bias.detach().to("cpu", torch.float64) if lin.bias is not None else torch.zeros(W0.shape[0])
            before = float(((X @ W0.T + b0 - Y) ** 2).mean())
            icpt = lin.bias is not None  # a head without a bias is fitted without an intercept
            A = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1) if icpt else X
            G, D = A.T @ A, X.shape[1]
            G[:D, :D] += damping * float(torch.diagonal(G)[:D].mean()) * torch.eye(D, dtype=G.dtype)
            sol = torch.linalg.solve(G, A.T @ Y)  # (D [+ 1], m)
            after = float(((A @ sol - Y) ** 2).mean())
            rep = WindowReport(block=n, window=n, units=[], params=int(sol.numel()), loss_before=before,
                               loss_after=before, target_energy=float((Y ** 2).mean()))
            if math.isfinite(after) and after < before:
                values = {"weight": sol[:D].T, **({"bias": sol[D]} if icpt else {})}
                install(lin, values)
                rep.loss_after, rep.status = after, "improved"
            rep.time_s = time.perf_counter() - t0
            reports.append(rep)
    return reports
