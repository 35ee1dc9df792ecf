"""Hugging Face folders through the command line: prune-hf -> load_pretrained / from_pretrained -> identical
outputs -> generate(); eval-ppl against a perplexity computed by hand; bad input changes nothing."""
import hashlib
import json
import math
import os
import random
import re

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
import lsprune.torch as lt  # noqa: E402
from lsprune.cli.main import main  # noqa: E402

WORDS = ("the quick brown fox jumps over lazy dog a bird sings in tree and sleeps red blue green house river stone "
         "light dark cold warm").split()


def _text(n, seed):
    r = random.Random(seed)
    return " ".join(r.choice(WORDS) for _ in range(n))


def _tokenizer(text):
    """A word-level tokenizer trained offline on ``text`` (no download)."""
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], tokenizers.trainers.WordLevelTrainer(
        special_tokens=["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    calib = _text(1200, 0)
    (d / "calib.txt").write_text(calib)
    (d / "held.txt").write_text(_text(60, 1))
    (d / "short.txt").write_text(_text(10, 2))
    tok = _tokenizer(calib)
    V = len(tok)
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64)).eval()  # GQA: 4 query heads per KV head
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64)).eval()
    llama.generation_config.max_new_tokens = 7  # a setting that must travel through the folders
    for name, model in (("llama", llama), ("bert", bert)):
        model.save_pretrained(d / name)
        tok.save_pretrained(d / name)
    return d


@pytest.fixture(autouse=True)
def _restore_logging(restore_lsprune_logging):
    """In-process CLI calls install a stderr handler on the ``lsprune`` logger (see conftest)."""


def _run(monkeypatch, *argv):
    """``lsprune *argv`` in this process; returns (exit code, the (pruned, report) lt.prune returned)."""
    seen = []
    real = lt.prune

    def recording(*a, **k):
        seen.append(real(*a, **k))
        return seen[-1]

    monkeypatch.setattr(lt, "prune", recording)
    code = main([str(a) for a in argv])
    monkeypatch.setattr(lt, "prune", real)
    return code, (seen[0] if seen else None)


def _ids(folder, text_file):
    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return torch.tensor(tok(open(text_file).read(), add_special_tokens=False)["input_ids"])


def _record(folder):
    return json.loads((folder / "structure.json").read_text())["pretrained"]


def _digest(folder):
    """Every file under ``folder`` (names and bytes)."""
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(root, f)
            h.update(os.path.relpath(p, folder).encode())
            h.update(open(p, "rb").read())
    return h.hexdigest()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def pruned_llama(folders, tmp_path_factory):
    """The tiny Llama pruned by ``prune-hf --ratio 0.5``: (its folder, the model lt.prune returned)."""
    out = tmp_path_factory.mktemp("pruned") / "out"
    with pytest.MonkeyPatch.context() as mp:
        code, (pruned, _) = _run(mp, "prune-hf", folders / "llama", "--calib", folders / "calib.txt", "--ratio",
                                 "0.5", "-o", out, "--seq-len", "32", "--max-sequences", "24", "-q")
    assert code == 0
    return out, pruned


def test_llama_gqa_uniform_widths_load_both_ways_and_generate(folders, pruned_llama):
    out, pruned = pruned_llama
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors",
                                       "structure.json", "tokenizer.json", "tokenizer_config.json"]
    assert _record(out)["config_widths"] == "pruned"
    cfg = json.loads((out / "config.json").read_text())
    # 1 of 2 KV groups (its 4 query heads), 48 of 96 neurons; head_dim explicit; the LS intercepts' flags
    assert (cfg["num_key_value_heads"], cfg["num_attention_heads"], cfg["head_dim"], cfg["intermediate_size"]) == \
        (1, 4, 8, 48)
    assert cfg["mlp_bias"] and cfg["attention_bias"]
    ids = _ids(out, folders / "held.txt")[None, :40]
    ref = _logits(pruned, ids)
    ours = lt.load_pretrained(out)
    plain = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert torch.equal(_logits(ours, ids), ref) and torch.equal(_logits(plain, ids), ref)
    assert ours.model.layers[1].self_attn.k_proj.out_features == 8
    assert ours.generation_config.max_new_tokens == 7 and plain.generation_config.max_new_tokens == 7
    prompt = ids[:, :5]
    for model in (ours, plain):
        gen = model.generate(prompt, max_new_tokens=6, do_sample=False)
        nocache = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
        assert gen.shape == (1, 11) and torch.equal(gen, nocache)
    assert torch.equal(gen, pruned.generate(prompt, max_new_tokens=6, do_sample=False))
    assert os.listdir(out.parent) == ["out"]  # no temporary folder left


