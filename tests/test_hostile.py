"""Hostile files: crafted checkpoint manifests (item 7), pickles in every input path of the CLI (item 8), and
truncated or corrupted checkpoint and saved-model files. Each is refused with a clear typed error
(``ValueError``; one line and exit status 2 in the CLI), no code from a file runs, and the user's files are
left as they were. (Statistics files byte by byte: test_statistics.py.)"""
import hashlib
import json
import os
import pickle
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

import lsprune.torch as lt  # noqa: E402
import lsprune.torch.pruning as pruning  # noqa: E402
import torch_models as tm  # noqa: E402
from cli_factories import small_cnn  # noqa: E402
from lsprune.cli.main import main  # noqa: E402
from torch_helpers import assert_unchanged, batches, snapshot  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_logging(restore_lsprune_logging):
    """In-process CLI calls install a stderr handler on the ``lsprune`` logger (see conftest)."""


def _tree(folder) -> dict:
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(root, n)
            out[os.path.relpath(p, folder)] = os.readlink(p) if os.path.islink(p) else open(p, "rb").read()
    return out


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# ---------------------------------------------------------------------------------------------- checkpoints
MLP_CAL = batches((4096, 16), n=4, seed=1)


def _mlp():
    torch.manual_seed(0)
    return tm.DeepMLP().eval()


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A checkpoint with finished pairs and one partial pair (the run is stopped in its 8th batch)."""
    folder = tmp_path_factory.mktemp("interrupted") / "ck"
    calls = [0]
    add = pruning.Sums.add

    def stop(self, *a, **k):
        calls[0] += 1
        if calls[0] == 8:
            raise KeyboardInterrupt
        return add(self, *a, **k)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(pruning.Sums, "add", stop)
        with pytest.raises(KeyboardInterrupt):
            lt.prune(_mlp(), MLP_CAL, ratio=0.5, progress=False, checkpoint=folder, checkpoint_interval=0)
    data = json.loads((folder / "manifest.json").read_text())
    assert {e["state"] for e in data["entries"].values()} == {"done", "partial"}
    return folder


def _interrupted_checkpoint(folder, interrupted) -> dict:
    """A copy of the interrupted checkpoint at ``folder``; returns its manifest."""
    shutil.copytree(interrupted, folder)
    return json.loads((folder / "manifest.json").read_text())


def _edit_manifest(folder, data, edit):
    edit(data)
    (folder / "manifest.json").write_text(json.dumps(data))


def _partial(data) -> dict:
    return next(e for e in data["entries"].values() if e["state"] == "partial")


@pytest.mark.parametrize("name", ["absolute", "parent", "separator", "dot-dot", "empty", "symlink out"])
def test_item07_manifest_names_outside_the_folder_are_refused(tmp_path, interrupted, name):
    ck, outside = tmp_path / "ck", tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.npz"
    victim.write_bytes(b"the user's file")
    data = _interrupted_checkpoint(ck, interrupted)
    if name == "separator":
        (ck / "sub").mkdir()
        shutil.copy(victim, ck / "sub" / "victim.npz")
    if name == "symlink out":
        os.symlink(victim, ck / "link.npz")
    fname = {"absolute": str(victim), "parent": "../outside/victim.npz", "separator": "sub/victim.npz",
             "dot-dot": "..", "empty": "", "symlink out": "link.npz"}[name]
    # the crafted name carries the right checksum: before the fix, the resumed pair's next commit deleted it
    _edit_manifest(ck, data, lambda d: _partial(d)["sha256"].update({fname: _sha(victim)}))
    before, outside_before = _tree(ck), _tree(outside)
    with pytest.raises(ValueError, match="not a plain file name|symbolic link") as e:
        lt.prune(_mlp(), MLP_CAL, ratio=0.5, progress=False, checkpoint=ck, checkpoint_interval=0)
    assert "Nothing was changed" in str(e.value)
    assert _tree(ck) == before and _tree(outside) == outside_before


def _break_entry(how):
    def edit(d):
        key = next(k for k, e in d["entries"].items() if e["state"] == "partial")
        if how == "entry not an object":
            d["entries"][key] = [1, 2]
        elif how == "no state":
            del d["entries"][key]["state"]
        elif how == "checksums not an object":
            d["entries"][key]["sha256"] = ["prune-001-partial-3.npz"]
        elif how == "stats file without checksum":
            d["entries"][key]["stats"] = "elsewhere.npz"
        elif how == "stats name not a string":
            d["entries"][key]["stats"] = 7
        else:  # batch count
            d["entries"][key]["batches"] = "3"
    return edit


@pytest.mark.parametrize("how", ["entry not an object", "no state", "checksums not an object",
                                 "stats file without checksum", "stats name not a string", "batch count"])
def test_malformed_manifest_entries_are_refused(tmp_path, interrupted, how):
    ck = tmp_path / "ck"
    data = _interrupted_checkpoint(ck, interrupted)
    _edit_manifest(ck, data, _break_entry(how))
    before = _tree(ck)
    model = _mlp()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="malformed|has no|names a file"):
        lt.prune(model, MLP_CAL, ratio=0.5, progress=False, checkpoint=ck)
    assert _tree(ck) == before
    assert_unchanged(model, snap)


def _done(data) -> dict:
    return next(e for e in data["entries"].values() if e["state"] == "done")


@pytest.mark.parametrize("damage", ["result truncated", "result emptied", "result holds a pickle",
                                    "partial statistics hold a pickle", "manifest is a list",
                                    "manifest is binary"])
def test_corrupted_checkpoint_files_with_matching_checksums_are_refused(tmp_path, interrupted, damage):
    """Checksums catch accidental damage; a crafted file with a matching checksum must still fail cleanly."""
    ck = tmp_path / "ck"
    data = _interrupted_checkpoint(ck, interrupted)
    marker = tmp_path / "ran"
    if damage.startswith("manifest"):
        (ck / "manifest.json").write_bytes(b"[1, 2]" if damage == "manifest is a list" else b"\xff\xfe\x00PK")
    else:
        entry = _done(data) if damage.startswith("result") else _partial(data)
        fname = entry["result"] if damage.startswith("result") else entry["stats"]
        p = ck / fname
        if damage == "result truncated":
            p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2])
        elif damage == "result emptied":
            p.write_bytes(b"")
        else:
            with open(p, "wb") as f:
                np.savez(f, kept=np.array([_Marker(marker)], dtype=object))
        _edit_manifest(ck, data, lambda d: entry["sha256"].update({fname: _sha(p)}))
    before = _tree(ck)
    model = _mlp()
    snap = snapshot(model)
    with pytest.raises(ValueError):
        lt.prune(model, MLP_CAL, ratio=0.5, progress=False, checkpoint=ck)
    assert _tree(ck) == before and not marker.exists()
    assert_unchanged(model, snap)


# ---------------------------------------------------------------------------------------------- pickles (CLI)
class _Marker:
    """Unpickling it creates the file ``path``: proof that code from the file ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    torch.save(small_cnn().state_dict(), d / "state.pt")
    g = torch.Generator().manual_seed(0)
    torch.save(torch.randn(96, 3, 8, 8, generator=g), d / "calib.pt")
    torch.save(torch.randn(20, 3, 8, 8, generator=g), d / "eval.pt")
    torch.save(torch.randint(0, 10, (20,), generator=g), d / "labels.pt")
    return d


