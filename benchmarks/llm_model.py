"""Small trained transformers for the transformer benchmark (CPU, a few minutes each).

* decoder: Llama architecture (``LlamaForCausalLM``): hidden 256, 4 layers, 8 query heads sharing 2
  KV heads (GQA, head_dim 32), SwiGLU MLP of width 704, RMSNorm, RoPE; causal LM.
* encoder: BERT (``BertForMaskedLM``): hidden 256, 4 layers, 8 heads (head_dim 32), GELU MLP of width
  1024 (as many MLP parameters as the SwiGLU 704); masked LM: trained with 40% of the tokens replaced
  by ``<mask>``, evaluated with 15%.

Both use the vocabulary of :mod:`llm_data` (4,096 byte-level BPE tokens), sequences of 128 tokens,
no dropout, and are trained on the train split with AdamW (batch 16 x 128 tokens, linear warm-up,
cosine decay, gradient clipping) for a fixed number of steps, 2 threads. The trained weights are
cached in ``benchmarks/.cache/`` as safetensors (train time and held-out perplexity in the file's
metadata), so later runs skip training.

    python benchmarks/llm_model.py [--kinds decoder,encoder]    # trains (or loads) and reports
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import llm_data

SEQ_LEN = 128
DECODER = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
               num_key_value_heads=4, head_dim=32, max_position_embeddings=SEQ_LEN, rms_norm_eps=1e-6)
ENCODER = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
               max_position_embeddings=SEQ_LEN, type_vocab_size=1, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0)
TRAIN = dict(steps=500, batch_size=16, lr=2e-3, warmup=50, weight_decay=0.1, clip=1.0, seed=0)
# the MLM learns from the masked tokens only: with 15% masked, 500 steps leave it at the unigram plateau
# (held-out perplexity ~600), so it trains with 40% masked (Wettig et al. 2023) and a lower peak rate
ENCODER_TRAIN = dict(lr=1e-3, mask_p=0.4)
MASK_P = 0.15  # perplexity (evaluation) mask rate
KINDS = ("decoder", "encoder")


def build(kind: str, seed: int = 0):
    """An untrained model of ``kind`` ("decoder": LlamaForCausalLM, "encoder": BertForMaskedLM) in eval
    mode; the encoder's config carries ``mask_token_id``."""
    from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

    tok = llm_data.tokenizer()
    ids = dict(vocab_size=tok.get_vocab_size(), pad_token_id=tok.token_to_id("<pad>"))
    torch.manual_seed(seed)
    if kind == "decoder":
        cfg = LlamaConfig(**DECODER, **ids, bos_token_id=None, eos_token_id=tok.token_to_id("<eos>"))
        return LlamaForCausalLM(cfg).eval()
    if kind == "encoder":
        cfg = BertConfig(**ENCODER, **ids)
        cfg.mask_token_id = tok.token_to_id("<mask>")
        return BertForMaskedLM(cfg).eval()
    raise ValueError(f"kind must be one of {KINDS}")


def is_mlm(model) -> bool:
    return type(model).__name__.endswith("ForMaskedLM")


def mask_tokens(ids: torch.Tensor, mask_id: int, gen: torch.Generator, p: float = MASK_P
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """MLM corruption of ids (B, T): each position masked with probability ``p`` (at least one per
    batch); returns (inputs with ``mask_id`` there, labels (B, T) = the token there, -100 elsewhere)."""
    m = torch.rand(ids.shape, generator=gen) < p
    if not m.any():
        m.view(-1)[0] = True
    return ids.masked_fill(m, mask_id), ids.masked_fill(~m, -100)


def token_nll(model, ids: torch.Tensor, gen: Optional[torch.Generator] = None, mask_p: float = MASK_P
              ) -> Tuple[torch.Tensor, int]:
    """Summed token NLL of a batch ids (B, T) and the number of predicted tokens: next-token
    prediction for a causal LM (B*(T-1) tokens), the masked tokens for an MLM (``gen`` draws the mask)."""
    if is_mlm(model):
        inputs, labels = mask_tokens(ids, model.config.mask_token_id, gen, mask_p)
        logits = model(input_ids=inputs).logits
    else:
        logits, labels = model(input_ids=ids).logits[:, :-1], ids[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="sum",
                          ignore_index=-100)
    return nll, int((labels != -100).sum())


@torch.no_grad()
def perplexity(model, token_batches) -> float:
    """exp(mean token NLL) over ``token_batches`` (LongTensors (B, T) or dicts with "input_ids").
    Causal LM: every next-token prediction; MLM: the masked tokens, the mask drawn from a generator
    seeded 0, so the same batches get the same mask for every model."""
    gen = torch.Generator().manual_seed(0)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    for b in token_batches:
        ids = b["input_ids"] if isinstance(b, dict) else b
        nll, n = token_nll(model, ids.to(dev), gen)
        total, count = total + float(nll), count + n
    model.train(was_training)
    return math.exp(total / count)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up to ``lr``, then cosine decay to lr/10."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(steps - warmup, 1)
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))


