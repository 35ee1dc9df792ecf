"""Regression tests of the hardening issue, front-end and CLI side (items 3, 4, 6, 13-17; the hostile-file
items 7 and 8 are in test_hostile.py). The CLI runs in-process through its main function."""
import json
import os
import re
import signal
import stat
from collections import OrderedDict

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402

import lsprune  # noqa: E402
import lsprune.torch as lt  # noqa: E402
from lsprune.cli import commands  # noqa: E402
from lsprune.cli.main import main  # noqa: E402
from cli_factories import small_cnn  # noqa: E402
from torch_helpers import batches  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("front")
    torch.save(small_cnn(), d / "model.pt")
    torch.save(small_cnn().state_dict(), d / "state.pt")
    g = torch.Generator().manual_seed(0)
    torch.save(torch.randn(96, 3, 8, 8, generator=g), d / "calib.pt")
    torch.save(torch.randn(16, 4, generator=g), d / "calib4.pt")
    return d


@pytest.fixture(autouse=True)
def _restore_logging(restore_lsprune_logging):
    """In-process CLI calls install a stderr handler on the ``lsprune`` logger (see conftest)."""


def _tree(folder) -> dict:
    """Every file under ``folder`` (relative path -> bytes; folders -> None)."""
    out = {}
    for root, dirs, names in os.walk(folder):
        for n in dirs:
            out[os.path.relpath(os.path.join(root, n), folder)] = None
        for n in names:
            p = os.path.join(root, n)
            out[os.path.relpath(p, folder)] = open(p, "rb").read()
    return out


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("lsprune: error:"), err
    return err[0]


def _forbid_work(monkeypatch):
    """The run must stop before it loads anything or prunes."""
    def no(*a, **k):
        raise AssertionError("the run did work before refusing its arguments")

    monkeypatch.setattr(commands, "load_model", no)
    monkeypatch.setattr(lt, "prune", no)


# ---------------------------------------------------------------------------------------------- item 3
def _clash(d, case):
    """Arguments of a prune whose outputs clash with its inputs or each other (``d``: a scratch folder)."""
    model, calib, state = str(d / "model.pt"), str(d / "calib.pt"), str(d / "state.pt")
    trusted = [model, "--trust-model-file", "--calib", calib, "--ratio", "0.5"]
    factory = ["cli_factories:small_cnn", "--weights", state, "--calib", calib, "--ratio", "0.5"]
    if case == "symlink to MODEL":
        os.symlink(model, d / "link.pt")
    elif case == "hard link to MODEL":
        os.link(model, d / "hard.pt")
    elif case == "-o inside --plots":
        os.mkdir(d / "plots")
    return {
        "-o is MODEL": trusted + ["-o", model],
        "symlink to MODEL": trusted + ["-o", str(d / "link.pt")],
        "hard link to MODEL": trusted + ["-o", str(d / "hard.pt")],
        "-o is --report": trusted + ["-o", str(d / "r.pt"), "--report", str(d / "r.pt")],
        "--plots is -o": trusted + ["-o", str(d / "out"), "--plots", str(d / "out")],
        "-o inside --plots": trusted + ["-o", str(d / "plots" / "channels.png"), "--plots", str(d / "plots")],
        "--report is --calib": trusted + ["-o", str(d / "o.pt"), "--report", calib],
        "--report is --weights": factory + ["-o", str(d / "o.pt"), "--report", state],
        "-o is --eval-data": trusted + ["-o", calib, "--eval-data", calib],
        "--checkpoint is -o": trusted + ["-o", str(d / "o.pt"), "--checkpoint", str(d / "o.pt")],
        "relative and absolute": trusted + ["-o", os.path.relpath(model)],
    }[case]


@pytest.mark.parametrize("case", ["-o is MODEL", "symlink to MODEL", "hard link to MODEL", "-o is --report",
                                  "--plots is -o", "-o inside --plots", "--report is --calib",
                                  "--report is --weights", "-o is --eval-data", "--checkpoint is -o",
                                  "relative and absolute"])
def test_item03_cli_refuses_output_equal_to_model(files, tmp_path, monkeypatch, capsys, case):
    for f in ("model.pt", "calib.pt", "state.pt"):
        (tmp_path / f).write_bytes((files / f).read_bytes())
    args = _clash(tmp_path, case)
    before = _tree(tmp_path)
    _forbid_work(monkeypatch)
    assert main(["prune", *args, "-q"]) == 2
    assert "name the same path" in _one_line(capsys)
    assert _tree(tmp_path) == before