def _evil(path, marker, how):
    if how == "torch.save":
        torch.save([torch.zeros(2), _Marker(marker)], path)
    elif how == "pickle":
        with open(path, "wb") as f:
            pickle.dump(_Marker(marker), f, protocol=2)
    elif how == "npy":
        np.save(path, np.array([_Marker(marker)], dtype=object), allow_pickle=True)
    else:
        with open(path, "wb") as f:
            np.savez(f, x=np.array([_Marker(marker)], dtype=object))
    return str(path)


INPUTS = [("MODEL", "torch.save"), ("MODEL", "pickle"), ("--weights", "torch.save"), ("--weights", "pickle"),
          ("--calib", "torch.save"), ("--calib", "pickle"), ("--calib", "npy"), ("--calib", "npz"),
          ("--eval-data", "torch.save"), ("--eval-data", "npy"), ("--eval-labels", "torch.save"),
          ("--eval-labels", "npz")]


@pytest.mark.parametrize("option,how", INPUTS)
def test_item08_pickles_never_run_without_the_trust_flag(good, tmp_path, capsys, option, how):
    marker = tmp_path / "ran"
    suffix = {"npy": ".npy", "npz": ".npz"}.get(how, ".pt")
    evil = _evil(tmp_path / f"evil{suffix}", marker, how)
    args = {"MODEL": "cli_factories:small_cnn", "--weights": str(good / "state.pt"), "--calib": str(good / "calib.pt"),
            "--eval-data": str(good / "eval.pt"), "--eval-labels": str(good / "labels.pt")}
    args[option] = evil
    argv = ["prune", args.pop("MODEL"), *[x for kv in args.items() for x in kv], "--ratio", "0.5",
            "-o", str(tmp_path / "o.pt"), "-q"]
    before = _tree(good)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lsprune: error:"), err
    assert not marker.exists()
    if option == "MODEL":
        assert "--trust-model-file" in err[0] and "--weights" in err[0] and "module:factory" in err[0]
    assert not (tmp_path / "o.pt").exists() and _tree(good) == before


