"""GradualPruner: pruning inside training with the optimizer's state shrunk like the parameters."""
from __future__ import annotations

import copy
import io
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lsprune import Budget
from lsprune.torch import GradualPruner, apply_structure, prune
from lsprune.torch import optimstate
from lsprune.torch.schedule import make_schedule
from torch_helpers import assert_unchanged, snapshot
from torch_models import VGG


@pytest.fixture(autouse=True)
def _one_thread():
    """The training loops here are many tiny ops: one thread avoids stalls on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _mlp(bias=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 24, bias=bias), nn.ReLU(), nn.Linear(24, 20, bias=bias), nn.ReLU(),
                         nn.Linear(20, 3, bias=bias))


def _task(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 10, generator=g)
    return X, (X[:, :3] * X[:, 3:6]).argmax(1)


def _train(model, opt, pruner, X, Y, steps, *, seed=0, sched=None, autocast=False):
    """A plain loop; returns the losses and the steps at which the pruner shrank the model."""
    g = torch.Generator().manual_seed(seed)
    losses, shrunk = [], []
    for t in range(steps):
        idx = torch.randint(0, len(Y), (64,), generator=g)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(X[idx]), Y[idx])
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            if pruner is not None and pruner.step(X[idx]):
                shrunk.append(t)
        losses.append(float(loss.detach()))
    return losses, shrunk


def _state(opt, model):
    """{parameter name: {key: tensor clone}}: the optimizer's state of the model's parameters."""
    return {n: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
            for n, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------------- exact slicing
def _cols(k, g):
    return (k[:, None] * g + torch.arange(g)).reshape(-1)


def test_optimizer_state_sliced_exactly_like_the_parameters():
    """VGG (conv -> BN -> conv, conv -> flatten -> Linear): every Adam moment equals the old moment cut by hand
    with the report's kept channels, along the dims the parameters were cut."""
    torch.manual_seed(0)
    model = VGG(c=(8, 12, 16), n_out=5, in_hw=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, amsgrad=True)
    X = torch.randn(256, 3, 16, 16)
    Y = torch.randint(0, 5, (256,))
    pr = GradualPruner(model, opt, ratio=0.4, schedule="once", end=3, buffer=4)
    for t in range(3):
        idx = torch.arange(64 * t, 64 * t + 64) % 256
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), Y[idx]).backward()
        opt.step()
        assert not pr.step(X[idx])
    before = _state(opt, model)
    assert pr.step(X[:64])
    (report,) = pr.reports
    k = {p.producer: torch.tensor(p.kept) for p in report.pairs}
    k1, k2, k3, k4 = k["conv1"], k["conv2"], k["conv3"], k["fc1"]
    cut = {"conv1.weight": lambda v: v[k1], "bn1.weight": lambda v: v[k1], "bn1.bias": lambda v: v[k1],
           "conv2.weight": lambda v: v[k2][:, k1], "conv2.bias": lambda v: v[k2],
           "bn2.weight": lambda v: v[k2], "bn2.bias": lambda v: v[k2],
           "conv3.weight": lambda v: v[k3][:, k2], "conv3.bias": lambda v: v[k3],
           "fc1.weight": lambda v: v[k4][:, _cols(k3, 16)], "fc1.bias": lambda v: v[k4],
           "fc2.weight": lambda v: v[:, k4], "fc2.bias": lambda v: v}
    params = dict(model.named_parameters())
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in model.parameters()]
    for name, f in cut.items():
        st = opt.state[params[name]]
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert torch.equal(st[key], f(before[name][key])), (name, key)
            assert st[key].shape == params[name].shape
        assert float(st["step"]) == float(before[name]["step"]) == 3.0
    assert pr.history[-1]["replaced"] == len(cut)  # every parameter is cut or re-fitted (fc2.bias)
    assert pr.history[-1]["reset"] == 0


