"""``lsprune prune-hf`` and ``lsprune eval-ppl``: local Hugging Face model folders in and out.

Only local files are read (``local_files_only=True`` and the Hub's offline switches set before transformers
is imported): nothing is downloaded. Text is tokenized with the folder's own tokenizer, without special
tokens, and cut into consecutive windows of ``--seq-len`` tokens (the calibration convention of SparseGPT,
Wanda and LLM-Pruner: windows of running text).
"""
from __future__ import annotations

import math
import os
import time

from .errors import CLIError, InterruptedAfterWrite, one_line
from .io import Outputs

#: Files of which at least one makes a folder hold a tokenizer transformers can read.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json",
                   "spiece.model")
DTYPES = ("auto", "float32", "bfloat16", "float16")
HF_METHODS = ("forward", "omp", "backward", "magnitude", "random", "wanda_sp", "flap")


def add_arguments(sub, common, damping: float) -> None:
    """The ``prune-hf`` and ``eval-ppl`` sub-commands."""
    h = sub.add_parser("prune-hf", parents=[common], help="prune a local Hugging Face transformers folder and write "
                                                          "a pruned folder")
    h.add_argument("model_dir", help="local transformers model folder (config.json, weights, tokenizer)")
    h.add_argument("--calib", required=True, help="UTF-8 text file of calibration text")
    amount = h.add_mutually_exclusive_group(required=True)
    amount.add_argument("--ratio", type=float, help="fraction of heads (KV groups) and MLP neurons removed per block")
    amount.add_argument("--budget", help="global budget: flops=F or params=P (a bare fraction means FLOPs)")
    h.add_argument("--heads", action="store_true", help="prune attention heads (KV groups under GQA)")
    h.add_argument("--mlp", action="store_true", help="prune MLP neurons (default: both kinds when neither is given)")
    h.add_argument("--method", choices=HF_METHODS, default="forward")
    h.add_argument("--no-refit", action="store_true", help="keep the consumers' original weights on the kept channels")
    h.add_argument("--targets", choices=("layer", "original"), default="layer",
                   help="what a re-fitted consumer reproduces (see prune(targets=))")
    h.add_argument("--damping", type=float, default=damping)
    h.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence (default 512)")
    h.add_argument("--max-sequences", type=int, default=128, help="calibration sequences used at most (default 128)")
    h.add_argument("--batch-size", type=int, default=8, help="sequences per calibration batch (default 8)")
    h.add_argument("--device", default=None, help="where calibration runs, e.g. cpu or cuda (default cpu)")
    h.add_argument("--dtype", choices=DTYPES, default="auto", help="dtype the model is loaded and pruned in "
                                                                   "(auto: the folder's)")
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--memory-limit", default="auto", help="memory guard, as for 'lsprune prune'")
    h.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="seconds of channel selection per unit")
    h.add_argument("--round-to", default=None, metavar="N|KIND=N,...",
                   help="aligned widths: kept counts multiples of N, or per kind, e.g. mlp=64,heads=2 (heads count "
                        "KV groups under GQA)")
    h.add_argument("--reconstruct", nargs="?", const="", default=None, metavar="KEY=VALUE,...",
                   help="block reconstruction after LS selection (label-free), with the defaults or e.g. "
                        "steps=50,lr=1e-3,window=sublayer (see lsprune.torch.ReconstructOptions)")
    h.add_argument("-o", "--output", required=True, help="the pruned model folder to write")
    h.add_argument("--overwrite", action="store_true", help="replace an output folder that is not empty")

    e = sub.add_parser("eval-ppl", parents=[common], help="perplexity of a causal LM folder (dense or pruned) on a "
                                                          "text file")
    e.add_argument("model_dir", help="local transformers causal LM folder (dense, or written by prune-hf)")
    e.add_argument("--text", required=True, help="UTF-8 text file")
    e.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    e.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: --seq-len)")
    e.add_argument("--batch-size", type=int, default=8, help="windows run at once (default 8)")
    e.add_argument("--device", default=None, help="e.g. cpu or cuda (default cpu)")
    e.add_argument("--dtype", choices=DTYPES, default="auto")


# ---------------------------------------------------------------------------------------------- shared
def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read local folders only, whatever the code paths below do
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401

        import lsprune.torch as lt
    except ImportError as e:
        raise CLIError("this command needs PyTorch and transformers: pip install torch transformers") from e
    return lt


def _check_model_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise CLIError(f"MODEL_DIR {path!r} is not a folder")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CLIError(f"MODEL_DIR {path!r} is not a transformers model folder (no config.json)")
    if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise CLIError(f"MODEL_DIR {path!r} holds no tokenizer ({', '.join(TOKENIZER_FILES[:2])}, ...): the text "
                       "is tokenized with the folder's own tokenizer; save it there with tokenizer.save_pretrained")


