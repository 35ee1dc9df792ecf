"""One coupled group's work (docs/design.md, "Coupled groups"): its readers' statistics, one joint channel
choice (:func:`lsprune.select_joint`), a re-fit per reader, the surgery on every member, the report.

A group's readers are :class:`.pruning.PairJob` objects (one per reader, with its own sums, position
sampler and group size), so the executors stream them exactly as pairs; :class:`GroupJob` ties them.
"""
from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch.nn as nn

import lsprune
from lsprune import _policy

from .baselines import filter_norms, no_refit_error, no_refit_path, random_order
from .checkpoint import Checkpoint
from .coupling import GroupChain
from .distributed import Dist
from .pairs import CoupledGroup, Pair, per_channel_width
from .pruning import PairJob, Timer, effective_damping, job_statistics, log_engine_warnings, make_job, target_matrix
from .report import PairReport
from .surgery import set_consumer, shrink_channels, shrink_in, shrink_out, slice_inputs

logger = logging.getLogger("lsprune.torch")

#: Methods with a coupled-group variant: the joint LS solvers, and the group magnitude / random orders.
GROUP_METHODS = lsprune.METHODS + ("magnitude", "random")


@dataclass
class GroupJob:
    """State of one coupled group being pruned. ``readers``: one :class:`PairJob` per reader (graph
    order; the last one completes the group); ``writers``/``between``: modules of the model being
    pruned; ``rows``: the prune's registry of the output rows each module still has (original numbering)."""

    index: int
    group: CoupledGroup
    chain: GroupChain
    channels: int
    n_keep: int
    readers: List[PairJob]
    writers: List[nn.Module]
    between: List[nn.Module]
    ref_writers: List[nn.Module]
    independent: bool
    rows: Dict[str, np.ndarray]
    # concat groups: the prune's registry {module: original inputs / channels it still has} (see PairJob.inputs),
    # and the between modules' original channel counts
    inputs: Optional[Dict[str, np.ndarray]] = None
    between_widths: List[int] = dataclasses.field(default_factory=list)
    refit: bool = True
    norm: str = "l1"
    seed: int = 0
    dist: Optional[Dist] = None
    ckpt: Optional[Checkpoint] = None
    stage: str = "prune"
    saved: Optional[dict] = None
    seconds: float = 0.0
    report: Optional[PairReport] = None
    time_budget: Optional[float] = None  # seconds of joint selection (prune(time_budget=))

    @property
    def key(self) -> str:
        return f"{self.stage}:{self.group.name}"

    @property
    def stem(self) -> str:
        return f"{self.stage}-{self.index:03d}"

    @property
    def name(self) -> str:
        return f"{self.group.kind} group {self.group.name}"

    @property
    def label(self) -> str:
        return self.name

    @property
    def pair(self) -> CoupledGroup:
        """The unit (as ``PairJob.pair``): its ``producer`` is the group's name."""
        return self.group

    @property
    def modules(self) -> List[nn.Module]:
        return [*self.writers, *self.between, *(r.consumer for r in self.readers)]

    def attach(self, stage: str) -> None:
        """Looks the group up in the checkpoint (finished groups only: a group being accumulated restarts)."""
        self.stage = stage
        self.saved = self.ckpt.done(self.key) if self.ckpt is not None else None
        for r in self.readers:
            r.saved = self.saved  # a finished group's readers stream nothing

    def set_keep(self, n_keep: int) -> None:
        self.n_keep = int(n_keep)
        for r in self.readers:
            r.n_keep = self.n_keep

    def reuse_for_pruning(self) -> None:
        """A job of the budget's independent pass prunes its group too (its statistics are in memory)."""
        self.attach("prune")


