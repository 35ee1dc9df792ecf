"""Per-pair work shared by the graph, hooks and blocks strategies: statistics, selection, surgery (the channel
plan is :mod:`.plan`)."""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import lsprune
from lsprune import _policy
from lsprune._policy import MIN_ROWS_PER_COLUMN, UNDERDETERMINED_DAMPING  # noqa: F401  (re-exported)

from . import budget as budgeting
from .accumulate import Sums, iter_rows
from .baselines import (compensated_error, flap_bias, flap_order, magnitude_order, naive_greedy, no_refit_error,
                        random_order, wanda_sp_order)
from .checkpoint import Checkpoint
from .distributed import Dist
from .pairs import Pair
from .report import PairReport
from .layouts import Unit, shrink_unit, unit_magnitude_order
from .surgery import (consumer_matrix, linear_like, set_bias, set_consumer, shrink_channels, shrink_in, shrink_out,
                      weight_rows)

logger = logging.getLogger("lsprune.torch")


# ---------------------------------------------------------------------------------------------- selection
#: Largest group (columns per channel) the CUDA engine's kernels take.
CUDA_MAX_GROUP = 49


def _engine_select(stats, n_keep, *, method, group_size, damping, weights_in=None, bias_in=None, job=None,
                   refine=None):
    # the solver runs where the calibration ran when the CUDA engine is there (the CUDA backward solver has
    # no time limit: a time-limited backward runs on the CPU)
    dev = job.sums.engine_dev if job is not None and group_size <= CUDA_MAX_GROUP else None
    limit = job.time_budget if job is not None else None
    if limit is not None and method == "backward":
        dev = None
    return lsprune.select(stats, n_keep=n_keep, group_size=group_size, method=method, damping=damping,
                          weights_in=weights_in, bias_in=bias_in, device=dev or "cpu", refine=refine,
                          time_limit=limit)


@contextmanager
def log_engine_warnings(name: str, what: str = "pair"):
    """Engine RuntimeWarnings (dead channels, raised damping) become log messages naming the pair (or the
    layer: ``what``)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        yield
    for w in caught:
        if issubclass(w.category, RuntimeWarning):
            # dead channels (never selectable) are normal after ReLUs; a partial result or raised damping is not
            level = logging.INFO if issubclass(w.category, lsprune.DegenerateGroupWarning) else logging.WARNING
            logger.log(level, "%s %s: %s", what, name, w.message)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


_log_engine_warnings = log_engine_warnings  # the former name


def _order_select(stats, n_keep, *, method, group_size, damping, weights_in=None, bias_in=None, job=None):
    """Keeps the first ``n_keep`` channels of a baseline's ranking and re-fits the consumer on them."""
    order = job_order(job, method, stats)
    sel = lsprune.refit(stats, np.sort(order[:n_keep]), group_size=group_size, damping=damping,
                        weights_in=weights_in, bias_in=bias_in)
    return dataclasses.replace(sel, method=method)


def _thinet_select(stats, n_keep, *, group_size, damping, weights_in=None, bias_in=None, job=None):
    """Naive greedy (re-solves per candidate), then the LS re-fit on its choice."""
    chosen, path = naive_greedy(stats, n_keep, group_size=group_size, damping=damping, weights_in=weights_in)
    sel = lsprune.refit(stats, np.sort(chosen), group_size=group_size, damping=damping, weights_in=weights_in,
                        bias_in=bias_in)
    rel = path / sel.target_energy if sel.target_energy > 0 else np.zeros_like(path)
    return dataclasses.replace(sel, method="thinet", selected=chosen, error_path=path, relative_error_path=rel,
                               n_kept_path=np.arange(path.size, dtype=np.int64))


def job_order(job: "PairJob", method: str, stats: Optional[lsprune.Statistics] = None) -> np.ndarray:
    """The channel ranking of an order-based baseline for a pair: from the original producer (magnitude),
    seeded (random), or from the consumer's original weights and the input statistics (Wanda-sp, FLAP)."""
    if method in STATS_ORDER_METHODS:
        W, _ = target_matrix(job)
        if method == "wanda_sp":
            return wanda_sp_order(stats, W, job.group_size, norm=job.norm)
        # FLAP's reference implementation squares the per-column metric of attention heads
        return flap_order(stats, W, job.group_size, power=2 if job.unit is not None and job.unit.kind == "heads"
                          else 1)
    if method == "magnitude":
        if job.unit is not None:
            return unit_magnitude_order(job.extra["ref_modules"], job.unit, job.norm)
        return magnitude_order(job.ref_producer, job.norm)
    return random_order(job.channels, job.seed, job.index)


