"""PyTorch front-end of lsprune: structured pruning of trained networks by layerwise least squares.

* :func:`prune` — prune a model on unlabeled calibration data; returns ``(pruned_model, report)``.
* :func:`factorize` — replace Linear/Conv2d layers by LS-fitted low-rank factorizations; ``(new_model, report)``.
* :class:`GradualPruner` — prune while training: LS prunes at scheduled steps, the optimizer's state shrunk alike.
* :func:`find_pairs` — list the prunable producer -> consumer pairs of a model (and why others are skipped).
* :func:`save_pruned` / :func:`load_pruned` — a pruned model as safetensors + structure, loaded into a fresh model.
* :func:`save_pretrained` / :func:`load_pretrained` — a pruned transformers model as a Hugging Face folder
  (config with the new widths where they are uniform, weights, structure) and back.
* :func:`find_units` — the attention-head and MLP units of a transformer block.
* :func:`find_residual_blocks` — the residual blocks of a CNN that ``prune(reconstruct=)`` fits.
* :func:`apply_structure` — shrink a freshly built model to a report's channel counts (to load a pruned state_dict).
* :func:`count_flops_params` — parameters and multiply-accumulates (MACs) of a model.
* :class:`ReconstructOptions` — settings of block reconstruction after LS selection (``prune(reconstruct=)``);
  :class:`WindowReport` its per-window record, :class:`ReconstructionWarning` a window stopped on a NaN/Inf loss.
* :class:`PruneReport`, :class:`PairReport`, :class:`FactorizeReport`, :class:`LayerFactorReport`, :class:`Pair`,
  :class:`CoupledGroup` (layers that share one channel index), :class:`SkippedPair`, :class:`PairSearch`;
  :class:`Budget` (= :class:`lsprune.Budget`).
* :class:`MemoryLimitError` (the memory guard refused), :class:`DistributedError` (another rank failed),
  :class:`NoPrunablePairsError` (nothing to prune; carries the skipped candidates and their reasons).

Only this subpackage imports torch; ``import lsprune`` works without it.
"""
try:
    import torch  # noqa: F401
except ImportError as e:  # pragma: no cover
    raise ImportError("lsprune.torch needs PyTorch: pip install 'lsprune[torch]'") from e

from lsprune.budget import Budget

from .api import DEFAULT_MAX_POSITIONS, find_pairs, prune
from .distributed import DistributedError
from .factor_report import FactorizeReport, LayerFactorReport
from .factorize import factorize
from .flops import FlopsCount, count_flops_params
from .gradual import GradualPruner
from .graph import NotTraceableError
from .memory import MemoryLimitError
from .pairs import CoupledGroup, NoPrunablePairsError, Pair, PairSearch, SkippedPair
from .report import PairReport, PruneReport
from .blockwise import BlocksNotFoundError
from .layouts import Unit, find_units
from .pretrained import load_pretrained, save_pretrained
from .reconstruct import ReconstructionWarning, ReconstructOptions
from .reconstruct_cnn import find_residual_blocks
from .report import WindowReport
from .saving import load_pruned, save_pruned
from .surgery import apply_structure

__all__ = ["prune", "factorize", "Budget", "find_pairs", "apply_structure", "count_flops_params", "FlopsCount", "Pair",
           "PairSearch", "SkippedPair", "PairReport", "PruneReport", "FactorizeReport", "LayerFactorReport",
           "NotTraceableError", "MemoryLimitError", "DistributedError", "DEFAULT_MAX_POSITIONS", "save_pruned",
           "load_pruned", "find_units", "Unit", "BlocksNotFoundError", "NoPrunablePairsError", "CoupledGroup",
           "GradualPruner", "save_pretrained", "load_pretrained", "ReconstructOptions", "ReconstructionWarning",
           "WindowReport", "find_residual_blocks"]