def make_group_job(index: int, chain: GroupChain, n_keep: int, ref_modules, pruned_modules, *, rows, device,
                   inputs: Optional[Dict[str, np.ndarray]] = None,
                   independent: bool, use_torch_sums: Optional[bool], seed: int, max_positions: Optional[int] = None,
                   n_samples: int = 1, refit: bool = True, norm: str = "l1", dist: Optional[Dist] = None,
                   ckpt: Optional[Checkpoint] = None, stage: str = "prune",
                   time_budget: Optional[float] = None) -> GroupJob:
    """A group's job: one reader job per reader (its own sums and position sampler), the members.
    ``inputs``: the registry of inputs a concatenation's readers still have (concat groups only);
    ``time_budget``: seconds for the joint selection's greedy steps (the engine's ``time_limit``)."""
    g = chain.group
    concat = g.kind == "concat"
    readers = []
    for r, (name, gs) in enumerate(zip(g.readers, g.group_sizes)):
        job = make_job(index, Pair(g.name, name, (), gs), g.channels, n_keep, ref_modules, pruned_modules,
                       device=device, independent=independent, use_torch_sums=use_torch_sums, seed=seed,
                       max_positions=max_positions, n_samples=n_samples, refit=refit, norm=norm, dist=dist)
        job.generator.manual_seed(int(seed) * 1_000_003 + index + 104_729 * (r + 1))  # one sampler per reader
        job.rows = rows
        if concat:  # the reader's input is wider than the group: its columns per channel are the group's
            job.group_size, job.inputs = int(gs), inputs
        readers.append(job)
    gj = GroupJob(index, g, chain, g.channels, n_keep, readers, [pruned_modules[w] for w in g.writers],
                  [pruned_modules[b] for b in g.between], [ref_modules[w] for w in g.writers], independent, rows,
                  refit=bool(refit), norm=norm, seed=int(seed), dist=dist, ckpt=ckpt,
                  inputs=inputs if concat else None,
                  between_widths=[per_channel_width(ref_modules[b]) or g.channels for b in g.between],
                  time_budget=time_budget)
    for job in readers:
        job.group = gj
    gj.attach(stage)
    return gj


# ---------------------------------------------------------------------------------------------- selection
def group_order(gjob: GroupJob, method: str) -> np.ndarray:
    """The channel ranking of an order baseline for a group: ``magnitude`` (group magnitude) sums the
    writers' filter norms, each divided by its largest so that no writer's weight scale dominates;
    ``random`` is seeded by the seed and the group's index."""
    if method == "random":
        return random_order(gjob.channels, gjob.seed, gjob.index)
    score = np.zeros(gjob.channels)
    for name, w in zip(gjob.group.writers, gjob.ref_writers):
        s = filter_norms(w, gjob.norm)  # summed over a unit's channels (whole groups, or a shuffle's positions)
        s = s.reshape(-1, gjob.channels).sum(0) if name in gjob.group.interleaved else \
            s.reshape(gjob.channels, -1).sum(1)
        score += s / max(float(s.max()), np.finfo(float).tiny)
    return np.argsort(-score, kind="stable")


@dataclass
class _Slice:
    """A concatenation's reader at selection time, in its statistics' column numbering: ``groups[c]`` are the
    columns of the group's channel ``c``, ``fixed`` those of the other slices it still reads (always kept: one
    forced group), ``original[i]`` the original input column of statistics column ``i``."""

    groups: List[np.ndarray]
    fixed: np.ndarray
    original: np.ndarray
    width: int  # original inputs (weight dim 1)
    offset: int
    per: int  # inputs per channel: 1 (Conv2d) or the group size (Linear)


def _slices(gjob: GroupJob) -> Optional[List[_Slice]]:
    """Concat groups: each reader's slice (see :class:`_Slice`); None for other groups."""
    if gjob.group.kind != "concat":
        return None
    out = []
    for r, job in enumerate(gjob.readers):
        m = job.ref_consumer
        conv = isinstance(m, nn.Conv2d)
        unit = m.kernel_size[0] * m.kernel_size[1] if conv else 1
        width = m.in_channels if conv else m.in_features
        per = 1 if conv else job.group_size
        off = gjob.group.offset(r)
        measured = job.measured if job.measured is not None else np.arange(width, dtype=np.int64)
        current = (gjob.inputs or {}).get(job.pair.consumer)
        current = np.arange(width, dtype=np.int64) if current is None else current
        if not np.isin(current, measured).all():
            raise RuntimeError(f"internal: reader {job.pair.consumer} has inputs its statistics do not cover")

        def cols(idx, measured=measured, unit=unit):
            pos = np.searchsorted(measured, idx)
            return (pos[:, None] * unit + np.arange(unit)).reshape(-1).astype(np.int64)

        sl = off + np.arange(gjob.channels * per, dtype=np.int64)
        groups = [cols(off + c * per + np.arange(per, dtype=np.int64)) for c in range(gjob.channels)]
        original = (measured[:, None] * unit + np.arange(unit)).reshape(-1)
        out.append(_Slice(groups, cols(np.setdiff1d(current, sl)), original, width, off, per))
        job.fixed_columns = int(out[-1].fixed.size)
    if len({sl.fixed.size > 0 for sl in out}) > 1:
        raise RuntimeError(f"internal: some readers of {gjob.name} read other slices, some do not")
    return out