def _tagged_shrink(model, batches, forward=None, **options):
    """One Adam step, every exp_avg replaced by its entries' flat indices, one shrink; returns the parameters
    before, the report and the optimizer."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    run = forward or (lambda m, b: m(b))
    run(model, batches[0]).float().square().mean().backward()
    opt.step()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        opt.state[p]["exp_avg"] = torch.arange(p.numel(), dtype=torch.float64).reshape(p.shape)
    pr = GradualPruner(model, opt, schedule="once", end=0, calibration=batches, **options)
    assert pr.step()
    return before, pr.reports[0], opt


def _check_tags(model, before, report, opt):
    """Where a parameter was only cut, its values are the old values at the entries its state says."""
    refit = {f"{c}.{a}" for p in report.pairs if p.status == "pruned" for c in (p.readers or [p.consumer])
             for a in ("weight", "bias")}
    cut = 0
    for n, p in model.named_parameters():
        if n not in before:  # a bias the LS intercept added: no state yet
            assert n in refit and not opt.state[p]
            continue
        tags = opt.state[p]["exp_avg"]
        assert tags.shape == p.shape and opt.state[p]["exp_avg_sq"].shape == p.shape, n
        if n not in refit:
            assert torch.equal(p.detach(), before[n].flatten()[tags.long()]), n
            cut += p.shape != before[n].shape
    return cut


def test_coupled_groups_and_residual_streams_keep_state_and_values_together():
    from torch_models import SmallResNet
    torch.manual_seed(0)
    model = SmallResNet(w=8, w2=16)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(32, 1, 12, 12, generator=g) for _ in range(4)]
    before, report, opt = _tagged_shrink(model, batches, ratio=0.5, coupled=True)
    assert any(p.writers for p in report.pairs if p.status == "pruned")  # a residual stream was cut
    assert _check_tags(model, before, report, opt) >= 6


@pytest.mark.parametrize("make, shape, kind", [
    (lambda tm: tm.init_bn(tm.InceptionConcat()), (16, 3, 8, 8), "concat"),
    (lambda tm: tm.FireNet(), (16, 1, 8, 8), "concat"),
    (lambda tm: tm.init_bn(tm.EfficientToy()), (16, 1, 8, 8), "gate"),
    (lambda tm: tm.init_bn(tm.GroupedNet()), (16, 1, 8, 8), "grouped"),
], ids=["inception", "fire", "se_gate", "grouped_conv"])
def test_concat_gate_and_grouped_units_keep_state_and_values_together(make, shape, kind):
    import torch_models as tm
    torch.manual_seed(0)
    model = make(tm)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(*shape, generator=g) for _ in range(4)]
    before, report, opt = _tagged_shrink(model, batches, ratio=0.5, coupled=True)
    assert any(p.kind == kind for p in report.pairs if p.status == "pruned")
    assert _check_tags(model, before, report, opt) >= 2  # cut parameters whose state was checked entry by entry


def test_transformer_heads_and_neurons_keep_state_and_values_together():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 64, (4, 16), generator=g)} for _ in range(4)]
    before, report, opt = _tagged_shrink(model, batches, lambda m, b: m(**b).logits, ratio=0.5)
    assert {p.kind for p in report.pairs} == {"heads", "mlp"}
    assert _check_tags(model, before, report, opt) >= 8  # q, k, v, gate, up of every block were cut


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.8, 0.95)),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, amsgrad=True),
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
], ids=["adam", "adamw_amsgrad", "sgd_momentum"])
def test_step_after_shrink_equals_a_fresh_optimizer_with_the_sliced_state(make):
    X, Y = _task()
    model = _mlp()
    opt = make(model.parameters())
    pr = GradualPruner(model, opt, budget=0.5, schedule="once", end=10**6, calibration=[X[:256]])
    _train(model, opt, None, X, Y, 5)
    before = _state(opt, model)
    assert pr.prune_to(0.5)
    k = {p.producer: torch.tensor(p.kept) for p in pr.reports[0].pairs}
    cut = {"0.weight": lambda v: v[k["0"]], "0.bias": lambda v: v[k["0"]],
           "2.weight": lambda v: v[k["2"]][:, k["0"]], "2.bias": lambda v: v[k["2"]],
           "4.weight": lambda v: v[:, k["2"]], "4.bias": lambda v: v}
    assert set(cut) == {n for n, _ in model.named_parameters()}
    # by hand: the same optimizer built fresh on (a copy of) the small model, the sliced state copied in
    fresh = copy.deepcopy(model)
    opt2 = make(fresh.parameters())
    for n, p in fresh.named_parameters():
        opt2.state[p] = {key: (cut[n](v) if torch.is_tensor(v) and v.dim() else v) for key, v in before[n].items()}
    for m, o in ((model, opt), (fresh, opt2)):
        o.zero_grad()
        F.cross_entropy(m(X[:64]), Y[:64]).backward()
        o.step()
    for (n, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), n
        for key, v in opt2.state[b].items():
            assert torch.equal(torch.as_tensor(opt.state[a][key]), torch.as_tensor(v)), (n, key)


# ---------------------------------------------------------------------------------------------- training goes on
def test_training_loss_keeps_falling_across_shrinks_and_the_lr_scheduler_steps():
    """Two param groups (no weight decay on biases) and a StepLR: every shrink keeps the groups' order and
    hyper-parameters, the scheduler keeps stepping, and the loss goes on falling."""
    X, Y = _task(2048)
    model = _mlp()
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=50, gamma=0.5)
    seen = []
    pr = GradualPruner(model, opt, budget=Budget(flops=0.4), schedule="cubic", start=60, end=150, every=30,
                       buffer=8, on_prune=lambda p, r: seen.append((p.steps_done, r.flops_after)))
    losses, shrunk = _train(model, opt, pr, X, Y, 260, sched=sched)
    assert [h["step"] for h in pr.history] == [90, 120, 150] and pr.done
    assert shrunk == [h["step"] for h in pr.history if h["pruned"]] == [s - 1 for s, _ in seen]
    assert shrunk[:2] == [90, 120]  # the last event is a no-op when the one before reached the budget
    assert all(b["target"] < a["target"] for a, b in zip(pr.history, pr.history[1:]))
    assert pr.history[-1]["reached"] <= 0.4 + 1e-9
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert math.isclose(opt.param_groups[0]["lr"], 1e-2 * 0.5 ** 5) and sched.last_epoch == 260
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for p in opt.param_groups[0]["params"]] == ["0.weight", "2.weight", "4.weight"]
    assert [names[id(p)] for p in opt.param_groups[1]["params"]] == ["0.bias", "2.bias", "4.bias"]
    mean = lambda a, b: sum(losses[a:b]) / (b - a)  # noqa: E731
    assert all(math.isfinite(v) for v in losses)
    assert mean(155, 175) < 1.5 * mean(70, 90)  # a shrink costs little
    assert mean(240, 260) < mean(155, 175) < mean(0, 20)  # and training goes on falling after it


def test_the_pruned_architecture_is_rebuilt_from_the_event_reports():
    """A checkpoint of a gradually pruned run loads into a fresh model shrunk by each event's report in turn."""
    X, Y = _task()
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pr = GradualPruner(model, opt, budget=0.3, schedule="constant", start=0, end=4, every=2)
    _train(model, opt, pr, X, Y, 6)
    assert len(pr.reports) == 2
    fresh = _mlp()
    for r in pr.reports:
        apply_structure(fresh, json.loads(r.to_json()))
    fresh.load_state_dict(model.state_dict())
    opt2 = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    opt2.load_state_dict(opt.state_dict())
    assert torch.equal(fresh(X[:8]), model(X[:8]))