def test_item08_trust_flag_is_what_unpickles_a_model_file(tmp_path, capsys):
    marker = tmp_path / "ran"
    evil = _evil(tmp_path / "evil.pt", marker, "torch.save")
    torch.save(torch.randn(8, 3, 8, 8), tmp_path / "calib.pt")
    argv = ["prune", evil, "--calib", str(tmp_path / "calib.pt"), "--ratio", "0.5", "-o", str(tmp_path / "o.pt")]
    assert main(argv) == 2 and not marker.exists()
    capsys.readouterr()
    assert main(argv + ["--trust-model-file"]) == 2 and marker.exists()  # unpickled: not a module, refused after
    assert "not a torch.nn.Module" in capsys.readouterr().err


def test_item08_pickled_checkpoint_file_never_runs(good, tmp_path, capsys):
    """A checkpoint's result file replaced by an object array (with a matching checksum) is refused on resume."""
    ck, marker = tmp_path / "ck", tmp_path / "ran"
    argv = ["prune", "cli_factories:small_cnn", "--weights", str(good / "state.pt"), "--calib",
            str(good / "calib.pt"), "--ratio", "0.5", "-o", str(tmp_path / "o.pt"), "-q", "--checkpoint", str(ck)]
    assert main(argv) == 0
    data = json.loads((ck / "manifest.json").read_text())
    entry = _done(data)
    _evil(ck / entry["result"], marker, "npz")
    _edit_manifest(ck, data, lambda d: entry["sha256"].update({entry["result"]: _sha(ck / entry["result"])}))
    out_before = (tmp_path / "o.pt").read_bytes()
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a readable result file" in err[0], err
    assert not marker.exists() and (tmp_path / "o.pt").read_bytes() == out_before


# ---------------------------------------------------------------------------------------------- saved models
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("saved")
    cal = batches((32, 3, 8, 8), n=2)
    for name, ratio in (("a", 0.5), ("b", 0.25)):
        pruned, rep = lt.prune(small_cnn(), cal, ratio=ratio, progress=False)
        lt.save_pruned(pruned, rep, d / name)
    return d


def _damage_saved(folder, other, damage):
    w, s = folder / "model.safetensors", folder / "structure.json"
    raw = w.read_bytes()
    header = 8 + int.from_bytes(raw[:8], "little")
    if damage.startswith("weights cut to"):
        w.write_bytes(raw[:{"0": 0, "10": 10, "half": len(raw) // 2, "all but one": len(raw) - 1}[damage[15:]]])
    elif damage in ("a data byte flipped", "a header byte flipped"):
        i = header + (len(raw) - header) // 2 if damage == "a data byte flipped" else header // 2
        w.write_bytes(raw[:i] + bytes([raw[i] ^ 0xFF]) + raw[i + 1:])
    elif damage == "weights of another save":
        shutil.copy(other / "model.safetensors", w)
    elif damage == "structure truncated":
        s.write_bytes(s.read_bytes()[:len(s.read_bytes()) // 2])
    elif damage == "structure binary":
        s.write_bytes(b"\xff\xfe\x00\x80garbage")
    elif damage == "structure a list":
        s.write_text("[1, 2]")
    elif damage == "structure pairs of the wrong type":
        d = json.loads(s.read_text())
        d["pairs"] = [1, 2]
        s.write_text(json.dumps(d))
    else:  # a save without the checksum (as before it existed) whose weights are cut
        d = json.loads(s.read_text())
        del d["weights_sha256"]
        s.write_text(json.dumps(d))
        w.write_bytes(raw[:len(raw) // 2])


@pytest.mark.parametrize("damage", ["weights cut to 0", "weights cut to 10", "weights cut to half",
                                    "weights cut to all but one", "a data byte flipped", "a header byte flipped",
                                    "weights of another save", "structure truncated", "structure binary",
                                    "structure a list", "structure pairs of the wrong type",
                                    "no checksum, weights cut"])
def test_truncated_or_corrupted_saved_model_is_refused(saved, tmp_path, damage):
    folder = tmp_path / "p"
    shutil.copytree(saved / "a", folder)
    _damage_saved(folder, saved / "b", damage)
    before = _tree(folder)
    fresh = small_cnn()
    snap = snapshot(fresh)
    with pytest.raises(ValueError):
        lt.load_pruned(fresh, folder)
    assert_unchanged(fresh, snap)
    assert _tree(folder) == before


def test_saved_model_round_trip_still_loads(saved):
    fresh = lt.load_pruned(small_cnn(), saved / "a")
    assert fresh[0].out_channels == 8