def _forced(slices: Optional[List[_Slice]]) -> bool:
    """Whether the readers' other slices are one forced group (index ``C``) of the joint problems."""
    return bool(slices) and slices[0].fixed.size > 0


def _problems(gjob: GroupJob, stats: List[lsprune.Statistics], slices=None) -> List[dict]:
    """One engine problem per reader: its statistics and group size, or a concatenation's reader's groups:
    the slice's channels, then its other inputs as one more group (independent mode: its own map ``W x + b``
    on the rows it still has as targets)."""
    out = []
    for i, (r, s) in enumerate(zip(gjob.readers, stats)):
        p = dict(stats=s, group_size=r.group_size)
        if slices is not None:
            sl = slices[i]
            p = dict(stats=s, groups=sl.groups + ([sl.fixed] if sl.fixed.size else []))
        if gjob.independent:
            W, b = target_matrix(r)
            p.update(weights_in=W if slices is None else W[:, slices[i].original], bias_in=b)
        out.append(p)
    return out


def _joint(problems, n_keep: int, forced: bool, C: int, **kw) -> lsprune.JointSelection:
    """``select_joint`` keeping ``n_keep`` of the group's channels; with ``forced`` the other slices' group
    (index ``C``) is kept too and taken out of the result (selection, kept set, path)."""
    if not forced:
        return lsprune.select_joint(problems, n_keep=n_keep, **kw)
    force = list(kw.pop("force", None) or []) + [C]
    j = lsprune.select_joint(problems, n_keep=n_keep + 1, force=force, **kw)
    while C not in j.kept:  # the engine skips a forced group it finds degenerate: raise the damping until it is not
        j = _other_slices_kept(problems, n_keep + 1, force, C, kw)
    path = None
    if j.kept_path is not None:
        on = j.kept_path >= 1  # forward/omp: the first entry is before the forced group
        path = (j.error_path[on], j.relative_error_path[on], j.kept_path[on] - 1)
    return dataclasses.replace(
        j, selected=j.selected[j.selected != C], kept=j.kept[j.kept != C], removed=j.removed[j.removed != C],
        error_path=path[0] if path else None, relative_error_path=path[1] if path else None,
        kept_path=path[2] if path else None)


def _other_slices_kept(problems, n_keep: int, force: List[int], C: int, kw: dict) -> lsprune.JointSelection:
    """The readers' other slices (group ``C``) are degenerate at ``kw["damping"]``: their kept channels are dead or
    linearly dependent on the calibration data (a Fire module's expand1x1 has more outputs than its squeeze has
    channels), and float32 sums can leave that block of the centred Gram indefinite, which a tiny ridge does not
    cure. They stay in the readers whatever the choice, so the re-fit must cover them: ``select_joint`` again
    with the damping raised one escalation step (``kw["damping"]`` is updated)."""
    damping = _policy.escalate(kw["damping"])
    if damping > _policy.MAX_DAMPING:
        raise lsprune.NumericalError(f"the other slices' columns stay degenerate up to damping={_policy.MAX_DAMPING:g}")
    warnings.warn(f"the concatenation's other slices are degenerate on the calibration data at damping="
                  f"{kw['damping']:g} (dead or linearly dependent kept channels); selecting again with damping="
                  f"{damping:g}", lsprune.DampingRaisedWarning)  # logged with the group's name
    kw["damping"] = damping
    return lsprune.select_joint(problems, n_keep=n_keep, force=force, **kw)