# ---------------------------------------------------------------------------------------------- item 4
def _factory(files):
    """``prune`` of the model built by a factory with its weights (no pickled model file involved)."""
    return ["prune", "cli_factories:small_cnn", "--weights", str(files / "state.pt"), "--calib",
            str(files / "calib.pt")]


def _outputs(d):
    out, rep, plots = d / "o.pt", d / "r.json", d / "plots"
    out.write_bytes(b"previous model")
    rep.write_text("previous report")
    plots.mkdir()
    (plots / "channels.png").write_bytes(b"previous plot")
    return ["-o", str(out), "--report", str(rep), "--plots", str(plots)]


def _interrupt_at(n, fn):
    """``fn`` that raises KeyboardInterrupt on its call number ``n`` (after writing a partial file when the
    call writes one)."""
    calls = [0]

    def wrapped(*a, **k):
        calls[0] += 1
        if calls[0] == n:
            raise KeyboardInterrupt
        return fn(*a, **k)
    return wrapped


@pytest.mark.parametrize("where", ["torch.save", "json.dump", "plots", "the renames"])
def test_item04_interrupt_while_writing_leaves_all_outputs_or_none(files, tmp_path, monkeypatch, capsys, where):
    import matplotlib.figure

    outs = _outputs(tmp_path)
    before = _tree(tmp_path)
    if where == "torch.save":
        def partial_save(obj, f, *a, **k):
            open(f, "wb").write(b"partial")
            raise KeyboardInterrupt
        monkeypatch.setattr(torch, "save", partial_save)
    elif where == "json.dump":
        monkeypatch.setattr(json, "dump", _interrupt_at(1, json.dump))
    elif where == "plots":
        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", _interrupt_at(2, matplotlib.figure.Figure.savefig))
    else:  # the 3rd rename: the model is in place, the report's previous file is being moved aside
        monkeypatch.setattr(os, "replace", _interrupt_at(3, os.replace))
    rc = main([*_factory(files), "--ratio", "0.5", "-q", *outs])
    monkeypatch.undo()
    assert rc == 130
    assert "no output was written" in capsys.readouterr().err
    assert _tree(tmp_path) == before  # every previous file as it was, no temporary file left


def test_item04_ctrl_c_during_the_commit_is_held_until_every_output_is_in_place(files, tmp_path, monkeypatch,
                                                                                 capsys):
    outs = _outputs(tmp_path)
    real = os.replace
    sent = []

    def replace_and_signal(a, b):
        if not sent:  # Ctrl-C right at the first rename of the commit
            sent.append(1)
            os.kill(os.getpid(), signal.SIGINT)
        return real(a, b)

    monkeypatch.setattr(os, "replace", replace_and_signal)
    rc = main([*_factory(files), "--ratio", "0.5", "-q", *outs])
    monkeypatch.undo()
    assert sent and rc == 130
    assert "after every output was written" in capsys.readouterr().err
    assert torch.load(tmp_path / "o.pt", weights_only=False)[0].out_channels == 8
    assert json.loads((tmp_path / "r.json").read_text())["format"] == "lsprune.torch.report"
    assert (tmp_path / "plots" / "channels.png").read_bytes()[:8] == PNG
    assert sorted(os.listdir(tmp_path)) == ["o.pt", "plots", "r.json"]


# ---------------------------------------------------------------------------------------------- item 6
class _Chain(nn.Module):
    """x -> a -> relu -> b -> relu -> c -> relu -> d; ``tie`` makes b use a's weight Parameter."""

    def __init__(self, tie=True):
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 12), nn.Linear(12, 4)
        if tie:
            self.b.weight = self.a.weight

    def forward(self, x):
        return self.d(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x)))))))


def _bn_shared():
    """conv1 -> bn1 -> conv2 -> bn2 -> conv3, bn2 sharing bn1's running mean (a tied buffer)."""
    torch.manual_seed(0)
    m = nn.Sequential(OrderedDict(c1=nn.Conv2d(3, 8, 3, padding=1), bn1=nn.BatchNorm2d(8), r1=nn.ReLU(),
                                  c2=nn.Conv2d(8, 8, 3, padding=1), bn2=nn.BatchNorm2d(8), r2=nn.ReLU(),
                                  c3=nn.Conv2d(8, 4, 3, padding=1))).eval()
    m.bn2.running_mean = m.bn1.running_mean
    return m


