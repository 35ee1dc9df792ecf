"""Measured inference speed of pruned models: dense and pruned timed in one run, as ratios.

Runs ``lsprune bench inference`` and ``benchmarks/bench_inference.py``. FLOPs promise a speed-up that odd
widths, memory traffic and per-op overheads may not deliver; these timings say what a pruned model really
gains on the machine at hand. Dense and pruned calls alternate (``ABAB…``), so a load that comes and goes
slows both alike, and the median of the repeats is kept.

Three workloads, each pruned at 25 % and 50 % removed, with and without ``round_to``:

* a CNN (VGG-style, 3×3 convs, BatchNorm, ReLU), batch 1 and 64, eager and (optionally) ``torch.compile``;
* an encoder (BERT layout) at sequence length 128;
* a decoder (Llama layout: SwiGLU MLP, GQA) — prefill tokens/s of a 512-token prompt and decode tokens/s
  with the KV cache (greedy ``generate``).

Weights are random and the calibration data is noise: speed depends on the widths, not on the values.
The transformer workloads need ``transformers`` (skipped with a note when it is not installed).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from lsprune.budget import Budget

from .api import prune


@dataclass(frozen=True)
class SpeedConfig:
    """Sizes of :func:`run_inference`'s workloads (``quick()`` for tests and a first look)."""

    cnn_widths: Sequence[int] = (64, 128, 256, 256, 512, 512)
    cnn_hw: int = 32
    cnn_batches: Sequence[int] = (1, 64)
    enc_hidden: int = 768  # BERT-base widths, 4 layers
    enc_layers: int = 4
    enc_heads: int = 12
    enc_ffn: int = 3072
    enc_seq: int = 128
    enc_batch: int = 8
    dec_hidden: int = 1024  # large enough that decoding reads weights rather than waits on Python
    dec_layers: int = 6
    dec_heads: int = 16
    dec_kv_heads: int = 4
    dec_ffn: int = 2816
    prompt: int = 512
    new_tokens: int = 64
    removed: Sequence[float] = (0.25, 0.5)
    round_to: Dict[str, object] = None  # per workload: {"cnn": 8, "encoder": {...}, "decoder": {...}}
    repeat: int = 7
    calib_batches: int = 2
    compile: bool = False

    @staticmethod
    def quick() -> "SpeedConfig":
        return SpeedConfig(cnn_widths=(8, 16, 16), cnn_hw=8, cnn_batches=(1, 4), enc_hidden=32, enc_layers=1,
                           enc_heads=4, enc_ffn=64, enc_seq=16, enc_batch=2, dec_hidden=32, dec_layers=1, dec_heads=4,
                           dec_kv_heads=2, dec_ffn=64, prompt=16, new_tokens=4, removed=(0.5,), repeat=1,
                           round_to={"cnn": 4, "encoder": {"mlp": 16, "heads": 2}, "decoder": {"mlp": 16, "heads": 2}})

    def round_to_for(self, workload: str):
        default = {"cnn": 8, "encoder": {"mlp": 64, "heads": 2}, "decoder": {"mlp": 64, "heads": 2}}
        return (self.round_to or default).get(workload)


# ---------------------------------------------------------------------------------------------- timing
#: A timed sample lasts at least this long (short calls are repeated within it), so that timer resolution and
#: one-off stalls weigh little.
MIN_SAMPLE_S = 0.05


def _now(fn: Callable[[], object], inner: int = 1) -> float:
    t = time.perf_counter()
    with torch.inference_mode():
        for _ in range(inner):
            fn()
    return (time.perf_counter() - t) / inner


def interleaved(fns: Sequence[Callable[[], object]], repeat: int, warmup: int = 1) -> List[float]:
    """Median seconds per call of each of ``fns``, timed in turns (``f0 f1 f0 f1 …``) after ``warmup`` rounds;
    a call shorter than :data:`MIN_SAMPLE_S` is repeated within its sample (the same count for every fn)."""
    first = [0.0] * len(fns)
    for _ in range(max(1, warmup)):
        first = [_now(f) for f in fns]
    inner = max(1, int(MIN_SAMPLE_S / max(min(first), 1e-9)))
    runs = [[] for _ in fns]
    for _ in range(max(1, repeat)):
        for r, f in zip(runs, fns):
            r.append(_now(f, inner))
    return [statistics.median(r) for r in runs]