def test_llama_budget_different_widths_load_pretrained_only(folders, tmp_path, monkeypatch):
    out = tmp_path / "out"
    code, (pruned, report) = _run(monkeypatch, "prune-hf", folders / "llama", "--calib", folders / "calib.txt",
                                  "--budget", "params=0.85", "--mlp", "-o", out, "--seq-len", "32",
                                  "--max-sequences", "24", "-q")
    assert code == 0 and all(r.kind == "mlp" for r in report.pairs)
    assert len({r.channels_after for r in report.pairs}) > 1  # the global allocation gave the blocks other widths
    rec = _record(out)
    assert rec["config_widths"] == "original" and "different numbers of MLP neurons" in rec["reason"]
    ids = _ids(out, folders / "held.txt")[None, :40]
    assert torch.equal(_logits(lt.load_pretrained(out), ids), _logits(pruned, ids))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # loud, not silently re-initialised
        transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    again = tmp_path / "again"  # its config does not describe its weights: pruning it again is refused
    code, _ = _run(monkeypatch, "prune-hf", out, "--calib", folders / "calib.txt", "--ratio", "0.2", "-o", again,
                   "--seq-len", "32", "-q")
    assert code == 2 and not again.exists()


def test_round_to_aligns_the_written_widths(folders, tmp_path, monkeypatch):
    out = tmp_path / "out"
    code, (pruned, report) = _run(monkeypatch, "prune-hf", folders / "llama", "--calib", folders / "calib.txt",
                                  "--ratio", "0.5", "--mlp", "--round-to", "mlp=32", "-o", out, "--seq-len", "32",
                                  "--max-sequences", "24", "-q")
    assert code == 0 and report.round_to == {"mlp": 32}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["intermediate_size"] == 64  # 96 - 48 = 48 kept: 32 and 64 are as near, a tie keeps more
    ids = _ids(out, folders / "held.txt")[None, :40]
    plain = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert torch.equal(_logits(plain, ids), _logits(pruned, ids))


def test_reconstruct_option_reaches_prune(folders, tmp_path, monkeypatch):
    out = tmp_path / "out"
    code, (pruned, report) = _run(monkeypatch, "prune-hf", folders / "llama", "--calib", folders / "calib.txt",
                                  "--ratio", "0.5", "--mlp", "--reconstruct", "steps=3,batch_size=64,seed=1", "-o",
                                  out, "--seq-len", "32", "--max-sequences", "8", "-q")
    assert code == 0
    assert report.reconstruct["steps"] == 3 and report.reconstruct["seed"] == 1 and report.reconstruction
    assert all(w.loss_after <= w.loss_before for w in report.reconstruction)
    ids = _ids(out, folders / "held.txt")[None, :40]
    assert torch.equal(_logits(lt.load_pretrained(out), ids), _logits(pruned, ids))


@pytest.mark.parametrize("units,widths", [("--mlp", "pruned"), (None, "original")])
def test_bert_encoder(folders, tmp_path, monkeypatch, units, widths):
    out = tmp_path / "out"
    code, (pruned, report) = _run(monkeypatch, "prune-hf", folders / "bert", "--calib", folders / "calib.txt",
                                  "--ratio", "0.5", "-o", out, "--seq-len", "32", "--max-sequences", "24", "-q",
                                  *([units] if units else []))
    assert code == 0
    # BERT derives its head size from hidden_size / num_attention_heads: pruned heads cannot be put in its config
    assert _record(out)["config_widths"] == widths
    ids = _ids(out, folders / "held.txt")[None, :40]
    ref = _logits(pruned, ids)
    assert torch.equal(_logits(lt.load_pretrained(out), ids), ref)
    assert isinstance(lt.load_pretrained(out), transformers.BertForMaskedLM)
    if widths == "pruned":
        plain = transformers.AutoModelForMaskedLM.from_pretrained(out, local_files_only=True).eval()
        assert plain.bert.encoder.layer[0].intermediate.dense.out_features == 64
        assert torch.equal(_logits(plain, ids), ref)
    else:
        with pytest.raises(RuntimeError):
            transformers.AutoModelForMaskedLM.from_pretrained(out, local_files_only=True)


