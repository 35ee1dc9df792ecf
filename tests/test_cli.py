"""The lsprune command line, run as a subprocess on small synthetic models."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

HERE = os.path.dirname(os.path.abspath(__file__))
PNG = b"\x89PNG\r\n\x1a\n"


def run(*args, cwd=None, timeout=300):
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "lsprune", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from cli_factories import small_cnn

    d = tmp_path_factory.mktemp("cli")
    torch.save(small_cnn(), d / "model.pt")
    g = torch.Generator().manual_seed(0)
    torch.save(torch.randn(96, 3, 8, 8, generator=g), d / "calib.pt")
    np.save(d / "calib.npy", torch.randn(64, 3, 8, 8, generator=g).numpy())
    torch.save(torch.randn(40, 3, 8, 8, generator=g), d / "eval.pt")
    torch.save(torch.randint(0, 10, (40,), generator=g), d / "labels.pt")
    torch.save(small_cnn().state_dict(), d / "state.pt")
    return d


@pytest.fixture(autouse=True)
def _restore_logging(restore_lsprune_logging):
    """In-process CLI calls install a stderr handler on the ``lsprune`` logger (see conftest)."""


def trusted(files):
    """MODEL as a pickled model file, which the CLI unpickles only with --trust-model-file."""
    return [str(files / "model.pt"), "--trust-model-file"]


def one_line_error(r):
    assert r.returncode == 2, (r.returncode, r.stderr)
    err = r.stderr.strip().splitlines()
    assert err and err[-1].startswith("lsprune: error:"), r.stderr
    assert "Traceback" not in r.stderr
    return err[-1]


def test_version_and_help():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.startswith("lsprune ")
    r = run("prune", "--help")
    assert r.returncode == 0 and "--calib" in r.stdout


def test_inspect_lists_pairs(files):
    r = run("inspect", *trusted(files), "--example-shape", "2", "3", "8", "8")
    assert r.returncode == 0, r.stderr
    assert "0" in r.stdout and "3" in r.stdout  # producer/consumer names of the Sequential
    r2 = run("inspect", "cli_factories:small_cnn", "--example-shape", "1", "3", "8", "8")
    assert r2.returncode == 0 and r2.stdout == r.stdout


def test_prune_writes_model_report_and_plots(files, tmp_path):
    out, rep, plots = tmp_path / "pruned.pt", tmp_path / "report.json", tmp_path / "plots"
    r = run("prune", *trusted(files), "--calib", str(files / "calib.pt"), "--ratio", "0.5", "-o", str(out),
            "--report", str(rep), "--plots", str(plots), "--eval-data", str(files / "eval.pt"), "--eval-labels",
            str(files / "labels.pt"), "--batch-size", "32", "--quiet")
    assert r.returncode == 0, r.stderr
    pruned = torch.load(out, weights_only=False)
    assert pruned[0].out_channels == 8 and pruned[3].in_channels == 8
    assert pruned(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    d = json.loads(rep.read_text())
    assert d["format"] == "lsprune.torch.report" and d["params_after"] < d["params_before"]
    assert 0 <= d["accuracy_before"] <= 1 and 0 <= d["accuracy_after"] <= 1
    for name in ("error_paths.png", "channels.png", "accuracy_vs_flops.png"):
        assert (plots / name).read_bytes()[:8] == PNG
    assert r.stdout == ""  # --quiet


def test_prune_factory_weights_npy_and_image_folder(files, tmp_path):
    from PIL import Image

    out = tmp_path / "a.pt"
    r = run("prune", "cli_factories:small_cnn", "--weights", str(files / "state.pt"), "--calib",
            str(files / "calib.npy"), "--ratio", "0.25", "-o", str(out), "--method", "omp", "--mode", "independent")
    assert r.returncode == 0, r.stderr
    assert "pruned in" in r.stdout and out.exists()
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(imgs / f"{i:02d}.png")
    r = run("prune", *trusted(files), "--calib", str(imgs), "--image-size", "8", "8", "--ratio", "0.5",
            "-o", str(tmp_path / "b.pt"), "-q")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("args,msg", [
    (["--calib", "missing.pt", "--ratio", "0.5", "-o", "o.pt"], "does not exist"),
    (["--calib", "CALIB", "--ratio", "1.5", "-o", "o.pt"], "--ratio must be in"),
    (["--calib", "CALIB", "--ratio", "0.5", "--flops", "0.5", "-o", "o.pt"], "not allowed with"),
    (["--calib", "CALIB", "--ratio", "abc", "-o", "o.pt"], "invalid float"),
    (["--calib", "CALIB", "--ratio", "0.5", "-o", "nodir/o.pt"], "does not exist"),
    (["--calib", "LABELS", "--ratio", "0.5", "-o", "o.pt"], "dtype torch.int64"),
    (["--calib", "CALIB", "--ratio", "0.5", "-o", "o.pt", "--eval-labels", "LABELS"], "needs --eval-data"),
])
def test_bad_arguments_one_line_nonzero(files, tmp_path, args, msg):
    args = [a.replace("CALIB", str(files / "calib.pt")).replace("LABELS", str(files / "labels.pt")) for a in args]
    r = run("prune", *trusted(files), *args, cwd=tmp_path)
    assert msg in one_line_error(r)
    assert not (tmp_path / "o.pt").exists()


def test_bad_models(files, tmp_path):
    assert "no such file" in one_line_error(run("inspect", "nope.pt", "--example-shape", "1", "3", "8", "8"))
    assert "state_dict" in one_line_error(run("inspect", str(files / "state.pt"), "--example-shape", "1", "3"))
    assert "not a torch.nn.Module" in one_line_error(run("inspect", "cli_factories:not_a_model", "--example-shape",
                                                         "1"))
    r = run("inspect", *trusted(files), "--example-shape", "1", "5", "8", "8")  # wrong channels
    one_line_error(r)


def test_debug_shows_traceback(files):
    r = run("inspect", *trusted(files), "--example-shape", "1", "5", "8", "8", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_interrupted_prune_writes_nothing(files, tmp_path, monkeypatch):
    import lsprune.torch as lt
    from lsprune.cli.main import main

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(lt, "prune", boom)
    out, rep = tmp_path / "o.pt", tmp_path / "r.json"
    rc = main(["prune", *trusted(files), "--calib", str(files / "calib.pt"), "--ratio", "0.5", "-o", str(out),
               "--report", str(rep)])
    assert rc == 130 and not out.exists() and not rep.exists()
    assert os.listdir(tmp_path) == []


def test_interrupt_during_save_leaves_no_partial_file(files, tmp_path, monkeypatch):
    from lsprune.cli.main import main

    out = tmp_path / "o.pt"
    out.write_bytes(b"previous")
    real_save = torch.save

    def partial_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", partial_save)
    rc = main(["prune", *trusted(files), "--calib", str(files / "calib.pt"), "--ratio", "0.5", "-o", str(out),
               "-q"])
    monkeypatch.setattr(torch, "save", real_save)
    assert rc == 130 and out.read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == ["o.pt"]


def test_bench_quick():
    r = run("bench", "solver", "--quick", "--repeat", "1")
    assert r.returncode == 0, r.stderr
    assert "vs_numpy" in r.stdout and "forward" in r.stdout


def test_demo_runs_end_to_end():
    r = run("demo", "--epochs", "3", "--quiet")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "Trained a" in out and "| original |" in out
    for label in ("LS forward (lsprune)", "magnitude + LS re-fit", "magnitude (no re-fit)"):
        assert out.count(label) == 3
    assert "10% FLOPs" in out


def test_coupled_groups_by_default_and_no_coupled(tmp_path):
    """``lsprune prune`` prunes the coupled groups (residual streams) by default, as ``--coupled`` does;
    ``--no-coupled`` prunes the pairs alone: the model ``prune(coupled=False)`` returns."""
    import lsprune.torch as lt
    from cli_factories import small_resnet
    from lsprune.cli.main import main

    calib = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.save(calib, tmp_path / "calib.pt")
    base = ["prune", "cli_factories:small_resnet", "--calib", str(tmp_path / "calib.pt"), "--ratio", "0.5", "-q"]
    got = {}
    for flag in ("", "--coupled", "--no-coupled"):
        out, rep = tmp_path / f"m{flag}.pt", tmp_path / f"r{flag}.json"
        assert main(base + [flag] * bool(flag) + ["-o", str(out), "--report", str(rep)]) == 0
        got[flag] = torch.load(out, weights_only=False).state_dict(), json.loads(rep.read_text())
    (default, rep), (on, _), (off, off_rep) = got[""], got["--coupled"], got["--no-coupled"]
    assert rep["coupled"] is True and any(p["writers"] for p in rep["pairs"])
    assert off_rep["coupled"] is False and not any(p["writers"] for p in off_rep["pairs"])
    want, _ = lt.prune(small_resnet(), [calib], ratio=0.5, coupled=False, progress=False)
    for k, v in want.state_dict().items():
        assert torch.equal(default[k], on[k]) and torch.equal(off[k], v), k
    assert default["fc.weight"].shape[1] < off["fc.weight"].shape[1]  # the head's stream lost channels


def test_checkpoint_and_memory_limit_options(files, tmp_path, capsys):
    from lsprune.cli.main import main

    base = ["prune", *trusted(files), "--calib", str(files / "calib.pt"), "--ratio", "0.5", "-q"]
    assert main(base + ["-o", str(tmp_path / "a.pt"), "--checkpoint", str(tmp_path / "ck"),
                        "--memory-limit", "0.9"]) == 0
    assert (tmp_path / "ck" / "manifest.json").exists()
    assert main(base + ["-o", str(tmp_path / "b.pt"), "--checkpoint", str(tmp_path / "ck")]) == 0  # resumed
    a, b = torch.load(tmp_path / "a.pt", weights_only=False), torch.load(tmp_path / "b.pt", weights_only=False)
    assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values()))
    capsys.readouterr()
    assert main(base + ["-o", str(tmp_path / "c.pt"), "--memory-limit", "1K"]) == 2
    assert "not enough memory" in capsys.readouterr().err and not (tmp_path / "c.pt").exists()
    assert main(base + ["-o", str(tmp_path / "c.pt"), "--memory-limit", "lots"]) == 2
    assert "--memory-limit 'lots'" in capsys.readouterr().err
    assert main(base + ["-o", str(tmp_path / "c.pt"), "--damping", "1e-3", "--checkpoint", str(tmp_path / "ck")]) == 2
    assert "written for another run: option damping" in capsys.readouterr().err


def test_statistics_and_time_budget_options(files, tmp_path, capsys):
    from lsprune.cli.main import main

    base = ["prune", *trusted(files), "--calib", str(files / "calib.pt"), "--ratio", "0.5", "-q"]
    assert main(base + ["-o", str(tmp_path / "a.pt"), "--report", str(tmp_path / "r.json"), "--statistics", "lean",
                        "--time-budget", "1e-9"]) == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["statistics"] == "lean" and rep["time_budget"] == 1e-9
    assert all(p["timed_out"] for p in rep["pairs"] if p["status"] == "pruned")
    capsys.readouterr()
    for bad in (["--time-budget", "0"], ["--time-budget", "nan"], ["--statistics", "fast"]):
        try:
            rc = main(base + ["-o", str(tmp_path / "b.pt"), *bad])
        except SystemExit as e:  # argparse's own refusal of a choice
            rc = e.code
        assert rc == 2 and not (tmp_path / "b.pt").exists()