def _row(workload: str, setting: str, removed: float, round_to, report, dense_s: float, pruned_s: float,
         unit: str, work: float) -> dict:
    """One table row: the measured speed-up next to the FLOPs and parameter ratios the report promises."""
    return dict(workload=workload, setting=setting, removed=removed, round_to=str(round_to) if round_to else "-",
                flops_ratio=report.flops_before / max(report.flops_after, 1),
                params_ratio=report.params_before / max(report.params_after, 1),
                dense_ms=1e3 * dense_s, pruned_ms=1e3 * pruned_s, speedup=dense_s / pruned_s,
                speedup_vs_flops=(dense_s / pruned_s) / (report.flops_before / max(report.flops_after, 1)),
                unit=unit, dense_rate=work / dense_s, pruned_rate=work / pruned_s)


# ---------------------------------------------------------------------------------------------- CNN
def vgg_cnn(widths: Sequence[int], hw: int, classes: int = 10) -> nn.Module:
    """3×3 conv + BatchNorm + ReLU per width, a 2×2 max-pool after every second conv, then a Linear."""
    layers, c, size = [], 3, hw
    for i, w in enumerate(widths):
        layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
        c = w
        if i % 2 == 1 and size >= 2:
            layers.append(nn.MaxPool2d(2))
            size //= 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * size * size, classes))


def cnn_rows(cfg: SpeedConfig, log=print) -> List[dict]:
    torch.manual_seed(0)
    dense = vgg_cnn(cfg.cnn_widths, cfg.cnn_hw).eval()
    calib = [torch.randn(32, 3, cfg.cnn_hw, cfg.cnn_hw) for _ in range(cfg.calib_batches)]
    rows = []
    for removed in cfg.removed:
        for rt in (None, cfg.round_to_for("cnn")):
            pruned, rep = prune(dense, calib, budget=Budget(flops=1.0 - removed), round_to=rt, progress=False)
            for batch in cfg.cnn_batches:
                x = torch.randn(batch, 3, cfg.cnn_hw, cfg.cnn_hw)
                modes = [("eager", dense, pruned)]
                if cfg.compile:
                    # a fresh dynamo cache per pair: each new width is a recompile, and past dynamo's recompile
                    # limit a compiled call silently runs eagerly
                    torch._dynamo.reset()
                    cd, cp = torch.compile(dense), torch.compile(pruned)
                    modes.append(("compile", cd, cp))
                for mode, d, p in modes:
                    td, tp = interleaved([lambda: d(x), lambda: p(x)], cfg.repeat, warmup=2 if mode == "compile" else 1)
                    rows.append(_row("cnn", f"batch {batch}, {mode}", removed, rt, rep, td, tp, "images/s", batch))
                    log(_line(rows[-1]))
    return rows


# ---------------------------------------------------------------------------------------------- transformers
def _hf_dense(workload: str, cfg: SpeedConfig, log):
    """The workload's randomly initialised transformer, seeded (None, and a note, without transformers)."""
    try:
        import transformers as tf
    except ImportError:
        log(f"({workload} rows skipped: transformers is not installed)")
        return None
    torch.manual_seed(0)
    if workload == "encoder":
        return tf.BertModel(tf.BertConfig(
            vocab_size=1024, hidden_size=cfg.enc_hidden, num_hidden_layers=cfg.enc_layers,
            num_attention_heads=cfg.enc_heads, intermediate_size=cfg.enc_ffn,
            max_position_embeddings=max(512, cfg.enc_seq)), add_pooling_layer=False).eval()
    return tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=1024, hidden_size=cfg.dec_hidden, intermediate_size=cfg.dec_ffn, num_hidden_layers=cfg.dec_layers,
        num_attention_heads=cfg.dec_heads, num_key_value_heads=cfg.dec_kv_heads,
        head_dim=cfg.dec_hidden // cfg.dec_heads, max_position_embeddings=cfg.prompt + cfg.new_tokens + 8)).eval()