def train(model, ids, steps: int, batch_size: int, lr: float, warmup: int, weight_decay: float, clip: float,
          seed: int, mask_p: float = MASK_P, log_every: int = 100) -> float:
    """Trains ``model`` in place on random windows of the token stream ``ids`` (N,) (an MLM with
    ``mask_p`` of the tokens masked); returns seconds."""
    gen = torch.Generator().manual_seed(seed)
    decay = [p for p in model.parameters() if p.ndim >= 2]  # matrices and embeddings; not norms, biases
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        nll, n = token_nll(model, llm_data.random_batch(ids, SEQ_LEN, batch_size, gen), gen, mask_p)
        (nll / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if log_every and (step + 1) % log_every == 0:
            print(f"  step {step + 1}/{steps}  loss {nll.item() / n:.3f}  {time.perf_counter() - t0:.0f} s", flush=True)
    model.eval()
    return time.perf_counter() - t0


def test_batches(max_batches: Optional[int] = None) -> List[torch.Tensor]:
    """The held-out test split as (16, 128) LongTensor batches."""
    return llm_data.batches(llm_data.tokens("test"), SEQ_LEN, 16, max_batches)


def calibration_batches(n: int = 8, batch_size: int = 8) -> List[Dict[str, torch.Tensor]]:
    """The first ``n`` calibration batches: dicts {"input_ids": LongTensor (batch_size, 128)}."""
    return [{"input_ids": b} for b in llm_data.batches(llm_data.tokens("calibration"), SEQ_LEN, batch_size, n)]


def train_settings(kind: str) -> dict:
    return dict(TRAIN, **ENCODER_TRAIN) if kind == "encoder" else dict(TRAIN)


def cache_path(kind: str) -> str:
    """The weights file, named after everything that determines them."""
    cfg = DECODER if kind == "decoder" else ENCODER
    key = json.dumps([kind, cfg, train_settings(kind), MASK_P, llm_data.corpus_tag()], sort_keys=True)
    return str(llm_data.CACHE / f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.safetensors")


def load_or_train(kind: str, verbose: bool = True):
    """The trained model of ``kind`` (eval mode) and its record {params, train_s, steps, test_ppl, ...}:
    loaded from the cache, else trained (2 threads), evaluated on the test split and cached."""
    from safetensors import safe_open
    from safetensors.torch import load_model, save_model

    path = cache_path(kind)
    model = build(kind)
    if os.path.exists(path):
        load_model(model, path)
        with safe_open(path, "pt") as f:
            info = json.loads(f.metadata()["info"])
        return model.eval(), info
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        if verbose:
            print(f"training the {kind} ({TRAIN['steps']} steps, 2 threads)", flush=True)
        secs = train(model, llm_data.tokens("train"), log_every=100 if verbose else 0, **train_settings(kind))
    finally:
        torch.set_num_threads(threads)
    info = dict(kind=kind, params=sum(p.numel() for p in model.parameters()), train_s=round(secs, 1),
                steps=TRAIN["steps"], tokens_seen=TRAIN["steps"] * TRAIN["batch_size"] * SEQ_LEN,
                train_settings=train_settings(kind),
                test_ppl=perplexity(model, test_batches()), corpus=llm_data.corpus_tag())
    os.makedirs(llm_data.CACHE, exist_ok=True)
    tmp = path + ".tmp"
    save_model(model, tmp, metadata={"info": json.dumps(info)})
    os.replace(tmp, path)
    return model, info


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", default=",".join(KINDS))
    a = p.parse_args()
    print({s: r for s, r in llm_data.summary().items()})
    for kind in a.kinds.split(","):
        _, info = load_or_train(kind)
        print(info)


if __name__ == "__main__":
    main()
