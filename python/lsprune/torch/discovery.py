"""What a prune works on: the pairs of a model, found by tracing it (graph strategy) or checked with module
hooks (hooks strategy, for the pairs the user names). Nothing is modified here."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch.fx as fx

from .batches import capture_call, forward_error
from .flops import record_positions
from .graph import NotTraceableError, Runner, bind_placeholders, concrete_arguments, discover, record_shapes, trace
from .hooks import check_mapping, probe
from .pairs import NoPrunablePairsError, Pair, PairSearch

logger = logging.getLogger("lsprune.torch")


def graph_discovery(ref, batch0, run):
    """Traces ``ref`` on the example batch: returns (PairSearch, chains by producer, graph module, output
    positions per module, the example's placeholder inputs)."""
    try:
        args, kwargs = capture_call(ref, run, batch0)
    except ValueError:
        raise
    except Exception as e:
        raise forward_error(e, 0) from e
    gm = trace(ref, concrete_arguments(ref, args, kwargs))
    inputs0 = bind_placeholders(ref, gm.graph, args, kwargs)
    positions: Dict[str, float] = {}
    try:
        with record_positions(ref, positions):
            shapes = record_shapes(gm.graph, Runner(ref), inputs0)
    except Exception as e:
        raise forward_error(e, 0) from e
    search, chains = discover(gm.graph, ref, shapes)
    return search, chains, gm, positions, inputs0


@dataclass
class Found:
    """The pairs to prune in forward order and how they were found: by the graph (``search``, ``chains``,
    ``gm``, ``inputs0``) or by hooks (``probes``); ``positions``: output positions per module on the example
    batch (FLOPs)."""

    pairs: List[Pair]
    use_graph: bool
    positions: Dict[str, float]
    search: Optional[PairSearch] = None
    chains: Optional[dict] = None
    gm: Optional[fx.GraphModule] = None
    inputs0: Optional[dict] = None
    probes: Optional[list] = None

    @property
    def strategy(self) -> str:
        return "graph" if self.use_graph else "hooks"


def find_prunable(ref, batch0, run, *, strategy: str, explicit: Optional[List[Pair]], seed: int) -> Found:
    """The pairs of ``ref`` to prune: every pair the graph shows, or the ``explicit`` ones (checked against
    the graph, or with hooks on the example batch when the model does not trace or ``strategy="hooks"``)."""
    found = _try_graph(ref, batch0, run, strategy, explicit)
    if found is None or strategy == "hooks":
        to_probe = explicit if explicit is not None else list(found.search.pairs)
        positions: Dict[str, float] = {}
        probes = probe(ref, to_probe, batch0, run, positions)
        for i, q in enumerate(probes):
            check_mapping(ref, q, batch0, run, seed=seed * 7919 + i)
            q.x0 = None  # the captured activation is no longer needed
        found = Found([q.pair for q in probes], False, positions, search=found.search if found else None,
                      probes=probes)
    elif explicit is not None:
        found.pairs = match_explicit(explicit, found.search, found.chains)
    if not found.pairs:
        raise NoPrunablePairsError("no prunable pairs found" +
                                   (f":\n{found.search.table()}" if found.search is not None else ""), found.search)
    return found


def _try_graph(ref, batch0, run, strategy: str, explicit) -> Optional[Found]:
    """The graph's pairs, or None when the model does not trace and the named pairs can go to hooks (or when
    hooks are asked for with named pairs)."""
    if strategy not in ("auto", "graph") and explicit is not None:
        return None
    try:
        search, chains, gm, positions, inputs0 = graph_discovery(ref, batch0, run)
    except NotTraceableError as e:
        if strategy == "graph" or explicit is None:
            raise ValueError(f"{e}\nName the pairs to prune with pairs=[(producer, consumer[, between]), ...]: "
                             "they are then checked and pruned with module hooks") from e
        logger.info("torch.fx cannot trace the model; using module hooks for the named pairs (%s)", e)
        return None
    return Found(list(search.pairs), True, positions, search=search, chains=chains, gm=gm, inputs0=inputs0)


def match_explicit(explicit: List[Pair], search: PairSearch, chains) -> List[Pair]:
    """The graph's records of the named pairs (in forward order); a pair the graph does not show is refused
    with the reason."""
    skipped = {s.producer: s for s in search.skipped}
    chosen = []
    for e in explicit:
        c = chains.get(e.producer)
        if c is None or c.pair.consumer != e.consumer:
            why = skipped[e.producer].reason if e.producer in skipped else \
                (f"its consumer is {c.pair.consumer!r}" if c is not None else "it is not a producer in the graph")
            raise ValueError(f"pair {e.producer} -> {e.consumer} cannot be pruned: {why}")
        if e.between and set(e.between) != set(c.pair.between):
            raise ValueError(f"pair {e.producer} -> {e.consumer}: between={list(e.between)} but the graph shows "
                             f"{list(c.pair.between)} losing the same channels")
        chosen.append(c.pair)
    order = {p.producer: i for i, p in enumerate(search.pairs)}
    return sorted(chosen, key=lambda p: order[p.producer])


def check_keep(keep, chosen: List[Pair], search: Optional[PairSearch]) -> None:
    """``keep`` names only producers of the pairs being pruned."""
    if not keep:
        return
    producers = {p.producer for p in chosen}
    skipped = {s.producer: s.reason for s in search.skipped} if search is not None else {}
    for name in keep:
        if name not in producers:
            why = f" (skipped: {skipped[name]})" if name in skipped else ""
            raise ValueError(f"keep names {name!r}, which is not the producer of a pair being pruned{why}; "
                             f"producers: {sorted(producers)}")