def _hand_perplexity(model, ids, L, S):
    """Each token's NLL from its own forward pass over its context: the tokens of the first window that holds
    it and at least one token before it (windows of L tokens every S tokens)."""
    total, n = 0.0, 0
    with torch.no_grad():
        for p in range(1, ids.numel()):
            begin = max(0, -(-(p - L + 1) // S)) * S  # the first window start with begin + L > p
            if p < begin + 1:
                continue
            logp = torch.log_softmax(model(input_ids=ids[None, begin:p]).logits[0, -1].double(), -1)
            total -= float(logp[ids[p]])
            n += 1
    return math.exp(total / n), n


@pytest.mark.parametrize("which", ["dense", "pruned"])
def test_eval_ppl_matches_hand_computed(folders, pruned_llama, capsys, which):
    folder = folders / "llama" if which == "dense" else pruned_llama[0]
    capsys.readouterr()
    model = lt.load_pretrained(folder)
    ids = _ids(folder, folders / "held.txt")
    for L, S, B in ((16, 16, 3), (16, 6, 1)):  # batches of 3 windows with a shorter tail; one window at a time
        assert main(["eval-ppl", str(folder), "--text", str(folders / "held.txt"), "--seq-len", str(L),
                     "--stride", str(S), "--batch-size", str(B)]) == 0
        line = capsys.readouterr().out
        ppl, scored = float(re.search(r"perplexity (\S+)", line).group(1)), int(re.search(r"(\d+) tokens", line)[1])
        want, n = _hand_perplexity(model, ids, L, S)
        assert scored == n and ppl == pytest.approx(want, rel=1e-5)
    assert 1 < ppl < 10 * len(WORDS)


def test_eval_ppl_refuses_an_encoder(folders, capsys):
    assert main(["eval-ppl", str(folders / "bert"), "--text", str(folders / "held.txt")]) == 2
    assert "not a causal language model" in capsys.readouterr().err


def _bad_cases(folders, tmp):
    """name -> (MODEL_DIR, calib, -o, extra args, the error's words)."""
    import shutil

    garbage = tmp / "garbage"
    garbage.mkdir()
    (garbage / "config.json").write_text("{not json")
    (garbage / "tokenizer.json").write_text("{}")
    notok = tmp / "notok"
    shutil.copytree(folders / "llama", notok)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        os.remove(notok / f)
    full = tmp / "full"
    full.mkdir()
    (full / "keep.txt").write_text("user data")
    link = tmp / "link"
    os.symlink(folders / "llama", link)
    llama, calib = folders / "llama", folders / "calib.txt"
    return {
        "not a folder": (calib, calib, tmp / "o", [], "not a folder"),
        "no config": (tmp / "full", calib, tmp / "o", [], "not a transformers model folder"),
        "bad config": (garbage, calib, tmp / "o", [], "cannot read its config.json"),
        "no tokenizer": (notok, calib, tmp / "o", [], "holds no tokenizer"),
        "short calibration": (llama, folders / "short.txt", tmp / "o", [], "fewer than one sequence"),
        "output not empty": (llama, calib, full, [], "add --overwrite"),
        "output is input": (llama, calib, llama, ["--overwrite"], "would overwrite its input"),
        "output is input via a link": (llama, calib, link, ["--overwrite"], "would overwrite its input"),
        "output inside input": (llama, calib, llama / "sub", [], "inside MODEL_DIR"),
        "seq-len over positions": (llama, calib, tmp / "o", ["--seq-len", "128"], "longer than the model's"),
        "bad budget": (llama, calib, tmp / "o", ["--budget", "flops=2"], "--budget"),
        "round-to not positive": (llama, calib, tmp / "o", ["--round-to", "0"], "--round-to"),
        "round-to unknown kind": (llama, calib, tmp / "o", ["--round-to", "attn=8"], "unknown kind 'attn'"),
        "round-to wider than a unit": (llama, calib, tmp / "o", ["--round-to", "mlp=128"], "round_to=128 is larger"),
        "reconstruct bad value": (llama, calib, tmp / "o", ["--reconstruct", "steps=-1"], "--reconstruct"),
        "reconstruct unknown key": (llama, calib, tmp / "o", ["--reconstruct", "epochs=3"], "--reconstruct"),
    }


def test_bad_input_exit_2_nothing_written(folders, tmp_path, capsys):
    before = {n: _digest(folders / n) for n in ("llama", "bert")}
    cases = _bad_cases(folders, tmp_path)
    listing = sorted(os.listdir(tmp_path))
    full = _digest(tmp_path / "full")
    for name, (model_dir, calib, out, extra, words) in cases.items():
        amount = [] if "--budget" in extra else ["--ratio", "0.5"]
        code = main(["prune-hf", str(model_dir), "--calib", str(calib), *amount, "-o", str(out), "--seq-len",
                     "32", "-q", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, (name, err)
        assert len(err) == 1 and err[0].startswith("lsprune: error:") and words in err[0], (name, err)
        assert sorted(os.listdir(tmp_path)) == listing, name  # nothing new, no temporary folder left
    assert _digest(tmp_path / "full") == full
    assert {n: _digest(folders / n) for n in ("llama", "bert")} == before


def test_overwrite_replaces_the_whole_folder(folders, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.bin").write_bytes(b"old")
    code, _ = _run(monkeypatch, "prune-hf", folders / "llama", "--calib", folders / "calib.txt", "--ratio", "0.25",
                   "--heads", "-o", out, "--seq-len", "32", "--max-sequences", "8", "--overwrite", "-q")
    assert code == 0 and not (out / "stale.bin").exists() and (out / "structure.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_failure_while_writing_leaves_nothing(folders, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(lt, "save_pretrained", fail)
    code, _ = _run(monkeypatch, "prune-hf", folders / "llama", "--calib", folders / "calib.txt", "--ratio", "0.25",
                   "-o", out, "--seq-len", "32", "--max-sequences", "4", "-q")
    assert code == 1 and os.listdir(tmp_path) == []


def test_real_command_line_help_and_bad_folder(tmp_path):
    """Through a real ``lsprune`` process: the sub-commands exist and bad input is one line, exit 2."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "lsprune", "prune-hf", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--calib" in r.stdout and "--overwrite" in r.stdout
    r = subprocess.run([sys.executable, "-m", "lsprune", "eval-ppl", str(tmp_path), "--text", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"lsprune: error: MODEL_DIR {str(tmp_path)!r} is not a transformers model folder (no config.json)"]


def test_widths_transformers_refuses_stay_original(tmp_path):
    """3 of 4 KV groups = 6 query heads: transformers 5 refuses a Llama config whose hidden size (64) is not a
    multiple of its heads, even with head_dim set, so the config keeps the original widths."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, head_dim=8, max_position_embeddings=32)).eval()
    g = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(0, 32, (4, 16), generator=g)} for _ in range(4)]
    pruned, report = lt.prune(model, calib, ratio=0.25, units="heads", progress=False)
    rec = lt.save_pretrained(pruned, report, tmp_path / "out")
    assert rec["config_widths"] == "original" and "not a multiple" in rec["reason"]
    ids = calib[0]["input_ids"]
    assert torch.equal(_logits(lt.load_pretrained(tmp_path / "out"), ids), _logits(pruned, ids))
    assert {k: v.shape for k, v in pruned.state_dict().items()} == \
        {k: v.shape for k, v in lt.load_pretrained(tmp_path / "out").state_dict().items()}
