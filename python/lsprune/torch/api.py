"""Public entry points: :func:`prune` and :func:`find_pairs`.

``prune`` reads top to bottom as its pipeline: options (:mod:`.options`, validated once) -> calibration
session (:mod:`.session`) -> the blocks strategy (:mod:`.blockprune`) or the pairs of the graph and
hooks strategies (:mod:`.pairprune`) -> the report.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from lsprune import _policy

from .batches import default_forward, first_tensor_device, to_device
from .blockprune import prune_blockwise, unit_search
from .blockwise import BlocksNotFoundError, find_blocks
from .discovery import graph_discovery as _graph_discovery
from .distributed import Dist
from .layouts import normalize_units
from .options import DEFAULT_MAX_POSITIONS, Flag, PruneOptions
from .pairprune import PairPrune
from .pairs import PairSearch
from .reconstruct_cnn import find_residual_blocks
from .report import PruneReport
from .session import CalibrationSession, TrainState

logger = logging.getLogger("lsprune.torch")


# ---------------------------------------------------------------------------------------------- find_pairs
def find_pairs(model: nn.Module, example_input, *, forward_fn: Optional[Callable] = None, units=None,
               blocks: Optional[str] = None, coupled: bool = True) -> PairSearch:
    """Lists what :func:`prune` would prune in a model, and why other layers are skipped.

    A model with a list of transformer blocks (see ``prune(strategy="blocks")``) lists its units:
    attention heads (or KV groups) and MLP neurons, one :class:`Pair` each (``producer`` = the unit's
    module, ``via`` = its kind); the layers that write the residual stream are listed as skipped
    (its width stays). Other models are traced with torch.fx.

    Parameters
    ----------
    model : nn.Module
    example_input : batch
        One calibration batch (tensor, ``(input, label)`` tuple, dict of kwargs, or what ``forward_fn`` takes);
        used for shape propagation (e.g. the H*W group of a flatten before a Linear).
    forward_fn : callable, optional
        ``forward_fn(model, batch)``, see :func:`prune`.
    units, blocks
        As in :func:`prune` (transformers).
    coupled : bool, default True
        Also list the coupled channel groups (:class:`CoupledGroup`: a producer read by several
        consumers, a residual stream), as :func:`prune` with ``coupled=True`` prunes them.

    Returns
    -------
    PairSearch
        ``.pairs`` (in forward order), ``.groups`` (coupled groups) and ``.skipped`` (with reasons);
        ``print()`` it for a table.

    Raises
    ------
    NotTraceableError
        torch.fx cannot trace the model: name the pairs with ``prune(..., pairs=...)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if forward_fn is not None and not callable(forward_fn):
        raise TypeError("forward_fn must be callable: forward_fn(model, batch)")
    coupled = Flag().check("coupled", coupled)
    kinds = normalize_units(units)
    try:
        return unit_search(model, blocks, kinds)
    except BlocksNotFoundError:
        if units is not None or blocks is not None:
            raise
    state = TrainState(model)
    try:
        model.eval()
        with torch.no_grad():
            search = _graph_discovery(model, to_device(example_input, first_tensor_device(model)),
                                      forward_fn or default_forward, coupled=coupled)[0]
    finally:
        state.restore(model)
    return search


