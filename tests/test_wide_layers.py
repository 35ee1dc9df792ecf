"""Wide layers (issue 21): a pair that does not fit the memory guard (a pass of its own, lean statistics, or
left out with the reason), lean statistics for grouped consumers, and the selection time budget."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402

import lsprune  # noqa: E402
import lsprune.torch as lt  # noqa: E402
from lsprune.torch import memory, pairprune  # noqa: E402
from torch_helpers import assert_unchanged, batches, snapshot  # noqa: E402


class Wide(nn.Module):
    """conv1 -> conv2 (3x3: groups of 9 columns) -> flatten -> fc1 (groups of hw² positions) -> fc2."""

    def __init__(self, hw=12, c1=8, c2=16, hidden=32, cin=3):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc1 = nn.Linear(c2 * hw * hw, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def _wide(**kw):
    torch.manual_seed(0)
    return Wide(**kw).eval()


CAL = batches((16, 3, 12, 12), n=4, seed=1)
#: Between the lean and the exact need of pair conv2 -> fc1 (exact: about 100 MiB, lean: about 27 MiB).
LIMIT = 50 << 20


def _same_model(a, b, tol=0.0):
    """Equal state dicts: bit for bit, or within ``tol`` of each tensor's largest entry."""
    for (k, u), v in zip(a.state_dict().items(), b.state_dict().values()):
        assert u.shape == v.shape, k
        assert torch.allclose(u, v, rtol=0, atol=tol * float(v.abs().max())) if tol else torch.equal(u, v), k


# ---------------------------------------------------------------------------------------------- time limit (engine)
def _stats(D=300, m=40, n=1500, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, D))
    Y = X @ rng.standard_normal((D, m)) + 0.1 * rng.standard_normal((n, m))
    return lsprune.Statistics(D, m).update(X, Y)


@pytest.mark.parametrize("method", ["forward", "omp", "backward"])
def test_time_limit_keeps_the_prefix_fills_up_and_refits_exactly(method):
    st = _stats()
    full = lsprune.select(st, n_keep=60, group_size=3, method=method)
    cut = lsprune.select(st, n_keep=60, group_size=3, method=method, time_limit=1e-9)
    assert cut.timed_out and not full.timed_out and cut.kept.size == 60
    assert cut.filled.size > 0
    ref = lsprune.refit(st, cut.kept, group_size=3)  # the weights are the exact re-fit on the final kept set
    np.testing.assert_allclose(cut.weights, ref.weights, rtol=1e-9, atol=1e-12)
    assert cut.error == pytest.approx(ref.error, rel=1e-9) and cut.error_path[-1] == pytest.approx(cut.error)
    assert cut.error >= full.error * (1 - 1e-9) or method == "backward"
    if method != "backward":  # the greedy prefix comes first, then the filled groups
        k = cut.selected.size - cut.filled.size
        np.testing.assert_array_equal(cut.selected[:k], full.selected[:k])
        np.testing.assert_array_equal(cut.selected[k:], cut.filled)
    else:
        assert set(cut.filled) <= set(cut.removed) and not set(cut.filled) & set(cut.kept)
    roomy = lsprune.select(st, n_keep=60, group_size=3, method=method, time_limit=1e6)
    assert not roomy.timed_out and np.array_equal(roomy.kept, full.kept) and np.array_equal(roomy.weights,
                                                                                           full.weights)


def test_time_limit_fill_uses_the_current_gains():
    """After 0 greedy steps the forward fill is the top-k of the initial exact gains (the single-group LS
    error drops), ties to the lowest index."""
    st = _stats(D=40, m=5)
    cut = lsprune.select(st, n_keep=10, time_limit=1e-9)
    gains = [st.target_energy - lsprune.refit(st, [j]).error for j in range(40)]
    assert cut.selected.size - cut.filled.size == 0  # the clock is read before the first step
    np.testing.assert_array_equal(np.sort(cut.filled), np.sort(np.argsort(-np.asarray(gains))[:10]))


@pytest.mark.parametrize("kw, exc", [(dict(time_limit=0.0), ValueError), (dict(time_limit=-1), ValueError),
                                     (dict(time_limit=float("inf")), ValueError), (dict(time_limit="1"), TypeError),
                                     (dict(time_limit=1.0, tol=0.1, n_keep=None), ValueError)])
def test_time_limit_argument_errors(kw, exc):
    args = dict(n_keep=5)
    args.update(kw)
    with pytest.raises(exc):
        lsprune.select(_stats(D=20, m=3), **args)


