"""The graph strategy: one sweep over the traced graph with the original and the pruned network side by side.

Every node is evaluated for *all* calibration batches before the next node, in two
environments: ``orig`` (the original network) and ``pruned`` (the network pruned so
far). When the sweep reaches a pair's consumer it has the consumer's input in the
pruned environment and its original output, so it can accumulate the statistics,
select, re-fit and shrink the modules right away; it then drops the removed channels
from the cached pruned-environment values of the pair's path (exactly what the
shrunk producer would have computed) and goes on. Values are freed after their last
use. Cost: about one original and one pruned forward pass in total; memory: the
live activations of the whole calibration set.

Until a node depends on something already pruned, both environments share its value
(computed once). In-place ops (``relu_``, ``inplace=True``) keep their eager
semantics; a shared input that an op would mutate differently in the two
environments is cloned first.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves
from tqdm.auto import tqdm

from .batches import forward_error
from .distributed import Dist
from .graph import Chain, Runner, map_values, mutated_input
from .pruning import PairJob, Timer, accumulate, finish


def _slice(v: torch.Tensor, keep: torch.Tensor, dim: int, group: int) -> torch.Tensor:
    """Keeps channels ``keep`` of ``v`` along ``dim`` (``group`` consecutive entries per channel)."""
    if group > 1:
        keep = (keep[:, None] * group + torch.arange(group, device=keep.device)).reshape(-1)
    return v.index_select(dim if dim >= 0 else v.ndim + dim, keep)


def sweep(graph: fx.Graph, ref: torch.nn.Module, pruned: torch.nn.Module, inputs: List[Dict[str, object]],
          masks: List[Optional[torch.Tensor]], jobs: Dict[str, PairJob], chains: Dict[str, Chain], *,
          sequential: bool, method: str, damping: float, progress: bool, timer: Timer,
          collect_only: bool = False, finish_fn: Callable = finish, job_nodes: Optional[Dict[str, fx.Node]] = None,
          dist: Optional[Dist] = None) -> dict:
    """Runs the sweep; prunes ``pruned`` in place.

    Parameters
    ----------
    inputs : list of dict
        Per batch, the placeholder values (:func:`graph.bind_placeholders`).
    masks : list
        Per batch, a bool position mask or None.
    jobs : dict producer name -> PairJob
        Pairs to prune (pairs that keep every channel are not in it).
    chains : dict producer name -> Chain
    collect_only : bool
        Independent mode: only accumulate the statistics (the jobs are not finished).
    finish_fn : callable
        ``finish_fn(job, method=, damping=, timer=)`` changes ``pruned`` once a job's statistics
        are complete (default: select, re-fit and shrink the pair). Jobs without a chain (e.g.
        factorized layers, keyed in ``job_nodes`` by their node) only have their module replaced;
        the pruned network's modules are re-read after every job.
    job_nodes : dict key -> fx.Node, optional
        The node at which a job without a chain is finished (its module's call).
    dist : Dist, optional
        Distributed calibration: the output error is summed over the ranks (the statistics are
        summed by the jobs' sums).

    Returns
    -------
    dict with ``output_relative_error`` (sequential only, else None) and ``pruned_pass_fraction``
    (share of graph nodes the pruned environment had to evaluate itself).
    """
    nodes = list(graph.nodes)
    nb = len(inputs)
    by_consumer = {(chains[p].consumer_node if p in chains else job_nodes[p]): jobs[p] for p in jobs}
    chain_of = {chains[p].consumer_node: chains[p] for p in jobs if p in chains}
    last_use = {}
    for i, n in enumerate(nodes):
        for inp in n.all_input_nodes:
            last_use[inp] = i
    ref_run, pr_run = Runner(ref), Runner(pruned)
    orig: Dict[fx.Node, list] = {}
    pruned_env: Dict[fx.Node, list] = {}
    diverged = set()  # nodes whose pruned-env value differs from the original one
    modified = set()  # names of modules already shrunk in `pruned`
    n_ops = n_pruned_ops = 0
    out_err = None
    pair_bar = tqdm(total=len(jobs), desc="lsprune pairs", unit="pair", disable=not progress, leave=False)
    node_bar = tqdm(total=len(nodes), desc="lsprune sweep", unit="node", disable=not progress, leave=False)
    pending: List[PairJob] = []
    try:
        for i, node in enumerate(nodes):
            node_bar.update(1)
            if node.op == "placeholder":
                orig[node] = [inp[node.name] for inp in inputs]
                pruned_env[node] = orig[node]
                continue
            if node.op == "output":
                if sequential:
                    num, den = _output_error(node, orig, pruned_env, nb)
                    if dist is not None:
                        num, den = dist.reduce_numbers([num, den])
                    out_err = num / den if den > 0 else None
                break
            n_ops += 1
            div = sequential and (any(a in diverged for a in node.all_input_nodes) or
                                  (node.op in ("call_module", "get_attr") and _owner(node) in modified))
            if div:
                mut = mutated_input(node, ref_run.modules)
                if mut is not None:
                    # the op writes into `mut` differently in the two networks: give the pruned one its own
                    # copy, and whoever reads `mut` later reads a pruned-network value
                    if mut in pruned_env and pruned_env[mut] is orig.get(mut):
                        pruned_env[mut] = [v.clone() if isinstance(v, torch.Tensor) else v for v in orig[mut]]
                    diverged.add(mut)
            with timer("forward"):
                vals = []
                for b in range(nb):
                    args = map_values(node.args, lambda n: orig[n][b])
                    kwargs = map_values(node.kwargs, lambda n: orig[n][b])
                    try:
                        vals.append(ref_run(node, args, kwargs))
                    except Exception as e:
                        raise forward_error(e, b) from e
                orig[node] = vals
            job = by_consumer.get(node)
            if job is not None:
                src = node.args[0]
                x_env = pruned_env if sequential else orig
                for b in range(nb):
                    accumulate(job, x_env[src][b], orig[node][b], masks[b], timer, b)
                if sequential:
                    rep = finish_fn(job, method=method, damping=damping, timer=timer)
                    pair_bar.update(1)
                    modified.update([job.pair.producer, job.pair.consumer, *job.pair.between])
                    pr_run.modules = dict(pruned.named_modules())  # a module may have been replaced
                    if node in chain_of:
                        keep = torch.as_tensor(rep.kept, dtype=torch.long)
                        for cn, dim, group in chain_of[node].slices:
                            if cn in pruned_env:
                                pruned_env[cn] = [_slice(v, keep.to(v.device), dim, group) for v in pruned_env[cn]]
                                diverged.add(cn)
                    div = True
                else:
                    pending.append(job)
            if sequential:
                if div:
                    n_pruned_ops += 1
                    with timer("forward"):
                        vals = []
                        for b in range(nb):
                            args = map_values(node.args, lambda n: pruned_env[n][b])
                            kwargs = map_values(node.kwargs, lambda n: pruned_env[n][b])
                            vals.append(pr_run(node, args, kwargs))
                        pruned_env[node] = vals
                    diverged.add(node)
                else:
                    pruned_env[node] = orig[node]
            for inp in node.all_input_nodes:
                if last_use.get(inp) == i:
                    orig.pop(inp, None)
                    pruned_env.pop(inp, None)
            if not node.users:
                orig.pop(node, None)
                pruned_env.pop(node, None)
        for job in ([] if collect_only else pending):  # independent mode: all measured on the original network
            finish_fn(job, method=method, damping=damping, timer=timer)
            pair_bar.update(1)
    finally:
        pair_bar.close()
        node_bar.close()
    return {"output_relative_error": out_err,
            "pruned_pass_fraction": (n_pruned_ops / n_ops if n_ops else 0.0) if sequential else 0.0}


def _owner(node: fx.Node) -> str:
    if node.op == "call_module":
        return node.target
    return node.target.rsplit(".", 1)[0] if "." in node.target else ""


def _output_error(node: fx.Node, orig, pruned_env, nb: int) -> Tuple[float, float]:
    """``Σ‖f_pruned(x) - f(x)‖²`` and ``Σ‖f(x)‖²`` over the batches."""
    num = den = 0.0
    for b in range(nb):
        o = [t for t in tree_leaves(map_values(node.args, lambda n: orig[n][b])) if isinstance(t, torch.Tensor)]
        p = [t for t in tree_leaves(map_values(node.args, lambda n: pruned_env[n][b])) if isinstance(t, torch.Tensor)]
        for a, c in zip(o, p):
            if a.is_floating_point() and a.shape == c.shape:
                a64, c64 = a.detach().double(), c.detach().double()
                num += float(((c64 - a64) ** 2).sum())
                den += float((a64 ** 2).sum())
    return num, den