def _run(model, opt, pr, X, Y, steps):
    """Training steps [pr.steps_done, steps) on a fixed stream of minibatches (step t always draws the same)."""
    for t in range(pr.steps_done, steps):
        idx = torch.randint(0, len(Y), (64,), generator=torch.Generator().manual_seed(1000 + t))
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), Y[idx]).backward()
        opt.step()
        pr.step(X[idx])


def _pruner(model, opt, **kw):
    return GradualPruner(model, opt, budget=0.3, schedule="constant", start=0, end=30, every=10, buffer=4, **kw)


def test_a_run_resumed_from_its_state_dicts_equals_the_uninterrupted_run():
    """Model, optimizer and pruner state dicts saved mid-schedule (the calibration buffer filling), loaded into
    fresh objects: the resumed run ends bit-identical to the run that never stopped."""
    X, Y = _task()
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pr = _pruner(model, opt)
    _run(model, opt, pr, X, Y, 28)
    assert len(pr.reports) == 2 and len(pr._buffer) == 1  # events at 10 and 20; step 27 kept for the one at 30
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "pruner": pr.state_dict()}, buf)
    _run(model, opt, pr, X, Y, 45)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    model2 = _mlp()
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2)
    pr2 = _pruner(model2, opt2)
    pr2.load_state_dict(ckpt["pruner"])
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    assert pr2.steps_done == 28 and [r.to_dict() for r in pr2.reports] == ckpt["pruner"]["reports"]
    _run(model2, opt2, pr2, X, Y, 45)
    assert len(pr2.reports) == 3 and pr2.history == pr.history[:2] + pr2.history[2:]
    for (n, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), n
    assert torch.equal(model(X[:16]), model2(X[:16]))