# ---------------------------------------------------------------------------------------------- time budget (prune)
def test_time_budget_stops_every_selection_and_gives_a_valid_model():
    model = _wide()
    snap = snapshot(model)
    pruned, rep = lt.prune(model, CAL, ratio=0.5, time_budget=1e-9, progress=False)
    assert_unchanged(model, snap)
    assert rep.time_budget == 1e-9
    assert all(p.timed_out for p in rep.pairs) and [p.channels_after for p in rep.pairs] == [4, 8, 16]
    out = pruned(CAL[0])
    assert out.shape == (16, 10) and torch.isfinite(out).all()
    _, plain = lt.prune(model, CAL, ratio=0.5, progress=False)
    assert not any(p.timed_out for p in plain.pairs)
    assert lt.PruneReport.from_dict(rep.to_dict()).pairs[0].timed_out


def test_time_budget_in_the_blocks_strategy():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=4, head_dim=8,
                                   max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    cal = [{"input_ids": torch.randint(0, 128, (4, 24), generator=g)} for _ in range(3)]
    pruned, rep = lt.prune(model, cal, ratio=0.5, time_budget=1e-9, progress=False)
    assert rep.strategy == "blocks" and rep.pairs and all(p.timed_out for p in rep.pairs)
    assert torch.isfinite(pruned(**cal[0]).logits).all()
    with pytest.raises(ValueError, match="statistics='lean'"):
        lt.prune(model, cal, ratio=0.5, statistics="lean", progress=False)


@pytest.mark.parametrize("kw, exc", [(dict(time_budget=0), ValueError), (dict(time_budget=-2.0), ValueError),
                                     (dict(time_budget=float("nan")), ValueError), (dict(time_budget="1"), TypeError),
                                     (dict(time_budget=1.0, method="magnitude"), ValueError),
                                     (dict(statistics="fast"), ValueError)])
def test_time_budget_and_statistics_argument_errors(kw, exc):
    model = _wide()
    snap = snapshot(model)
    with pytest.raises(exc):
        lt.prune(model, CAL, ratio=0.5, progress=False, **kw)
    assert_unchanged(model, snap)


# ---------------------------------------------------------------------------------------------- lean statistics
def _chunks_of_first_pair(model, pair):
    """The float32 row chunks (x, y) the first pruned pair streams (its input is the original network's; all
    positions), in streaming order."""
    from lsprune.torch.accumulate import iter_rows

    cons = dict(model.named_modules())[pair[1]]
    out, box = [], {}
    h = cons.register_forward_hook(lambda m, a, o: box.update(x=a[0], y=o))
    with torch.no_grad():
        for x in CAL:
            model(x)
            out += [(xr, yr) for xr, yr, _ in iter_rows(cons, pair[1], box["x"], box["y"])]
    h.remove()
    return out


