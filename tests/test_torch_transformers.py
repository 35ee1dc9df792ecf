"""Transformers through prune(): attention heads (MHA, GQA, GPT-2's fused c_attn), gated and plain MLPs,
the block-wise executor, targets, surgery, Hugging Face round trip and generate()."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
import lsprune.torch as lt  # noqa: E402
from lsprune.torch.blockwise import find_blocks  # noqa: E402

#: Pruned models must agree with their reloaded copies to float32 round-off.
ROUND_TRIP_TOL = 1e-5


def _llama(kv=2, attn="sdpa"):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                   num_attention_heads=8, num_key_value_heads=kv, head_dim=8,
                                   max_position_embeddings=64, attn_implementation=attn)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval(), cfg


def _bert():
    cfg = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.BertModel(cfg, add_pooling_layer=False).eval(), cfg


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                 bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval(), cfg


def _opt():
    cfg = transformers.OPTConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                                 num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64,
                                 bos_token_id=0, eos_token_id=0, pad_token_id=1)
    torch.manual_seed(0)
    return transformers.OPTForCausalLM(cfg).eval(), cfg


def _vit():
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=96)
    torch.manual_seed(0)
    return transformers.ViTModel(cfg, add_pooling_layer=False).eval(), cfg


def _tokens(n=4, b=4, t=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 128, (b, t), generator=g)} for _ in range(n)]


def _images(n=4, b=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(b, 3, 16, 16, generator=g)} for _ in range(n)]


def _out(model, batch):
    with torch.no_grad():
        o = model(**batch)
    return o.logits if hasattr(o, "logits") and o.logits is not None else o.last_hidden_state


def _rel(a, b):
    return float((a - b).norm() / a.norm())


ARCHS = {"llama_gqa": (_llama, _tokens, 3, ("gated_mlp", "qkvo")), "bert": (_bert, _tokens, 2,
                                                                          ("bert_mlp", "bert_attention")),
         "gpt2": (_gpt2, _tokens, 2, ("mlp", "fused_qkv")), "vit": (_vit, _images, 2, ("mlp", "qkvo")),
         "opt": (_opt, _tokens, 2, ("mlp", "qkvo"))}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_units_found(arch):
    make, _, n_blocks, layouts = ARCHS[arch]
    model, cfg = make()
    name, blocks = find_blocks(model)
    assert len(blocks) == n_blocks
    units = lt.find_units(blocks[0], f"{name}.0")
    assert sorted(u.layout for u in units) == sorted(layouts)
    heads = next(u for u in units if u.kind == "heads")
    kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    assert heads.channels == kv
    assert heads.group_size * heads.channels == cfg.hidden_size if arch != "llama_gqa" else \
        heads.group_size == (cfg.num_attention_heads // kv) * cfg.head_dim


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("units", ["mlp", "heads"])
def test_prune_beats_magnitude_and_shapes(arch, units):
    make, data, _, _ = ARCHS[arch]
    model, _ = make()
    calib, held = data(n=16), data(n=1, seed=9)[0]  # enough rows that the LS re-fit does not overfit
    before = copy.deepcopy(model.state_dict())
    ls, rep = lt.prune(model, calib, ratio=0.5, units=units, progress=False)
    mag, _ = lt.prune(model, calib, ratio=0.5, units=units, method="magnitude", refit=False, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's model is untouched
    assert rep.strategy == "blocks" and all(r.kind == units for r in rep.pairs)
    assert all(r.channels_after == max(1, r.channels_before - round(0.5 * r.channels_before)) for r in rep.pairs)
    ref = _out(model, held)
    assert _rel(ref, _out(ls, held)) < _rel(ref, _out(mag, held))
    assert rep.params_after < rep.params_before


def test_gqa_removes_whole_kv_groups_and_generates():
    model, cfg = _llama(kv=2)
    pruned, rep = lt.prune(model, _tokens(), keep={"model.layers.1.self_attn": 1}, units="heads", progress=False)
    att = pruned.model.layers[1].self_attn
    assert att.k_proj.out_features == 8 and att.v_proj.out_features == 8  # one KV head of head_dim 8
    assert att.q_proj.out_features == 32 and att.o_proj.in_features == 32  # its 4 query heads
    assert att.num_key_value_groups == 4
    assert pruned.model.layers[0].self_attn.q_proj.out_features == 64  # not named in keep: unchanged
    for attn in ("sdpa", "eager"):
        pruned.config._attn_implementation = attn
        out = pruned.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=6, do_sample=False)
        # with a KV cache and without it, greedy decoding gives the same tokens
        nocache = pruned.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=6, do_sample=False, use_cache=False)
        assert out.shape == (1, 9) and torch.equal(out, nocache)


def test_opt_heads_and_generate():
    model, _ = _opt()
    pruned, rep = lt.prune(model, _tokens(n=8), ratio=0.5, progress=False)
    layer = pruned.model.decoder.layers[0]
    assert layer.self_attn.num_heads == 2 and layer.self_attn.out_proj.in_features == 32
    assert layer.fc1.out_features == 64 and layer.fc2.in_features == 64
    out = pruned.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    nocache = pruned.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(out, nocache)


def test_gpt2_fused_qkv_heads_and_generate():
    model, _ = _gpt2()
    pruned, rep = lt.prune(model, _tokens(), ratio=0.5, units="heads", progress=False)
    att = pruned.transformer.h[0].attn
    assert att.c_attn.weight.shape == (64, 96) and att.c_attn.nf == 96 and att.c_proj.weight.shape == (32, 64)
    assert att.num_heads == 2 and att.split_size == 32
    out = pruned.generate(torch.tensor([[5, 6]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 6)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_round_trip(arch, tmp_path):
    make, data, _, _ = ARCHS[arch]
    model, cfg = make()
    pruned, rep = lt.prune(model, data(), ratio=0.4, progress=False)
    lt.save_pruned(pruned, rep, tmp_path / "p")
    fresh = type(model)(cfg) if arch not in ("bert", "vit") else type(model)(cfg, add_pooling_layer=False)
    lt.load_pruned(fresh.eval(), tmp_path / "p")
    batch = data(n=1, seed=3)[0]
    assert _rel(_out(pruned, batch), _out(fresh, batch)) < ROUND_TRIP_TOL


def test_load_pruned_refuses_other_architecture_and_leaves_it(tmp_path):
    model, cfg = _llama()
    pruned, rep = lt.prune(model, _tokens(), ratio=0.5, progress=False)
    lt.save_pruned(pruned, rep, tmp_path)
    other, _ = _llama(kv=4)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError):
        lt.load_pruned(other, tmp_path)
    after = other.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("targets", ["layer", "original"])
def test_targets_and_zero_ratio(targets):
    model, _ = _llama()
    calib = _tokens()
    same, rep = lt.prune(model, calib, ratio=0.0, targets=targets, progress=False)
    assert all(r.status == "unchanged" for r in rep.pairs)
    assert _rel(_out(model, calib[0]), _out(same, calib[0])) == 0.0
    pruned, rep = lt.prune(model, calib, ratio=0.25, targets=targets, progress=False)
    assert all(r.status == "pruned" and 0 <= r.relative_error < 1 for r in rep.pairs)


def test_block_passes_do_not_grow_with_depth():
    model, _ = _llama()
    _, rep = lt.prune(model, _tokens(), ratio=0.5, progress=False)
    assert rep.forward_passes <= 2.5  # one collection and one output pass per block, plus a batch for FLOPs


def test_padding_tokens_stay_out_of_statistics():
    model, _ = _llama()
    calib = _tokens(n=2)
    padded = [dict(b, attention_mask=torch.ones_like(b["input_ids"])) for b in calib]
    for b in padded:
        b["attention_mask"][:, -8:] = 0
    _, rep = lt.prune(model, padded, ratio=0.5, units="mlp", progress=False)
    assert all(r.samples == 2 * 4 * (24 - 8) for r in rep.pairs)


def test_bad_blocks_name_is_a_clear_error():
    model, _ = _llama()
    with pytest.raises(lt.BlocksNotFoundError, match="blocks="):
        lt.prune(model, _tokens(), ratio=0.5, blocks="model.nope", progress=False)
    with pytest.raises(ValueError, match="keep"):
        lt.prune(model, _tokens(), keep={"model.layers.0.mlp": 0}, progress=False)
    with pytest.raises(ValueError, match="between 1 and"):
        lt.prune(model, _tokens(), keep={"model.layers.0.self_attn": 3}, progress=False)
    with pytest.raises(ValueError, match="units"):
        lt.prune(model, _tokens(), ratio=0.5, units="neurons", progress=False)
    with pytest.raises(ValueError, match="does not support"):
        lt.prune(model, _tokens(), ratio=0.5, mode="independent", progress=False)


def test_model_without_blocks_refuses_blocks_strategy():
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with pytest.raises(lt.BlocksNotFoundError, match="blocks="):
        lt.prune(net, [torch.randn(8, 4)], ratio=0.5, strategy="blocks", progress=False)


def test_inplace_failure_restores_model():
    model, _ = _llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = {"n": 0}

    def forward_fn(m, batch):  # FLOPs count on batch 0, capture of batch 0, then batch 1 fails
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return m(**batch)

    with pytest.raises(ValueError, match="batch 1"):
        lt.prune(model, _tokens(), ratio=0.5, inplace=True, forward_fn=forward_fn, progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.model.layers[0].mlp.down_proj.in_features == 96


@pytest.mark.parametrize("kind", ["params", "flops"])
def test_budget_across_heads_and_neurons(kind):
    import lsprune

    model, _ = _llama()
    calib, held = _tokens(n=8), _tokens(n=1, seed=9)[0]
    ref = _out(model, held)
    g, rep = lt.prune(model, calib, budget=lsprune.Budget(**{kind: 0.7}), progress=False)
    u, rep_u = lt.prune(model, calib, budget=lsprune.Budget(**{kind: 0.7}, allocation="uniform"), progress=False)
    for r in (rep, rep_u):
        assert r.budget["reached"] <= 0.7 + 1e-9
        assert (r.params_ratio if kind == "params" else r.flops_ratio) == pytest.approx(r.budget["reached"])
    assert rep.budget["reached"] > 0.69  # the global allocation spends the budget
    assert {r.kind for r in rep.pairs if r.status == "pruned"} == {"mlp", "heads"}
    assert all(r.predicted_error is not None for r in rep.pairs)
    assert _rel(ref, _out(g, held)) < _rel(ref, _out(u, held))
    assert rep.forward_passes <= 3.5  # the allocation's pass on the original stream, then the pruning passes


def test_find_pairs_lists_units_and_the_residual_stream():
    model, _ = _llama()
    search = lt.find_pairs(model, _tokens(1)[0])
    assert [p.producer for p in search.pairs][:2] == ["model.layers.0.self_attn", "model.layers.0.mlp"]
    assert [p.via for p in search.pairs][:2] == [("heads",), ("mlp",)]
    assert any("residual stream" in s.reason and s.producer == "model.layers.0.mlp.down_proj" for s in search.skipped)
    assert len(lt.find_pairs(model, _tokens(1)[0], units="heads")) == 3


@pytest.mark.parametrize("method", ["wanda_sp", "flap"])
def test_statistics_baselines_pick_their_top_channels(method):
    import lsprune
    from lsprune.torch.baselines import flap_order, wanda_sp_order

    model, _ = _llama()
    calib = _tokens(n=4)
    stats = lsprune.Statistics(96)
    down = model.model.layers[0].mlp.down_proj
    h = down.register_forward_pre_hook(lambda m, a: [stats.update(a[0].reshape(-1, 96).double().numpy())] and None)
    with torch.no_grad():
        for b in calib:
            model(**b)
    h.remove()
    W = down.weight.detach().double().numpy()
    order = wanda_sp_order(stats, W, 1, norm="l1") if method == "wanda_sp" else flap_order(stats, W, 1)
    pruned, rep = lt.prune(model, calib, ratio=0.5, units="mlp", method=method, refit=False, progress=False)
    assert rep.pairs[0].kept == sorted(order[:48].tolist())
    new = pruned.model.layers[0].mlp.down_proj
    assert rep.pairs[0].bias_added == (method == "flap") and (new.bias is not None) == (method == "flap")
    if method == "flap":  # the bias keeps the removed neurons' mean contribution
        removed = sorted(set(range(96)) - set(rep.pairs[0].kept))
        mean = stats.sum_x / stats.count
        assert torch.allclose(new.bias.double(), torch.as_tensor(W[:, removed] @ mean[removed]), atol=1e-6)


def test_memory_guard_refuses_before_allocating():
    model, _ = _llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lt.MemoryLimitError, match="block-wise"):
        lt.prune(model, _tokens(), ratio=0.5, memory_limit=10_000, inplace=True, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    _, rep = lt.prune(model, _tokens(), ratio=0.5, progress=False)
    assert rep.memory["estimate"] > rep.memory["model_copy"] > 0


def test_fill_up_that_cannot_be_fitted_falls_back(caplog, monkeypatch):
    import lsprune

    model, _ = _llama()
    with torch.no_grad():
        for layer in model.model.layers:  # 60 dead neurons: the selection stops at the 36 live ones
            layer.mlp.gate_proj.weight[36:] = 0

    def singular(*a, **kw):
        raise lsprune.NumericalError("the kept columns' Gram matrix stays singular even with damping 0.1")

    monkeypatch.setattr(lsprune, "refit", singular)
    with caplog.at_level("WARNING", logger="lsprune.torch"):
        pruned, rep = lt.prune(model, _tokens(n=8), keep={"model.layers.0.mlp": 48}, units="mlp", damping=0.0,
                               progress=False)
    assert any("stopped after" in r.getMessage() for r in caplog.records)
    assert any("constant" in r.getMessage() for r in caplog.records)
    assert rep.pairs[0].channels_after == 48 and set(range(36)) <= set(rep.pairs[0].kept)
    assert torch.isfinite(_out(pruned, _tokens(n=1, seed=5)[0])).all()


def test_singular_gram_falls_back_instead_of_failing(caplog, monkeypatch):
    import lsprune
    from lsprune.torch import pruning

    def singular(stats, n_keep, **kw):  # what the engine raises when even the largest damping does not help
        raise lsprune.NumericalError("the Gram matrix stays singular even with damping 0.1")

    monkeypatch.setitem(pruning.SELECTORS, "forward", singular)
    model, _ = _llama()
    with caplog.at_level("WARNING", logger="lsprune.torch"):
        pruned, rep = lt.prune(model, _tokens(n=8), ratio=0.5, units="mlp", progress=False)
    assert any("constant" in r.getMessage() for r in caplog.records)
    assert all(r.channels_after == 48 and 0 < r.relative_error < 1 for r in rep.pairs)
    down = pruned.model.layers[0].mlp.down_proj
    assert down.bias is not None and rep.pairs[0].bias_added  # the removed neurons' mean went into the bias
    batch = _tokens(n=1, seed=5)[0]
    assert torch.isfinite(_out(pruned, batch)).all()


def test_block_calls_move_between_devices():
    from lsprune.torch.blockwise import BlockCall

    h, cos = torch.randn(2, 3, 4), torch.randn(3, 4)
    call = BlockCall((h,), {"position_embeddings": (cos, cos), "attention_mask": None, "use_cache": False})
    assert call.to(torch.device("cpu")) is call  # nothing moves: no copy
    meta = call.to(torch.device("meta"))  # what a GPU model's cached host calls go through, per block call
    assert meta.hidden.device.type == "meta" and meta.kwargs["position_embeddings"][1].device.type == "meta"
    assert meta.kwargs["attention_mask"] is None and meta.kwargs["use_cache"] is False
    assert call.hidden.device.type == "cpu"