def test_load_state_dict_refuses_what_it_cannot_resume():
    X, Y = _task()
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pr = _pruner(model, opt)
    _run(model, opt, pr, X, Y, 12)
    state = pr.state_dict()
    with pytest.raises(ValueError, match="fresh GradualPruner"):
        pr.load_state_dict(state)
    fresh = _mlp()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    opt2 = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    other = GradualPruner(fresh, opt2, budget=0.3, schedule="constant", start=0, end=40, every=10)
    for bad, match in [(state, "not this pruner's"), ({"steps_done": 3}, "not a GradualPruner state"),
                       (dict(state, reports=["x"]), "list of report dicts")]:
        with pytest.raises(ValueError, match=match):
            (other if match == "not this pruner's" else _pruner(fresh, opt2)).load_state_dict(bad)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())  # nothing changed
    broken = copy.deepcopy(state)  # the second event names a module the model does not have
    broken["reports"].append(copy.deepcopy(broken["reports"][0]))
    broken["reports"][1]["pairs"][0]["producer"] = "nope"
    broken["schedule"], params = state["schedule"], [p for g in opt2.param_groups for p in g["params"]]
    with pytest.raises(ValueError, match="no module"):
        _pruner(fresh, opt2).load_state_dict(broken)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())  # the first event undone
    assert [p for g in opt2.param_groups for p in g["params"]] == params


def test_refit_state_reset_drops_the_state_of_refitted_parameters_only():
    X, Y = _task()
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pr = GradualPruner(model, opt, ratio=0.5, schedule="once", end=3, refit_state="reset")
    _train(model, opt, pr, X, Y, 4)
    st = {n: opt.state.get(p, {}) for n, p in model.named_parameters()}
    assert st["0.weight"] and st["0.bias"]  # producer only: sliced
    assert not st["2.weight"] and not st["4.weight"] and not st["4.bias"]  # re-fitted consumers: afresh
    assert pr.history[0]["reset"] == 4  # 2.weight, 2.bias (re-fitted, then cut), 4.weight, 4.bias
    _train(model, opt, pr, X, Y, 2)  # Adam starts them again
    assert float(opt.state[model[4].weight]["step"]) == 2.0


