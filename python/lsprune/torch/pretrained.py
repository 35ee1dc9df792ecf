"""Hugging Face model folders in and out: a pruned transformers model written as a folder that loads again.

A folder written by :func:`save_pretrained` holds ``config.json`` (and ``generation_config.json``),
``model.safetensors`` and ``structure.json`` (the prune report, as :func:`.saving.save_pruned` writes it,
plus a ``"pretrained"`` record). Which widths ``config.json`` carries is decided here:

* **pruned** — every block has the same MLP width and the same head counts: the config gets the new widths
  (``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``, an explicit ``head_dim``, ...)
  and, where a re-fitted consumer gained a bias (the LS intercept), the family's bias flag
  (``mlp_bias``/``attention_bias``) with zero biases for the other projections it covers. This is only
  chosen when the architecture built from that config (on the meta device, nothing allocated) has exactly
  the pruned model's parameter names and shapes, so plain ``from_pretrained`` loads every tensor and
  nothing else: the outputs are the pruned model's.
* **original** — widths differ between blocks, or the family cannot express the new widths in its config
  (BERT/GPT-2/OPT derive the head size from ``hidden_size / num_heads``): the config keeps the original
  widths and only :func:`load_pretrained` (original config -> :func:`apply_structure` -> weights) loads the
  folder. Plain ``from_pretrained`` then meets tensors of other shapes and raises (transformers refuses a
  size mismatch unless ``ignore_mismatched_sizes=True``) instead of loading something else.

transformers is imported lazily: it is not a dependency of lsprune.
"""
from __future__ import annotations

import copy
import json
import os
from contextlib import contextmanager
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .blockwise import BlocksNotFoundError, block_units, find_blocks
from .report import PruneReport
from .saving import STRUCTURE, WEIGHTS, load_weights, read_structure, write_pruned
from .surgery import Backup, apply_structure, linear_like, weight_rows

CONFIG = "config.json"
GENERATION = "generation_config.json"
RECORD = "pretrained"  # key of the folder record in structure.json
#: Config fields that hold the MLP width, the query heads and the key/value heads, across families.
MLP_FIELDS = ("intermediate_size", "ffn_dim", "n_inner", "d_ff", "ffn_hidden_size")
HEAD_FIELDS = ("num_attention_heads", "n_head", "num_heads")
KV_FIELDS = ("num_key_value_heads", "num_kv_heads", "n_head_kv")
#: The family's bias flag for each unit kind (Llama, Mistral, Qwen2 name them so).
BIAS_FLAGS = {"mlp": "mlp_bias", "heads": "attention_bias"}


# ---------------------------------------------------------------------------------------------- classes
def model_class(config):
    """The transformers class a folder's config describes: its ``architectures`` entry when transformers has
    it, else the causal LM of its model type, else the bare model (``AutoModel``)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    auto = transformers.AutoModelForCausalLM if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else \
        transformers.AutoModel
    try:
        return auto._model_mapping[type(config)]
    except KeyError:
        raise ValueError(f"transformers has no model class for config {type(config).__name__} "
                         f"(model_type {config.model_type!r})") from None


def is_causal_lm(cls) -> bool:
    """Whether ``cls`` is a causal language model (what ``AutoModelForCausalLM`` builds)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return cls.__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


# ---------------------------------------------------------------------------------------------- config widths
def unit_widths(model: nn.Module) -> Dict[str, set]:
    """Per unit kind, the distinct ``(channels, group_size, heads_per_channel)`` over the model's blocks;
    empty when the model has no blocks lsprune recognises."""
    try:
        name, blocks = find_blocks(model)
    except BlocksNotFoundError:
        return {}
    out: Dict[str, set] = {}
    for _, units in block_units(blocks, name, ("mlp", "heads")):
        for u in units:
            out.setdefault(u.kind, set()).add((u.channels, u.group_size, u.heads_per_channel))
    return out


def _set_present(cfg, fields, value) -> bool:
    """Sets the first of ``fields`` the config has (GPT-2's ``n_inner`` may be None); True if one was."""
    for f in fields:
        if f in cfg.to_dict():
            setattr(cfg, f, value)
            return True
    return False


