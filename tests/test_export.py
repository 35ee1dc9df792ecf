"""Pruned models export: torch.export and ONNX (when onnx/onnxruntime are installed) give the pruned model's
outputs. A pruned model is plain modules of smaller sizes, so export only fails where surgery left a size
attribute stale: these tests are the check."""
import copy

import pytest

torch = pytest.importorskip("torch")
import lsprune.torch as lt  # noqa: E402
from torch_models import VGG, ResNet, init_bn  # noqa: E402

TOL = dict(rtol=1e-4, atol=1e-5)


def _cnns():
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(16, 3, 16, 16, generator=g) for _ in range(4)]
    x = torch.randn(3, 3, 16, 16, generator=g)
    vgg, _ = lt.prune(init_bn(VGG()).eval(), calib, ratio=0.5, progress=False)
    resnet, rep = lt.prune(init_bn(ResNet()).eval(), calib, ratio=0.5, coupled=True, progress=False)
    assert any(r.kind != "pair" for r in rep.pairs)  # the residual streams were pruned too
    return {"vgg": (vgg, (x,), {}), "resnet": (resnet, (x,), {})}


def _encoder():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    g = torch.Generator().manual_seed(1)
    calib = [{"input_ids": torch.randint(0, 64, (4, 16), generator=g)} for _ in range(4)]
    pruned, rep = lt.prune(model, calib, ratio=0.5, progress=False)
    assert {r.kind for r in rep.pairs} == {"heads", "mlp"}
    ids = torch.randint(0, 64, (2, 16), generator=g)
    return pruned, (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture(scope="module")
def cnns():
    return _cnns()


@pytest.fixture(scope="module")
def encoder():
    return _encoder()


@pytest.fixture(params=["vgg", "resnet", "bert"])
def case(request):
    """(pruned model, positional inputs, keyword inputs); the encoder only where transformers is installed."""
    if request.param == "bert":
        return request.getfixturevalue("encoder")
    return request.getfixturevalue("cnns")[request.param]


def _first(out):
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


def test_torch_export_gives_the_same_outputs(case):
    model, args, kwargs = case
    with torch.no_grad():
        want = _first(model(*args, **kwargs))
        ep = torch.export.export(copy.deepcopy(model), args, kwargs)
        got = ep.module()(*args, **kwargs)
    got = got["last_hidden_state"] if isinstance(got, dict) else _first(got)
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.onnx's own use of a deprecated pytree name
def test_onnx_export_runs_in_onnxruntime(case, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model, args, kwargs = case
    with torch.no_grad():
        want = _first(model(*args, **kwargs))
    path = tmp_path / "model.onnx"
    torch.onnx.export(copy.deepcopy(model), args, str(path), kwargs=kwargs or None, dynamo=True,
                      verbose=False, report=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = [a.numpy() for a in args] + [v.numpy() for v in kwargs.values()]
    got = sess.run(None, {i.name: v for i, v in zip(sess.get_inputs(), feeds)})[0]
    torch.testing.assert_close(torch.from_numpy(got), want, **TOL)