def _read_text(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise CLIError(f"{what} {path!r} is not a file")
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8")
    except UnicodeDecodeError as e:
        raise CLIError(f"{what} {path!r} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise CLIError(f"cannot read {what} {path!r}: {one_line(e)}") from e


def _config_and_class(model_dir: str):
    from lsprune.torch.pretrained import model_class, read_config

    try:
        config = read_config(model_dir)
        return config, model_class(config)
    except ValueError as e:
        raise CLIError(one_line(e)) from e


def _tokenize(model_dir: str, text: str):
    """The folder's tokenizer applied to ``text`` without special tokens: a 1-D int64 tensor."""
    import torch
    import transformers

    try:
        tok = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError, ImportError) as e:
        raise CLIError(f"cannot load the tokenizer of {model_dir!r}: {one_line(e)}") from e
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return tok, torch.tensor(ids, dtype=torch.int64)


def _check_seq_len(seq_len: int, config, minimum: int = 1) -> None:
    if seq_len < minimum:
        raise CLIError(f"--seq-len must be >= {minimum}, got {seq_len}")
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(limit, int) and seq_len > limit:
        raise CLIError(f"--seq-len {seq_len} is longer than the model's {limit} positions (max_position_embeddings)")


def _dtype(name: str, config):
    import torch

    if name != "auto":
        return getattr(torch, name)
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) else torch.float32


def _device(text):
    """``--device``: None (CPU) or a device torch knows and has."""
    import torch

    if text is None:
        return None
    try:
        dev = torch.device(text)
    except RuntimeError as e:
        raise CLIError(f"--device {text!r}: {one_line(e)}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {text!r}: CUDA is not available here")
    return dev


def _load(lt, model_dir: str, dtype, device=None):
    try:
        return lt.load_pretrained(model_dir, dtype=dtype, device=device)
    except (OSError, RuntimeError) as e:  # unreadable weights, shapes transformers refuses
        raise CLIError(f"cannot load the model in {model_dir!r}: {one_line(e)}") from e


# ---------------------------------------------------------------------------------------------- prune-hf
def prune_hf(args) -> int:
    _check_prune_hf_args(args)
    lt = _transformers()
    config, cls = _config_and_class(args.model_dir)
    _check_seq_len(args.seq_len, config)
    _device(args.device)
    _check_reprunable(args.model_dir)
    tok, ids = _tokenize(args.model_dir, _read_text(args.calib, "--calib"))
    calib = calibration_batches(ids, args.seq_len, args.max_sequences, args.batch_size)
    model = _load(lt, args.model_dir, _dtype(args.dtype, config))

    t = time.perf_counter()
    pruned, report = lt.prune(model, calib, **hf_prune_options(args))
    seconds = time.perf_counter() - t
    del model  # pruned in place: the same object as pruned
    pruned.to("cpu")  # the pruned model is this command's own: saved from host memory
    outputs = Outputs()
    try:
        tmp = outputs.new_folder(args.output)
        record = lt.save_pretrained(pruned, report, tmp)
        tok.save_pretrained(tmp)
        outputs.commit()
    except BaseException:
        outputs.abort()
        raise
    try:
        if not args.quiet:
            print(report)
            print(f"pruned in {seconds:.1f}s on {len(calib)} batches of {args.seq_len}-token sequences; saved to "
                  f"{args.output}")
            print(_load_hint(record, cls))
    except KeyboardInterrupt:
        raise InterruptedAfterWrite() from None
    return 0