@pytest.mark.parametrize("pair, g", [(("conv1", "conv2"), 9), (("conv2", "fc1"), 144)])
def test_lean_chooses_on_pooled_statistics_and_refits_exactly(pair, g):
    """Lean: the channels are those of forward selection on the channel-level (pooled) statistics, and the
    consumer's weights are lsprune.refit on the kept columns' statistics of the same rows."""
    model = _wide()
    chunks = _chunks_of_first_pair(model, pair)
    pruned, rep = lt.prune(model, CAL, ratio=0.5, pairs=[pair], statistics="lean", max_positions=None,
                           progress=False)
    r = rep.pairs[0]
    assert r.statistics == "lean" and r.group_size == g
    D, m = chunks[0][0].shape[1], chunks[0][1].shape[1]
    C = D // g
    pooled = lsprune.Statistics(C, m)
    for xr, yr in chunks:
        pooled.update(xr.reshape(-1, C, g).sum(-1), yr)
    choice = lsprune.select(pooled, n_keep=C // 2, damping=r.damping)
    assert r.kept == choice.kept.tolist()
    cols = (np.asarray(r.kept)[:, None] * g + np.arange(g)).reshape(-1)
    kept_stats = lsprune.Statistics(cols.size, m)
    for xr, yr in chunks:
        kept_stats.update(xr[:, torch.as_tensor(cols)], yr)
    fit = lsprune.refit(kept_stats, np.arange(len(r.kept)), group_size=g, damping=r.damping)
    cons = dict(pruned.named_modules())[pair[1]]
    W = cons.weight.detach().double().reshape(cons.weight.shape[0], -1).numpy()
    np.testing.assert_allclose(W, fit.weights, rtol=1e-5, atol=1e-7 * np.abs(fit.weights).max())
    np.testing.assert_allclose(cons.bias.detach().double().numpy(), fit.bias, rtol=1e-5, atol=1e-7)
    assert r.relative_error == pytest.approx(fit.plain_error / fit.target_energy, rel=1e-6, abs=1e-12)
    # and the same as the re-fit from the exact statistics of all columns, up to float32 accumulation (the conv
    # pair: 9216 rows for 72 columns; the classifier's 64 rows interpolate, its error is ~0 either way)
    exact = lsprune.Statistics(D, m)
    for xr, yr in chunks:
        exact.update(xr.double(), yr.double())
    full = lsprune.refit(exact, r.kept, group_size=g, damping=r.damping)
    assert r.relative_error == pytest.approx(full.plain_error / full.target_energy, rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("pair", [("conv1", "conv2"), ("conv2", "fc1"), ("fc1", "fc2")])
@pytest.mark.parametrize("kw", [dict(), dict(strategy="hooks"), dict(method="backward"), dict(method="omp"),
                                dict(method="magnitude")])
def test_lean_equals_exact_with_one_position_per_channel(monkeypatch, pair, kw):
    """With P = 1 (one column per channel) the pooled statistics are the exact ones: forcing the lean path
    gives the exact path's channels and (the re-fit is a separate solve) its weights to rounding."""
    model = _wide(hw=1, cin=32, c1=24, c2=24, hidden=24)
    cal = batches((64, 32, 1, 1), n=4, seed=3)  # 1x1 images: every pair has P = 1
    monkeypatch.setattr(memory.Guard, "lean_applies", lambda self, p: True)
    lean, rl = lt.prune(model, cal, ratio=0.5, pairs=[pair], statistics="lean", progress=False, **kw)
    monkeypatch.undo()
    exact, re_ = lt.prune(model, cal, ratio=0.5, pairs=[pair], statistics="exact", progress=False, **kw)
    assert rl.pairs[0].statistics == "lean" and re_.pairs[0].statistics == "exact"
    assert rl.pairs[0].kept == re_.pairs[0].kept
    # both paths multiply float32 activations in float32 (in different orders): the errors agree to what those
    # products round to on an ill-conditioned Gram (cond ~6e3), which depends on the machine's sgemm kernels
    assert rl.pairs[0].relative_error == pytest.approx(re_.pairs[0].relative_error, rel=1e-4, abs=1e-12)
    _same_model(lean, exact, tol=1e-3)


def test_auto_uses_lean_only_where_exact_does_not_fit():
    model = _wide()
    _, auto = lt.prune(model, CAL, ratio=0.5, progress=False)
    assert [p.statistics for p in auto.pairs] == ["exact"] * 3
    pruned, tight = lt.prune(model, CAL, ratio=0.5, progress=False, memory_limit=LIMIT)
    assert [p.statistics for p in tight.pairs] == ["exact", "lean", "exact"]
    assert tight.memory["passes"][-1]["lean"] == ["conv2"] and tight.memory["estimate"] <= LIMIT
    assert torch.isfinite(pruned(CAL[0])).all()
    assert "(lean)" in str(tight)


# ---------------------------------------------------------------------------------------------- memory guard
def test_a_pair_that_does_not_fit_is_left_out_with_the_reason_and_the_rest_is_pruned():
    model = _wide()
    snap = snapshot(model)
    pruned, rep = lt.prune(model, CAL, ratio=0.5, progress=False, memory_limit=LIMIT, statistics="exact")
    assert_unchanged(model, snap)
    st = {p.producer: p for p in rep.pairs}
    assert st["conv2"].status == "skipped" and "memory_limit = 50.00 MiB" in st["conv2"].reason
    assert st["conv2"].channels_after == 16 and pruned.conv2.out_channels == 16
    assert st["conv1"].status == st["fc1"].status == "pruned"
    assert any(s["producer"] == "conv2" and s["reason"] == st["conv2"].reason for s in rep.skipped)
    assert "conv2" in rep.memory["passes"][-1]["skipped"]
    assert torch.isfinite(pruned(CAL[0])).all() and "skipped (memory)" in str(rep)
    back = lt.PruneReport.from_dict(rep.to_dict())
    assert back.pair("conv2").status == "skipped" and back.pair("conv2").reason == st["conv2"].reason
    fresh = lt.apply_structure(_wide(), rep)
    fresh.load_state_dict(pruned.state_dict())


@pytest.mark.parametrize("kw", [dict(), dict(mode="independent")])
def test_a_budget_pass_pair_that_does_not_fit_is_pinned_or_lean(kw):
    model = _wide()
    budget = lsprune.Budget(flops=0.5)
    _, lean = lt.prune(model, CAL, budget=budget, progress=False, memory_limit=LIMIT, **kw)
    assert lean.memory["passes"][0]["lean"] == ["conv2"] and lean.pair("conv2").statistics == "lean"
    assert lean.budget["reached"] <= 0.5
    _, pinned = lt.prune(model, CAL, budget=budget, progress=False, memory_limit=LIMIT, statistics="exact", **kw)
    assert pinned.pair("conv2").status == "skipped" and pinned.pair("conv2").channels_after == 16
    assert "budget's independent pass" in pinned.pair("conv2").reason
    assert pinned.budget["reached"] <= 0.5


def test_nothing_fits_names_the_options_to_change():
    model = _wide()
    snap = snapshot(model)
    with pytest.raises(lt.MemoryLimitError, match=r"even for the pair that needs least .*memory_limit= .*pairs="):
        lt.prune(model, CAL, ratio=0.5, progress=False, memory_limit=64 << 10)
    assert_unchanged(model, snap)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()


MLP_CAL = batches((512, 16), n=8, seed=2)


def test_pairs_over_the_sweep_are_pruned_in_passes_of_their_own():
    """The cached activations of the sweep (8 batches of 512 rows) do not fit, each pair alone does: every pair
    is pruned with module hooks, one batch at a time, with the same result."""
    model = _mlp()
    ref, r_ref = lt.prune(model, MLP_CAL, ratio=0.5, progress=False)
    limit = r_ref.memory["estimate"] // 2
    snap = snapshot(model)
    out, rep = lt.prune(model, MLP_CAL, ratio=0.5, progress=False, memory_limit=limit)
    assert_unchanged(model, snap)
    assert all(p.own_pass and p.statistics == "exact" for p in rep.pairs)
    assert rep.memory["passes"][-1]["own_pass"] == ["0", "2"] and rep.memory["estimate"] <= limit
    assert rep.output_relative_error is None and rep.forward_passes > r_ref.forward_passes
    assert [p.kept for p in rep.pairs] == [p.kept for p in r_ref.pairs]
    _same_model(out, ref, tol=1e-5)


def test_a_pass_of_its_own_between_two_sweeps(monkeypatch):
    """The middle pair of three in a pass of its own: a sweep before it, module hooks for it, a sweep after it
    that evaluates the already pruned modules in the pruned network; the result equals one sweep."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(),
                          nn.Linear(48, 8)).eval()
    cal = batches((256, 16), n=3, seed=4)
    ref, r_ref = lt.prune(model, cal, ratio=0.5, progress=False)
    decide = memory.decide

    def middle_alone(what, options, pm, alone):
        chosen, skipped = decide(what, options, pm, alone)
        if "2" in chosen:
            chosen["2"] = memory.Decision(chosen["2"].statistics, True, chosen["2"].need)
        return chosen, skipped

    monkeypatch.setattr(memory, "decide", middle_alone)
    passes = []
    real = pairprune.sweep
    monkeypatch.setattr(pairprune, "sweep", lambda *a, **k: passes.append(sorted(a[5])) or real(*a, **k))
    out, rep = lt.prune(model, cal, ratio=0.5, progress=False)
    assert [p.own_pass for p in rep.pairs] == [False, True, False]
    assert passes == [["0"], ["4"]]
    assert rep.output_relative_error == pytest.approx(r_ref.output_relative_error, rel=1e-4)
    assert [p.kept for p in rep.pairs] == [p.kept for p in r_ref.pairs]
    _same_model(out, ref, tol=1e-5)


def test_decide_prefers_exact_then_a_pass_of_its_own_then_lean():
    node = object()
    lim = memory.Limit(2000, "memory_limit")
    pm = memory.PassModel({None: 100, node: 1000}, sequential=True, limit=lim)
    alone = memory.PassModel({None: 0}, sequential=True, limit=lim)

    def need(name, host):
        return memory.PairNeed(name, node, {"host": host, "device": 0, "convert": 0}, 0)

    def opts(name, exact, lean=None):
        out = [memory.Decision("exact", False, need(name, exact)), memory.Decision("exact", True, need(name, exact))]
        if lean is not None:
            out += [memory.Decision("lean", False, need(name, lean)), memory.Decision("lean", True, need(name, lean))]
        return out

    chosen, skipped = memory.decide("p", {"a": opts("a", 500), "b": opts("b", 1500), "c": opts("c", 5000, 800),
                                          "d": opts("d", 5000, 1900), "e": opts("e", 5000, 4000)}, pm, alone)
    got = {n: (d.statistics, d.own_pass) for n, d in chosen.items()}
    assert got == {"a": ("exact", False), "b": ("exact", True), "c": ("lean", False), "d": ("lean", True)}
    assert list(skipped) == ["e"] and "3.91 KiB" in skipped["e"] and "memory_limit = 1.95 KiB" in skipped["e"]
    with pytest.raises(lt.MemoryLimitError, match="even for the pair that needs least"):
        memory.decide("p", {"e": opts("e", 5000, 4000)}, pm, alone)


# ---------------------------------------------------------------------------------------------- failures
@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_a_failure_in_the_lean_refit_leaves_the_model_unchanged(monkeypatch, exc):
    model = _wide()
    snap = snapshot(model)
    real = lsprune.refit

    def failing(stats, keep, **kw):
        if stats.n_features > 16:  # the kept columns' re-fit of a lean pair
            raise exc("injected")
        return real(stats, keep, **kw)

    monkeypatch.setattr(lsprune, "refit", failing)
    with pytest.raises(exc, match="injected"):
        lt.prune(model, CAL, ratio=0.5, progress=False, statistics="lean")
    assert_unchanged(model, snap)


def test_lean_fallbacks_when_the_systems_stay_singular(monkeypatch, caplog):
    """What the engine raises when even the largest damping does not help: for the channel-level choice, the
    channels of largest input variance are re-fitted on their columns; for that re-fit, the original weights
    stay on the kept columns. Either way a valid model, never NaN."""
    from lsprune.torch import pruning

    def singular(*a, **kw):
        raise lsprune.NumericalError("the Gram matrix stays singular even with damping 0.1")

    model = _wide()
    monkeypatch.setitem(pruning.SELECTORS, "forward", singular)
    with caplog.at_level("WARNING", logger="lsprune.torch"):
        pruned, rep = lt.prune(model, CAL, ratio=0.5, pairs=[("conv1", "conv2")], statistics="lean",
                               progress=False)
    assert any("largest input variance" in r.getMessage() for r in caplog.records)
    r = rep.pairs[0]
    assert r.statistics == "lean" and r.channels_after == 4 and r.error_path == [] and 0 < r.relative_error < 1
    monkeypatch.undo()
    monkeypatch.setattr(lsprune, "refit", singular)
    with caplog.at_level("WARNING", logger="lsprune.torch"):
        pruned2, rep2 = lt.prune(model, CAL, ratio=0.5, pairs=[("conv1", "conv2")], statistics="lean",
                                 progress=False)
    assert any("original weights on the kept channels" in r.getMessage() for r in caplog.records)
    kept = torch.as_tensor(rep2.pairs[0].kept)
    assert torch.equal(pruned2.conv2.weight, model.conv2.weight[:, kept]) and torch.equal(pruned2.conv2.bias,
                                                                                          model.conv2.bias)
    for p in (pruned, pruned2):
        assert torch.isfinite(p(CAL[0])).all()


@pytest.mark.parametrize("inplace", [False, True])
def test_a_failure_in_a_pass_of_its_own_leaves_the_model_unchanged(monkeypatch, inplace):
    from lsprune.torch import hooks

    model = _mlp()
    _, r_ref = lt.prune(model, MLP_CAL, ratio=0.5, progress=False)
    snap = snapshot(model)
    calls, real = [], hooks.accumulate

    def failing(job, *a, **k):
        calls.append(job.name)
        if len(calls) == len(MLP_CAL) + 1:  # the second pair's pass of its own, after the first pair's surgery
            raise KeyboardInterrupt("injected")
        return real(job, *a, **k)

    monkeypatch.setattr(hooks, "accumulate", failing)
    with pytest.raises(KeyboardInterrupt, match="injected"):
        lt.prune(model, MLP_CAL, ratio=0.5, progress=False, inplace=inplace,
                 memory_limit=r_ref.memory["estimate"] // 2)
    assert calls[0] == "0 -> 2" and calls[-1] == "2 -> 4"
    assert_unchanged(model, snap)


def test_lean_with_checkpoint_resumes_to_the_same_model(tmp_path):
    model = _wide()
    ref, _ = lt.prune(model, CAL, ratio=0.5, progress=False, statistics="lean")
    first, _ = lt.prune(model, CAL, ratio=0.5, progress=False, statistics="lean", checkpoint=tmp_path / "c")
    again, rep = lt.prune(model, CAL, ratio=0.5, progress=False, statistics="lean", checkpoint=tmp_path / "c")
    _same_model(first, ref)
    _same_model(again, ref)
    assert rep.pair("conv2").statistics == "lean"
    with pytest.raises(ValueError, match="statistics"):  # another statistics= is another run
        lt.prune(model, CAL, ratio=0.5, progress=False, statistics="exact", checkpoint=tmp_path / "c")
