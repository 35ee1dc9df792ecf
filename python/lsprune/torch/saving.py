"""Saving a pruned model as safetensors + its structure, and loading it into a freshly built model.

A pruned Hugging Face model no longer matches its config (layers have different head counts and MLP
widths), so ``from_pretrained`` cannot rebuild it. :func:`save_pruned` writes the weights
(``model.safetensors``) and the prune report (``structure.json``); :func:`load_pruned` shrinks a model
built from the original config with :func:`apply_structure` and loads the weights. No pickle is involved.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch.nn as nn

from lsprune._atomic import atomic_write, sha256_file

from .report import PruneReport
from .surgery import Backup, apply_structure

WEIGHTS = "model.safetensors"
STRUCTURE = "structure.json"
WEIGHTS_SHA256 = "weights_sha256"  # key in structure.json


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
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(report, PruneReport):
        raise TypeError(f"report must be the PruneReport of the prune, got {type(report).__name__}")
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    write_pruned(model, report, folder)


def write_pruned(model: nn.Module, report: PruneReport, folder: str, extra: Optional[dict] = None) -> None:
    """``model.safetensors`` and ``structure.json`` (the report, the weights' checksum and ``extra``) into an
    existing ``folder``, each file atomically."""
    from safetensors.torch import save_model

    digest = []

    def write_weights(p):
        save_model(model, p)
        digest.append(sha256_file(p))

    atomic_write(os.path.join(folder, WEIGHTS), write_weights)
    # the weights' checksum: a corrupted file, or weights and structure from two different saves, are refused
    text = json.dumps({**report.to_dict(), **(extra or {}), WEIGHTS_SHA256: digest[0]}, indent=2)

    def write_text(p):
        with open(p, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(os.path.join(folder, STRUCTURE), write_text)


def load_pruned(model: nn.Module, folder) -> nn.Module:
    """Loads a model saved by :func:`save_pruned` into ``model``, built fresh from the original
    architecture (e.g. ``LlamaForCausalLM(config)``): shrinks it to the saved structure and loads the
    weights (strict). On any error ``model`` is left as it was.

    Returns
    -------
    nn.Module : ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    folder = os.fspath(folder)
    report = read_structure(folder)
    backup = Backup(list(model.modules()))
    try:
        apply_structure(model, report)
        load_weights(model, folder)
    except BaseException:
        backup.restore()
        raise
    return model


def load_weights(model: nn.Module, folder: str) -> None:
    """``model.safetensors`` of ``folder`` into ``model`` (strict), after checking every tensor's name and shape
    against the model, so that nothing is copied into a model of another architecture."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    path = os.path.join(folder, WEIGHTS)
    _check_shapes(model, path)  # before any value is copied into the model's tensors
    try:
        load_model(model, path, strict=True)
    except SafetensorError as e:
        raise ValueError(f"{WEIGHTS} in {folder} is not a readable safetensors file (truncated or "
                         f"corrupted?): {e}") from None


def read_structure(folder: str) -> PruneReport:
    """The saved structure, after checking the weights file against the checksum it records (files saved
    before the checksum existed are read without it)."""
    try:
        with open(os.path.join(folder, STRUCTURE), "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{STRUCTURE} in {folder} is not valid JSON (truncated or corrupted?): {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{STRUCTURE} in {folder} is not a prune structure")
    digest = data.get(WEIGHTS_SHA256)
    if digest is not None and sha256_file(os.path.join(folder, WEIGHTS)) != digest:
        raise ValueError(f"{WEIGHTS} in {folder} does not match its {STRUCTURE} (checksum mismatch): the file is "
                         "truncated or corrupted, or the two files come from different saves")
    try:
        return PruneReport.from_dict(data)
    except (TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{STRUCTURE} in {folder} is not a prune structure (corrupted?): {e!r}") from None


def _check_shapes(model: nn.Module, path: str) -> None:
    from safetensors import SafetensorError, safe_open

    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        f = safe_open(path, framework="pt")
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupted?): {e}") from None
    with f:
        for k in f.keys():
            if k not in want:
                raise ValueError(f"{WEIGHTS} holds {k!r}, which the model does not have: another architecture?")
            shape = tuple(f.get_slice(k).get_shape())
            if shape != want[k]:
                raise ValueError(f"{WEIGHTS}: {k} has shape {shape}, the model after the saved structure "
                                 f"{want[k]}: another architecture or config?")