def test_item06_tied_weights_are_skipped_with_a_reason():
    torch.manual_seed(0)
    model = _Chain().eval()
    cal = batches((64, 8), n=2)
    search = lt.find_pairs(model, cal[0])
    assert [(p.producer, p.consumer) for p in search.pairs] == [("c", "d")]
    reasons = {s.producer: s.reason for s in search.skipped}
    assert "shared with b.weight" in reasons["a"] and "shared with a.weight" in reasons["b"]
    pruned, rep = lt.prune(model, cal, ratio=0.5, progress=False)
    assert pruned.a.weight is pruned.b.weight and pruned.a.weight.shape == (8, 8)  # still tied, not pruned
    assert pruned.c.out_features == 6
    assert {s["producer"] for s in rep.skipped} >= {"a", "b"}
    with pytest.raises(ValueError, match="pair a -> b: a: weight is shared with b.weight"):
        lt.prune(model, cal, ratio=0.5, pairs=[("a", "b")], strategy="hooks", progress=False)
    bn = _bn_shared()
    search = lt.find_pairs(bn, torch.randn(2, 3, 8, 8))
    assert [p.producer for p in search.pairs] == []
    reasons = {s.producer: s.reason for s in search.skipped}
    assert "bn1 between producer and consumer: running_mean is shared with bn2.running_mean" in reasons["c1"]
    _, frep = lt.factorize(model, cal, rank=2, progress=False)
    assert {s["layer"] for s in frep.skipped} == {"a", "b"}


class _MLP(nn.Module):
    def __init__(self, d=8, h=16):
        super().__init__()
        self.up_proj, self.down_proj = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return self.down_proj(torch.relu(self.up_proj(x)))


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = _MLP()

    def forward(self, x):
        return x + self.mlp(x)


