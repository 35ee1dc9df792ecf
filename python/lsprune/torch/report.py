"""The prune report: per pair and model totals, JSON-serialisable."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .report_base import ModelReport, si as _si, table

REPORT_FORMAT = "lsprune.torch.report"
REPORT_VERSION = 1


@dataclass
class PairReport:
    """What happened to one prunable pair.

    Attributes
    ----------
    producer, consumer : str
        Module names.
    between : list of str
        Modules that lost the same channels (BatchNorm, depthwise conv, PReLU).
    group_size : int
        Consumer input columns per channel (kh*kw for Conv2d, H*W for Linear after flatten, else 1).
    channels_before, channels_after : int
        Producer output channels.
    kept : list of int
        Kept channel indices (original numbering), ascending.
    status : str
        ``"pruned"``, ``"unchanged"`` when every channel is kept (no re-fit either), or ``"skipped"`` when the
        pair was left unchanged because it did not fit ``memory_limit`` (``reason``).
    relative_error : float
        Reconstruction error of the consumer's output on the calibration rows,
        ``‖Y - Ŷ‖² / ‖Y - Ȳ‖²`` (centred; Y = the original network's consumer output).
    error_path : list of float
        Relative error (ridge objective) along the selection: ``error_path[i]`` is the
        error with ``n_kept_path[i]`` channels kept.
    n_kept_path : list of int
    bias_added : bool
        The consumer had no bias and got one (the LS intercept).
    samples : int
        Rows streamed into the statistics (samples, tokens or conv positions).
    damping : float
        Relative ridge of this pair's fit (raised above ``prune(damping=)`` for an underdetermined
        fit, see the README; 0 for unchanged pairs).
    params_before, params_after : int
        Parameters of the producer, ``between`` and consumer modules.
    flops_before, flops_after : int
        MACs per calibration sample of the producer, ``between`` and consumer modules.
        Pair rows overlap when a module is the consumer of one pair and the producer of the next.
    time_s : float
        Seconds spent on this pair's statistics, selection and surgery (the shared forward
        sweep is in ``PruneReport.timings``).
    method : str
        How the channels were chosen (``prune(method=)``).
    refit : bool
        The consumer was re-fitted by LS (False: original weights on the kept channels).
    predicted_error : float or None
        With a global budget: the relative error the allocation expected for this pair's count
        (from the independent pass's error path; a sequential pass usually does better).
    kind : str
        ``"pair"`` (producer -> consumer), ``"mlp"`` (MLP neurons of a transformer block; ``producer``
        names the MLP module), ``"heads"`` (attention heads, or whole KV groups under GQA;
        ``producer`` names the attention module and channels count heads or groups), or a coupled
        group (:class:`lsprune.torch.CoupledGroup`): ``"multi_consumer"`` / ``"residual"`` / ``"concat"`` /
        ``"gate"`` / ``"grouped"`` / ``"shuffle"``; then
        ``producer`` is the group's name (its first writer), ``consumer`` its first reader,
        ``between`` its per-channel modules, ``group_size`` the first reader's, ``relative_error``
        the joint relative error ``Σ_r w_r E_r / Σ_r w_r energy_r`` (``w_r = 1/energy_r``: the mean
        of the readers' relative errors), ``error_path`` the joint path, ``samples`` the readers'
        rows summed, ``bias_added`` whether any reader gained a bias.
    writers, readers : list of str
        Coupled groups: every writer (rows removed) and reader (re-fitted), in graph order.
    group_sizes : list of int
        Coupled groups: each reader's input columns per channel.
    reader_errors : list of float
        Coupled groups: each reader's relative error ``‖Y_r - Ŷ_r‖² / ‖Y_r - Ȳ_r‖²``.
    biases_added : list of bool
        Coupled groups: per reader, whether it gained a bias (the LS intercept).
    offsets, between_offsets : list of int
        Concat groups (``kind == "concat"``): where the group's channels start in each reader's input (index
        along its weight dim 1) and among each ``between`` module's channels (:class:`CoupledGroup`); empty
        for other groups.
    unit : int
        Coupled groups: channels per unit (> 1 when a grouped conv loses whole groups; ``channels_*`` and
        ``kept`` then count units, unit ``j`` being channels ``j*unit ... (j+1)*unit - 1``).
    interleaved : list of str
        Shuffle groups: the writers and per-channel modules before the channel shuffle, whose unit ``j`` is
        channels ``j + a*channels_before`` (``a < unit``) instead (:class:`CoupledGroup`).
    swaps : list of [int, int]
        With ``prune(refine=)``: the exchanges of swap refinement, (channel out, channel in), in
        order; each added one entry to ``error_path``.
    statistics : str
        ``"exact"`` (the full statistics) or ``"lean"`` (channels chosen on the channel-level statistics,
        consumer re-fitted on the kept columns' exact statistics; ``error_path`` is then the channel-level
        problem's, see ``prune(statistics=)``).
    own_pass : bool
        The pair did not fit the sequential pass's memory and was pruned in a pass of its own.
    timed_out : bool
        ``prune(time_budget=)`` stopped this pair's greedy selection; the rest of the kept set was
        filled at once by the current gains, then re-fitted.
    reason : str or None
        For ``status == "skipped"``: why the pair was left unchanged (it did not fit ``memory_limit``).
    """

    producer: str
    consumer: str
    between: List[str]
    group_size: int
    channels_before: int
    channels_after: int
    kept: List[int]
    status: str = "pruned"
    relative_error: float = 0.0
    error_path: List[float] = field(default_factory=list)
    n_kept_path: List[int] = field(default_factory=list)
    bias_added: bool = False
    samples: int = 0
    damping: float = 0.0
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    time_s: float = 0.0
    method: str = ""
    refit: bool = True
    predicted_error: Optional[float] = None
    kind: str = "pair"
    swaps: List[List[int]] = field(default_factory=list)
    statistics: str = "exact"
    own_pass: bool = False
    timed_out: bool = False
    reason: Optional[str] = None
    writers: List[str] = field(default_factory=list)
    readers: List[str] = field(default_factory=list)
    group_sizes: List[int] = field(default_factory=list)
    reader_errors: List[float] = field(default_factory=list)
    biases_added: List[bool] = field(default_factory=list)
    offsets: List[int] = field(default_factory=list)
    between_offsets: List[int] = field(default_factory=list)
    unit: int = 1
    interleaved: List[str] = field(default_factory=list)

    @property
    def members(self) -> List[str]:
        """Every module of this entry: producer/writers, between, consumer/readers (each once)."""
        if self.writers:
            return list(dict.fromkeys([*self.writers, *self.between, *self.readers]))
        return list(dict.fromkeys([self.producer, *self.between, self.consumer]))


@dataclass
class WindowReport:
    """Block reconstruction of one window (``prune(reconstruct=)``, blocks strategy).

    Attributes
    ----------
    block : str
        The block (e.g. ``model.layers.3``).
    window : str
        The module that was fitted: the block (``window="block"``) or a sublayer (attention, MLP).
    tap : str or None
        The module inside ``window`` whose output was fitted (a sublayer that is not a module of its own, e.g.
        BERT's MLP: its down projection); None: ``window``'s own output.
    units : list of str
        The pruned units the window covers.
    params : int
        Parameters that were trained (the units' kept weights and biases, norm scales with ``norms=True``).
    steps : int
        Optimizer steps run (fewer than asked when a non-finite loss stopped the fit).
    best_step : int
        The step whose weights were kept (0: the LS solution).
    loss_before, loss_after : float
        Mean squared error of the window's output to its targets over the calibration set (padding excluded):
        the LS solution's and the kept weights' (never above ``loss_before``).
    target_energy : float
        Mean square of the targets (the loss of a zero output), the scale of the losses.
    time_s : float
        Seconds spent on this window (inputs, targets, steps, evaluations).
    status : str
        ``"improved"``, ``"unchanged"`` (no step beat the LS solution, or ``steps=0``) or ``"non_finite"`` (the
        loss turned NaN/Inf: stopped, LS weights kept, a ``ReconstructionWarning`` was emitted).
    """

    block: str
    window: str
    tap: Optional[str] = None
    units: List[str] = field(default_factory=list)
    params: int = 0
    steps: int = 0
    best_step: int = 0
    loss_before: float = 0.0
    loss_after: float = 0.0
    target_energy: float = 0.0
    time_s: float = 0.0
    status: str = "unchanged"

    @property
    def gain(self) -> float:
        """Fraction of the LS loss removed, ``1 - loss_after / loss_before`` (0 when the loss was 0)."""
        return 1.0 - self.loss_after / self.loss_before if self.loss_before > 0 else 0.0


@dataclass
class PruneReport(ModelReport):
    """Result of :func:`lsprune.torch.prune` (next to the pruned model).

    Attributes
    ----------
    pairs : list of PairReport
        In the order they were pruned (forward order).
    skipped : list of dict
        ``{"producer", "consumer", "reason"}`` for candidate producers left alone.
    mode, method, strategy : str
        ``strategy`` is ``"graph"`` (torch.fx sweep), ``"hooks"`` (explicit pairs on an untraceable model)
        or ``"blocks"`` (transformer units, block by block).
    targets : str or None
        Blocks strategy: ``"layer"`` or ``"original"`` (see ``prune(targets=)``).
    ratio : float or None
    refit : bool
        Consumers were re-fitted by LS (``prune(refit=)``).
    norm : str or None
        Filter norm of ``method="magnitude"`` (``"l1"``/``"l2"``), else None.
    budget : dict or None
        With ``prune(budget=)``: ``kind`` ("flops"/"params"), ``target`` (the fraction asked for),
        ``reached`` (measured on the pruned model), ``flops_reached``, ``params_reached``,
        ``predicted`` (the plan's exact predicted fraction), ``reachable`` ([min, 1]),
        ``allocation`` ("global"/"uniform"), ``min_keep``, ``max_keep``, ``multiple``, ``weights``,
        ``predicted_error`` (the allocation's weighted sum of independent relative errors).
    damping : float
    max_positions : int or None
    seed : int
    refine : bool, int or None
        The swap-refinement option (``prune(refine=)``); each pair's exchanges are in its
        ``PairReport.swaps``.
    params_before, params_after : int
        All parameters of the model.
    flops_before, flops_after : int
        Conv/Linear multiply-accumulates (MACs) per calibration sample: measured on the first
        calibration batch and divided by its batch size.
    forward_passes : float
        Forward passes spent, in full-model passes over the calibration set (see README).
    n_batches, n_samples : int
        Calibration batches and samples used.
    output_relative_error : float or None
        ``Σ‖f_pruned(x) - f(x)‖² / Σ‖f(x)‖²`` over the calibration set (graph strategy,
        sequential mode only; None otherwise).
    time_s : float
        Wall time of the whole call.
    timings : dict
        Seconds in ``forward`` (model ops), ``statistics``, ``selection``, ``surgery``, ``allocation``
        (a global budget's error paths and :func:`lsprune.allocate`) and ``other``.
    versions : dict
        lsprune and torch versions.
    world_size : int
        Ranks of a distributed calibration (1: one process); ``n_batches``, ``n_samples``,
        ``output_relative_error`` and every pair's ``samples`` cover all ranks.
    coupled : bool or None
        ``prune(coupled=)``: whether coupled channel groups were pruned too (graph strategy; None in
        reports written before the option existed).
    memory : dict or None
        The memory guard: ``limit`` (bytes, None = no guard), ``limit_source``, ``available``,
        ``estimate`` (peak bytes of host memory estimated for the prune), ``device_estimate``, ``model_copy``
        (bytes of the model copy being pruned), and
        per pass ``{"pass", "estimate", "device_estimate", "waves", "largest_pair", "lean", "own_pass",
        "skipped"}`` (the last three: the pairs the guard gave lean statistics, a pass of their own, or left out).
    statistics : str
        ``prune(statistics=)``.
    time_budget : float or None
        ``prune(time_budget=)``: seconds of selection per pair.
    round_to : int, dict or None
        ``prune(round_to=)``: the multiple every kept count was aligned to (None: not aligned).
    removed_fraction : float (property)
        The fraction of the pruned units' channels actually removed, ``1 - Σ after / Σ before`` over
        ``pairs`` (with ``round_to`` it can differ from ``ratio``).
    reconstruct : dict or None
        ``prune(reconstruct=)``: the :class:`lsprune.torch.ReconstructOptions` as a dict (None: off).
    reconstruction : list of WindowReport
        Block reconstruction, one record per window in the order they were fitted (empty when off).
    """

    pairs: List[PairReport] = field(default_factory=list)
    skipped: List[Dict[str, Optional[str]]] = field(default_factory=list)
    mode: str = "sequential"
    method: str = "forward"
    strategy: str = "graph"
    ratio: Optional[float] = None
    refit: bool = True
    norm: Optional[str] = None
    budget: Optional[dict] = None
    damping: float = 1e-6
    max_positions: Optional[int] = None
    seed: int = 0
    refine: Any = None
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    forward_passes: float = 0.0
    n_batches: int = 0
    n_samples: int = 0
    output_relative_error: Optional[float] = None
    time_s: float = 0.0
    timings: Dict[str, float] = field(default_factory=dict)
    versions: Dict[str, str] = field(default_factory=dict)
    world_size: int = 1
    memory: Optional[dict] = None
    targets: Optional[str] = None
    coupled: Optional[bool] = None
    statistics: str = "auto"
    time_budget: Optional[float] = None
    round_to: Any = None
    reconstruct: Optional[dict] = None
    reconstruction: List[WindowReport] = field(default_factory=list)

    FORMAT = REPORT_FORMAT
    VERSION = REPORT_VERSION
    WHAT = "prune"
    ITEMS = ("pairs", PairReport)

    @property
    def removed_fraction(self) -> float:
        """``1 - Σ channels_after / Σ channels_before`` over the reported pairs and units (0 when none)."""
        before = sum(p.channels_before for p in self.pairs)
        return 1.0 - sum(p.channels_after for p in self.pairs) / before if before else 0.0

    @classmethod
    def from_dict(cls, data: dict) -> "PruneReport":
        report = super().from_dict(data)
        report.reconstruction = [WindowReport(**w) for w in data.get("reconstruction", [])]
        return report

    def pair(self, producer: str) -> PairReport:
        """The report of the pair whose producer is ``producer``."""
        for p in self.pairs:
            if p.producer == producer:
                return p
        raise KeyError(producer)

    def table(self) -> str:
        """Per-pair plain-text table."""
        rows = [("producer", "consumer", "channels", "rel. error", "MACs/sample", "time")]
        for p in self.pairs:
            prod, cons = p.producer, p.consumer
            if p.writers:  # a coupled group: its name, kind and member counts
                prod = f"{p.producer} ({p.kind}, {len(p.writers)} writer(s))"
                cons = f"{p.consumer}" + (f" +{len(p.readers) - 1} reader(s)" if len(p.readers) > 1 else "")
            notes = ("" if p.refit else " (no re-fit)") + (" (lean)" if p.statistics == "lean" else "")
            err = "skipped (memory)" if p.status == "skipped" else f"{p.relative_error:.3g}{notes}"
            rows.append((prod, cons, f"{p.channels_before} -> {p.channels_after}", err,
                         f"{_si(p.flops_before)} -> {_si(p.flops_after)}", f"{p.time_s:.2f}s"))
        return table(rows)

    def __str__(self):
        groups = sum(bool(p.writers) for p in self.pairs)
        what = f"{len(self.pairs) - groups} pair(s)" + (f" and {groups} coupled group(s)" if groups else "") + \
            f", {self.mode}" if self.targets is None else f"{len(self.pairs)} unit(s), targets={self.targets}"
        out = f"lsprune: {what}/{self.method}, {self.strategy} strategy; " + self._costs_line()
        if self.output_relative_error is not None:
            out += f"; output rel. error {self.output_relative_error:.3g}"
        if self.round_to is not None:
            out += (f"\nround_to={self.round_to}: {self.removed_fraction:.4g} of the channels removed"
                    + (f" (ratio {self.ratio:g} asked)" if self.ratio is not None else ""))
        return out + self._budget_line() + self._reconstruction_lines() + "\n" + self.table()

    def _reconstruction_lines(self) -> str:
        """The reconstruction's summary line and, per window, its losses."""
        if not self.reconstruct:
            return ""
        w = self.reconstruction
        before, after = sum(r.loss_before for r in w), sum(r.loss_after for r in w)
        r = self.reconstruct
        out = (f"\nreconstruction ({r['window']} windows, {r['targets']} targets, {r['steps']} steps, lr {r['lr']:g}):"
               f" {len(w)} window(s), summed loss {before:.4g} -> {after:.4g}"
               f" ({1 - after / before if before > 0 else 0.0:.1%} lower), {sum(x.time_s for x in w):.2f}s")
        bad = [x.window for x in w if x.status == "non_finite"]
        if bad:
            out += f"; stopped on a non-finite loss (LS weights kept): {', '.join(bad)}"
        rows = [("window", "loss before", "loss after", "best step", "time")]
        rows += [(x.window + (f" -> {x.tap.rsplit('.', 1)[-1]}" if x.tap else ""), f"{x.loss_before:.4g}",
                  f"{x.loss_after:.4g}", f"{x.best_step}/{x.steps}", f"{x.time_s:.2f}s") for x in w]
        return out + "\n" + table(rows)