def test_a_bias_added_by_the_ls_intercept_joins_its_weights_group():
    X, Y = _task()
    model = _mlp(bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pr = GradualPruner(model, opt, ratio=0.5, schedule="once", end=2)
    _train(model, opt, pr, X, Y, 4)
    assert model[2].bias is not None and model[4].bias is not None
    ids = [id(p) for p in opt.param_groups[0]["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and pr.history[0]["added"] == 2
    assert opt.state[model[4].bias]["momentum_buffer"].shape == (3,)  # trained since


def test_amp_bf16_on_cpu_calibrates_in_float32():
    """step() inside torch.autocast(bfloat16): the shrink calibrates in the model's float32 (the same model as a
    prune outside autocast on the same batches) and training goes on under autocast."""
    X, Y = _task()
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, opt, None, X, Y, 4, autocast=True)
    cal = [X[:128], X[128:256]]
    ref = prune(copy.deepcopy(model), cal, budget=0.5, progress=False)[0]
    pr = GradualPruner(model, opt, budget=0.5, schedule="once", end=0, calibration=cal)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert pr.step()
    for (n, a), (_, b) in zip(model.named_parameters(), ref.named_parameters()):
        assert a.dtype == torch.float32 and torch.equal(a, b), n
    losses, _ = _train(model, opt, pr, X, Y, 20, autocast=True)
    assert all(math.isfinite(v) for v in losses)


def test_a_compiled_model_is_pruned_through_its_original_module():
    X, Y = _task()
    model = _mlp()
    compiled = torch.compile(model, backend="eager")
    opt = torch.optim.Adam(compiled.parameters(), lr=1e-2)
    calls = []
    pr = GradualPruner(compiled, opt, ratio=0.5, schedule="once", end=3, on_prune=lambda p, r: calls.append(r))
    assert pr.model is model
    losses, shrunk = _train(compiled, opt, pr, X, Y, 8)
    assert shrunk == [3] and len(calls) == 1 and model[0].out_features == 12
    with torch.no_grad():
        assert torch.equal(compiled(X[:8]), model(X[:8]))  # the compiled code follows the new shapes
    assert all(math.isfinite(v) for v in losses)


# ---------------------------------------------------------------------------------------------- all or nothing
def _frozen(model, opt):
    return snapshot(model), [list(g["params"]) for g in opt.param_groups], \
        {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}


def _assert_frozen(model, opt, frozen):
    snap, groups, state = frozen
    assert_unchanged(model, snap)
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == [[id(p) for p in ps] for ps in groups]
    assert set(map(id, opt.state)) == set(state)
    for p, s in opt.state.items():
        assert all(torch.equal(v, state[id(p)][k]) for k, v in s.items())


@pytest.mark.parametrize("where", ["prune", "optimizer"])
def test_an_interrupt_during_a_shrink_leaves_model_and_optimizer_as_they_were(where, monkeypatch):
    X, Y = _task()
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    calls = []

    def forward(m, batch):  # Ctrl-C in the middle of the calibration passes
        calls.append(1)
        if where == "prune" and len(calls) == 4:
            raise KeyboardInterrupt
        return m(batch)

    pr = GradualPruner(model, opt, ratio=0.5, schedule="once", end=3, forward_fn=forward)
    _train(model, opt, pr, X, Y, 3)
    if where == "optimizer":  # Ctrl-C after the model shrank, while the optimizer's state is being sliced
        real, n = optimstate.slice_state, []

        def slice_state(*a):
            n.append(1)
            if len(n) == 3:
                raise KeyboardInterrupt
            return real(*a)
        monkeypatch.setattr(optimstate, "slice_state", slice_state)
    frozen = _frozen(model, opt)
    with pytest.raises(KeyboardInterrupt):
        pr.step(X[:64])
    _assert_frozen(model, opt, frozen)
    assert not pr.reports and model[0].out_features == 24 and pr.steps_done == 3
    monkeypatch.undo()
    calls.clear()
    calls.extend([1] * 10)  # no more interrupts: the event is retried
    assert pr.step(X[:64]) and model[0].out_features == 12 and pr.steps_done == 4


def test_state_that_cannot_follow_the_surgery_refuses_the_shrink():
    X, Y = _task()
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pr = GradualPruner(model, opt, ratio=0.5, schedule="once", end=3)
    _train(model, opt, pr, X, Y, 3)
    opt.state[model[2].weight]["factored"] = torch.zeros(20)  # e.g. Adafactor's row statistics
    frozen = _frozen(model, opt)
    with pytest.raises(TypeError, match="factored"):
        pr.step(X[:64])
    _assert_frozen(model, opt, frozen)


# ---------------------------------------------------------------------------------------------- schedules
def test_schedules_give_the_documented_steps_and_fractions():
    c = make_schedule("cubic", 0.25, start=100, end=500, every=100)
    assert c.steps == (200, 300, 400, 500)
    assert all(math.isclose(f, 0.25 + 0.75 * (1 - k / 4) ** 3) for k, f in enumerate(c.fractions, 1))
    assert c.fractions[-1] == 0.25 and c.at(300) == c.fractions[1] and c.at(250) is None
    s = make_schedule("constant", 0.5, start=0, end=40, every=10)
    assert s.steps == (10, 20, 30, 40) and [round(f, 9) for f in s.fractions] == [0.875, 0.75, 0.625, 0.5]
    assert make_schedule("once", 0.3, start=None, end=7, every=None).steps == (7,)
    custom = make_schedule({30: 0.5, 10: 0.8, 20: 0.8}, 0.5, start=None, end=None, every=None)
    assert custom.steps == (10, 20, 30) and custom.fractions == (0.8, 0.8, 0.5)


def test_the_counts_of_a_schedule_are_what_the_pruner_runs():
    X, Y = _task()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pr = GradualPruner(model, opt, budget=0.3, schedule="constant", start=0, end=8, every=2, buffer=2)
    _, shrunk = _train(model, opt, pr, X, Y, 10)
    assert shrunk == [2, 4, 6, 8] == list(pr.schedule.steps)
    reached = [h["reached"] for h in pr.history]
    assert all(r <= t + 1e-9 for r, t in zip(reached, pr.schedule.fractions)) and reached == sorted(reached)[::-1]


# ---------------------------------------------------------------------------------------------- bad input
def _bad(model=None, opt=None, **kw):
    model = model if model is not None else _mlp()
    opt = opt if opt is not None else torch.optim.SGD(model.parameters(), lr=0.1)
    kw = {"budget": 0.5, "schedule": "cubic", "start": 0, "end": 100, "every": 10, **kw}
    return GradualPruner(model, opt, **kw)


@pytest.mark.parametrize("kw, err, match", [
    (dict(every=0), ValueError, "every"), (dict(every=2.5), TypeError, "every"), (dict(every=True), TypeError, "every"),
    (dict(end=95), ValueError, "multiple"), (dict(end=0), ValueError, "after start"),
    (dict(schedule="linear"), ValueError, "schedule"), (dict(schedule="once", every=10), ValueError, "once"),
    (dict(schedule={10: 0.6, 20: 0.7, 30: 0.5}, start=None, end=None, every=None), ValueError, "not increase"),
    (dict(schedule=[(10, 0.8), (20, 0.6)], start=None, end=None, every=None), ValueError, "ends at 0.6"),
    (dict(schedule=[(20, 0.8), (10, 0.5)], start=None, end=None, every=None), ValueError, "increase"),
    (dict(ratio=0.3), ValueError, "one of them"), (dict(budget=None), ValueError, "one of them"),
    (dict(budget=None, ratio=1.0), ValueError, "ratio"), (dict(budget=1.5), ValueError, "at most 1"),
    (dict(buffer=0), ValueError, "buffer"), (dict(refit_state="keep"), ValueError, "refit_state"),
    (dict(on_prune=3), TypeError, "on_prune"), (dict(calibration=iter([torch.zeros(2, 10)])), TypeError, "re-iter"),
    (dict(inplace=False), ValueError, "itself"), (dict(methd="forward"), TypeError, "methd"),
    (dict(method="nope"), ValueError, "method"), (dict(pairs=[("0", "nope")]), ValueError, "nope"),
])
def test_bad_options_raise_before_training(kw, err, match):
    with pytest.raises(err, match=match):
        _bad(**kw)


def test_an_optimizer_over_foreign_or_tied_parameters_is_refused():
    model = _mlp()
    other = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="not the model's"):
        _bad(model, torch.optim.SGD([*model.parameters(), *other.parameters()], lr=0.1))
    with pytest.raises(TypeError, match="Optimizer"):
        _bad(model, [p for p in model.parameters()])
    tied = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 3))
    tied[2].weight = tied[0].weight  # two layers, one tensor
    with pytest.raises(ValueError, match="tied"):
        _bad(tied, torch.optim.SGD(tied.parameters(), lr=0.1))
    shared = nn.Sequential(tied[4], nn.ReLU(), nn.Linear(3, 3), nn.ReLU())
    shared.append(shared[2])  # one layer applied twice: its weights are tied to themselves
    with pytest.raises(ValueError, match="tied"):
        _bad(shared, torch.optim.SGD(shared.parameters(), lr=0.1))
    lm = nn.Sequential(nn.Embedding(5, 10), nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 10), nn.Linear(10, 5))
    lm[4].weight = lm[0].weight  # an embedding tied to the output layer: allowed
    _bad(lm, torch.optim.SGD(lm.parameters(), lr=0.1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_state_stays_on_the_device():
    X, Y = (t.cuda() for t in _task())
    model = _mlp().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    pr = GradualPruner(model, opt, budget=0.5, schedule="once", end=3)
    losses, shrunk = _train(model, opt, pr, X, Y, 8)
    assert shrunk == [3] and all(math.isfinite(v) for v in losses)
    for p in model.parameters():
        assert p.is_cuda and all(v.is_cuda for v in opt.state[p].values() if torch.is_tensor(v) and v.dim())
