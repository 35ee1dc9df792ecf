"""Block reconstruction after LS selection (prune(reconstruct=...)): the best iterate never ends above the LS
start, zero steps are plain LS bit for bit, a fixed seed repeats, bad options are refused before anything runs,
a non-finite loss keeps the LS weights with a typed warning, an interrupted in-place prune leaves the model as it
was, and the report carries the windows through JSON."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
import lsprune.torch as lt  # noqa: E402
from lsprune.torch import reconstruct as rc  # noqa: E402


def _llama(layers=2, dtype=torch.float32):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=32, attn_implementation="eager")  # fast at this size
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def _bert():
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def _tokens(n=3, b=4, t=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 64, (b, t), generator=g)} for _ in range(n)]


RC = dict(steps=16, lr=1e-3, batch_size=32, window="block")  # 2 sequences of 16 tokens per step


def _prune(model, calib, **kw):
    return lt.prune(model, calib, ratio=0.5, progress=False, **kw)


@pytest.fixture(scope="module")
def plain():
    """The tiny Llama, its calibration batches and the plain LS prune (model, report) of them."""
    model, calib = _llama(), _tokens()
    return model, calib, _prune(model, calib)


def _same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


def _output_error(model, pruned, calib) -> float:
    with torch.no_grad():
        return sum(float((model(**b).logits - pruned(**b).logits).pow(2).sum()) for b in calib)


@pytest.mark.parametrize("window", ["block", "sublayer"])
def test_loss_never_rises_and_reconstruction_helps(window, plain):
    model, calib, (ls, _) = plain
    pr, rep = _prune(model, calib, reconstruct=dict(RC, window=window, steps=20))
    w = rep.reconstruction
    assert [x.window for x in w] == (["model.layers.0", "model.layers.1"] if window == "block" else
                                     ["model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.1.self_attn",
                                      "model.layers.1.mlp"])
    assert all(x.loss_after <= x.loss_before and x.steps == 20 for x in w)
    assert any(x.status == "improved" and x.loss_after < x.loss_before for x in w)
    assert rep.reconstruct == rc.ReconstructOptions(**dict(RC, window=window, steps=20)).to_dict()
    assert _output_error(model, pr, calib) < _output_error(model, ls, calib)  # the whole network moved closer too


def test_steps_that_only_hurt_keep_the_ls_weights(plain):
    model, calib, (ls, _) = plain
    pr, rep = _prune(model, calib, reconstruct=dict(RC, lr=0.3))  # Adam moves every weight by ~0.3 a step: too far
    assert all(x.status == "unchanged" and x.best_step == 0 and x.loss_after == x.loss_before
               for x in rep.reconstruction)
    assert _same(ls, pr)


def test_zero_steps_is_plain_ls_bit_for_bit(plain):
    model, calib, (ls, ls_rep) = plain
    for targets in ("dense", "pruned_stream"):
        pr, rep = _prune(model, calib, reconstruct=dict(RC, steps=0, targets=targets, window="sublayer"))
        assert _same(ls, pr)
        assert [p.kept for p in rep.pairs] == [p.kept for p in ls_rep.pairs]
        assert all(x.steps == 0 and x.loss_after == x.loss_before > 0 for x in rep.reconstruction)


def test_a_fixed_seed_repeats_and_another_differs(plain):
    model, calib, _ = plain
    opts = lt.ReconstructOptions(**RC)
    a, _ = _prune(model, calib, reconstruct=opts)
    b, _ = _prune(model, calib, reconstruct=opts)
    c, _ = _prune(model, calib, reconstruct=dict(RC, seed=1))
    assert _same(a, b)
    assert not _same(a, c)


@pytest.mark.parametrize("bad", [dict(steps=-1), dict(steps=2.5), dict(steps=True), dict(lr=0), dict(lr=-1e-3),
                                 dict(lr=float("nan")), dict(lr=float("inf")), dict(lr="1e-3"), dict(window="layer"),
                                 dict(optimizer="lbfgs"), dict(targets="original"), dict(batch_size=0),
                                 dict(norms="yes"), dict(seed=-1), dict(step=10)])
def test_bad_options_raise_before_anything_runs(bad):
    ran = []

    def forward_fn(m, batch):
        ran.append(1)
        return m(**batch)

    with pytest.raises(ValueError, match="reconstruct"):
        _prune(_llama(), _tokens(), reconstruct=bad, forward_fn=forward_fn)
    assert not ran


def test_reconstruct_of_a_wrong_type_or_strategy_is_refused():
    with pytest.raises(TypeError, match="reconstruct"):
        _prune(_llama(), _tokens(), reconstruct=25)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with pytest.raises(ValueError, match="blocks strategy"):
        lt.prune(net, [torch.randn(16, 4)], ratio=0.5, progress=False, reconstruct={})


def test_non_finite_loss_warns_names_the_block_and_keeps_ls(plain):
    model, calib, (ls, _) = plain
    with pytest.warns(lt.ReconstructionWarning) as caught:
        pr, rep = _prune(model, calib, reconstruct=dict(RC, lr=1e30))
    assert [str(w.message).split(":")[0] for w in caught] == ["block model.layers.0", "block model.layers.1"]
    assert all("not finite" in str(w.message) for w in caught)
    assert all(x.status == "non_finite" and x.loss_after == x.loss_before for x in rep.reconstruction)
    assert _same(ls, pr)
    assert "non-finite" in str(rep)


def test_interrupted_inplace_prune_leaves_the_model_bit_identical(monkeypatch):
    model, calib = _llama(), _tokens()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step, calls = rc.BlockReconstructor._step, []

    def interrupted(self, *a, **k):  # block 0 is reconstructed and installed; Ctrl-C in block 1
        calls.append(1)
        if len(calls) == RC["steps"] + 3:
            raise KeyboardInterrupt
        return step(self, *a, **k)

    monkeypatch.setattr(rc.BlockReconstructor, "_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _prune(model, calib, reconstruct=RC, inplace=True)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.model.layers[0].mlp.down_proj.in_features == 64


def test_bf16_model_trains_float32_masters_and_stays_bf16():
    model, calib = _llama(dtype=torch.bfloat16), _tokens()
    pr, rep = _prune(model, calib, reconstruct=dict(RC, steps=12))
    assert all(p.dtype == torch.bfloat16 for p in pr.parameters())
    assert all(x.loss_after <= x.loss_before for x in rep.reconstruction)
    assert any(x.status == "improved" for x in rep.reconstruction)  # bf16 steps of 2e-3 alone would mostly round away


def test_bert_sublayers_tap_the_mlp_and_norms_move():
    model, calib = _bert(), _tokens()
    pr, rep = _prune(model, calib, reconstruct=dict(RC, window="sublayer", norms=True))
    att, mlp = rep.reconstruction
    assert (att.window, att.tap) == ("encoder.layer.0.attention", None)  # BertAttention holds its LayerNorm
    assert (mlp.window, mlp.tap) == ("encoder.layer.0", "encoder.layer.0.output.dense")  # the MLP lives in the layer
    assert all(x.loss_after <= x.loss_before for x in rep.reconstruction)
    ls, _ = _prune(model, calib)
    moved = not torch.equal(pr.encoder.layer[0].attention.output.LayerNorm.weight,
                            ls.encoder.layer[0].attention.output.LayerNorm.weight)
    assert moved == (att.status == "improved")


def test_report_round_trip_and_summary(plain):
    model, calib, (_, off) = plain
    _, rep = _prune(model, calib, reconstruct=dict(RC, window="sublayer", targets="pruned_stream"))
    back = lt.PruneReport.from_dict(json.loads(rep.to_json()))
    assert back.reconstruction == rep.reconstruction and isinstance(back.reconstruction[0], lt.WindowReport)
    assert back.reconstruct == rep.reconstruct and back.reconstruct["targets"] == "pruned_stream"
    assert rep.timings["reconstruction"] > 0 and rep.memory["reconstruction"] > 0
    text = str(rep)
    assert "reconstruction (sublayer windows, pruned_stream targets" in text and "model.layers.1.mlp" in text
    assert off.reconstruct is None and off.reconstruction == [] and "reconstruction" not in str(off)


def test_plots_show_the_windows(plain, tmp_path):
    pytest.importorskip("matplotlib")
    from lsprune.cli.plots import write_plots

    model, calib, (_, off) = plain
    _, rep = _prune(model, calib, reconstruct=dict(RC, steps=2))
    assert any(p.endswith("reconstruction.png") for p in write_plots(rep, str(tmp_path)))
    assert (tmp_path / "reconstruction.png").stat().st_size > 0
    (tmp_path / "off").mkdir()
    assert not any(p.endswith("reconstruction.png") for p in write_plots(off, str(tmp_path / "off")))


def test_padding_stays_out_of_the_loss_and_slices_keep_shared_tensors():
    from lsprune.torch.blockwise import BlockCall
    from lsprune.torch.windows import minibatches, slice_call

    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 3, 4)
    with torch.no_grad():
        y = lin(x)
    y[:, -1] = 1e6  # what a padded position's target may be: it must not count
    mask = torch.tensor([[True, True, False], [True, True, False]])
    calls = [BlockCall((x,), {})]
    assert rc.window_loss(lin, None, calls, [y], [mask], "cpu")[0] == 0.0
    assert rc.window_loss(lin, None, calls, [y], [None], "cpu")[0] > 1e10
    rope = torch.randn(1, 3, 8)  # shared across the batch: stays whole
    call = BlockCall((x,), {"attention_mask": torch.zeros(2, 1, 3, 3), "position_embeddings": (rope, rope),
                            "cache_position": torch.arange(3)})
    part = slice_call(call, torch.tensor([1]))
    assert torch.equal(part.hidden, x[1:]) and part.kwargs["attention_mask"].shape == (1, 1, 3, 3)
    assert part.kwargs["position_embeddings"][0] is rope and part.kwargs["cache_position"].shape == (3,)
    steps = minibatches([2, 3], 2, 4, torch.Generator().manual_seed(0))
    for groups in steps:  # two distinct sequences a step, grouped by batch
        picked = [(b, int(r)) for b, rows in groups for r in rows]
        assert len(picked) == len(set(picked)) == 2


def test_opt_mlp_runs_on_flattened_tokens():
    cfg = transformers.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=4,
                                 max_position_embeddings=32, word_embed_proj_dim=32, bos_token_id=0, eos_token_id=0,
                                 pad_token_id=1)
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(cfg).eval()
    for targets in ("dense", "pruned_stream"):
        _, rep = _prune(model, _tokens(), reconstruct=dict(RC, window="sublayer", targets=targets, steps=4))
        mlp = rep.reconstruction[1]  # OPT's MLP lives in the layer and runs on (B*T, H) tokens
        assert (mlp.window, mlp.tap) == ("model.decoder.layers.0", "model.decoder.layers.0.fc2")
        assert all(x.loss_after <= x.loss_before for x in rep.reconstruction)