def width_config(config, widths: Dict[str, set]) -> Tuple[Optional[object], str]:
    """A copy of ``config`` with the uniform widths of ``widths`` (see :func:`unit_widths`); (None, why) when a
    kind's width differs between blocks or the config has no field for it."""
    cfg = copy.deepcopy(config)
    for kind, ws in sorted(widths.items()):
        what = "MLP neurons" if kind == "mlp" else "head channels (heads or KV groups)"
        if len(ws) != 1:
            return None, f"the blocks keep different numbers of {what}: {sorted(w[0] for w in ws)}"
        channels, group, per = next(iter(ws))
        if kind == "mlp":
            ok = _set_present(cfg, MLP_FIELDS, channels)
        else:
            ok = _set_present(cfg, HEAD_FIELDS, channels * per)
            _set_present(cfg, KV_FIELDS, channels)
            cfg.head_dim = group // per  # explicit: families that read it do not recompute hidden / heads
        if not ok:
            return None, f"{type(config).__name__} has no field for its {what}"
    return cfg, ""


def _invalid(cfg) -> str:
    """Why transformers' own validation refuses ``cfg`` ("" if it accepts it). transformers 5 checks configs
    when they are saved, e.g. Llama's ``hidden_size`` must be a multiple of ``num_attention_heads`` even with an
    explicit ``head_dim``: 6 of 8 heads of a 256-wide model cannot be put in its config."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # transformers 4: no validation on save
        StrictDataclassError = ValueError
    validate = getattr(cfg, "validate", None)
    if validate is None:
        return ""
    try:
        validate()
    except (StrictDataclassError, ValueError) as e:
        cause = e.__cause__ if e.__cause__ is not None else e  # the validator's own message
        return f"transformers refuses the new widths in {type(cfg).__name__}: {cause}"
    return ""


@contextmanager
def _quiet_transformers():
    """transformers logs warnings and shows progress bars while it builds and loads models; lsprune reports
    what matters itself."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _meta_shapes(cls, cfg) -> Dict[str, Tuple[int, ...]]:
    """Parameter and buffer shapes of ``cls`` built from ``cfg`` on the meta device (nothing allocated)."""
    with torch.device("meta"), _quiet_transformers():
        m = cls._from_config(copy.deepcopy(cfg))
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def _bias_owner_kinds(model: nn.Module, names) -> Optional[set]:
    """The unit kinds whose modules own the bias tensors ``names``; None if one is not in a unit."""
    try:
        bname, blocks = find_blocks(model)
    except BlocksNotFoundError:
        return None
    owner = {}
    for _, units in block_units(blocks, bname, ("mlp", "heads")):
        for u in units:
            for m in u.modules:
                owner[f"{m}.bias"] = u.kind
    kinds = {owner.get(n) for n in names}
    return None if None in kinds else kinds


def plain_config(model: nn.Module, config) -> Tuple[Optional[object], List[str], str]:
    """The config plain ``from_pretrained`` rebuilds the pruned model from, if there is one.

    Returns
    -------
    (config or None, zero-bias names, reason)
        The config with the new widths (and bias flags), the bias parameters to add as zeros (the family's
        flag gives every projection of the kind a bias; the LS re-fit gave only the consumer one), and,
        when there is no such config, why not.
    """
    widths = unit_widths(model)
    if not widths:
        return None, [], "no transformer blocks lsprune recognises"
    cfg, why = width_config(config, widths)
    if cfg is None or (why := _invalid(cfg)):
        return None, [], why
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    cls = type(model)
    want = _meta_shapes(cls, cfg)
    extra = [k for k in have if k not in want]
    if extra:  # biases from the LS intercept: set the family's flag for their kind, if it has one
        kinds = _bias_owner_kinds(model, extra) if all(k.endswith(".bias") for k in extra) else None
        flags = [BIAS_FLAGS[k] for k in sorted(kinds or ())]
        if not kinds or not all(f in cfg.to_dict() for f in flags):
            return None, [], f"the config cannot give {extra[0]} (a bias the LS re-fit added)"
        for f in flags:
            setattr(cfg, f, True)
        want = _meta_shapes(cls, cfg)
    modules = dict(model.named_modules())
    zeros = [k for k in want if k not in have]
    bad = [k for k in zeros if not (k.endswith(".bias") and linear_like(modules.get(k[:-5], nn.Identity())))]
    bad += [k for k in have if want.get(k) != have[k]]
    if bad:
        return None, [], f"{bad[0]}: the config built from the new widths does not give its shape"
    return cfg, zeros, ""


