"""Model factories for the CLI tests (imported by `lsprune` subprocesses as 'cli_factories:<name>')."""
import torch.nn as nn


def small_cnn():
    import torch

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(24 * 4 * 4, 10)).eval()


def not_a_model():
    return 42


def no_pairs():
    """Two Linears with a LayerNorm between them: no prunable pair (the first mixes, the second is the output)."""
    import torch

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3)).eval()


def fails_loudly():
    raise RuntimeError("the factory failed\nsecond line of the message\nthird line")


def small_resnet():
    """The coupled-group tests' ResNet (two residual streams: coupled groups)."""
    import torch
    from torch_models import SmallResNet, init_bn

    torch.manual_seed(0)
    return init_bn(SmallResNet()).eval()