def _select(gjob: GroupJob, problems: List[dict], method: str, damping: float, slices=None) -> lsprune.JointSelection:
    """The joint choice of ``gjob.n_keep`` channels: an LS solver, or the first channels of an order
    baseline re-fitted; an early stop is filled up by the readers' summed relative input variance."""
    k, forced, C = gjob.n_keep, _forced(slices), gjob.channels
    if method in lsprune.METHODS:
        j = _joint(problems, k, forced, C, method=method, damping=damping, time_limit=gjob.time_budget)
        if j.timed_out:
            logger.info("%s: the time budget (%gs) stopped the joint selection after %d of %d channels; the other "
                        "%d were added by their current gains and every reader re-fitted", gjob.name,
                        gjob.time_budget, k - j.filled.size, k, j.filled.size)
    else:
        j = _joint(problems, k, forced, C, force=group_order(gjob, method)[:k].tolist(), damping=damping)
    if j.kept.size < k:
        var = sum(_relative_variance(p["stats"], r.group_size, sl) for p, r, sl in
                  zip(problems, gjob.readers, slices or [None] * len(problems)))
        rest = [int(c) for c in np.argsort(-var, kind="stable") if c not in set(j.kept.tolist())]
        logger.warning("%s: selection stopped after %d of %d channels (the others are degenerate on the "
                       "calibration data); keeping %d channels by input variance", gjob.name, j.kept.size, k,
                       k - j.kept.size)
        j = _joint(problems, k, forced, C, force=j.kept.tolist() + rest[: k - j.kept.size],
                   damping=_policy.fill_up_damping(damping))
    return j


def _relative_variance(stats: lsprune.Statistics, g: int, sl: Optional[_Slice] = None) -> np.ndarray:
    d = np.diag(stats.cov_x)
    var = d.reshape(-1, g).sum(1) if sl is None else np.array([d[c].sum() for c in sl.groups])
    return var / max(float(var.sum()), np.finfo(float).tiny)


def _damping(gjob: GroupJob, stats: List[lsprune.Statistics], damping: float) -> float:
    """One damping for the joint problem: the largest any reader's underdetermined-fit rule asks for."""
    for r, s in zip(gjob.readers, stats):
        if s.count == 0:
            raise ValueError(f"{gjob.label}: no calibration rows reached reader {r.pair.consumer} (does the mask "
                             "exclude every position?)")
    return max(effective_damping(r, s.count, damping) for r, s in zip(gjob.readers, stats))


# ---------------------------------------------------------------------------------------------- finish
def finish_group(gjob: GroupJob, *, method: str, damping: float, timer: Timer) -> PairReport:
    """Selects the kept channels jointly, re-fits every reader, shrinks every member; returns the report."""
    if gjob.saved is not None:
        return _apply_saved(gjob, timer)
    t = time.perf_counter()
    with timer("selection"):
        stats = [job_statistics(r) for r in gjob.readers]
        slices = _slices(gjob)  # before the damping: a concat reader's other slices are fitted columns too
        damping = _damping(gjob, stats, damping)
        problems = _problems(gjob, stats, slices)
        try:
            with log_engine_warnings(gjob.name, what="coupled"):
                j = _select(gjob, problems, method, damping, slices)
        except Exception as e:
            if hasattr(e, "add_note"):
                e.add_note(f"while selecting the channels of {gjob.name}")
            raise
    kept = np.asarray(j.kept, dtype=np.int64)
    errors = _reader_errors(gjob, stats, j, kept, slices)
    with timer("surgery"):
        added = _surgery(gjob, kept, [(s.weights, s.bias) for s in j.selections] if gjob.refit else None)
    gjob.seconds += time.perf_counter() - t + sum(r.seconds for r in gjob.readers)  # the readers' statistics
    has_path = gjob.refit and method in lsprune.METHODS and j.relative_error_path is not None
    gjob.report = _report(gjob, kept, errors, j, added, method, sum(int(s.count) for s in stats),
                          path=(j.relative_error_path, j.kept_path) if has_path else None, damping=damping)
    logger.info("%s: %d -> %d channels, joint relative error %.4g (%.2fs)", gjob.name, gjob.channels, kept.size,
                gjob.report.relative_error, gjob.seconds)
    if gjob.ckpt is not None:
        arrays = {"kept": kept}
        if gjob.refit:
            for r, s in enumerate(j.selections):
                arrays.update({f"weights{r}": np.asarray(s.weights), f"bias{r}": np.asarray(s.bias)})
        gjob.ckpt.save_done(gjob.key, gjob.stem, None, arrays, {"report": dataclasses.asdict(gjob.report)})
    for r in gjob.readers:
        r.sums.release()
    return gjob.report


