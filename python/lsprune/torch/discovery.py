"""What a prune works on: the pairs of a model, found by tracing it (graph strategy) or checked with module
hooks (hooks strategy, for the pairs the user names). Nothing is modified here."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch.fx as fx

from .batches import capture_call, forward_error
from .coupling import GroupChain, find_groups, match_groups, with_groups
from .flops import record_positions
from .graph import NotTraceableError, Runner, bind_placeholders, concrete_arguments, discover, record_shapes, trace
from .hooks import check_mapping, probe
from .pairs import CoupledGroup, NoPrunablePairsError, Pair, PairSearch, SkippedPair

logger = logging.getLogger("lsprune.torch")


def graph_discovery(ref, batch0, run, *, coupled: bool = False):
    """Traces ``ref`` on the example batch: returns (PairSearch, chains by producer, graph module, output
    positions per module, the example's placeholder inputs, the coupled groups' chains). ``coupled``: look
    for coupled groups too (:mod:`.coupling`); otherwise the search is the pairs' alone and no chains."""
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
    groups: List[GroupChain] = []
    if coupled:
        groups, blocked = find_groups(gm.graph, ref, shapes, search)
        search = with_groups(search, groups, blocked)
    return search, chains, gm, positions, inputs0, groups


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
    groups: List[GroupChain] = field(default_factory=list)  # coupled groups to prune, in completion order

    @property
    def strategy(self) -> str:
        return "graph" if self.use_graph else "hooks"


def find_prunable(ref, batch0, run, *, strategy: str, explicit: Optional[List[Pair]], seed: int,
                  coupled: bool = False) -> Found:
    """The pairs (and, with ``coupled``, the coupled groups) of ``ref`` to prune: everything the graph shows,
    or the ``explicit`` ones (checked against the graph, or with hooks on the example batch when the model
    does not trace or ``strategy="hooks"``; coupled groups need the graph)."""
    declared = [p for p in explicit if isinstance(p, CoupledGroup)] if explicit is not None else []
    explicit = [p for p in explicit if not isinstance(p, CoupledGroup)] if explicit is not None else None
    found = _try_graph(ref, batch0, run, strategy, explicit if explicit or not declared else None,
                       coupled=coupled or bool(declared))
    if declared and (found is None or strategy == "hooks"):
        raise ValueError("coupled groups (CoupledGroup in pairs=) need the graph strategy: a model torch.fx traces "
                         "and strategy='auto' or 'graph'")
    if found is not None and strategy == "hooks":
        _skip_groups(found, "coupled groups need the graph strategy (strategy='hooks' prunes pairs only)")
    if found is None or strategy == "hooks":
        to_probe = explicit if explicit is not None else list(found.search.pairs)
        positions: Dict[str, float] = {}
        probes = probe(ref, to_probe, batch0, run, positions)
        for i, q in enumerate(probes):
            check_mapping(ref, q, batch0, run, seed=seed * 7919 + i)
            q.x0 = None  # the captured activation is no longer needed
        found = Found([q.pair for q in probes], False, positions, search=found.search if found else None,
                      probes=probes)
    elif explicit is not None or declared:
        found.pairs = match_explicit(explicit or [], found.search, found.chains)
        found.groups = match_groups(declared, {c.group.name: c for c in found.groups}, found.search)
    if not found.pairs and not found.groups:
        raise NoPrunablePairsError("no prunable pairs found" +
                                   (f":\n{found.search.table()}" if found.search is not None else ""), found.search)
    return found


def _try_graph(ref, batch0, run, strategy: str, explicit, *, coupled: bool) -> Optional[Found]:
    """The graph's pairs (and groups), or None when the model does not trace and the named pairs can go to
    hooks (or when hooks are asked for with named pairs)."""
    if strategy not in ("auto", "graph") and explicit is not None:
        return None
    try:
        search, chains, gm, positions, inputs0, groups = graph_discovery(ref, batch0, run, coupled=coupled)
    except NotTraceableError as e:
        if strategy == "graph" or explicit is None:
            raise ValueError(f"{e}\nName the pairs to prune with pairs=[(producer, consumer[, between]), ...]: "
                             "they are then checked and pruned with module hooks") from e
        logger.info("torch.fx cannot trace the model; using module hooks for the named pairs (%s)", e)
        return None
    return Found(list(search.pairs), True, positions, search=search, chains=chains, gm=gm, inputs0=inputs0,
                 groups=list(groups))


def _skip_groups(found: Found, reason: str) -> None:
    """The coupled groups are not pruned after all: their writers join the skipped candidates."""
    for c in found.groups:
        for w in c.group.writers:
            found.search.skipped.append(SkippedPair(w, f"{c.group.kind} group {c.group.name}: {reason}"))
    found.search.groups = []
    found.groups = []


def skip_groups_for_method(found: Found, method: str, supported) -> None:
    """Methods without a coupled-group variant leave the groups alone (listed as skipped, with the reason)."""
    if method not in supported and found.groups:
        _skip_groups(found, f"method {method!r} has no coupled-group variant (one of {', '.join(supported)} has)")


def match_explicit(explicit: List[Pair], search: PairSearch, chains) -> List[Pair]:
    """The graph's records of the named pairs (in forward order); a pair the graph does not show is refused
    with the reason."""
    skipped = {s.producer: s for s in search.skipped}
    writers = {w: g for g in search.groups for w in g.writers}
    chosen = []
    for e in explicit:
        c = chains.get(e.producer)
        if c is None or c.pair.consumer != e.consumer:
            why = skipped[e.producer].reason if e.producer in skipped else \
                (f"its consumer is {c.pair.consumer!r}" if c is not None else
                 f"it writes the coupled {writers[e.producer].kind} group {writers[e.producer].name!r} (pass "
                 "that CoupledGroup from find_pairs)" if e.producer in writers else "it is not a producer in the graph")
            raise ValueError(f"pair {e.producer} -> {e.consumer} cannot be pruned: {why}")
        if e.between and set(e.between) != set(c.pair.between):
            raise ValueError(f"pair {e.producer} -> {e.consumer}: between={list(e.between)} but the graph shows "
                             f"{list(c.pair.between)} losing the same channels")
        chosen.append(c.pair)
    order = {p.producer: i for i, p in enumerate(search.pairs)}
    return sorted(chosen, key=lambda p: order[p.producer])


def check_keep(keep, chosen: List[Pair], search: Optional[PairSearch]) -> None:
    """``keep`` names only producers of the pairs (names of the coupled groups) being pruned."""
    if not keep:
        return
    producers = {p.producer for p in chosen}
    skipped = {s.producer: s.reason for s in search.skipped} if search is not None else {}
    writers = {w: g.name for g in (search.groups if search is not None else ()) for w in g.writers}
    for name in keep:
        if name not in producers:
            why = f" (skipped: {skipped[name]})" if name in skipped else \
                (f" (a writer of the coupled group {writers[name]!r}: name the group)" if name in writers else "")
            raise ValueError(f"keep names {name!r}, which is not the producer of a pair being pruned{why}; "
                             f"producers: {sorted(producers)}")