# ---------------------------------------------------------------------------------------------- save / load
def save_pretrained(model: nn.Module, report: PruneReport, folder) -> dict:
    """Writes a pruned transformers model as a Hugging Face folder: ``config.json`` (the new widths where every
    block has the same ones, see the module doc), ``generation_config.json`` for generative models,
    ``model.safetensors`` and ``structure.json``. Load it with :func:`load_pretrained`. The tokenizer is not
    written here (``tokenizer.save_pretrained(folder)``; ``lsprune prune-hf`` does it).

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The pruned model :func:`prune` returned (its ``config`` is the original one). Left unchanged (zero
        biases added for the config's bias flag are removed again after writing).
    report : PruneReport
        Its report.
    folder : str or os.PathLike
        Created if needed; the files are written atomically one by one (``lsprune prune-hf`` writes a
        temporary folder and renames it, for all-or-nothing).

    Returns
    -------
    dict : the ``"pretrained"`` record stored in ``structure.json`` (``config_widths``: ``"pruned"`` or
    ``"original"``, ``reason`` when original, ``architecture``, ``zero_biases``).
    """
    import transformers

    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if not isinstance(report, PruneReport):
        raise TypeError(f"report must be the PruneReport of the prune, got {type(report).__name__}")
    cfg, zeros, reason = plain_config(model, model.config)
    record = {"config_widths": "pruned" if cfg is not None else "original", "architecture": type(model).__name__,
              "zero_biases": zeros}
    if cfg is None:
        cfg, record["reason"] = copy.deepcopy(model.config), reason
    cfg.architectures = [type(model).__name__]
    # the weights' dtype (transformers 5 names the field dtype, 4 torch_dtype)
    setattr(cfg, "torch_dtype" if "torch_dtype" in cfg.to_dict() else "dtype", next(model.parameters()).dtype)
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    cfg.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(folder)
    modules = dict(model.named_modules())
    owners = [modules[k[:-5]] for k in zeros]
    backup = Backup(owners)
    try:
        with torch.no_grad():
            for m in owners:
                w = m.weight
                m.bias = nn.Parameter(w.new_zeros(weight_rows(m, out=True)), requires_grad=w.requires_grad)
        write_pruned(model, report, folder, {RECORD: record})
    finally:
        backup.restore()
    return record


def load_pretrained(folder, *, device=None, dtype=None) -> nn.Module:
    """Loads a Hugging Face model folder: one written by :func:`save_pretrained` (``lsprune prune-hf``), with
    the pruned widths of every block, or a plain (dense) one. Reads local files only; nothing runs from the
    folder and nothing is downloaded.

    Pruned folders: the model is built from ``config.json`` (its class from ``architectures``), shrunk to
    ``structure.json`` when the config keeps the original widths (:func:`apply_structure`), and the weights are
    loaded strictly after their checksum and shapes are checked. Its outputs are the pruned model's;
    ``generate()`` works (KV cache, SDPA and eager attention).

    Parameters
    ----------
    folder : str or os.PathLike
    device : str or torch.device, optional
        Where the model is put (default CPU).
    dtype : torch.dtype, optional
        Default: the dtype the folder's config records (that of the saved weights).

    Returns
    -------
    transformers.PreTrainedModel, in eval mode.

    Raises
    ------
    ValueError
        Not a transformers folder, a damaged or mismatched ``structure.json``/``model.safetensors``.
    """
    folder = os.fspath(folder)
    if not os.path.isfile(os.path.join(folder, CONFIG)):
        raise ValueError(f"{folder!r} is not a transformers model folder (no {CONFIG})")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    config = read_config(folder)
    cls = model_class(config)
    if not os.path.isfile(os.path.join(folder, STRUCTURE)):  # a dense folder
        with _quiet_transformers():
            model = cls.from_pretrained(folder, local_files_only=True, **({"dtype": dtype} if dtype else {}))
        return model.to(device or "cpu").eval()
    report = read_structure(folder)
    record = _record(folder)
    with _quiet_transformers():
        model = cls._from_config(config, **({"dtype": dtype} if dtype else {}))
    if record.get("config_widths") != "pruned":
        apply_structure(model, report)
    load_weights(model, folder)
    if model.can_generate() and os.path.isfile(os.path.join(folder, GENERATION)):  # as from_pretrained does
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
    return model.to(device or "cpu").eval()


def read_config(folder: str):
    """The folder's config (local files only); a ValueError when transformers cannot read it."""
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{folder!r}: transformers cannot read its {CONFIG}: {type(e).__name__}: {e}") from e


def _record(folder: str) -> dict:
    with open(os.path.join(folder, STRUCTURE), "rb") as f:
        rec = json.loads(f.read().decode("utf-8")).get(RECORD, {})
    if not isinstance(rec, dict) or rec.get("config_widths", "original") not in ("pruned", "original"):
        raise ValueError(f"{STRUCTURE} in {folder}: the {RECORD!r} record is damaged")
    return rec


__all__ = ["save_pretrained", "load_pretrained", "WEIGHTS"]