# ---------------------------------------------------------------------------------------------- prune
def prune(model: nn.Module, calibration, *, ratio: Optional[float] = None, keep: Optional[Dict[str, int]] = None,
          budget=None, method: str = "forward", refit: bool = True, norm: str = "l1", mode: str = "sequential",
          damping: float = _policy.DEFAULT_DAMPING, max_batches: Optional[int] = None,
          device=None, progress: bool = True, pairs: Optional[Sequence] = None, forward_fn: Optional[Callable] = None,
          mask_fn: Optional[Callable] = None, inplace: bool = False,
          max_positions: Optional[int] = DEFAULT_MAX_POSITIONS, seed: int = 0,
          strategy: str = "auto", distributed: Optional[bool] = None, checkpoint=None,
          checkpoint_interval: float = 60.0, memory_limit="auto", units=None, targets: str = "layer",
          blocks: Optional[str] = None, coupled: bool = True, refine=None, statistics: str = "auto",
          time_budget: Optional[float] = None, round_to=None,
          reconstruct=None) -> Tuple[nn.Module, PruneReport]:
    """Structurally prunes a trained model by layerwise least squares (no labels, no fine-tuning).

    For every prunable pair producer -> (BatchNorm, activation, pooling, depthwise conv,
    flatten) -> consumer, chooses the producer's output channels that best reproduce the
    consumer's original outputs on the calibration data, re-fits the consumer by least
    squares and physically removes the other channels. Coupled channel groups (a producer read
    by several consumers, a residual stream: ``coupled``) lose the same channels in every member,
    chosen jointly for all their readers.

    Parameters
    ----------
    model : nn.Module
        Trained model. Not modified (unless ``inplace=True``), also when an error occurs.
    calibration : iterable of batches
        A DataLoader, a list of tensors, ``(input, label)`` tuples (labels ignored) or dicts of
        model kwargs. Read once into a list (at most ``max_batches`` batches) and kept in memory.
    ratio : float in [0, 1), optional
        Fraction of channels removed in every pair (``round(ratio*C)``; at least one channel stays).
    keep : dict {producer name: int}, optional
        Exact number of channels to keep for these pairs (overrides ``ratio``; with ``budget`` these
        pairs are pinned and the budget is spread over the others). Pairs in neither ``keep`` nor
        covered by ``ratio``/``budget`` are left unchanged.
    budget : lsprune.Budget, float or dict, optional
        Target fraction of the whole model's FLOPs or parameters, e.g. ``Budget(flops=0.5)`` (a
        float means FLOPs). Per-pair counts are chosen to fit it (see :class:`lsprune.Budget` and
        the README). Not together with ``ratio``. Raises ``ValueError`` with the reachable range
        when the budget cannot be met.
    method : {"forward", "omp", "backward", "magnitude", "random", "thinet", "wanda_sp", "flap"}
        How channels are chosen: the LS selection solvers (see :func:`lsprune.select`);
        ``"magnitude"``: largest producer filter norm (``norm``); ``"random"``: seeded by ``seed``;
        ``"wanda_sp"``: largest ``Σ ‖x_c‖·‖W[:, c]‖`` over a channel's consumer columns (``norm`` of W);
        ``"flap"``: largest input variance × ``‖W[:, c]‖²`` (FLAP's fluctuation; with ``refit=False`` the
        consumer's bias absorbs the removed channels' mean, FLAP's bias compensation);
        ``"thinet"``: a naive greedy that re-solves the LS problem per candidate (same choices as
        ``"forward"``, much slower; for speed comparisons on small layers).
    refit : bool, default True
        Re-fit the consumer by least squares on the kept channels. False: the consumer keeps its
        original weights (and bias) restricted to the kept channels, so that selection and
        reconstruction can be judged apart.
    norm : {"l1", "l2"}
        Filter norm of ``method="magnitude"``.
    mode : {"sequential", "independent"}
        ``sequential``: pairs are pruned in forward order; a consumer's input comes from the
        already pruned network and its targets from the original one, so errors are corrected as
        they go. ``independent``: every pair is measured on the original network in one pass.
    damping : float
        Relative ridge of the LS fits (see :func:`lsprune.select`).
    refine : bool or int, optional
        Swap refinement after each LS selection (``method`` forward/omp/backward; see
        :func:`lsprune.select`): ``True`` until no exchange of a kept and a removed channel lowers
        the pair's LS error, an int caps the exchanges per pair. Off by default.
    max_batches : int, optional
        Use only the first ``max_batches`` calibration batches.
    device : str or torch.device, optional
        Where calibration runs (default: the model's device). The pruned model lives there.
    progress : bool
        tqdm progress bars.
    pairs : list, optional
        Pairs to prune: :class:`Pair` objects or ``(producer, consumer)`` / ``(producer, consumer,
        [between...])`` tuples of module names, and :class:`CoupledGroup` objects. On a traceable
        model they must be among the pairs and groups :func:`find_pairs` finds (a declared group whose
        members disagree on width raises ``ValueError``); on a model torch.fx cannot trace pairs are
        required and are checked with hooks on the first batch (see the README).
    forward_fn : callable, optional
        ``forward_fn(model, batch)`` runs one batch; it must call ``model(...)`` once. Default:
        ``model(x)``, ``model(batch[0])`` for tuples/lists, ``model(**batch)`` for dicts.
    mask_fn : callable, optional
        ``mask_fn(batch)`` -> bool tensor; True marks positions that enter the statistics. Shape
        ``(batch,)`` (samples) or the consumer input's leading shape, e.g. ``(batch, seq)`` tokens of
        a Linear consumer on ``(batch, seq, features)``; consumers that see pooled ``(batch, features)``
        inputs use every sample.
    inplace : bool
        Prune ``model`` itself (it is still restored if an error occurs).
    max_positions : int or None, default 16
        Conv2d consumers: at most this many output positions per sample are streamed into the
        statistics (drawn without replacement by a generator seeded from ``seed`` and the pair
        index), but never fewer than needed for ``8 * D`` rows over the calibration set (D = the
        consumer's C_in*kh*kw inputs). None uses all positions.
    seed : int
        Seed of the position subsampling.
    strategy : {"auto", "graph", "hooks", "blocks"}
        ``graph``: one torch.fx sweep; ``hooks``: per-pair module hooks (for models fx cannot
        trace); ``blocks``: transformers, block by block (attention heads and MLP neurons, see
        ``units``); ``auto``: blocks when the model has a list of transformer blocks with units
        lsprune recognises (or ``units``/``blocks`` is given), else graph when the model traces,
        else hooks (needs ``pairs``).
    units : {"mlp", "heads"} or a list of them, optional
        Blocks strategy: what is pruned. ``"mlp"``: MLP neurons (rows of the up/gate projections,
        columns of the down projection; gated SwiGLU/GeGLU MLPs too); ``"heads"``: attention heads
        (q/k/v rows and output-projection columns; under grouped-query attention whole KV groups,
        see the README). Default: both. The residual stream's width is never changed.
    targets : {"layer", "original"}
        Blocks strategy: what a re-fitted consumer reproduces. ``"layer"`` (default): its own
        original map applied to its current input (the pruned stream); ``"original"``: the
        original network's outputs on the original stream (a second stream is cached and run).
    blocks : str, optional
        Blocks strategy: the name of the ``nn.ModuleList`` of repeated blocks (e.g.
        ``"model.layers"``); found automatically when omitted.
    coupled : bool, default True
        Graph strategy: also prune coupled channel groups (:class:`CoupledGroup`, see
        :func:`find_pairs`): a producer whose output feeds several consumers, and residual streams
        (every writer into the stream by elementwise add and every reader of it). Channel ``j`` leaves
        every member; the channels are chosen jointly over the readers' LS problems
        (:func:`lsprune.select_joint`) and each reader is re-fitted. ``False``: only pairs (the result
        of lsprune before coupled groups, bit for bit).
        Methods with a group variant: forward, omp, backward, magnitude (group magnitude), random;
        with the others the groups are left alone (``report.skipped``).

    distributed : bool or None
        ``None`` (default): distributed calibration when ``torch.distributed`` is initialised with
        more than one rank: every rank passes its own shard of the calibration data (a rank may
        have none), the float64 sums are all-reduced before each selection, and every rank returns
        the same pruned model. ``True``: require an initialised process group; ``False``: this
        process only. Every rank must call ``prune`` with the same model and options.
    checkpoint : str or os.PathLike, optional
        Folder for checkpoint/resume: finished pairs (statistics, kept channels, re-fitted weights)
        and partial statistics are saved as the prune goes; calling ``prune`` again with the same
        folder (same model, data and options) skips the finished pairs and resumes the partial one,
        bit-identical to an uninterrupted run. A folder of another run, or a damaged one, is
        refused with ``ValueError`` and left untouched. Not with distributed calibration.
    checkpoint_interval : float
        Seconds between two partial saves of a pair being accumulated (0: after every batch at
        which the engine holds no pending float32 products).
    memory_limit : "auto", int, float or None
        The memory guard: before any statistics are allocated, the memory the pass needs at once
        (statistics ``8·D²`` per pair and more, solver, cached activations; see the README) is
        estimated and compared with this limit: ``"auto"`` = 0.7 × the available memory, a float
        in (0, 1] = that fraction of it, an int = bytes, ``None`` = no guard. An independent pass
        that does not fit runs in waves of pairs (one forward pass each); otherwise
        :class:`lsprune.torch.MemoryLimitError` (a ``MemoryError`` and ``ValueError``) states the
        estimate and the limit. ``report.memory`` records the estimate. A pair that does not fit the
        sequential pass is pruned in a pass of its own (module hooks, one batch of activations at a time),
        else with lean statistics (``statistics``), else left unchanged (``PairReport.status == "skipped"``
        with the reason, also in ``report.skipped``); only when no pair fits is the error raised.
    statistics : {"auto", "exact", "lean"}
        What a pair whose consumer reads each channel as a group of ``P > 1`` columns (a conv's kh*kw
        taps, the H*W positions of a flatten before a Linear) streams: ``"exact"``: the full
        ``(C·P)²`` statistics; ``"lean"``: the channel-level (spatially pooled, ``C²``) statistics to
        choose the channels, then a second streaming of the kept columns only for the exact LS re-fit
        (docs/design.md, "Lean statistics"); ``"auto"``: exact whenever the memory guard says it fits,
        lean otherwise. Pairs with ``P = 1`` are always exact (lean would be the same). Lean supports
        ``refit=True`` with the forward/omp/backward/magnitude/random methods.
    time_budget : float, optional
        Seconds of channel selection per pair or coupled group (forward/omp/backward; a group's joint
        selection too). When they pass, the greedy keeps what it chose and adds the rest at once by its
        current gains (backward: removes the rest by its current costs), then re-fits exactly (every
        reader of a group); ``PairReport.timed_out`` says so. The global budget's
        error paths are not limited. Not with distributed calibration (the ranks could stop at
        different steps).
    round_to : int or dict, optional
        Aligned widths: every kept count is a multiple of this (fast kernels prefer multiples of 8,
        64, ...), never zero and never above the original; a unit may also stay whole when its width
        is not a multiple. A dict gives one per kind of unit, ``{"conv": 8, "linear": 16, "mlp": 64,
        "heads": 1}`` (the producer's type for pairs and coupled groups; kinds not named: 1); for heads
        it counts heads, or KV groups under GQA. Decided in the plan, so budgets, the global
        allocation, the selection and the report all see the rounded counts: ``ratio`` goes to the
        nearest multiple (ties keep more), a ``budget`` chooses among multiples only (the least common
        multiple with ``Budget.multiple``) and stays at or under its target, ``keep`` counts must be
        multiples. ``report.round_to`` and ``report.removed_fraction`` say what was reached. A unit
        to be pruned that is narrower than its multiple raises ``ValueError``.
    reconstruct : dict or ReconstructOptions, optional
        Blocks strategy: block reconstruction after LS selection (label-free; off by default). After a
        block's units are selected and re-fitted, its kept weights (and, with ``norms=True``, its norm
        scales) take a bounded number of optimizer steps on the cached calibration inputs, starting from
        the LS solution, to match the dense network's output (``window="block"``) or each sublayer's
        (``"sublayer"``: attention and MLP separately); then the block's outputs are recomputed for the
        next block. The best evaluated iterate is kept, so a window's calibration loss never ends above
        the LS solution's; a loss that turns NaN/Inf keeps the LS weights and warns
        (:class:`lsprune.torch.ReconstructionWarning`). Options (window, steps, lr, batch_size, optimizer,
        targets, norms, seed): see :class:`lsprune.torch.ReconstructOptions` and the README;
        ``report.reconstruction`` holds each window's losses and time. Graph/hooks strategy (a CNN built of
        residual blocks, :func:`lsprune.torch.find_residual_blocks`): after the LS prune, every changed
        residual block is fitted in forward order to the dense block's outputs on the channels it keeps
        (``window="block"`` only; ``targets="pruned_stream"`` only with ``coupled=False``; ``batch_size``
        counts images), then the Linear heads after the blocks are re-fitted by LS; BatchNorm running
        statistics never change, its affine parameters train only with ``norms=True``.

    Returns
    -------
    (pruned_model, PruneReport)

    Raises
    ------
    TypeError, ValueError
        Invalid arguments, calibration batches that do not fit the model, no prunable pair, pairs
        whose channels do not map one-to-one, a stale or damaged checkpoint.
    MemoryLimitError
        The estimated memory exceeds ``memory_limit`` and waves cannot help (nothing was allocated).
    DistributedError
        Another rank of a distributed prune failed.
    """
    options = {k: v for k, v in locals().items() if k not in ("model", "calibration")}
    dist = Dist.resolve(Flag(none=True).check("distributed", distributed))
    try:
        opts = PruneOptions.create(model, **options)
        if _use_blocks(model, opts):
            _check_blockwise(opts, dist)
            session = CalibrationSession(model, calibration, opts)
            with session.opened():
                return session.finish(*prune_blockwise(session, opts))
        if opts.reconstruct is not None:
            _check_residual(model, opts, dist)
        if opts.time_budget is not None and dist.active:
            raise ValueError("time_budget= is not supported with distributed calibration (the ranks could stop "
                             "their selections at different steps): give time_budget=None or distributed=False")
        if _stream_allocation(opts) and dist.active:
            raise ValueError("Budget(allocation='sequential') is not supported with distributed calibration: give "
                             "allocation='global' or distributed=False")
        if opts.checkpoint is not None and dist.active:
            raise ValueError("checkpoint= is not supported with distributed calibration: give checkpoint=None or "
                             "distributed=False")
        session = CalibrationSession(model, calibration, opts, allow_empty=dist.active)
        with session.opened():
            return session.finish(*PairPrune(session, opts, dist).run())
    except BaseException as e:
        dist.fail(e)  # the other ranks raise at their next collective instead of waiting for this one
        raise


