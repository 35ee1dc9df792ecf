"""Memory guard: what a prune holds at once, checked against a limit before any statistics exist.

Cost model, in bytes, for a pair whose consumer has ``D = C_in·kh·kw`` input columns (``in_features``
for a Linear) and ``m`` outputs, keeping ``K = n_keep·g`` columns (read off the engine's code):

* **statistics**, alive from the pair's first rows until its selection is done:
  ``8·D²`` (float64 Gram) ``+ 4·D²`` (the engine's float32 product scratch; not for float64
  activations) ``+ 12·D·m_s`` (cross sums in float64 + float32) ``+ 16·(D + m_s)``, with
  ``m_s = m`` in sequential mode and ``0`` (Gram only) in independent mode and the budget pass.
  Torch sums on a GPU: ``8·D² + 8·D·m_s`` on the device, and twice that on the host while they
  are converted for the engine (one pair at a time).
* **solver**, one pair at a time: forward/omp ``8·(2·D·m + K·D + 1.5·K² + 4·K·m)`` (centred cross
  and residual ``R``, the ``K × D`` state ``C``, the Cholesky factor, the weights), or where the engine
  takes its blocked state (``lsprune._core.blocked_forward_pays``) ``8·(2·D·m + 2·D² + 128·D + 1.5·K² +
  4·K·m)`` (the two ``D × D`` Schur complements and 64 pending rows of each instead of ``R`` and ``C``); backward
  ``8·(D² + 3·D·m + K² + 3·K·m)`` (``H = G⁻¹``, ``W``, the final re-fit); magnitude/random
  ``8·(D·m + K² + 3·K·m)`` (the re-fit); thinet and ``refit=False`` add ``8·D²`` (centred NumPy
  copies); independent targets add ``8·m·D`` (the consumer's weights in float64).
* **the model copy** that is pruned (``prune`` never modifies the user's model): its parameters
  and buffers, twice when calibration runs on another device than the model's; held throughout.
* **cached activations** (graph strategy): the sweep keeps every live value for the whole
  calibration set, in two copies where the original and the pruned network differ. The bytes
  recorded per graph node on the first batch are scaled to all calibration samples and the
  sweep's liveness is replayed node by node (on a GPU they count against the device). The hooks
  strategy holds one batch at a time (not counted).

What is alive at once: a **sequential** pass holds one pair's statistics and solver plus the
activations live at that pair's consumer; an **independent** pass (``mode="independent"``, and
the extra pass of a global budget) holds the statistics of every pair it measures until the
end of the pass. An independent pass that does not fit is split into *waves* of pairs, each
one more forward pass over the calibration data (same result).

A pair that does not fit on its own gets, in this order, a pass of its own (sequential graph
sweep: module hooks, one batch of activations), lean statistics (channel-level sums ``C² + C·m``,
then the kept columns' ``(K·g)² + K·g·m`` and their re-fit), or is left out with the reason
(:func:`decide`; docs/design.md, "Memory guard decisions"); only when no pair fits does
:func:`prune` refuse, before allocating any statistics.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from .._native import _core
from .accumulate import CHUNK_BYTES
from .pairs import CoupledGroup, producer_channels
from .pruning import consumer_width

logger = logging.getLogger("lsprune.torch")

#: Default ``memory_limit``: this fraction of the memory available when ``prune`` starts.
DEFAULT_FRACTION = 0.7
#: Methods that can choose channels from lean (channel-level) statistics: the LS solvers, and the rankings that
#: need no per-column statistics.
LEAN_METHODS = ("forward", "omp", "backward", "magnitude", "random")
#: Transient buffers while a batch is streamed into a pair's sums: the unfolded or masked chunk of rows
#: (at most ``accumulate.CHUNK_BYTES``) and its float32 conversion.
TRANSIENT_CHUNKS = 2


class MemoryLimitError(MemoryError, ValueError):
    """The estimated memory of a prune exceeds ``memory_limit`` (raised before anything is allocated)."""


def gib(n: float) -> str:
    """Bytes in readable units."""
    for unit, s in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(n) >= unit:
            return f"{n / unit:.2f} {s}"
    return f"{int(n)} B"


def available_memory() -> Optional[int]:
    """Bytes the system can still hand out (``MemAvailable`` of /proc/meminfo, else free pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


@dataclass
class Limit:
    """The resolved ``memory_limit``: ``bytes`` (None = no guard) and how it was derived."""

    bytes: Optional[int]
    source: str
    available: Optional[int] = None


def resolve_limit(option, available: Optional[int] = None) -> Limit:
    """``memory_limit`` as bytes: ``"auto"`` = ``DEFAULT_FRACTION`` of the available memory, a float
    in (0, 1] = that fraction of it, an int = bytes, None = no guard."""
    if option is None:
        return Limit(None, "no limit (memory_limit=None)")
    avail = available_memory() if available is None else available
    if option == "auto" or isinstance(option, float):
        frac = DEFAULT_FRACTION if option == "auto" else float(option)
        if avail is None:
            return Limit(None, "no limit (the available memory is unknown)")
        return Limit(int(frac * avail), f"{frac:g} × {gib(avail)} available", avail)
    return Limit(int(option), "memory_limit", avail)


def statistics_bytes(D: int, m_stats: int, *, fp32_scratch: bool, on_device: bool) -> Dict[str, int]:
    """One pair's sums (see the module docstring): ``host`` and ``device`` bytes alive while the pair
    accumulates, and ``convert``: host bytes while torch sums on a GPU are handed to the engine."""
    sums = 8 * D * D + 8 * D * m_stats + 16 * (D + m_stats)
    if on_device:
        return {"host": 0, "device": sums, "convert": 2 * sums}
    if fp32_scratch:
        sums += 4 * D * D + 4 * D * m_stats
    return {"host": sums, "device": 0, "convert": 0}


def solver_bytes(D: int, m: int, K: int, *, method: str, refit: bool, independent: bool, g: int = 1) -> int:
    """Host bytes of one pair's selection and re-fit (see the module docstring); ``g`` columns per group."""
    if method == "backward":
        b = D * D + 3 * D * m + K * K + 3 * K * m
    elif method in ("magnitude", "random"):
        b = D * m + K * K + 3 * K * m
    elif _core.blocked_forward_pays(D, m, K, g):  # forward/omp/thinet on the blocked state (the engine decides)
        b = 2 * D * m + 2 * D * D + 128 * D + 1.5 * K * K + 4 * K * m
    else:  # forward, omp, thinet (whose error path runs forward selection) on the residual state
        b = 2 * D * m + K * D + 1.5 * K * K + 4 * K * m
    if method == "thinet" or not refit:
        b += D * D
    if independent:
        b += m * D
    return int(8 * b)


@dataclass
class PairNeed:
    """One pair's memory in one pass."""

    name: str
    consumer_node: Optional[fx.Node]
    statistics: Dict[str, int]
    solver: int
    transient: int = 0


@dataclass
class PassPlan:
    """A pass's estimate: ``peak`` bytes (host) and the pairs of each wave (one wave = one pass)."""

    what: str
    peak: int
    device_peak: int
    waves: List[List[str]]
    largest_pair: int = 0
    total: int = 0  # the whole pass in one wave
    lean: List[str] = field(default_factory=list)  # pairs with lean statistics
    own_pass: List[str] = field(default_factory=list)  # pairs pruned in a pass of their own (not in `waves`)
    skipped: Dict[str, str] = field(default_factory=dict)  # pairs that fit in no way: the reason


def activation_profile(graph: Optional[fx.Graph], consumers: Dict[fx.Node, Sequence[fx.Node]], *, sequential: bool,
                       scale: float) -> Dict[Optional[fx.Node], int]:
    """Replays the graph sweep's liveness: bytes of cached activations (all calibration samples) live
    at each pair's consumer node, and under the key None the peak over all nodes.

    ``consumers`` maps each pruned pair's consumer node to the chain nodes whose pruned-network
    values get their own copy once it is done (sequential mode)."""
    if graph is None:
        return {None: 0}
    nodes = list(graph.nodes)
    last_use = {}
    for i, n in enumerate(nodes):
        for inp in n.all_input_nodes:
            last_use[inp] = i
    size = {n: int(n.meta.get("nbytes", 0) * scale) for n in nodes}
    orig: Dict[fx.Node, int] = {}
    pruned: Dict[fx.Node, int] = {}
    diverged = set()
    out: Dict[Optional[fx.Node], int] = {None: 0}
    for i, node in enumerate(nodes):
        if node.op == "output":
            break
        if node.op != "placeholder":
            orig[node] = size[node]
            div = sequential and any(a in diverged for a in node.all_input_nodes)
            if node in consumers:
                out[node] = sum(orig.values()) + sum(pruned.values())
                if sequential:
                    for cn in consumers[node]:
                        if cn in orig:
                            pruned[cn] = size[cn]
                            diverged.add(cn)
                    div = True
            if div:
                pruned[node] = size[node]
                diverged.add(node)
            out[None] = max(out[None], sum(orig.values()) + sum(pruned.values()))
        for inp in node.all_input_nodes:
            if last_use.get(inp) == i:
                orig.pop(inp, None)
                pruned.pop(inp, None)
        if not node.users:
            orig.pop(node, None)
            pruned.pop(node, None)
    return out


class PassModel:
    """Host and device peaks of a pass over a group of pairs (see the module docstring). ``act``: cached
    activations per consumer node (key None: the peak over all nodes); ``fixed``: bytes held throughout (the
    model copy); ``on_device``: the activations, the sums and the model copy live on the GPU, the solver on
    the host."""

    def __init__(self, act: Dict[Optional[fx.Node], int], *, sequential: bool, limit: Limit,
                 device_limit: Optional[int] = None, on_device: bool = False, fixed: int = 0):
        self.act = {k: v + fixed for k, v in act.items()}  # the model copy lives next to the activations
        self.base = self.act.get(None, 0)
        self.sequential, self.limit, self.device_limit = sequential, limit, device_limit
        self.on_device, self.fixed = on_device, fixed

    def live(self, n: PairNeed) -> int:
        """Activations and transient rows while pair ``n`` streams its batches."""
        return self.act.get(n.consumer_node, self.base) + n.transient

    def host_peak(self, group: List[PairNeed]) -> int:
        a = 0 if self.on_device else self.base
        if self.sequential:
            return max([a] + [(0 if self.on_device else self.live(n)) + n.statistics["host"] +
                              n.statistics["convert"] + n.solver for n in group])
        stats, peak = 0, a
        for n in group:  # the statistics pile up along the pass; selections run at the end, one at a time
            stats += n.statistics["host"]
            peak = max(peak, (0 if self.on_device else self.live(n)) + stats)
        end = stats + (0 if self.on_device else self.fixed)  # the activations are gone, the model copy is not
        return max(peak, end + max((n.statistics["convert"] + n.solver for n in group), default=0))

    def device_peak(self, group: List[PairNeed]) -> int:
        if not self.on_device:
            return 0
        if self.sequential:
            return max([self.base] + [self.live(n) + n.statistics["device"] for n in group])
        stats, peak = 0, self.base
        for n in group:
            stats += n.statistics["device"]
            peak = max(peak, self.live(n) + stats)
        return peak

    def fits(self, group: List[PairNeed]) -> bool:
        return (self.limit.bytes is None or self.host_peak(group) <= self.limit.bytes) and \
            (self.device_limit is None or self.device_peak(group) <= self.device_limit)


def plan_pass(what: str, needs: List[PairNeed], act: Dict[Optional[fx.Node], int], *, sequential: bool,
              limit: Limit, device_limit: Optional[int] = None, on_device: bool = False, fixed: int = 0) -> PassPlan:
    """Peak memory of a pass and its waves; raises :class:`MemoryLimitError` when even one pair at a
    time does not fit (the message gives the estimate, its parts and the limit). ``on_device``: the
    activations, the sums and the model copy live on the GPU (``device_limit``), the solver on the host.
    ``fixed``: bytes held throughout (the copy of the model that is pruned)."""
    pm = PassModel(act, sequential=sequential, limit=limit, device_limit=device_limit, on_device=on_device,
                   fixed=fixed)
    base = pm.base
    if not needs:
        return PassPlan(what, 0 if on_device else base, base if on_device else 0, [])
    total = pm.host_peak(needs)
    if pm.fits(needs) or sequential:
        waves = [[n.name for n in needs]]
        bad = None if pm.fits(needs) else max(needs, key=lambda n: pm.host_peak([n]))
    else:
        waves, cur, bad = [], [], None
        for n in needs:
            if not pm.fits([n]):
                bad = n
                break
            if cur and not pm.fits(cur + [n]):
                waves.append([c.name for c in cur])
                cur = []
            cur.append(n)
        if bad is None:
            waves.append([c.name for c in cur])
    if bad is not None:
        raise MemoryLimitError(_refusal(what, bad, total if sequential else pm.host_peak([bad]), pm,
                                        needs if sequential else [bad],
                                        "the largest pair, " if sequential else "pair ",
                                        "" if sequential else " even with one pair per wave"))
    peak = max(pm.host_peak([n for n in needs if n.name in w]) for w in waves)
    dpeak = max(pm.device_peak([n for n in needs if n.name in w]) for w in waves)
    return PassPlan(what, int(peak), int(dpeak), waves, max(pm.host_peak([n]) for n in needs), int(total))


def _refusal(what: str, bad: PairNeed, need: int, pm: PassModel, dev_group: List[PairNeed], which: str,
             tail: str) -> str:
    """The message of a :class:`MemoryLimitError`: the estimate, its parts, the limit and what to change."""
    on_device, fixed, limit = pm.on_device, pm.fixed, pm.limit
    return (f"not enough memory: {what} needs an estimated {gib(need)} at once{tail}"
            f" ({which}{bad.name}: statistics {gib(bad.statistics['host'] + bad.statistics['device'])}, selection "
            f"{gib(bad.solver)}; cached calibration activations up to "
            f"{gib(max(pm.base, pm.act.get(bad.consumer_node, 0)) - fixed)}; the model copy being pruned {gib(fixed)}"
            + (f"; {gib(pm.device_peak(dev_group))} on the device" if on_device else "")
            + f"), over memory_limit = {gib(limit.bytes or 0)} ({limit.source})"
            + (f" / the device limit {gib(pm.device_limit)}" if pm.device_limit is not None else "")
            + ". Nothing was allocated. Raise memory_limit= (bytes, or a fraction of the available memory), use "
              "fewer calibration batches (max_batches=) or strategy='hooks' (one batch of activations at a time), "
              "or leave the largest pairs out (pairs=).")


@dataclass
class Decision:
    """How the memory guard lets a pair into a pass: its ``statistics`` (``"exact"`` or ``"lean"``), whether it
    runs in a pass of its own (``own_pass``), and the :class:`PairNeed` of that choice."""

    statistics: str
    own_pass: bool
    need: PairNeed


def decide(what: str, options: Dict[str, List[Decision]], pm: PassModel, alone: PassModel
           ) -> Tuple[Dict[str, Decision], Dict[str, str]]:
    """The first of each pair's ``options`` (in order of preference) that fits on its own: in the pass
    (``pm``) or in a pass of its own (``alone``). Returns the decisions and, for the pairs none of whose
    options fit, the reason; raises :class:`MemoryLimitError` when no pair fits at all."""
    chosen: Dict[str, Decision] = {}
    skipped: Dict[str, str] = {}
    for name, opts in options.items():
        for d in opts:
            if (alone if d.own_pass else pm).fits([d.need]):
                chosen[name] = d
                break
        else:
            cheapest = min(opts, key=lambda d: (alone if d.own_pass else pm).host_peak([d.need]))
            model = alone if cheapest.own_pass else pm
            skipped[name] = (f"{what}: it does not fit memory_limit = {gib(pm.limit.bytes or 0)}: even "
                             f"{'lean' if cheapest.statistics == 'lean' else 'exact'} statistics"
                             f"{' in a pass of its own' if cheapest.own_pass else ''} need an estimated "
                             f"{gib(model.host_peak([cheapest.need]))} at once")
    if options and not chosen:  # nothing fits: a smaller limit than the smallest block of statistics
        best = min(((d, alone if d.own_pass else pm) for o in options.values() for d in o),
                   key=lambda t: t[1].host_peak([t[0].need]))
        d, model = best
        raise MemoryLimitError(_refusal(what, d.need, model.host_peak([d.need]), model, [d.need], "",
                                        " even for the pair that needs least" +
                                        (" in a pass of its own" if d.own_pass else "")))
    return chosen, skipped


@dataclass
class MemoryReport:
    """The memory guard's numbers, kept in ``PruneReport.memory``."""

    limit: Optional[int]
    source: str
    available: Optional[int]
    estimate: int = 0
    device_estimate: int = 0
    passes: List[dict] = field(default_factory=list)
    model_copy: int = 0

    def add(self, plan: PassPlan) -> None:
        self.passes.append({"pass": plan.what, "estimate": plan.peak, "device_estimate": plan.device_peak,
                            "waves": len(plan.waves), "largest_pair": plan.largest_pair, "lean": list(plan.lean),
                            "own_pass": list(plan.own_pass), "skipped": dict(plan.skipped)})
        self.estimate = max(p["estimate"] for p in self.passes)
        self.device_estimate = max(p["device_estimate"] for p in self.passes)

    def to_dict(self) -> dict:
        return {"limit": self.limit, "limit_source": self.source, "available": self.available,
                "estimate": self.estimate, "device_estimate": self.device_estimate, "model_copy": self.model_copy,
                "passes": self.passes}


class Guard:
    """The memory guard of one :func:`lsprune.torch.prune` call.

    Parameters
    ----------
    option : "auto", float, int or None
        ``memory_limit``.
    dist : distributed.Dist
        Distributed: the smallest limit of all ranks applies and rank 0's waves are used everywhere.
    device : torch.device
    ref_modules : dict
        Modules of the original network.
    chains : dict or None
        Graph strategy: the pairs' chains (consumer node, sliced nodes) by producer, and the coupled
        groups' :class:`.coupling.GroupChain` by group name.
    graph : fx.Graph or None
        Graph strategy: the traced graph (node bytes recorded by ``record_shapes``).
    method, refit, statistics
        As in ``prune``.
    scale : float
        Calibration samples over the samples of the batch the node bytes were recorded on.
    """

    def __init__(self, option, dist, device, ref_modules, chains, graph, *, method: str, refit: bool, scale: float,
                 model_copies: int = 1, statistics: str = "exact"):
        self.dist, self.modules, self.chains, self.graph = dist, ref_modules, chains, graph
        self.method, self.refit, self.statistics = method, refit, statistics
        root = ref_modules[""]
        self.fixed = model_copies * sum(t.nelement() * t.element_size()
                                        for t in (*root.parameters(), *root.buffers()))
        self.on_device = device.type != "cpu"
        self.limit = resolve_limit(option)
        self.device_limit = None
        if device.type == "cuda" and (option == "auto" or isinstance(option, float)):
            free, _ = torch.cuda.mem_get_info(device)
            self.device_limit = int((DEFAULT_FRACTION if option == "auto" else option) * free)
        if dist.active:  # every rank plans with the tightest limit and the largest shard
            inf = float("inf")
            lim, dlim, neg_scale = dist.reduce_numbers(
                [self.limit.bytes if self.limit.bytes is not None else inf,
                 self.device_limit if self.device_limit is not None else inf, -scale], "min")
            self.limit.bytes = None if lim == inf else int(lim)
            self.device_limit = None if dlim == inf else int(dlim)
            scale = -neg_scale
        self.scale = scale
        self.report = MemoryReport(self.limit.bytes, self.limit.source, self.limit.available, model_copy=self.fixed)

    def _shape(self, pair):
        """(D, m, C, g, float32 scratch, consumer node, transient bytes) of a pair's consumer."""
        cons = self.modules[pair.consumer]
        D = consumer_width(cons)
        C = max(1, producer_channels(self.modules[pair.producer]))
        g = D // C
        node = self.chains[pair.producer].consumer_node if self.chains is not None else None
        chunk = CHUNK_BYTES
        if node is not None and node.args and isinstance(node.args[0], fx.Node):  # one batch of unfolded inputs
            chunk = min(chunk, int(node.args[0].meta.get("nbytes", chunk) * g))
        # float64 activations skip the float32 scratch
        return D, int(cons.weight.shape[0]), C, g, cons.weight.dtype != torch.float64, node, TRANSIENT_CHUNKS * chunk

    def _need(self, pair, count: int, *, sequential: bool) -> PairNeed:
        if isinstance(pair, CoupledGroup):
            return self._group_need(pair, count, sequential=sequential)
        D, m, C, g, fp32, node, transient = self._shape(pair)
        return PairNeed(pair.producer, node,
                        statistics_bytes(D, m if sequential else 0, fp32_scratch=fp32, on_device=self.on_device),
                        solver_bytes(D, m, int(count) * g, method=self.method, refit=self.refit,
                                     independent=not sequential, g=g), transient)

    def _reader_need(self, name: str, consumer: str, g: int, count: int, *, sequential: bool) -> PairNeed:
        """One reader of a coupled group: its statistics and solver, keeping ``count`` channels of ``g``
        columns each."""
        cons = self.modules[consumer]
        D, m = consumer_width(cons), int(cons.weight.shape[0])
        fp32 = cons.weight.dtype != torch.float64  # float64 activations skip the float32 scratch
        return PairNeed(name, None,
                        statistics_bytes(D, m if sequential else 0, fp32_scratch=fp32, on_device=self.on_device),
                        solver_bytes(D, m, int(count) * g, method=self.method, refit=self.refit,
                                     independent=not sequential, g=g), TRANSIENT_CHUNKS * CHUNK_BYTES)

    def _group_need(self, group: CoupledGroup, count: int, *, sequential: bool) -> PairNeed:
        """A coupled group holds every reader's statistics at once and solves them jointly (one forward
        state per reader): the readers' needs summed, alive at its last reader."""
        chain = self.chains[group.name] if self.chains is not None else None
        needs = [self._reader_need(group.name, r, g, count, sequential=sequential)
                 for r, g in zip(group.readers, group.group_sizes)]
        stats = {k: sum(n.statistics[k] for n in needs) for k in needs[0].statistics}
        return PairNeed(group.name, chain.consumer_node if chain is not None else None, stats,
                        sum(n.solver for n in needs), max(n.transient for n in needs))

    def lean_applies(self, pair) -> bool:
        """Lean statistics differ from exact ones (a channel is a group of g > 1 columns) and the method can
        use them (the LS solvers and the rankings that need no per-column statistics, with the LS re-fit)."""
        if isinstance(pair, CoupledGroup):  # groups have exact statistics only
            return False
        return self.refit and self.method in LEAN_METHODS and self._shape(pair)[3] > 1

    def _lean_need(self, pair, count: int, *, paths: bool = False) -> PairNeed:
        """Lean statistics (docs/design.md, "Lean statistics"): the channel-level sums (C columns, with targets)
        and their selection, then the kept columns' sums (K = count·g) and their re-fit; both counted at once.
        ``paths``: a global budget's pass, which only needs the channel-level error path."""
        D, m, C, g, fp32, node, transient = self._shape(pair)
        K = int(count) * g
        s1 = statistics_bytes(C, m, fp32_scratch=fp32, on_device=self.on_device)
        solver = solver_bytes(C, m, int(count), method=self.method, refit=True, independent=False)
        if paths:
            return PairNeed(pair.producer, node, s1, solver, transient)
        s2 = statistics_bytes(K, m, fp32_scratch=fp32, on_device=self.on_device)
        solver = max(solver, solver_bytes(K, m, K, method="magnitude", refit=True, independent=False))
        return PairNeed(pair.producer, node, {k: s1[k] + s2[k] for k in s1}, solver, transient)

    def _options(self, pair, count: int, *, sequential: bool, own: bool, paths: bool) -> List[Decision]:
        """A pair's ways into the pass, in order of preference: exact statistics (in the pass, then in a pass
        of its own), then lean ones (likewise); ``statistics=`` removes one kind."""
        out = []
        lean = self.statistics != "exact" and self.lean_applies(pair)
        if self.statistics != "lean" or not lean:
            need = self._need(pair, count, sequential=sequential)
            out += [Decision("exact", False, need)] + ([Decision("exact", True, need)] if own else [])
        if lean:
            need = self._lean_need(pair, count, paths=paths)
            out += [Decision("lean", False, need)] + ([Decision("lean", True, need)] if own else [])
        return out

    def plan(self, what: str, pairs, counts, names, *, sequential: bool, replace: bool = False,
             paths: bool = False) -> PassPlan:
        """Estimates a pass over the pairs ``names`` (keeping ``counts[producer]`` channels): each pair gets the
        first of its options that fits (:meth:`_options`, :func:`decide`) or is left out with the reason; an
        independent pass is split into waves. Raises :class:`MemoryLimitError` when no pair fits at all.
        A pass of its own exists in the sequential graph sweep only (the hooks strategy already holds one
        batch of activations; an independent pass has its waves). ``paths``: a global budget's pass (error paths
        only, no re-fit)."""
        consumers = {}
        if self.chains is not None:
            for n in names:
                c = self.chains[n]
                consumers[c.consumer_node] = [cn for cn, _, _ in c.slices]
        act = activation_profile(self.graph, consumers, sequential=sequential, scale=self.scale)
        kw = dict(limit=self.limit, device_limit=self.device_limit, on_device=self.on_device, fixed=self.fixed)
        pm, alone = PassModel(act, sequential=sequential, **kw), PassModel({None: 0}, sequential=True, **kw)
        own = sequential and self.graph is not None
        # a coupled group is solved inside the graph sweep only: no pass of its own
        options = {p.producer: self._options(p, counts[p.producer], sequential=sequential,
                                             own=own and not isinstance(p, CoupledGroup), paths=paths)
                   for p in pairs if p.producer in names}
        chosen, skipped = decide(what, options, pm, alone)
        in_pass = [d.need for d in chosen.values() if not d.own_pass]
        plan = plan_pass(what, in_pass, act, sequential=sequential, **kw)
        if not in_pass and len(chosen):  # only passes of their own: no sweep holds the cached activations
            plan.peak = plan.device_peak = 0
        plan.lean = [n for n, d in chosen.items() if d.statistics == "lean"]
        plan.own_pass = [n for n, d in chosen.items() if d.own_pass]
        plan.skipped = skipped
        for n in plan.own_pass:
            plan.peak = max(plan.peak, alone.host_peak([chosen[n].need]))
            plan.device_peak = max(plan.device_peak, alone.device_peak([chosen[n].need]))
        if self.dist.active:  # every rank runs rank 0's plan
            plan.waves, plan.lean, plan.own_pass, plan.skipped = self.dist.broadcast_object(
                (plan.waves, plan.lean, plan.own_pass, plan.skipped), 0)
        if options:
            if replace:
                self.report.passes = [p for p in self.report.passes if p["pass"] != what]
            self.report.add(plan)
        return plan

    def announce(self, plan: PassPlan) -> None:
        """Logs that a pass runs in waves (when it does)."""
        if len(plan.waves) > 1:
            logger.warning("%s needs an estimated %s at once, over memory_limit = %s (%s): it runs in %d waves of "
                           "pairs, one forward pass each", plan.what, gib(plan.total), gib(self.limit.bytes or 0),
                           self.limit.source, len(plan.waves))