# The channel-choosing step: name -> callable(stats, n_keep, *, group_size, damping, weights_in, bias_in, job)
# returning an lsprune.Selection (the kept channels and the LS re-fit on them). Internal extension point.
SELECTORS: Dict[str, Callable] = {m: functools.partial(_engine_select, method=m) for m in lsprune.METHODS}
SELECTORS["magnitude"] = functools.partial(_order_select, method="magnitude")
SELECTORS["random"] = functools.partial(_order_select, method="random")
SELECTORS["thinet"] = _thinet_select
SELECTORS["wanda_sp"] = functools.partial(_order_select, method="wanda_sp")
SELECTORS["flap"] = functools.partial(_order_select, method="flap")
#: Methods whose selection ``prune(time_budget=)`` can stop (the engine's greedy solvers).
TIME_LIMITED = tuple(lsprune.METHODS)
#: Rankings computed from the consumer's input statistics and original weights.
STATS_ORDER_METHODS = ("wanda_sp", "flap")
#: Methods whose choice is a fixed channel ranking (the budget's error path follows that ranking).
ORDER_METHODS = ("magnitude", "random") + STATS_ORDER_METHODS


def effective_damping(job: "PairJob", n_rows: int, damping: float) -> float:
    """The damping used for a pair: :func:`lsprune._policy.underdetermined_damping` of its kept
    input columns (``n_keep * group_size``), logged when raised; the report records each pair's damping."""
    cols = job.n_keep * job.group_size + job.fixed_columns
    used = _policy.underdetermined_damping(n_rows, cols, damping)
    if used != damping:
        logger.warning("pair %s: %d calibration rows for %d kept input columns: the LS fit is underdetermined; "
                       "damping raised from %g to %g for this pair (more calibration data avoids this)", job.name,
                       n_rows, cols, damping, used)
    return used


# ---------------------------------------------------------------------------------------------- timing
class Timer:
    """Accumulates wall time per category."""

    def __init__(self):
        self.totals: Dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, what: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.totals[what] += time.perf_counter() - t