def _stream_allocation(opts: PruneOptions) -> bool:
    return opts.budget is not None and opts.budget.allocation == "sequential"


# ---------------------------------------------------------------------------------------------- blocks
def _use_blocks(model, opts: PruneOptions) -> bool:
    """The blocks strategy: asked for, or (auto, no pairs named) the model has transformer blocks."""
    if opts.strategy == "blocks":
        return True
    if opts.strategy != "auto" or opts.pairs is not None:
        if opts.units is not None or opts.blocks is not None:
            raise ValueError("units= and blocks= belong to the blocks strategy: use strategy='blocks' or 'auto' "
                             "without pairs=")
        return False
    if opts.units is not None or opts.blocks is not None:
        return True
    try:
        find_blocks(model, None, opts.unit_kinds)
    except BlocksNotFoundError:
        return False
    return True


def _check_residual(model: nn.Module, opts: PruneOptions, dist: Dist) -> None:
    """``reconstruct=`` without transformer blocks: the model must have residual CNN blocks, and the options
    must make sense for them; refused before anything runs."""
    r = opts.reconstruct
    if not find_residual_blocks(model):
        raise ValueError("reconstruct= needs blocks: transformer blocks (the blocks strategy: strategy='blocks', or "
                         "'auto' on a model with transformer blocks and no pairs=) or the residual blocks of a CNN "
                         "(children of an nn.Sequential / nn.ModuleList that add a branch to their input); this "
                         "model has neither")
    if r.window != "block":
        raise ValueError(f"reconstruct window={r.window!r}: residual CNN blocks are fitted whole (window='block'); "
                         "'sublayer' is for transformer blocks")
    if r.targets == "pruned_stream" and opts.coupled:
        raise ValueError("reconstruct targets='pruned_stream' needs the residual stream unpruned (the dense block "
                         "cannot run on the pruned stream's fewer channels): use targets='dense' or coupled=False")
    if dist.active:
        raise ValueError("reconstruct= of residual CNN blocks does not support distributed calibration")


def _check_blockwise(opts: PruneOptions, dist: Dist) -> None:
    """What the blocks strategy does not do (yet): refused before anything runs."""
    for bad, what in ((dist.active, "distributed calibration"), (opts.checkpoint is not None, "checkpoint="),
                      (opts.mode != "sequential", "mode='independent' (blocks are pruned in sequence; targets= "
                                                  "chooses what the re-fit reproduces)"),
                      (opts.method == "thinet", "method='thinet'"),
                      (_stream_allocation(opts), "Budget(allocation='sequential') (use 'global' or 'uniform')"),
                      (opts.statistics == "lean", "statistics='lean' (units are read by their consumer as groups "
                                                  "of head_dim columns or single neurons: use 'exact' or 'auto')")):
        if bad:
            raise ValueError(f"the blocks strategy (transformer heads and MLP neurons) does not support {what}")
