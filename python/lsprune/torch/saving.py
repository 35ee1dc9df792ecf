"""Saving a pruned model as safetensors + its structure, and loading it into a freshly built model.

A pruned Hugging Face model no longer matches its config (layers have different head counts and MLP
widths), so ``from_pretrained`` cannot rebuild it. :func:`save_pruned` writes the weights
(``model.safetensors``) and the prune report (``structure.json``); :func:`load_pruned` shrinks a model
built from the original config with :func:`apply_structure` and loads the weights. No pickle is involved.
"""
from __future__ import annotations

import json
import os
import tempfile

import torch.nn as nn

from .report import PruneReport
from .surgery import Backup, apply_structure

WEIGHTS = "model.safetensors"
STRUCTURE = "structure.json"


def _atomic(path: str, write) -> None:
    """Writes ``path`` through a temporary file in the same folder: an interrupted save leaves the old file."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".lsprune-", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_pruned(model: nn.Module, report: PruneReport, folder) -> None:
    """Saves a pruned model to ``folder`` (created if needed): ``model.safetensors`` and ``structure.json``.

    Parameters
    ----------
    model : nn.Module
        The pruned model :func:`prune` returned.
    report : PruneReport
        Its report (the structure: which units/pairs lost how many channels).
    folder : str or os.PathLike
    """
    from safetensors.torch import save_model

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(report, PruneReport):
        raise TypeError(f"report must be the PruneReport of the prune, got {type(report).__name__}")
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    _atomic(os.path.join(folder, WEIGHTS), lambda p: save_model(model, p))
    text = report.to_json()

    def write_text(p):
        with open(p, "w", encoding="utf-8") as f:
            f.write(text)

    _atomic(os.path.join(folder, STRUCTURE), write_text)


def load_pruned(model: nn.Module, folder) -> nn.Module:
    """Loads a model saved by :func:`save_pruned` into ``model``, built fresh from the original
    architecture (e.g. ``LlamaForCausalLM(config)``): shrinks it to the saved structure and loads the
    weights (strict). On any error ``model`` is left as it was.

    Returns
    -------
    nn.Module : ``model``.
    """
    from safetensors.torch import load_model

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    folder = os.fspath(folder)
    with open(os.path.join(folder, STRUCTURE), encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{STRUCTURE} in {folder} is not valid JSON: {e}") from None
    path = os.path.join(folder, WEIGHTS)
    backup = Backup(list(model.modules()))
    try:
        apply_structure(model, PruneReport.from_dict(data))
        _check_shapes(model, path)  # before any value is copied into the model's tensors
        load_model(model, path, strict=True)
    except BaseException:
        backup.restore()
        raise
    return model


def _check_shapes(model: nn.Module, path: str) -> None:
    from safetensors import safe_open

    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with safe_open(path, framework="pt") as f:
        for k in f.keys():
            if k not in want:
                raise ValueError(f"{WEIGHTS} holds {k!r}, which the model does not have: another architecture?")
            shape = tuple(f.get_slice(k).get_shape())
            if shape != want[k]:
                raise ValueError(f"{WEIGHTS}: {k} has shape {shape}, the model after the saved structure "
                                 f"{want[k]}: another architecture or config?")
