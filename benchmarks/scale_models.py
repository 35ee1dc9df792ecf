"""Models and images of the wide-layer benchmarks (built by hand: no torchvision).

* :func:`vgg16`: torchvision's VGG-16 layout (13 3x3 convs in 5 stages, max pools, adaptive 7x7 average
  pool, classifier 512*7*7 -> 4096 -> 4096 -> classes), channel widths scaled by ``width``; torchvision's
  initialisation (Kaiming normal, fan-out, for the convs; N(0, 0.01) for the Linear layers).
* :func:`alexnet`: torchvision's AlexNet layout (classifier 9216 -> 4096 -> 4096 -> classes).
* :func:`vit_mlp`: a stack of ViT-B/32 MLPs (768 -> 3072 -> GELU -> 768, residual-free) on 50 tokens.
* :func:`convnext_t`: torchvision's ConvNeXt-T layout (4x4 patchify stem, stages of 3-3-9-3 blocks of widths
  96-192-384-768, LayerNorm2d + 2x2 stride-2 downsampling, pooled LayerNorm head), layer scale 1e-6.
* :func:`vit_b32`: a Hugging Face ViT-B/32 (12 layers, 12 heads, MLP 3072, 224² images, 7x7 patches + CLS)
  from ``ViTConfig`` (transformers is a benchmark dependency), random weights.
* :func:`images`: 224x224 crops of scikit-learn's two sample photographs (china.jpg, flower.jpg), ImageNet
  normalisation, so that the activations have natural-image statistics without a dataset download.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _init(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return model


class VGG16(nn.Module):
    def __init__(self, width: float = 1.0, n_classes: int = 1000, hidden: int = 4096):
        super().__init__()
        layers, cin = [], 3
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                c = max(1, int(v * width))
                layers += [nn.Conv2d(cin, c, 3, padding=1), nn.ReLU(inplace=True)]
                cin = c
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(cin * 49, hidden), nn.ReLU(True), nn.Dropout(),
            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(),
            nn.Linear(hidden, n_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class AlexNet(nn.Module):
    def __init__(self, n_classes: int = 1000):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(True), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(True), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(True), nn.MaxPool2d(3, 2))
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(), nn.Linear(256 * 36, 4096), nn.ReLU(True),
            nn.Dropout(), nn.Linear(4096, 4096), nn.ReLU(True), nn.Linear(4096, n_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class ViTMLPs(nn.Module):
    """``depth`` ViT-B/32 MLP blocks (fc1 768 -> 3072, GELU, fc2 3072 -> 768) applied in sequence to
    (batch, 50 tokens, 768) inputs; no residual, so that every fc1 -> fc2 pair is prunable."""

    def __init__(self, depth: int = 2, dim: int = 768, hidden: int = 3072):
        super().__init__()
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
                                      for _ in range(depth)])

    def forward(self, x):
        return self.blocks(x)


class ConvNeXtT(nn.Module):
    """ConvNeXt-T: stem, four stages of CNBlocks (benchmarks/coverage_models.py) with downsampling between."""

    def __init__(self, dims=(96, 192, 384, 768), depths=(3, 3, 9, 3), n_classes: int = 1000):
        super().__init__()
        from coverage_models import CNBlock, LayerNorm2d

        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0]))
        stages = []
        for i, (c, n) in enumerate(zip(dims, depths)):
            if i:
                stages.append(nn.Sequential(LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], c, 2, 2)))
            stages.append(nn.Sequential(*[CNBlock(c, layer_scale=1e-6) for _ in range(n)]))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], n_classes)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.head(self.norm(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)))


def convnext_t(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = ConvNeXtT()
    for m in model.modules():  # torchvision's initialisation
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return model.eval()


class ViTLogits(nn.Module):
    """A Hugging Face image classifier returning its logits tensor (for agreement and Torch-Pruning)."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, x):
        return self.hf(pixel_values=x).logits


def vit_b32(seed: int = 0) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    cfg = ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                    image_size=224, patch_size=32, num_labels=1000)
    return ViTForImageClassification(cfg).eval()


def vgg16(width: float = 1.0, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return _init(VGG16(width, **kw)).eval()


def alexnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _init(AlexNet()).eval()


def vit_mlp(depth: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = ViTMLPs(depth)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.normal_(m.bias, std=1e-6)
    return model.eval()


def images(n: int, seed: int = 0, size: int = 224) -> torch.Tensor:
    """``n`` random ``size``² crops (random flips) of the two scikit-learn sample photographs, (n, 3, size, size),
    normalised with the ImageNet mean and standard deviation."""
    from sklearn.datasets import load_sample_images

    photos = [np.asarray(im, dtype=np.float32) / 255.0 for im in load_sample_images().images]
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, size, size), dtype=np.float32)
    mean = np.array([0.485, 0.456, 0.406], dtype=np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], dtype=np.float32)[:, None, None]
    for i in range(n):
        im = photos[rng.integers(len(photos))]
        y, x = rng.integers(im.shape[0] - size + 1), rng.integers(im.shape[1] - size + 1)
        crop = im[y:y + size, x:x + size].transpose(2, 0, 1)
        if rng.random() < 0.5:
            crop = crop[:, :, ::-1]
        out[i] = (crop - mean) / std
    return torch.from_numpy(out)