def _reader_errors(gjob: GroupJob, stats, j: lsprune.JointSelection, kept: np.ndarray, slices=None) -> List[float]:
    """Each reader's relative error (re-fitted, or its original weights on the kept channels)."""
    out = []
    for i, (r, s, sel) in enumerate(zip(gjob.readers, stats, j.selections)):
        if gjob.refit:
            plain = sel.plain_error
        elif slices is not None:  # the kept channels' columns and the other slices', original weights
            W, b = target_matrix(r)
            plain = no_refit_error(s, W[:, slices[i].original], b if r.consumer.bias is not None else None,
                                   _slice_columns(slices[i], kept), 1)
        else:
            W, b = target_matrix(r)
            plain = no_refit_error(s, W, b if r.consumer.bias is not None else None, kept, r.group_size)
        out.append(float(plain / sel.target_energy) if sel.target_energy > 0 else 0.0)
    return out


def _slice_columns(sl: _Slice, kept: np.ndarray) -> np.ndarray:
    """A concat reader's statistics columns of the kept channels and of the other slices, ascending."""
    parts = [sl.fixed] + [sl.groups[int(c)] for c in kept]
    return np.sort(np.concatenate(parts)).astype(np.int64)


def _surgery(gjob: GroupJob, kept: np.ndarray, fits) -> List[bool]:
    """Readers first (a module that reads and writes the stream gets its re-fit on every row, then loses
    rows), then writers and per-channel modules; returns per reader whether it gained a bias. A concatenation's
    readers and per-channel modules lose the slice's removed channels wherever earlier surgery left the slice
    (the ``inputs`` registry), the other slices keep theirs."""
    added = []
    g, concat = gjob.group, gjob.group.kind == "concat"
    rows = (kept[:, None] * g.unit + np.arange(g.unit)).reshape(-1)  # the kept units' channels
    for r, reader in enumerate(gjob.readers):
        conv = isinstance(reader.ref_consumer, nn.Conv2d)
        idx, group, n_in = (rows if conv else kept), reader.group_size, int(rows.size)
        if concat:
            m = reader.ref_consumer
            conv = isinstance(m, nn.Conv2d)
            idx, new = slice_inputs(gjob.inputs.get(g.readers[r]), m.in_channels if conv else m.in_features,
                                    g.offset(r), 1 if conv else reader.group_size, gjob.channels, kept)
            gjob.inputs[g.readers[r]] = new
            group, n_in = 1, int(new.size)
        if fits is not None:
            added.append(bool(set_consumer(reader.consumer, fits[r][0], fits[r][1], n_in, kept=idx, group=group)))
        else:
            shrink_in(reader.consumer, idx, group)
            added.append(False)
    for name, w in zip(g.writers, gjob.writers):
        mine = g.rows(name, kept)
        shrink_out(w, mine)
        prev = gjob.rows.get(name)
        gjob.rows[name] = mine if prev is None else prev[mine]
    for b, (name, m) in enumerate(zip(g.between, gjob.between)):
        if concat:
            idx, gjob.inputs[name] = slice_inputs(gjob.inputs.get(name), gjob.between_widths[b], g.between_offset(b),
                                                  1, gjob.channels, kept)
            shrink_channels(m, idx)
        else:
            shrink_channels(m, g.rows(name, kept))
    if gjob.dist is not None:
        gjob.dist.sync_modules(gjob.modules, kept.tolist(), gjob.name)
    return added


def _report(gjob: GroupJob, kept, errors, j, added, method, samples, *, path, damping) -> PairReport:
    g = gjob.group
    w = np.asarray(j.weights, dtype=np.float64)
    energy = np.array([s.target_energy for s in j.selections], dtype=np.float64)
    den = float(w @ energy)
    rel = float(w @ (np.asarray(errors) * energy)) / den if den > 0 else 0.0
    return PairReport(
        producer=g.name, consumer=g.readers[0], between=list(g.between), group_size=g.group_sizes[0],
        channels_before=gjob.channels, channels_after=int(kept.size), kept=kept.tolist(), status="pruned",
        relative_error=rel, error_path=[float(v) for v in path[0]] if path else [],
        n_kept_path=[int(v) for v in path[1]] if path else [], bias_added=any(added), samples=int(samples),
        damping=float(damping), time_s=gjob.seconds, method=method, refit=gjob.refit, kind=g.kind,
        writers=list(g.writers), readers=list(g.readers), group_sizes=list(g.group_sizes), reader_errors=errors,
        biases_added=added, offsets=list(g.offsets), between_offsets=list(g.between_offsets), unit=g.unit,
        interleaved=list(g.interleaved), timed_out=bool(j.timed_out))