def _check_prune_hf_args(args) -> None:
    """Everything that can be checked before transformers is imported: numbers, folders, output paths."""
    if args.ratio is not None and not 0.0 <= args.ratio < 1.0:
        raise CLIError(f"--ratio must be in [0, 1), got {args.ratio}")
    if args.budget is not None:
        budget_spec(args.budget)
    for name in ("max_sequences", "batch_size"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.seq_len < 2:
        raise CLIError(f"--seq-len must be >= 2, got {args.seq_len}")
    if args.time_budget is not None and not (math.isfinite(args.time_budget) and args.time_budget > 0):
        raise CLIError(f"--time-budget must be a number of seconds > 0, got {args.time_budget}")
    from .commands import _memory_limit, parse_round_to

    _memory_limit(args.memory_limit)
    parse_round_to(args.round_to)
    parse_reconstruct(args.reconstruct)
    _check_model_dir(args.model_dir)
    if not os.path.isfile(args.calib):
        raise CLIError(f"--calib {args.calib!r} is not a file")
    check_output_folder(args.output, {"MODEL_DIR": args.model_dir, "--calib": args.calib}, args.overwrite)


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies below it (after resolving links)."""
    p, f = os.path.realpath(path), os.path.realpath(folder)
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)


def check_output_folder(output: str, inputs: dict, overwrite: bool) -> None:
    """The output folder: a new or empty folder (or ``overwrite``) in an existing folder, not an input nor
    holding one, not inside the model folder (``inputs``: option name -> path)."""
    if os.path.lexists(output) and not os.path.isdir(output):
        raise CLIError(f"-o {output!r} exists and is not a folder")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise CLIError(f"the folder of -o {output!r} does not exist")
    for name, path in inputs.items():
        if _inside(path, output):
            raise CLIError(f"-o {output!r} is or holds {name} {path!r}: the run would overwrite its input; give "
                           "another folder")
        if os.path.isdir(path) and _inside(output, path):
            raise CLIError(f"-o {output!r} lies inside {name} {path!r}: the run would change its input; give a "
                           "folder outside it")
    if os.path.isdir(output) and os.listdir(output) and not overwrite:
        raise CLIError(f"-o {output!r} exists and is not empty: add --overwrite to replace it")


def _check_reprunable(model_dir: str) -> None:
    """A pruned folder whose config keeps the original widths cannot be pruned again (its structure would be
    relative to a model its config does not describe)."""
    from lsprune.torch.pretrained import STRUCTURE, _record

    if os.path.isfile(os.path.join(model_dir, STRUCTURE)):
        try:
            widths = _record(model_dir).get("config_widths")
        except (ValueError, OSError) as e:
            raise CLIError(one_line(e)) from e
        if widths != "pruned":
            raise CLIError(f"{model_dir!r} is a pruned folder whose blocks have different widths; prune the "
                           "original model again instead")


def calibration_batches(ids, seq_len: int, max_sequences: int, batch_size: int) -> list:
    """Consecutive, non-overlapping windows of ``seq_len`` tokens (at most ``max_sequences``), in batches of
    ``batch_size``: dicts of ``input_ids`` and ``attention_mask``, shape (B, seq_len)."""
    import torch

    n = min(int(ids.numel()) // seq_len, max_sequences)
    if n == 0:
        raise CLIError(f"the calibration text gives {ids.numel()} tokens, fewer than one sequence of --seq-len "
                       f"{seq_len}: give more text or a shorter --seq-len")
    windows = ids[:n * seq_len].reshape(n, seq_len)
    return [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(batch_size)]


def budget_spec(text: str):
    """``--budget``: ``flops=F``, ``params=P`` or a bare fraction F (FLOPs); an ``lsprune.Budget``."""
    import lsprune

    kind, sep, value = text.partition("=")
    kind, value = (kind.strip().lower(), value) if sep else ("flops", kind)
    try:
        f = float(value)
    except ValueError:
        f = None
    if kind not in ("flops", "params") or f is None or not 0.0 < f <= 1.0:
        raise CLIError(f"--budget {text!r}: give flops=F or params=P with a fraction F in (0, 1]")
    return lsprune.Budget(**{kind: f})


def parse_reconstruct(text):
    """``--reconstruct [KEY=VALUE,...]`` -> ``prune(reconstruct=)`` (None: off; ``""``: the defaults), checked by
    :class:`lsprune.torch.ReconstructOptions` so that a bad value fails before any work."""
    if text is None:
        return None
    import dataclasses

    from lsprune.torch.reconstruct import ReconstructOptions, as_reconstruct

    kinds = {f.name: type(f.default) for f in dataclasses.fields(ReconstructOptions)}
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in kinds:
            raise CLIError(f"--reconstruct: {item!r} is not KEY=VALUE with KEY one of {', '.join(kinds)}")
        try:
            out[key] = _typed(value.strip(), kinds[key])
        except ValueError:
            raise CLIError(f"--reconstruct: {key}={value!r} is not a {kinds[key].__name__}") from None
    try:
        as_reconstruct(out)
    except (TypeError, ValueError) as e:
        raise CLIError(f"--reconstruct: {one_line(e)}") from e
    return out


def _typed(value: str, kind: type):
    if kind is bool:
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(value)
        return value.lower() in ("true", "1")
    return kind(value)


def hf_prune_options(args) -> dict:
    """The keyword arguments of ``lsprune.torch.prune`` from the prune-hf arguments (the one place)."""
    from .commands import _memory_limit, parse_round_to

    kinds = [k for k, on in (("mlp", args.mlp), ("heads", args.heads)) if on] or None
    # inplace: the model is this command's own copy, loaded from the folder (no second copy in memory)
    kw = dict(strategy="blocks", units=kinds, inplace=True, method=args.method, targets=args.targets,
              damping=args.damping, device=args.device, seed=args.seed, progress=not args.quiet,
              memory_limit=_memory_limit(args.memory_limit), time_budget=args.time_budget)
    if args.round_to is not None:
        kw["round_to"] = parse_round_to(args.round_to)
    if args.reconstruct is not None:
        kw["reconstruct"] = parse_reconstruct(args.reconstruct)
    if args.no_refit:
        kw["refit"] = False
    if args.ratio is not None:
        kw["ratio"] = args.ratio
    else:
        kw["budget"] = budget_spec(args.budget)
    return kw


def _load_hint(record: dict, cls) -> str:
    if record["config_widths"] == "pruned":
        auto = "AutoModelForCausalLM" if _causal(cls) else "AutoModel"
        return (f"every block has the same widths: config.json carries them, so {auto}.from_pretrained(OUT) loads "
                "the pruned model too (as does lsprune.torch.load_pretrained(OUT))")
    return (f"config.json keeps the original widths ({one_line(record.get('reason') or '')}): load with "
            "lsprune.torch.load_pretrained(OUT); plain from_pretrained refuses the folder (size mismatch)")


def _causal(cls) -> bool:
    from lsprune.torch.pretrained import is_causal_lm

    return is_causal_lm(cls)


# ---------------------------------------------------------------------------------------------- eval-ppl
def eval_ppl(args) -> int:
    stride = args.seq_len if args.stride is None else args.stride
    if args.seq_len < 2:
        raise CLIError(f"--seq-len must be >= 2, got {args.seq_len}")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 1 <= stride <= args.seq_len:
        raise CLIError(f"--stride must be in [1, --seq-len {args.seq_len}] (a larger one skips tokens), got {stride}")
    _check_model_dir(args.model_dir)
    lt = _transformers()
    config, cls = _config_and_class(args.model_dir)
    if not _causal(cls):
        raise CLIError(f"{args.model_dir!r} holds a {cls.__name__}, not a causal language model: perplexity needs "
                       "next-token predictions")
    _check_seq_len(args.seq_len, config, 2)
    _, ids = _tokenize(args.model_dir, _read_text(args.text, "--text"))
    if ids.numel() < 2:
        raise CLIError(f"--text {args.text!r} gives {ids.numel()} tokens; perplexity needs at least 2")
    model = _load(lt, args.model_dir, _dtype(args.dtype, config), _device(args.device))
    ppl, scored, n_windows = perplexity(model, ids, args.seq_len, stride, args.batch_size)
    print(f"perplexity {ppl:.6g} ({scored} tokens scored in {n_windows} windows of <= {args.seq_len} tokens, "
          f"stride {stride})")
    return 0


def windows(n: int, seq_len: int, stride: int) -> list:
    """``(begin, end, first)`` of every window over ``n`` tokens that scores something: tokens ``[begin, end)``
    are read, positions ``[first, end)`` scored. Every position after the first is scored once, in the first
    window that holds it and at least one token before it (with ``stride == seq_len`` a window's first token
    has no context and is not scored)."""
    out, done = [], 1  # positions < done are scored (position 0 never is)
    for begin in range(0, max(n - 1, 0), stride):
        end = min(begin + seq_len, n)
        first = max(done, begin + 1)
        if first < end:
            out.append((begin, end, first))
            done = end
        if end == n:
            break
    return out


def perplexity(model, ids, seq_len: int, stride: int, batch_size: int = 8):
    """exp of the mean next-token negative log-likelihood of ``ids`` (1-D) over :func:`windows` (windows of
    ``seq_len`` tokens starting every ``stride`` tokens), run ``batch_size`` windows of equal length at a time;
    the NLL is summed in float64.

    Returns
    -------
    (perplexity, tokens scored, windows run)
    """
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    todo = windows(int(ids.numel()), seq_len, stride)
    total, scored, i = 0.0, 0, 0
    with torch.no_grad():
        while i < len(todo):
            j, length = i + 1, todo[i][1] - todo[i][0]  # consecutive windows of one length: one batch
            while j < len(todo) and j - i < batch_size and todo[j][1] - todo[j][0] == length:
                j += 1
            group = todo[i:j]
            x = torch.stack([ids[b:e] for b, e, _ in group]).to(device)
            logits = model(input_ids=x, use_cache=False).logits
            for row, (b, e, first) in enumerate(group):
                pred = logits[row, first - 1 - b:e - 1 - b].float()
                nll = F.cross_entropy(pred, ids[first:e].to(device), reduction="none")
                total += float(nll.double().sum())
                scored += e - first
            i += len(group)
    return math.exp(total / scored), scored, len(todo)