def _tokens(n: int, b: int, t: int, vocab: int, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (b, t), generator=g)} for _ in range(n)]


def encoder_rows(cfg: SpeedConfig, log=print) -> List[dict]:
    dense = _hf_dense("encoder", cfg, log)
    if dense is None:
        return []
    calib = _tokens(cfg.calib_batches, 4, cfg.enc_seq, 1024)
    x = _tokens(1, cfg.enc_batch, cfg.enc_seq, 1024, seed=2)[0]
    rows = []
    for removed in cfg.removed:
        for rt in (None, cfg.round_to_for("encoder")):
            pruned, rep = prune(dense, calib, ratio=removed, round_to=rt, progress=False)
            td, tp = interleaved([lambda: dense(**x), lambda: pruned(**x)], cfg.repeat)
            rows.append(_row("encoder", f"seq {cfg.enc_seq}, batch {cfg.enc_batch}", removed, rt, rep, td, tp,
                             "tokens/s", cfg.enc_batch * cfg.enc_seq))
            log(_line(rows[-1]))
    return rows


def _generate(model, ids, n: int):
    return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                          pad_token_id=0)


def decoder_rows(cfg: SpeedConfig, log=print) -> List[dict]:
    dense = _hf_dense("decoder", cfg, log)
    if dense is None:
        return []
    calib = _tokens(cfg.calib_batches, 4, min(cfg.prompt, 128), 1024)
    ids = _tokens(1, 1, cfg.prompt, 1024, seed=2)[0]["input_ids"]
    n = cfg.new_tokens
    rows = []
    for removed in cfg.removed:
        for rt in (None, cfg.round_to_for("decoder")):
            pruned, rep = prune(dense, calib, ratio=removed, round_to=rt, progress=False)
            td, tp = interleaved([lambda: dense(input_ids=ids, use_cache=False),
                                  lambda: pruned(input_ids=ids, use_cache=False)], cfg.repeat)
            rows.append(_row("decoder", f"prefill {cfg.prompt}", removed, rt, rep, td, tp, "tokens/s", cfg.prompt))
            log(_line(rows[-1]))
            # decode: n new tokens minus the first (which includes the prefill), per token
            g1d, g1p, gnd, gnp = interleaved([lambda: _generate(dense, ids, 1), lambda: _generate(pruned, ids, 1),
                                              lambda: _generate(dense, ids, n), lambda: _generate(pruned, ids, n)],
                                             max(1, cfg.repeat // 2))
            td, tp = (gnd - g1d) / (n - 1), (gnp - g1p) / (n - 1)
            rows.append(_row("decoder", f"decode (KV cache, {cfg.prompt}+{n})", removed, rt, rep, td, tp,
                             "tokens/s", 1))
            log(_line(rows[-1]))
    return rows


# ---------------------------------------------------------------------------------------------- driver
COLUMNS = ["workload", "setting", "removed", "round_to", "flops_ratio", "params_ratio", "dense_ms", "pruned_ms",
           "speedup", "speedup_vs_flops", "unit", "dense_rate", "pruned_rate"]


def _line(r: dict) -> str:
    return (f"{r['workload']:8s} {r['setting']:28s} removed {r['removed']:.2f} round_to {r['round_to']:26s} "
            f"FLOPs x{r['flops_ratio']:.2f}  speed-up x{r['speedup']:.2f} ({r['speedup_vs_flops']:.0%} of FLOPs)")


def run_inference(cfg: Optional[SpeedConfig] = None, which: Sequence[str] = ("cnn", "encoder", "decoder"),
                  log=print) -> List[dict]:
    """Times dense vs pruned models; returns one dict per row (:data:`COLUMNS`)."""
    cfg = cfg or SpeedConfig()
    bad = [w for w in which if w not in ("cnn", "encoder", "decoder")]
    if bad:
        raise ValueError(f"unknown workload(s) {bad}; choose from cnn, encoder, decoder")
    rows = []
    for w, fn in (("cnn", cnn_rows), ("encoder", encoder_rows), ("decoder", decoder_rows)):
        if w in which:
            rows += fn(cfg, log)
    return rows