def _apply_saved(gjob: GroupJob, timer: Timer) -> PairReport:
    """Installs a group an earlier (interrupted) run finished: the same surgery, no selection."""
    with timer("surgery"):
        a = gjob.ckpt.load_arrays(gjob.saved)
        kept = a["kept"].astype(np.int64)
        _surgery(gjob, kept, [(a[f"weights{r}"], a[f"bias{r}"]) for r in range(len(gjob.readers))]
                 if gjob.refit else None)
    gjob.report = PairReport(**gjob.saved["info"]["report"])
    for r in gjob.readers:
        r.sums.release()
    logger.info("%s: %d -> %d channels, from the checkpoint", gjob.name, gjob.channels, kept.size)
    return gjob.report


def unchanged_group_report(group: CoupledGroup) -> PairReport:
    """Report of a group that keeps every channel (not re-fitted)."""
    return PairReport(producer=group.name, consumer=group.readers[0], between=list(group.between),
                      group_size=group.group_sizes[0], channels_before=group.channels,
                      channels_after=group.channels, kept=list(range(group.channels)), status="unchanged",
                      kind=group.kind, writers=list(group.writers), readers=list(group.readers),
                      group_sizes=list(group.group_sizes), biases_added=[False] * len(group.readers),
                      offsets=list(group.offsets), between_offsets=list(group.between_offsets), unit=group.unit,
                      interleaved=list(group.interleaved))


# ---------------------------------------------------------------------------------------------- budget
def group_error_path(gjob: GroupJob, method: str, damping: float, lo: int, hi: int) -> np.ndarray:
    """The group's joint relative error for every kept count (NaN where not computed), from its readers'
    independent statistics: the joint path of the method's own choices (forward/omp up to ``hi``, backward
    down to ``lo``, an order baseline forced along its order); ``refit=False``: the readers' no-re-fit
    errors along the same order, weighted as the joint objective."""
    if gjob.saved is not None:
        return gjob.ckpt.load_arrays(gjob.saved)["path"]
    stats = [job_statistics(r) for r in gjob.readers]
    slices = _slices(gjob)
    damping = _damping(gjob, stats, damping)
    problems = _problems(gjob, stats, slices)
    forced, C = _forced(slices), gjob.channels
    with log_engine_warnings(gjob.name, what="coupled"):
        if method in lsprune.METHODS:
            n = lo if method == "backward" else hi
            j = _joint(problems, int(n), forced, C, method=method, damping=damping)
        else:
            j = _joint(problems, int(hi), forced, C, force=group_order(gjob, method)[:hi].tolist(), damping=damping)
    path = np.full(gjob.channels + 1, np.nan)
    if gjob.refit:
        path[np.asarray(j.kept_path)] = j.relative_error_path
    else:
        order = np.concatenate([j.selected, np.setdiff1d(np.arange(gjob.channels), j.selected)]) \
            if method != "backward" else np.concatenate([j.kept, j.removed[::-1]])
        path[lo:hi + 1] = _no_refit_path(gjob, stats, j, order.astype(np.int64), slices)[lo:hi + 1]
    if gjob.ckpt is not None:
        gjob.ckpt.save_done(gjob.key, gjob.stem, None, {"path": path})
    return path


def _no_refit_path(gjob: GroupJob, stats, j: lsprune.JointSelection, order: np.ndarray, slices=None) -> np.ndarray:
    w = np.asarray(j.weights, dtype=np.float64)
    energy = np.array([s.target_energy for s in j.selections], dtype=np.float64)
    if slices is None:
        num = sum(wr * no_refit_path(s, target_matrix(r)[0], order, r.group_size)
                  for wr, r, s in zip(w, gjob.readers, stats))
    else:  # a concat reader keeps its other slices: the error of each prefix of the order, one at a time
        num = sum(wr * np.array([no_refit_error(s, target_matrix(r)[0][:, sl.original], None,
                                                _slice_columns(sl, order[:n]), 1) for n in range(gjob.channels + 1)])
                  for wr, r, s, sl in zip(w, gjob.readers, stats, slices))
    den = float(w @ energy)
    return num / den if den > 0 else np.zeros(gjob.channels + 1)