class _Blocks(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.layers = nn.ModuleList(blocks)

    def forward(self, x):
        for b in self.layers:
            x = b(x)
        return x


@pytest.mark.parametrize("how", ["tied weight", "one block twice in the list"])
def test_item06_units_that_share_weights_are_skipped_in_the_blocks_path(how):
    torch.manual_seed(0)
    if how == "tied weight":
        model = _Blocks([_Block() for _ in range(3)]).eval()
        model.layers[1].mlp.up_proj.weight = model.layers[0].mlp.up_proj.weight
    else:
        shared = _Block()
        model = _Blocks([shared, shared, _Block()]).eval()
    cal = batches((32, 8), n=2)
    search = lt.find_pairs(model, cal[0])
    assert [p.producer for p in search.pairs] == ["layers.2.mlp"]
    reasons = {s.producer: s.reason for s in search.skipped}
    assert "layers.0.mlp.up_proj: " in reasons["layers.0.mlp"] and "layers.1.mlp.up_proj: " in reasons["layers.1.mlp"]
    pruned, rep = lt.prune(model, cal, ratio=0.5, progress=False)
    assert pruned.layers[0].mlp.up_proj.out_features == pruned.layers[1].mlp.up_proj.out_features == 16
    assert pruned.layers[2].mlp.up_proj.out_features == 8
    assert pruned.layers[0].mlp.up_proj.weight is pruned.layers[1].mlp.up_proj.weight  # still shared
    assert (pruned.layers[0] is pruned.layers[1]) == (how != "tied weight")
    assert {s["producer"] for s in rep.skipped} >= {"layers.0.mlp", "layers.1.mlp"}


# ---------------------------------------------------------------------------------------------- item 13
def test_item13_cli_prints_the_table_of_skipped_pairs(files, tmp_path, capsys):
    rc = main(["prune", "cli_factories:no_pairs", "--calib", str(files / "calib4.pt"), "--ratio", "0.5",
               "-o", str(tmp_path / "o.pt"), "-q"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("lsprune: error: no prunable pairs found")
    table = "\n".join(err[1:])
    assert "producer" in err[1] and "reason" in err[1]
    assert "LayerNorm" in table and "mixes channels" in table and "model output" in table
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------- item 14
def _failure(d, kind):
    calib, model = str(d / "calib.pt"), str(d / "model.pt")
    if kind == "truncated model file":
        raw = open(model, "rb").read()
        (d / "half.pt").write_bytes(raw[:len(raw) // 2])
        return ["prune", str(d / "half.pt"), "--trust-model-file", "--calib", calib]
    if kind == "weights of another model":
        torch.save(nn.Linear(3, 2).state_dict(), d / "other.pt")
        return ["prune", "cli_factories:small_cnn", "--weights", str(d / "other.pt"), "--calib", calib]
    if kind == "calibration that does not fit":
        return ["prune", "cli_factories:small_cnn", "--calib", str(d / "calib4.pt")]
    return {"pickled model as --weights": ["prune", "cli_factories:small_cnn", "--weights", model, "--calib", calib],
            "a factory with a multi-line error": ["prune", "cli_factories:fails_loudly", "--calib", calib],
            "a module that does not import": ["prune", "no_such_module_xyz:f", "--calib", calib],
            "no such model": ["prune", str(d / "missing.pt"), "--calib", calib],
            "pickled model without --trust-model-file": ["prune", model, "--calib", calib],
            "missing --weights file": ["prune", "cli_factories:small_cnn", "--weights", str(d / "missing.pt"),
                                       "--calib", calib],
            }[kind]


@pytest.mark.parametrize("kind", ["pickled model as --weights", "truncated model file", "weights of another model",
                                  "a factory with a multi-line error", "a module that does not import",
                                  "no such model", "pickled model without --trust-model-file",
                                  "missing --weights file", "calibration that does not fit"])
def test_item14_cli_errors_are_one_line(files, tmp_path, capsys, kind):
    for f in ("model.pt", "calib.pt", "calib4.pt"):
        (tmp_path / f).write_bytes((files / f).read_bytes())
    args = _failure(tmp_path, kind) + ["--ratio", "0.5", "-o", str(tmp_path / "o.pt"), "-q"]
    assert main(args) == 2
    _one_line(capsys)
    assert not (tmp_path / "o.pt").exists()


# ---------------------------------------------------------------------------------------------- item 15
def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.mark.parametrize("umask", [0o027, 0o002])
def test_item15_written_files_honour_the_umask(files, tmp_path, umask):
    old = os.umask(umask)
    try:
        assert main([*_factory(files), "--ratio", "0.5", "-q", "-o", str(tmp_path / "o.pt"), "--report",
                     str(tmp_path / "r.json"), "--plots", str(tmp_path / "plots"), "--checkpoint",
                     str(tmp_path / "ck")]) == 0
        st = lsprune.Statistics(3).update(np.random.default_rng(0).normal(size=(10, 3)))
        st.save(tmp_path / "s.npz")
        model = small_cnn()
        pruned, rep = lt.prune(model, batches((16, 3, 8, 8), n=2), ratio=0.5, progress=False)
        lt.save_pruned(pruned, rep, tmp_path / "saved")
    finally:
        os.umask(old)
    written = [tmp_path / "o.pt", tmp_path / "r.json", tmp_path / "s.npz", *(tmp_path / "plots").iterdir(),
               *(tmp_path / "ck").iterdir(), *(tmp_path / "saved").iterdir()]
    assert len(written) > 8
    assert {str(p): _mode(p) for p in written} == {str(p): 0o666 & ~umask for p in written}
    assert _mode(tmp_path / "plots") == 0o777 & ~umask


# ---------------------------------------------------------------------------------------------- item 16
def test_item16_factorize_nan_error_names_the_layer():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(c1=nn.Conv2d(3, 8, 3, padding=1), r=nn.ReLU(),
                                      c2=nn.Conv2d(8, 8, 3, padding=1))).eval()
    cal = batches((8, 3, 8, 8), n=3)
    cal[1][0, 0, 0, 0] = float("nan")
    with pytest.raises(lsprune.NonFiniteInputError) as e:
        lt.factorize(model, cal, rank=2, progress=False)
    assert re.match(r"layer c[12]: the calibration activations contain NaN or Inf", str(e.value)), str(e.value)


# ---------------------------------------------------------------------------------------------- item 17
@pytest.mark.parametrize("content", [b"e 1 2 3\n4 5 6\n", b"", PNG + b"\x00" * 32, b"\x93NUMPX garbage"])
def test_item17_text_file_as_calibration_data_gets_a_clear_message(files, tmp_path, capsys, content):
    (tmp_path / "calib.txt").write_bytes(content)
    rc = main(["prune", "cli_factories:small_cnn", "--calib", str(tmp_path / "calib.txt"), "--ratio", "0.5",
               "-o", str(tmp_path / "o.pt"), "-q"])
    assert rc == 2
    line = _one_line(capsys)
    assert "calibration data" in line and "is not a tensor file" in line