# ---------------------------------------------------------------------------------------------- one pair
@dataclass
class PairJob:
    """State of one pair being pruned. Modules: ``ref_*`` in the original network (targets),
    the others in the model being pruned."""

    index: int
    pair: Pair
    channels: int
    n_keep: int
    group_size: int
    ref_consumer: nn.Module
    producer: nn.Module
    between: List[nn.Module]
    consumer: nn.Module
    independent: bool
    sums: Sums
    generator: torch.Generator
    max_positions: Optional[int] = None
    seconds: float = 0.0
    report: Optional[PairReport] = None
    extra: dict = field(default_factory=dict)
    ref_producer: Optional[nn.Module] = None
    refit: bool = True
    norm: str = "l1"
    seed: int = 0
    dist: Optional[Dist] = None
    ckpt: Optional[Checkpoint] = None
    stage: str = "prune"  # checkpoint stage: "prune", or "budget" (a global budget's independent pass)
    start_batch: int = 0  # batches already in the sums (a resumed partial pair)
    restore: Optional[dict] = None  # checkpoint entry of partial sums not loaded yet
    saved: Optional[dict] = None  # checkpoint entry of a pair finished by an earlier run
    unit: Optional[Unit] = None  # a transformer unit (heads, MLP neurons): its own producer surgery
    what: str = "pair"  # how messages name the job: "pair" (producer -> consumer) or "layer" (factorize)
    # the prune's registry {module: output rows it still has, original numbering}: a consumer whose rows a
    # coupled group removed reproduces only those rows (None: no registry, every row stays)
    rows: Optional[Dict[str, np.ndarray]] = None
    group: Optional[object] = None  # the GroupJob this job is a reader of (None: a pair)
    # the prune's registry {module: original inputs (weight dim 1) / channels it still has}, kept by concat groups;
    # a reader measured on the pruned network has sums over those inputs only (``measured``; None: all)
    inputs: Optional[Dict[str, np.ndarray]] = None
    measured: Optional[np.ndarray] = None
    fixed_columns: int = 0  # a concat reader's columns of the other slices, always kept (the damping rule)
    lean: bool = False  # lean statistics: `sums` are channel-level; the kept columns are streamed again
    own_pass: bool = False  # pruned in a pass of its own (the memory guard's decision; the report says so)
    time_budget: Optional[float] = None  # seconds of selection (prune(time_budget=))
    # lean jobs: source(add) calls add(x, y or None, mask, batch) for every batch of the consumer's input again;
    # set by the executor before the job is completed
    source: Optional[Callable] = None

    @property
    def key(self) -> str:
        return f"{self.stage}:{self.pair.producer}"

    @property
    def stem(self) -> str:
        return f"{self.stage}-{self.index:03d}"

    def attach(self, stage: str) -> None:
        """Looks the pair up in the checkpoint for ``stage``: finished (``saved``) or partial (``restore``)."""
        self.stage = stage
        self.saved = self.restore = None
        self.start_batch = 0
        if self.ckpt is not None:
            self.saved = self.ckpt.done(self.key)
            self.restore = None if self.saved is not None else self.ckpt.partial(self.key)
            if self.restore is not None:
                self.start_batch = int(self.restore["batches"])

    def reuse_for_pruning(self) -> None:
        """A job of the budget's independent pass prunes its pair too (independent mode): its statistics
        are complete, in memory or (finished by an earlier run) in the checkpoint."""
        budget_entry = self.saved
        self.stage = "prune"
        self.saved = self.ckpt.done(self.key) if self.ckpt is not None else None
        if self.saved is None and budget_entry is not None:
            self.restore = budget_entry

    def skips(self, batch: int) -> bool:
        """Whether batch ``batch`` adds nothing (the pair is finished, or the batch is already in its sums)."""
        return self.saved is not None or batch < self.start_batch

    @property
    def name(self) -> str:
        return f"{self.pair.producer} -> {self.pair.consumer}"

    @property
    def label(self) -> str:
        """The job in messages: ``pair P -> C``, or ``layer L`` for a factorized layer (producer = consumer)."""
        return f"layer {self.pair.consumer}" if self.what == "layer" else f"pair {self.name}"

    @property
    def modules(self) -> List[nn.Module]:
        return [self.producer, *self.between, self.consumer]

    @property
    def out_rows(self) -> Optional[np.ndarray]:
        """The consumer's remaining output rows (original numbering), or None when it has all of them."""
        return self.rows.get(self.pair.consumer) if self.rows is not None else None


def target_matrix(job: PairJob):
    """The original consumer's weights (m, D) and bias (m,) as float64 NumPy, restricted to the output
    rows the consumer still has: the map its re-fit reproduces (independent targets, no-re-fit errors)."""
    W, b = consumer_matrix(job.ref_consumer)
    rows = job.out_rows
    return (W, b) if rows is None else (W[rows], b[rows])


def consumer_width(module: nn.Module) -> int:
    """D: consumer input columns (C_in*kh*kw for Conv2d)."""
    if isinstance(module, nn.Conv2d):
        return module.in_channels * module.kernel_size[0] * module.kernel_size[1]
    return weight_rows(module, out=False) if linear_like(module) else module.in_features


#: Position subsampling never leaves a Conv2d consumer fewer than this many rows per input column
#: (when the calibration set has them).
MIN_ROWS_PER_FEATURE = 8


