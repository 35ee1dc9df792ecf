"""The hooks strategy: explicitly named pairs on models torch.fx cannot trace.

Module hooks capture a consumer's input (in the model being pruned) and its output
(in the original model); a forward is stopped as soon as the consumer has run. A
probe pass on the first batch checks that every named module runs once, in order,
and that the consumer's input channels map one-to-one onto the producer's output
channels: shapes must agree, and perturbing a random half of the producer's
channels may change only the matching consumer input channels.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

import lsprune

from .batches import forward_error, make_mask, to_device
from .flops import record_positions
from .pairs import Pair, is_depthwise, producer_channels
from .pruning import PairJob, Timer, accumulate


class _Stop(BaseException):
    """Ends a forward early once the needed activation is captured (BaseException so that user code's
    ``except Exception`` does not swallow it)."""


class _HookError(BaseException):
    """Carries an error of lsprune's own statistics hook through the user's forward, so that it is not
    reported as a batch that does not fit the model."""

    def __init__(self, exc: Exception):
        super().__init__()
        self.exc = exc


@dataclass
class Probe:
    """What the probe pass learned about one explicit pair."""

    pair: Pair
    order: int  # position of the consumer call in the forward
    channels: int
    group_size: int
    x0: torch.Tensor  # consumer input on the first batch (reference for the perturbation check)


def _refuse(pair: Pair, msg: str, error=ValueError) -> ValueError:
    return error(f"pair {pair.producer} -> {pair.consumer}: {msg}")


def probe(ref: nn.Module, pairs: List[Pair], batch, run: Callable, positions: Dict[str, float]) -> List[Probe]:
    """One forward of ``ref`` on ``batch`` with hooks; validates the pairs. Returns probes in forward order."""
    modules = dict(ref.named_modules())
    named = {n for p in pairs for n in (p.producer, p.consumer, *p.between)}
    leaves = {n: m for n, m in modules.items() if n and (not any(True for _ in m.children()) or n in named)}
    rec = _record(ref, leaves, {p.consumer for p in pairs}, batch, run, positions)
    probes = []
    for p in pairs:
        t_prod, t_cons = _check_order(p, rec)
        prod, cons = modules[p.producer], modules[p.consumer]
        C = producer_channels(prod)
        ps = rec.out_shape.get(p.producer)
        cd = 1 if isinstance(prod, nn.Conv2d) else -1
        if ps is None or ps[cd] != C:
            raise _refuse(p, f"the producer's output {ps} does not hold its {C} channels in dim {cd}")
        _check_unlisted(p, leaves, named, rec, t_prod, t_cons, C)
        xs = rec.x_in.get(p.consumer)
        if xs is None:
            raise _refuse(p, "the consumer is not called with a tensor input")
        g = _group_size(p, prod, cons, tuple(xs.shape), ps, C)
        probes.append(Probe(Pair(p.producer, p.consumer, p.between, g, p.via), t_cons, C, g, xs))
    probes.sort(key=lambda q: q.order)
    return probes


@dataclass
class _Recording:
    """The probe forward: each leaf's start and end ticks, output shapes, and the consumers' inputs."""

    start: Dict[str, List[int]]
    end: Dict[str, List[int]]
    out_shape: Dict[str, tuple]
    x_in: Dict[str, torch.Tensor]


def _record(ref: nn.Module, leaves, consumers, batch, run: Callable, positions) -> _Recording:
    rec = _Recording(defaultdict(list), defaultdict(list), {}, {})
    seq = [0]

    def pre(name):
        def hook(mod, args):
            seq[0] += 1
            rec.start[name].append(seq[0])
            if name in consumers and args and isinstance(args[0], torch.Tensor):
                rec.x_in[name] = args[0].detach().clone()
        return hook

    def post(name):
        def hook(mod, args, output):
            seq[0] += 1
            rec.end[name].append(seq[0])
            if isinstance(output, torch.Tensor):
                rec.out_shape[name] = tuple(output.shape)
        return hook

    handles = []
    for n, m in leaves.items():
        handles.append(m.register_forward_pre_hook(pre(n)))
        handles.append(m.register_forward_hook(post(n)))
    try:
        with record_positions(ref, positions):
            run(ref, batch)
    except Exception as e:
        raise forward_error(e, 0) from e
    finally:
        for h in handles:
            h.remove()
    return rec


def _check_order(p: Pair, rec: _Recording):
    """Every module of the pair runs once, the ``between`` ones between producer and consumer; returns the
    producer's end and the consumer's start ticks."""
    for n in (p.producer, p.consumer, *p.between):
        if len(rec.start[n]) != 1:
            raise _refuse(p, f"module {n!r} runs {len(rec.start[n])} times per forward; only modules that run "
                             "exactly once can be pruned")
    t_prod, t_cons = rec.end[p.producer][0], rec.start[p.consumer][0]
    if t_prod > t_cons:
        raise _refuse(p, "the consumer runs before the producer")
    for b in p.between:
        if not (t_prod < rec.start[b][0] and rec.end[b][0] < t_cons):
            raise _refuse(p, f"{b!r} does not run between the producer and the consumer")
    return t_prod, t_cons


def _check_unlisted(p: Pair, leaves, named, rec: _Recording, t_prod: int, t_cons: int, C: int) -> None:
    """A module with per-channel state for these C channels, running in between but not listed, would break."""
    for n, m in leaves.items():
        if n in named or not rec.end[n] or not any(t_prod < t < t_cons for t in rec.end[n]):
            continue
        if _per_channel(m, C):
            raise _refuse(p, f"{n!r} ({type(m).__name__}) runs between producer and consumer and holds "
                             f"per-channel state for {C} channels: list it in between= (it then loses the "
                             "same channels), or leave the pair out if it is not on the channel path")


def _group_size(p: Pair, prod: nn.Module, cons: nn.Module, xs_shape: tuple, ps, C: int) -> int:
    """Consumer input columns per producer channel, or a refusal when they do not map one-to-one."""
    if isinstance(cons, nn.Conv2d):
        if not isinstance(prod, nn.Conv2d) or len(xs_shape) != 4 or xs_shape[1] != C:
            raise _refuse(p, f"the consumer's input {xs_shape} does not map one-to-one onto the producer's "
                             f"output {ps} ({C} channels)")
        return cons.kernel_size[0] * cons.kernel_size[1]
    D = cons.in_features
    if D == C and (isinstance(prod, nn.Linear) or len(xs_shape) == 2):
        return 1
    if isinstance(prod, nn.Conv2d) and len(xs_shape) == 2 and D % C == 0 and D > C:
        return D // C
    raise _refuse(p, f"the consumer's input {xs_shape} does not map one-to-one onto the producer's "
                     f"output {ps} ({C} channels)")


def _per_channel(m: nn.Module, C: int) -> bool:
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return m.num_features == C
    if isinstance(m, nn.PReLU):
        return m.weight.numel() == C and C > 1
    if isinstance(m, nn.Conv2d) and is_depthwise(m):
        return m.in_channels == C
    return False


def run_until(model: nn.Module, module: nn.Module, run: Callable, batch, what: str,
              perturb: Optional[Callable] = None) -> torch.Tensor:
    """Runs ``run(model, batch)`` until ``module`` has its input (``what="input"``) or output
    (``"output"``); returns it. ``perturb`` (module, output) -> output may modify another module's output."""
    box = {}

    def pre(mod, args):
        box["v"] = args[0]
        raise _Stop

    def post(mod, args, output):
        box["v"] = output
        raise _Stop

    h = module.register_forward_pre_hook(pre) if what == "input" else module.register_forward_hook(post)
    try:
        run(model, batch)
    except _Stop:
        pass
    finally:
        h.remove()
    if "v" not in box:
        raise ValueError("the forward finished without calling the consumer")
    return box["v"]


