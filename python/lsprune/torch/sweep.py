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

A coupled group's readers (jobs with ``job.group``) only stream their rows; the group is complete at its
last reader. In sequential mode the sweep then completes the group and *stops*: the values computed since
its first reader used the unpruned stream and the readers' old weights, so the caller starts the next
sweep on the model pruned so far (``modified`` names the modules already shrunk; docs/design.md,
"Coupled groups").
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves
from tqdm.auto import tqdm

from .batches import forward_error
from .distributed import Dist
from .graph import Chain, Runner, map_values, mutated_input
from .pruning import PairJob, Timer, accumulate


def _slice(v: torch.Tensor, keep: torch.Tensor, dim: int, group: int) -> torch.Tensor:
    """Keeps channels ``keep`` of ``v`` along ``dim`` (``group`` consecutive entries per channel)."""
    if group > 1:
        keep = (keep[:, None] * group + torch.arange(group, device=keep.device)).reshape(-1)
    return v.index_select(dim if dim >= 0 else v.ndim + dim, keep)


def sweep(graph: fx.Graph, ref: torch.nn.Module, pruned: torch.nn.Module, inputs: List[Dict[str, object]],
          masks: List[Optional[torch.Tensor]], jobs: Dict[str, PairJob], chains: Dict[str, Chain], *,
          sequential: bool, complete: Callable[[PairJob], object], progress: bool, timer: Timer,
          collect_only: bool = False, job_nodes: Optional[Dict[str, fx.Node]] = None,
          dist: Optional[Dist] = None, modified: Sequence[str] = ()) -> dict:
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
    complete : callable
        ``complete(job)`` changes ``pruned`` once a job's statistics are complete (e.g.
        :func:`.pruning.finish`: select, re-fit and shrink the pair) and returns its report (with
        ``kept`` for a pair with a chain). Jobs without a chain (e.g. factorized layers, keyed in
        ``job_nodes`` by their node) only have their module replaced; the pruned network's modules
        are re-read after every job. The sweep itself knows nothing of selection.
    job_nodes : dict key -> fx.Node, optional
        The node at which a job without a chain is finished (its module's call).
    dist : Dist, optional
        Distributed calibration: the output error is summed over the ranks (the statistics are
        summed by the jobs' sums).
    modified : sequence of str
        Modules of ``pruned`` already changed before this sweep (pairs pruned by an earlier sweep or in a
        pass of their own): their nodes are evaluated in the pruned environment from the start.

    A lean job (``job.lean``) gets ``job.source``, which streams its consumer's cached input again for the
    re-fit on its kept columns; in independent mode it is therefore completed at its node (its input is freed
    after the node's last use; independent surgery does not change what the sweep computes).

    Returns
    -------
    dict with ``output_relative_error`` (sequential and not stopped, else None), ``pass_fraction``
    (share of graph nodes the original network evaluated: < 1 when stopped after a group) and
    ``pruned_pass_fraction`` (share of graph nodes the pruned environment had to evaluate itself).
    """
    state = _Sweep(graph, ref, pruned, inputs, masks, jobs, chains, job_nodes, sequential=sequential, timer=timer,
                   complete=complete, collect_only=collect_only)
    state.modified.update(modified or ())
    units = {id(j.group) if j.group is not None else id(j): 1 for j in jobs.values()}
    pair_bar = tqdm(total=len(units), desc="lsprune pairs", unit="pair", disable=not progress, leave=False)
    node_bar = tqdm(total=len(state.nodes), desc="lsprune sweep", unit="node", disable=not progress, leave=False)
    state.on_done = lambda: pair_bar.update(1)
    try:
        out_err = state.run(node_bar, dist)
        for job in ([] if collect_only else state.pending):  # independent mode: all measured on the original network
            complete(job)
            pair_bar.update(1)
    finally:
        pair_bar.close()
        node_bar.close()
    return {"output_relative_error": out_err, "pruned_pass_fraction": state.pruned_pass_fraction,
            "pass_fraction": state.n_ops / state.total_ops if state.total_ops else 1.0}


class _Sweep:
    """The two environments of a sweep, node by node: ``orig`` (values of the original network, per batch)
    and ``pruned_env`` (the network pruned so far; the same list objects while a node has not diverged).
    ``complete(job)`` is called when a job's statistics are complete (sequential mode; independent jobs
    are left in ``pending``)."""

    def __init__(self, graph, ref, pruned, inputs, masks, jobs, chains, job_nodes, *, sequential: bool,
                 timer: Timer, complete: Callable, collect_only: bool = False):
        self.nodes = list(graph.nodes)
        self.pruned, self.inputs, self.masks = pruned, inputs, masks
        self.nb = len(inputs)
        self.sequential, self.timer, self.complete, self.collect_only = sequential, timer, complete, collect_only
        self.by_consumer: Dict[fx.Node, List[PairJob]] = {}  # several: the readers of a concatenation's slices
        for p in jobs:
            self.by_consumer.setdefault(chains[p].consumer_node if p in chains else job_nodes[p], []).append(jobs[p])
        self.chain_of = {chains[p].consumer_node: chains[p] for p in jobs if p in chains}
        self.last_use = {}
        for i, n in enumerate(self.nodes):
            for inp in n.all_input_nodes:
                self.last_use[inp] = i
        self.ref_run, self.pr_run = Runner(ref), Runner(pruned)
        self.orig: Dict[fx.Node, list] = {}
        self.pruned_env: Dict[fx.Node, list] = {}
        self.diverged = set()  # nodes whose pruned-env value differs from the original one
        self.modified = set()  # names of modules already shrunk in `pruned`
        self.n_ops = self.n_pruned_ops = 0
        self.total_ops = sum(n.op not in ("placeholder", "output") for n in self.nodes)
        self.stopped = False  # a coupled group was completed (sequential): the rest of the sweep is stale
        self.pending: List[PairJob] = []
        self.on_done: Callable = lambda: None

    @property
    def pruned_pass_fraction(self) -> float:
        """Share of graph nodes the pruned environment had to evaluate itself (sequential mode)."""
        return (self.n_pruned_ops / self.total_ops if self.total_ops else 0.0) if self.sequential else 0.0

    def run(self, node_bar, dist: Optional[Dist]) -> Optional[float]:
        """Every node in order; returns the output's relative error (sequential) or None."""
        for i, node in enumerate(self.nodes):
            node_bar.update(1)
            if node.op == "placeholder":
                self.orig[node] = [inp[node.name] for inp in self.inputs]
                self.pruned_env[node] = self.orig[node]
                continue
            if node.op == "output":
                return self._output_error(node, dist) if self.sequential else None
            self.n_ops += 1
            div = self._diverges(node)
            self.orig[node] = self._evaluate(node, self.ref_run, self.orig, wrap_errors=True)
            for job in self.by_consumer.get(node, ()):
                div = self._at_consumer(node, job) or div
                if self.stopped:
                    break
            if self.stopped:
                return None
            if self.sequential:
                self._evaluate_pruned(node, div)
            self._free(node, i)
        return None

    def _diverges(self, node: fx.Node) -> bool:
        """Whether the pruned network's value of ``node`` differs from the original one (sequential mode);
        an op that writes into a shared input gets a pruned copy of it first."""
        div = self.sequential and (any(a in self.diverged for a in node.all_input_nodes) or
                                   (node.op in ("call_module", "get_attr") and _owner(node) in self.modified))
        if div:
            mut = mutated_input(node, self.ref_run.modules)
            if mut is not None:
                # the op writes into `mut` differently in the two networks: give the pruned one its own
                # copy, and whoever reads `mut` later reads a pruned-network value
                if mut in self.pruned_env and self.pruned_env[mut] is self.orig.get(mut):
                    self.pruned_env[mut] = [v.clone() if isinstance(v, torch.Tensor) else v for v in self.orig[mut]]
                self.diverged.add(mut)
        return div

    def _evaluate(self, node: fx.Node, runner: Runner, env, wrap_errors: bool = False) -> list:
        """``node`` on every batch of ``env``."""
        with self.timer("forward"):
            vals = []
            for b in range(self.nb):
                args = map_values(node.args, lambda n: env[n][b])
                kwargs = map_values(node.kwargs, lambda n: env[n][b])
                if not wrap_errors:
                    vals.append(runner(node, args, kwargs))
                    continue
                try:
                    vals.append(runner(node, args, kwargs))
                except Exception as e:
                    raise forward_error(e, b) from e
            return vals

    def _at_consumer(self, node: fx.Node, job: PairJob) -> bool:
        """Streams the job's rows; sequential: completes it and drops the removed channels from the cached
        values of its path. Returns whether the node now diverges."""
        src = node.args[0]
        x_env = self.pruned_env if self.sequential else self.orig
        for b in range(self.nb):
            accumulate(job, x_env[src][b], self.orig[node][b], self.masks[b], self.timer, b)
        if job.lean:  # finish() clears it
            job.source = lambda add: [add(x_env[src][b], self.orig[node][b], self.masks[b], b) for b in range(self.nb)]
        if job.group is not None:
            return self._at_reader(job)
        if not self.sequential:
            if job.lean and not self.collect_only:  # its input is only here
                self.complete(job)
                self.on_done()
            else:
                self.pending.append(job)
            return False
        rep = self.complete(job)
        self.on_done()
        self.modified.update([job.pair.producer, job.pair.consumer, *job.pair.between])
        self.pr_run.modules = dict(self.pruned.named_modules())  # a module may have been replaced
        if node in self.chain_of:
            keep = torch.as_tensor(rep.kept, dtype=torch.long)
            for cn, dim, group in self.chain_of[node].slices:
                if cn in self.pruned_env:
                    self.pruned_env[cn] = [_slice(v, keep.to(v.device), dim, group) for v in self.pruned_env[cn]]
                    self.diverged.add(cn)
        return True

    def _at_reader(self, job: PairJob) -> bool:
        """A coupled group's reader has streamed its rows; at its last reader the group is complete:
        pending (independent), or completed and the sweep stops (sequential)."""
        group = job.group
        if job is not group.readers[-1]:
            return False
        if not self.sequential:
            self.pending.append(group)
            return False
        self.complete(group)
        self.on_done()
        self.stopped = True
        return False

    def _evaluate_pruned(self, node: fx.Node, div: bool) -> None:
        if div:
            self.n_pruned_ops += 1
            self.pruned_env[node] = self._evaluate(node, self.pr_run, self.pruned_env)
            self.diverged.add(node)
        else:
            self.pruned_env[node] = self.orig[node]

    def _free(self, node: fx.Node, i: int) -> None:
        """Drops values after their last use."""
        for inp in node.all_input_nodes:
            if self.last_use.get(inp) == i:
                self.orig.pop(inp, None)
                self.pruned_env.pop(inp, None)
        if not node.users:
            self.orig.pop(node, None)
            self.pruned_env.pop(node, None)

    def _output_error(self, node: fx.Node, dist: Optional[Dist]) -> Optional[float]:
        num, den = _output_error(node, self.orig, self.pruned_env, self.nb)
        if dist is not None:
            num, den = dist.reduce_numbers([num, den])
        return num / den if den > 0 else None


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
