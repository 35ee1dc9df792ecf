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
  and residual ``R``, the ``K × D`` state ``C``, the Cholesky factor, the weights); backward
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
one more forward pass over the calibration data (same result); when a single pair (or a
sequential pass) does not fit, :func:`prune` refuses before allocating any statistics.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.fx as fx

from .accumulate import CHUNK_BYTES
from .pairs import CoupledGroup, producer_channels
from .pruning import consumer_width

logger = logging.getLogger("lsprune.torch")

#: Default ``memory_limit``: this fraction of the memory available when ``prune`` starts.
DEFAULT_FRACTION = 0.7
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


def solver_bytes(D: int, m: int, K: int, *, method: str, refit: bool, independent: bool) -> int:
    """Host bytes of one pair's selection and re-fit (see the module docstring)."""
    if method == "backward":
        b = D * D + 3 * D * m + K * K + 3 * K * m
    elif method in ("magnitude", "random"):
        b = D * m + K * K + 3 * K * m
    else:  # forward, omp, thinet (whose error path runs forward selection)
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


def plan_pass(what: str, needs: List[PairNeed], act: Dict[Optional[fx.Node], int], *, sequential: bool,
              limit: Limit, device_limit: Optional[int] = None, on_device: bool = False, fixed: int = 0) -> PassPlan:
    """Peak memory of a pass and its waves; raises :class:`MemoryLimitError` when even one pair at a
    time does not fit (the message gives the estimate, its parts and the limit). ``on_device``: the
    activations, the sums and the model copy live on the GPU (``device_limit``), the solver on the host.
    ``fixed``: bytes held throughout (the copy of the model that is pruned)."""
    act = {k: v + fixed for k, v in act.items()}  # the model copy lives next to the activations
    base = act.get(None, 0)

    def live(n: PairNeed) -> int:  # activations and transient rows while pair n streams its batches
        return act.get(n.consumer_node, base) + n.transient

    def host_peak(group: List[PairNeed]) -> int:
        a = 0 if on_device else base
        if sequential:
            return max([a] + [(0 if on_device else live(n)) + n.statistics["host"] + n.statistics["convert"] +
                              n.solver for n in group])
        stats, peak = 0, a
        for n in group:  # the statistics pile up along the pass; selections run at the end, one at a time
            stats += n.statistics["host"]
            peak = max(peak, (0 if on_device else live(n)) + stats)
        end = stats + (0 if on_device else fixed)  # the activations are gone, the model copy is not
        return max(peak, end + max((n.statistics["convert"] + n.solver for n in group), default=0))

    def device_peak(group: List[PairNeed]) -> int:
        if not on_device:
            return 0
        if sequential:
            return max([base] + [live(n) + n.statistics["device"] for n in group])
        stats, peak = 0, base
        for n in group:
            stats += n.statistics["device"]
            peak = max(peak, live(n) + stats)
        return peak

    def fits(group) -> bool:
        return (limit.bytes is None or host_peak(group) <= limit.bytes) and \
            (device_limit is None or device_peak(group) <= device_limit)

    if not needs:
        return PassPlan(what, 0 if on_device else base, base if on_device else 0, [])
    total = host_peak(needs)
    if fits(needs) or sequential:
        waves = [[n.name for n in needs]]
        bad = None if fits(needs) else max(needs, key=lambda n: host_peak([n]))
    else:
        waves, cur, bad = [], [], None
        for n in needs:
            if not fits([n]):
                bad = n
                break
            if cur and not fits(cur + [n]):
                waves.append([c.name for c in cur])
                cur = []
            cur.append(n)
        if bad is None:
            waves.append([c.name for c in cur])
    peak = max(host_peak([n for n in needs if n.name in w]) for w in waves) if bad is None else host_peak(needs)
    dpeak = max(device_peak([n for n in needs if n.name in w]) for w in waves) if bad is None else device_peak(needs)
    if bad is not None:
        need = total if sequential else host_peak([bad])
        raise MemoryLimitError(
            f"not enough memory: {what} needs an estimated {gib(need)} at once"
            + ("" if sequential else " even with one pair per wave")
            + f" ({'the largest pair, ' if sequential else 'pair '}{bad.name}: statistics "
              f"{gib(bad.statistics['host'] + bad.statistics['device'])}, selection {gib(bad.solver)}; cached "
              f"calibration activations up to {gib(max(base, act.get(bad.consumer_node, 0)) - fixed)}; the model "
              f"copy being pruned {gib(fixed)}"
            + (f"; {gib(device_peak(needs if sequential else [bad]))} on the device" if on_device else "")
            + f"), over memory_limit = {gib(limit.bytes or 0)} ({limit.source})"
            + (f" / the device limit {gib(device_limit)}" if device_limit is not None else "")
            + ". Nothing was allocated. Raise memory_limit= (bytes, or a fraction of the available memory), use "
              "fewer calibration batches (max_batches=) or strategy='hooks' (one batch of activations at a time), "
              "or leave the largest pairs out (pairs=).")
    return PassPlan(what, int(peak), int(dpeak), waves, max(host_peak([n]) for n in needs), int(total))


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
                            "waves": len(plan.waves), "largest_pair": plan.largest_pair})
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
    method, refit
        As in ``prune``.
    scale : float
        Calibration samples over the samples of the batch the node bytes were recorded on.
    """

    def __init__(self, option, dist, device, ref_modules, chains, graph, *, method: str, refit: bool, scale: float,
                 model_copies: int = 1):
        self.dist, self.modules, self.chains, self.graph = dist, ref_modules, chains, graph
        self.method, self.refit = method, refit
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

    def _need(self, pair, count: int, *, sequential: bool) -> PairNeed:
        if isinstance(pair, CoupledGroup):
            return self._group_need(pair, count, sequential=sequential)
        g = consumer_width(self.modules[pair.consumer]) // max(1, producer_channels(self.modules[pair.producer]))
        node = self.chains[pair.producer].consumer_node if self.chains is not None else None
        return self._reader_need(pair.producer, pair.consumer, g, count, node, sequential=sequential)

    def _reader_need(self, name: str, consumer: str, g: int, count: int, node, *, sequential: bool) -> PairNeed:
        """One consumer's statistics and solver, keeping ``count`` channels of ``g`` columns each."""
        cons = self.modules[consumer]
        D = consumer_width(cons)
        m = int(cons.weight.shape[0])
        fp32 = cons.weight.dtype != torch.float64  # float64 activations skip the float32 scratch
        chunk = CHUNK_BYTES
        if node is not None and node.args and isinstance(node.args[0], fx.Node):  # one batch of unfolded inputs
            chunk = min(chunk, int(node.args[0].meta.get("nbytes", chunk) * g))
        return PairNeed(name, node,
                        statistics_bytes(D, m if sequential else 0, fp32_scratch=fp32, on_device=self.on_device),
                        solver_bytes(D, m, int(count) * g, method=self.method, refit=self.refit,
                                     independent=not sequential), TRANSIENT_CHUNKS * chunk)

    def _group_need(self, group: CoupledGroup, count: int, *, sequential: bool) -> PairNeed:
        """A coupled group holds every reader's statistics at once and solves them jointly (one forward
        state per reader): the readers' needs summed, alive at its last reader."""
        chain = self.chains[group.name] if self.chains is not None else None
        needs = [self._reader_need(group.name, r, g, count, None, sequential=sequential)
                 for r, g in zip(group.readers, group.group_sizes)]
        stats = {k: sum(n.statistics[k] for n in needs) for k in needs[0].statistics}
        return PairNeed(group.name, chain.consumer_node if chain is not None else None, stats,
                        sum(n.solver for n in needs), max(n.transient for n in needs))

    def plan(self, what: str, pairs, counts, names, *, sequential: bool, replace: bool = False) -> PassPlan:
        """Estimates a pass over the pairs ``names`` (keeping ``counts[producer]`` channels) and splits an
        independent pass into waves; raises :class:`MemoryLimitError` when it cannot fit."""
        needs = [self._need(p, counts[p.producer], sequential=sequential) for p in pairs if p.producer in names]
        consumers = {}
        if self.chains is not None:
            for n in names:
                c = self.chains[n]
                consumers[c.consumer_node] = [cn for cn, _, _ in c.slices]
        act = activation_profile(self.graph, consumers, sequential=sequential, scale=self.scale)
        plan = plan_pass(what, needs, act, sequential=sequential, limit=self.limit, device_limit=self.device_limit,
                         on_device=self.on_device, fixed=self.fixed)
        if self.dist.active:
            plan.waves = self.dist.broadcast_object(plan.waves, 0)
        if needs:
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