def check_mapping(ref: nn.Module, q: Probe, batch, run: Callable, seed: int) -> None:
    """Perturbs a random half of the producer's channels and checks that only the matching
    consumer input channels change."""
    modules = dict(ref.named_modules())
    p, C, g = q.pair, q.channels, q.group_size
    prod, cons = modules[p.producer], modules[p.consumer]
    gen = torch.Generator().manual_seed(seed)
    sel = torch.zeros(C, dtype=torch.bool)
    sel[torch.randperm(C, generator=gen)[: max(1, C // 2)]] = True

    def bump(mod, args, out):
        s = sel.to(out.device)
        if isinstance(mod, nn.Conv2d):
            s = s.view(1, C, *([1] * (out.ndim - 2)))
        d = 1.0 + float(out.detach().abs().max())
        return out + d * s.to(out.dtype)

    h = prod.register_forward_hook(bump)
    try:
        x1 = run_until(ref, cons, run, batch, "input")
    finally:
        h.remove()
    x0 = q.x0
    if not bool(torch.isfinite(x0).all()):  # NaN would look like a changed channel: say what is wrong instead
        raise _refuse(p, "the calibration activations contain NaN or Inf (batch 0, at the consumer's input); "
                         "check the calibration data and the model's weights", lsprune.NonFiniteInputError)
    tol = 1e-6 * (float(x0.abs().max()) + 1.0)
    diff = ~((x1 - x0).abs() <= tol)  # NaN counts as changed
    if isinstance(cons, nn.Conv2d):
        changed = diff.transpose(0, 1).reshape(C, -1).any(1)
    else:
        changed = diff.reshape(-1, C * g).any(0).reshape(C, g).any(1)
    changed = changed.cpu()
    if not changed.any():
        raise _refuse(p, "perturbing the producer's output does not change the consumer's input: the consumer "
                         "does not read the producer's channels")
    if (changed & ~sel).any():
        bad = torch.nonzero(changed & ~sel).flatten()[:8].tolist()
        raise _refuse(p, "the consumer's input channels do not map one-to-one onto the producer's output "
                         f"channels: perturbing producer channels changed consumer input channels {bad} ... as "
                         "well (something between them mixes channels, e.g. a LayerNorm, attention or a reshape)")


def run_hooks(ref: nn.Module, pruned: nn.Module, batches: list, device, run: Callable, mask_fn, jobs: List[PairJob],
              *, sequential: bool, complete: Callable[[PairJob], object], progress: bool, timer: Timer,
              collect_only: bool = False) -> float:
    """Streams every pair's rows with module hooks; ``complete(job)`` (e.g. :func:`.pruning.finish`) prunes
    ``pruned`` once a pair's statistics are complete: pair by pair (sequential) or after one pass
    (independent). Returns the forward passes spent (an early-stopped pass counts as a full one).
    ``collect_only`` (independent mode): only accumulate the statistics, complete no pair."""
    ref_mods, pr_mods = dict(ref.named_modules()), dict(pruned.named_modules())
    passes = 0.0
    pair_bar = tqdm(total=len(jobs), desc="lsprune pairs", unit="pair", disable=not progress, leave=False)
    try:
        if not sequential:
            handles = []
            cur = {}

            def make(job):
                def hook(mod, args):
                    try:
                        accumulate(job, args[0], None, cur["mask"], timer, cur["batch"])
                    except Exception as e:
                        raise _HookError(e) from None
                return hook

            for job in jobs:
                handles.append(ref_mods[job.pair.consumer].register_forward_pre_hook(make(job)))
            try:
                for b, batch in enumerate(tqdm(batches, desc="lsprune batches", unit="batch", disable=not progress,
                                               leave=False)):
                    if all(job.skips(b) for job in jobs):  # a checkpoint holds this batch for every pair
                        continue
                    batch = to_device(batch, device)
                    cur["mask"], cur["batch"] = make_mask(mask_fn, batch, device), b
                    with timer("forward"):
                        try:
                            run(ref, batch)
                        except _HookError as h:
                            raise h.exc
                        except Exception as e:
                            raise forward_error(e, b) from e
            finally:
                for h in handles:
                    h.remove()
            passes += 1.0
            for job in ([] if collect_only else jobs):
                if job.lean:  # its input again (targets: the consumer's own map), one more pass
                    job.source = _source(ref, ref, ref_mods, batches, device, run, mask_fn, job, timer, False)
                    passes += 1.0
                complete(job)
                pair_bar.update(1)
            return passes
        for job in jobs:
            stream = _source(ref, pruned, pr_mods, batches, device, run, mask_fn, job, timer, True, progress)
            stream(lambda x, y, mask, b: accumulate(job, x, y, mask, timer, b), skip=job.skips)
            passes += 2.0 if job.saved is None else 0.0
            if job.lean:  # its rows again for the re-fit on the kept columns: two more passes
                job.source = stream
                passes += 2.0
            complete(job)
            pair_bar.update(1)
    finally:
        pair_bar.close()
    return passes


def _source(ref: nn.Module, pruned: nn.Module, pr_mods, batches: list, device, run: Callable, mask_fn,
            job: PairJob, timer: Timer, sequential: bool, progress: bool = False) -> Callable:
    """``stream(add, skip=None)`` calls ``add(x, y, mask, b)`` for every calibration batch ``b`` (not
    ``skip(b)``): ``x`` the consumer's input in ``pruned`` and ``y`` its output in ``ref`` (sequential), or
    ``x`` its input in ``ref`` and ``y = None`` (independent), each forward stopped at the consumer."""
    name = job.pair.consumer
    ref_mods = dict(ref.named_modules())

    def stream(add: Callable, skip: Optional[Callable] = None) -> None:
        for b, batch in enumerate(tqdm(batches, desc=f"lsprune {name}", unit="batch", disable=not progress,
                                       leave=False)):
            if skip is not None and skip(b):  # finished by an earlier run, or already in the resumed sums
                continue
            batch = to_device(batch, device)
            mask = make_mask(mask_fn, batch, device)
            with timer("forward"):
                y = None
                if sequential:
                    try:
                        y = run_until(ref, ref_mods[name], run, batch, "output")
                    except Exception as e:
                        raise forward_error(e, b) from e
                try:
                    x = run_until(pruned, pr_mods[name], run, batch, "input")
                except Exception as e:
                    raise (pruned_failure(e) if sequential else forward_error(e, b)) from e
            add(x, y, mask, b)

    return stream


def pruned_failure(e: BaseException) -> ValueError:
    return ValueError(f"the partly pruned model fails to run ({type(e).__name__}: {e}). A module holding per-channel "
                      "state between a producer and its consumer may be missing from between=, or a producer's "
                      "output has another user (e.g. a residual add) that cannot lose channels")