def positions_cap(max_positions: Optional[int], n_features: int, n_samples: int) -> Optional[int]:
    """Output positions per sample streamed for a Conv2d consumer: ``max_positions``, raised so that
    the calibration set yields at least ``MIN_ROWS_PER_FEATURE * n_features`` rows; None = all."""
    if max_positions is None:
        return None
    return max(int(max_positions), -(-MIN_ROWS_PER_FEATURE * n_features // max(1, n_samples)))


def make_job(index: int, pair: Pair, channels: int, n_keep: int, ref_modules, pruned_modules, *, device,
             independent: bool, use_torch_sums: Optional[bool], seed: int, max_positions: Optional[int] = None,
             n_samples: int = 1, refit: bool = True, norm: str = "l1", dist: Optional[Dist] = None,
             ckpt: Optional[Checkpoint] = None, stage: str = "prune", lean: bool = False, own_pass: bool = False,
             time_budget: Optional[float] = None) -> PairJob:
    """The job of one pair; ``lean``: its sums are channel-level, ``C`` columns with the consumer's outputs as
    targets (also in independent mode), see :func:`accumulate`."""
    ref_consumer = ref_modules[pair.consumer]
    D = consumer_width(ref_consumer)
    m_out = weight_rows(ref_consumer) if linear_like(ref_consumer) else ref_consumer.weight.shape[0]
    m = m_out if lean or not independent else 0
    g = D // channels
    job = PairJob(index, pair, channels, n_keep, g, ref_consumer, pruned_modules[pair.producer],
                  [pruned_modules[b] for b in pair.between], pruned_modules[pair.consumer], independent,
                  Sums(channels if lean else D, m, device, use_torch_sums, dist=dist), _generator(seed, index),
                  positions_cap(max_positions, D, n_samples), ref_producer=ref_modules[pair.producer],
                  refit=bool(refit), norm=norm, seed=int(seed), dist=dist, ckpt=ckpt, lean=bool(lean),
                  own_pass=bool(own_pass), time_budget=time_budget)
    job.attach(stage)
    return job


def _generator(seed: int, index: int) -> torch.Generator:
    """The position sampler of pair ``index`` (the same draws for the same seed)."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + index)


def _resume(job: PairJob) -> None:
    """Loads a resumed pair's partial sums and sampler state (lazily: the sums are only alive while used)."""
    if job.restore is not None:
        job.sums.restore(job.ckpt.load_statistics(job.restore))
        if "generator" in job.restore:
            job.generator.set_state(job.ckpt.generator_state(job.restore))
        job.restore = None


def accumulate(job: PairJob, x: torch.Tensor, y: Optional[torch.Tensor], mask, timer: Timer, batch: int = 0):
    """Streams batch number ``batch`` of consumer input ``x`` (and original output ``y``) into the pair's
    sums (nothing for a batch a checkpoint already holds); writes a partial checkpoint when due."""
    if job.skips(batch):
        return
    t = time.perf_counter()
    with timer("statistics"):
        _measured_inputs(job)
        y = _kept_targets(job, y)
        _resume(job)
        try:
            for xr, yr, wr in _rows(job, x, y, mask, job.generator):
                job.sums.add(_pooled(xr, job.channels) if job.lean else xr, yr, wr)
        except lsprune.NonFiniteInputError as e:
            raise _nan_error(job, e) from None
        if job.ckpt is not None and job.ckpt.want_partial(job.key, job.sums.pending_rows):
            job.ckpt.save_partial(job.key, job.stem, job.sums.snapshot(), batch + 1, job.generator)
    job.seconds += time.perf_counter() - t


def _measured_inputs(job: PairJob) -> None:
    """A concatenation's reader measured on the pruned network (sequential) reads only the inputs the registry
    says it still has (other slices were pruned before): its sums get that many columns."""
    if job.inputs is None or job.independent or job.measured is not None:
        return
    cur = job.inputs.get(job.pair.consumer)
    if cur is None:
        return
    job.measured = np.asarray(cur, dtype=np.int64)
    unit = job.ref_consumer.kernel_size[0] * job.ref_consumer.kernel_size[1] \
        if isinstance(job.ref_consumer, nn.Conv2d) else 1
    if job.sums.D != job.measured.size * unit:
        job.sums = job.sums.with_targets(job.sums.m, job.measured.size * unit)


def _kept_targets(job: PairJob, y: Optional[torch.Tensor], sums=None) -> Optional[torch.Tensor]:
    """The original outputs of the rows the consumer still has (all of them unless a coupled group removed
    rows of a consumer that writes into it); the sums (the job's, or lean re-fit's ``sums``) take that many
    targets."""
    rows = job.out_rows
    if rows is None or y is None or job.independent:
        return y
    if sums is None and job.sums.m != rows.size:
        job.sums = job.sums.with_targets(int(rows.size))
    dim = 1 if isinstance(job.ref_consumer, nn.Conv2d) else y.ndim - 1
    return y.index_select(dim, torch.as_tensor(rows, dtype=torch.long, device=y.device))


def _rows(job: PairJob, x: torch.Tensor, y: Optional[torch.Tensor], mask, generator):
    """The consumer's row chunks of one batch (:func:`.accumulate.iter_rows`); lean jobs always have targets:
    without the original output (independent hooks), the consumer's own map of its input rows."""
    keep_y = None if job.independent and not job.lean else y
    for xr, yr, wr in iter_rows(job.ref_consumer, job.pair.consumer, x, keep_y, mask=mask,
                                max_positions=job.max_positions, generator=generator):
        if job.lean and yr is None:
            W = job.ref_consumer.weight.detach().reshape(job.ref_consumer.weight.shape[0], -1)
            b = job.ref_consumer.bias
            yr = F.linear(xr, W.to(xr.dtype), b.detach().to(xr.dtype) if b is not None else None)
        yield xr, yr, wr


def _pooled(xr: torch.Tensor, channels: int) -> torch.Tensor:
    """Channel-level rows (n, C) of consumer rows (n, C·g): each channel's g columns summed (in float32 at
    least), docs/design.md, "Lean statistics"."""
    dt = torch.float32 if xr.dtype in (torch.float16, torch.bfloat16) else xr.dtype
    return xr.reshape(xr.shape[0], channels, -1).sum(-1, dtype=dt)


def _nan_error(job: PairJob, e: Exception) -> lsprune.NonFiniteInputError:
    return lsprune.NonFiniteInputError(f"{job.label}: the calibration activations contain NaN or Inf ({e}); "
                                       "check the calibration data and the model's weights")


def job_statistics(job: PairJob) -> lsprune.Statistics:
    """The pair's complete statistics (summed over the ranks when distributed)."""
    _resume(job)
    try:
        return job.sums.statistics()
    except lsprune.NonFiniteInputError as e:  # the torch device sums find NaN/Inf only here
        raise _nan_error(job, e) from None


def finish(job: PairJob, *, method: str, damping: float, timer: Timer, refine=None) -> PairReport:
    """Selects the kept channels (LS methods: swap-refined with ``refine``), re-fits the consumer and shrinks
    the modules; returns the pair's report."""
    if job.saved is not None:
        return _apply_saved(job, timer)
    t = time.perf_counter()
    with timer("selection"):
        stats = job_statistics(job)
        if stats.count == 0:
            raise ValueError(f"{job.label}: no calibration rows reached the statistics (does the mask "
                             "exclude every position?)")
        damping = effective_damping(job, stats.count, damping)
        sel = _choose(job, stats, method, damping, refine)
    if job.lean:  # the exact re-fit on the kept columns, from a second streaming of the consumer's input
        sel = _lean_refit(job, sel, damping, timer)
        job.source = None  # it holds the executor's cached inputs
    kept = np.asarray(sel.kept, dtype=np.int64)
    if job.refit:
        plain = sel.plain_error
    else:  # the consumer keeps its original weights on the kept channels (and its original bias)
        plain, new_bias = _kept_weights_error(job, stats, kept, method)
    with timer("surgery"):
        shrink_producers(job, kept)
        if job.refit:
            added = set_consumer(job.consumer, sel.weights, sel.bias, int(kept.size), kept=kept,
                                 group=job.group_size)
        else:
            shrink_in(job.consumer, kept, job.group_size)
            added = set_bias(job.consumer, new_bias) if new_bias is not None else False
        if job.dist is not None:
            job.dist.sync_modules(job.modules, kept.tolist(), job.name)
    job.seconds += time.perf_counter() - t
    job.report = _pair_report(job, sel, kept, plain, added, stats, method)
    if job.ckpt is not None:
        arrays = {"kept": kept}
        if job.refit:
            arrays.update(weights=np.asarray(sel.weights), bias=np.asarray(sel.bias))
        job.ckpt.save_done(job.key, job.stem, stats, arrays, {"report": dataclasses.asdict(job.report)})
    job.sums.release()
    return job.report


def _choose(job: PairJob, stats: lsprune.Statistics, method: str, damping: float, refine=None) -> lsprune.Selection:
    """The method's kept channels (LS methods: swap-refined with ``refine``) and the LS re-fit on them (lean jobs:
    on the channel-level statistics, each channel one column); fills up an early stop, falls back for (nearly)
    constant inputs."""
    g = 1 if job.lean else job.group_size
    kw = dict(group_size=g, damping=damping, job=job)
    if refine:  # options allow it with the LS methods only
        kw["refine"] = refine
    if job.independent and not job.lean:
        W, b = target_matrix(job)
        kw.update(weights_in=W, bias_in=b)
    try:
        with log_engine_warnings(job.name):
            sel = SELECTORS[method](stats, job.n_keep, **kw)
            if sel.kept.size < job.n_keep:
                sel = _fill_up(stats, sel, job, damping, g)
    except lsprune.NumericalError as e:  # singular even at the largest damping: (nearly) constant inputs
        if job.lean:  # the re-fit on the kept columns decides what is left to fit
            return _by_variance(stats, job, 1, np.zeros(0, dtype=np.int64), e)
        sel = _constant_inputs(stats, job, damping, e)
    except Exception as e:
        if hasattr(e, "add_note"):
            e.add_note(f"while selecting the channels of pair {job.name}")
        raise
    if sel.timed_out:
        logger.info("pair %s: the time budget (%gs) stopped the selection after %d of %d channels; the other %d "
                    "were added by their current gains and the kept set re-fitted", job.name, job.time_budget,
                    sel.kept.size - sel.filled.size, job.n_keep, sel.filled.size)
    return sel


def _lean_refit(job: PairJob, choice: lsprune.Selection, damping: float, timer: Timer) -> lsprune.Selection:
    """Lean statistics, second step: streams the kept channels' columns again (the same rows: the position
    sampler restarts from its seed) and re-fits the consumer on them exactly. The result keeps the choice's
    order and (channel-level) error path."""
    if job.source is None:
        raise RuntimeError(f"internal: lean pair {job.name} finished without a way to stream its input again")
    g = job.group_size
    kept = np.asarray(choice.kept, dtype=np.int64)
    cols = (kept[:, None] * g + np.arange(g)).reshape(-1)
    with timer("statistics"):
        m = job.sums.m if job.out_rows is None or job.independent else int(job.out_rows.size)
        sums = Sums(cols.size, m, job.sums.device, None if job.sums.engine_dev else job.sums.use_torch,
                    dist=job.sums.dist)
        gen, idx = _generator(job.seed, job.index), torch.as_tensor(cols)

        def add(x, y, mask, batch):
            try:
                for xr, yr, wr in _rows(job, x, _kept_targets(job, y, sums), mask, gen):
                    sums.add(xr[:, idx.to(xr.device)], yr, wr)
            except lsprune.NonFiniteInputError as e:
                raise _nan_error(job, e) from None

        job.source(add)
        stats = sums.statistics()
    with timer("selection"), log_engine_warnings(job.name):
        try:
            fit = lsprune.refit(stats, np.arange(kept.size), group_size=g, damping=damping)
        except lsprune.NumericalError as e:  # constant inputs: the original weights on the kept columns
            logger.warning("pair %s: %s; keeping the original weights on the kept channels", job.name, e)
            W, b = target_matrix(job)
            Wk, b0 = W[:, cols], (b if job.ref_consumer.bias is not None else None)
            err = no_refit_error(stats, Wk, b0, np.arange(kept.size), g)
            fit = dataclasses.replace(choice, weights=Wk, bias=b if b0 is not None else np.zeros(W.shape[0]),
                                      error=err, plain_error=err, target_energy=float(stats.target_energy))
    return dataclasses.replace(fit, method=choice.method, selected=choice.selected, kept=kept, columns=cols,
                               error_path=choice.error_path, relative_error_path=choice.relative_error_path,
                               n_kept_path=choice.n_kept_path, timed_out=choice.timed_out, filled=choice.filled)


def _pair_report(job: PairJob, sel, kept: np.ndarray, plain: float, added: bool, stats, method: str) -> PairReport:
    rel = plain / sel.target_energy if sel.target_energy > 0 else 0.0
    p = job.pair
    has_path = job.refit and method not in ORDER_METHODS and sel.relative_error_path is not None and \
        sel.method not in ("refit", "variance")
    rep = PairReport(
        producer=p.producer, consumer=p.consumer, between=list(p.between), group_size=job.group_size,
        channels_before=job.channels, channels_after=int(kept.size), kept=kept.tolist(), status="pruned",
        relative_error=float(rel),
        error_path=[float(v) for v in sel.relative_error_path] if has_path else [],
        n_kept_path=[int(v) for v in sel.n_kept_path] if has_path else [],
        bias_added=bool(added), samples=int(stats.count), damping=float(sel.damping), time_s=job.seconds,
        method=method, refit=job.refit, kind=job.unit.kind if job.unit is not None else "pair",
        statistics="lean" if job.lean else "exact", own_pass=job.own_pass, timed_out=bool(sel.timed_out),
        swaps=np.asarray(sel.swaps).tolist())
    logger.info("pair %s: %d -> %d channels, relative error %.4g (%.2fs)%s", job.name, job.channels, kept.size, rel,
                job.seconds, ", lean statistics" if job.lean else "")
    return rep


def error_path(job, method: str, damping: float, lo: int, hi: int, keep: bool = False) -> np.ndarray:
    """A pair's relative error for every kept count, from its independent statistics (or from the
    checkpoint). ``keep``: the statistics can prune the pair too (independent mode): a checkpoint saves them.
    A sequential job's statistics have the reference outputs as targets: its path is that of the stream it saw
    (``allocation="sequential"``)."""
    if job.saved is not None:
        return job.ckpt.load_arrays(job.saved)["path"]
    stats = job_statistics(job)
    if stats.count == 0:
        raise ValueError(f"{job.label}: no calibration rows reached the statistics")
    damping = effective_damping(job, stats.count, damping)
    # lean statistics: the channel-level problem's path (with its own targets; an upper bound, see the design)
    W, b = (None, None) if job.lean or not job.independent else target_matrix(job)
    order = job_order(job, method, stats) if method in ORDER_METHODS else None
    with log_engine_warnings(job.name):
        path = budgeting.pair_error_path(stats, method=method, refit=job.refit, n_channels=job.channels,
                                         group_size=1 if job.lean else job.group_size, lo=lo, hi=hi,
                                         damping=damping, weights_in=W, bias_in=b, order=order)
    if job.ckpt is not None:
        job.ckpt.save_done(job.key, job.stem, stats if keep else None, {"path": path})
    return path


def _kept_weights_error(job: PairJob, stats, kept: np.ndarray, method: str):
    """``refit=False``: the error of the consumer's original weights on the kept channels, and the new bias
    (FLAP's bias compensation keeps the removed channels' mean contribution; others keep the bias)."""
    W, b = target_matrix(job)
    b0 = b if job.ref_consumer.bias is not None else None
    if method != "flap":
        return no_refit_error(stats, W, b0, kept, job.group_size), None
    new_bias = flap_bias(stats, W, b0, kept, job.group_size)
    if stats.n_targets == 0:  # targets = the layer's own map: what is left is the removed columns' fluctuation
        return compensated_error(stats, W, kept, job.group_size), new_bias
    return no_refit_error(stats, W, new_bias, kept, job.group_size), new_bias


def shrink_producers(job: PairJob, kept: np.ndarray) -> None:
    """Removes the dropped channels from the producer side: a pair's producer and ``between`` modules,
    or a unit's producer slices and head counts."""
    if job.unit is not None:
        shrink_unit(job.extra["pr_modules"], job.unit, kept)
        return
    shrink_out(job.producer, kept)
    for m in job.between:
        shrink_channels(m, kept)
    if job.rows is not None:
        prev = job.rows.get(job.pair.producer)
        job.rows[job.pair.producer] = np.asarray(kept, dtype=np.int64) if prev is None else prev[kept]


def _apply_saved(job: PairJob, timer: Timer) -> PairReport:
    """Installs the result of a pair an earlier (interrupted) run finished: the same surgery, no selection."""
    with timer("surgery"):
        a = job.ckpt.load_arrays(job.saved)
        kept = a["kept"].astype(np.int64)
        shrink_producers(job, kept)
        if job.refit:
            set_consumer(job.consumer, a["weights"], a["bias"], int(kept.size), kept=kept, group=job.group_size)
        else:
            shrink_in(job.consumer, kept, job.group_size)
    job.report = PairReport(**job.saved["info"]["report"])
    job.sums.release()
    logger.info("pair %s: %d -> %d channels, from the checkpoint", job.name, job.channels, kept.size)
    return job.report


def _fill_up(stats, sel, job: PairJob, damping: float, g: int):
    """The selection stopped early (the remaining channels look degenerate on the calibration data:
    dead, or more channels than samples). Keeps the promised number of channels anyway: adds the
    remaining channels with the largest input variance (ties: lowest index) and re-fits. ``g``: columns per
    channel in ``stats``."""
    logger.warning("pair %s: selection stopped after %d of %d channels (the others are degenerate on the "
                   "calibration data: dead channels, or fewer samples than inputs); keeping %d channels by "
                   "variance. More calibration data avoids this.", job.name, sel.kept.size, job.n_keep,
                   job.n_keep - sel.kept.size)
    keep = _by_variance(stats, job, g, np.asarray(sel.kept, dtype=np.int64)).kept
    kw = {}
    if job.independent and not job.lean:
        W, b = target_matrix(job)
        kw.update(weights_in=W, bias_in=b)
    try:
        return lsprune.refit(stats, keep, group_size=g, damping=_policy.fill_up_damping(damping), **kw)
    except lsprune.NumericalError as e:  # the added channels cannot be fitted: no trustworthy LS fit left
        if job.lean:  # the re-fit on the kept columns decides what is left to fit
            return _by_variance(stats, job, g, np.zeros(0, dtype=np.int64), e)
        return _constant_inputs(stats, job, damping, e)


def _by_variance(stats, job: PairJob, g: int, first: np.ndarray, err: Optional[Exception] = None):
    """``first``, then the other channels of largest input variance (``g`` columns each in ``stats``; ties:
    lowest index) up to ``job.n_keep``, as a choice without weights (``method="variance"``): what a lean job
    re-fits on its kept columns when the channel-level problem gave no (complete) LS choice."""
    if err is not None:
        logger.warning("pair %s: %s; keeping the channels of largest input variance", job.name, err)
    var = np.diag(stats.cov_x).reshape(-1, g).sum(1)
    taken = set(first.tolist())
    rest = [int(c) for c in np.argsort(-var, kind="stable") if c not in taken]
    kept = np.sort(np.concatenate([first, np.asarray(rest[: job.n_keep - first.size], dtype=np.int64)]))
    empty = np.zeros(0)
    return lsprune.Selection(method="variance", selected=kept, removed=np.zeros(0, dtype=np.int64), kept=kept,
                             columns=kept, weights=empty, bias=empty, error_path=None, relative_error_path=None,
                             n_kept_path=None, error=0.0, plain_error=0.0, relative_error=0.0, target_energy=0.0,
                             damping=float(_policy.DEFAULT_DAMPING), ridge=0.0)


def _constant_inputs(stats, job: PairJob, damping: float, err: Exception):
    """The fallback when the inputs' Gram stays singular at the largest damping (the consumer's inputs are
    (nearly) constant over the calibration rows, e.g. a collapsed layer of an untrained model): no LS
    problem is left to solve. Keeps the channels of largest input variance with the consumer's original
    weights, and the removed channels' mean in the bias (FLAP's compensation: exact for constant inputs)."""
    logger.warning("pair %s: %s; the inputs are (nearly) constant on the calibration data: keeping the %d "
                   "channels of largest variance with the original weights, the removed channels' mean in "
                   "the bias", job.name, err, job.n_keep)
    g = job.group_size
    var = np.diag(stats.cov_x).reshape(-1, g).sum(1)
    kept = np.sort(np.argsort(-var, kind="stable")[: job.n_keep])
    W, b = target_matrix(job)
    bias = flap_bias(stats, W, b if job.ref_consumer.bias is not None else None, kept, g)
    cols = (kept[:, None] * g + np.arange(g)).reshape(-1)
    if stats.n_targets == 0:
        err2 = compensated_error(stats, W, kept, g)
        energy = float(np.sum((W @ np.asarray(stats.cov_x)) * W)) * stats.count
    else:
        err2 = no_refit_error(stats, W, bias, kept, g)
        energy = float(stats.target_energy)
    return lsprune.Selection(
        method="constant-inputs", selected=kept, removed=np.zeros(0, dtype=np.int64), kept=kept, columns=cols,
        weights=W[:, cols], bias=bias, error_path=None, relative_error_path=None, n_kept_path=None, error=err2,
        plain_error=err2, relative_error=err2 / energy if energy > 0 else 0.0, target_energy=energy,
        damping=damping, ridge=0.0)


def unchanged_report(pair: Pair, channels: int, group_size: int) -> PairReport:
    """Report of a pair that keeps all channels (not re-fitted)."""
    return PairReport(producer=pair.producer, consumer=pair.consumer, between=list(pair.between),
                      group_size=group_size, channels_before=channels, channels_after=channels,
                      kept=list(range(channels)), status="unchanged")
