"""Architectures of the coverage benchmark (bench_coverage.py), built by hand at small widths (no torchvision).

Each is the named architecture's block structure at a few channels: ResNet-18 (basic blocks) and ResNet-50
(bottlenecks, expansion 4), ResNeXt (grouped bottlenecks), an Inception net (four concatenated branches),
SqueezeNet (Fire modules), RegNetY (group convs and SE), EfficientNet (MBConv with SE), ConvNeXt (depthwise
7x7, permute, LayerNorm, channels-last Linear layers, layer scale) and ShuffleNet-V2 (split, concat, channel
shuffle). Every model takes (B, 1, 16, 16) images, returns (B, 10) logits, and names its last layer
``classifier`` (Torch-Pruning's ignored layer). Where the test suite has the block (tests/torch_models.py)
it is reused, so that a block fixed there is fixed here.

Data: sklearn's 8x8 digits (tests/torch_helpers.digits_data: 1,297 train / 500 held out), upsampled
bilinearly to 16x16 so that three stride-2 stages still leave a 2x2 map.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import torch_models as tm  # noqa: E402
from torch_helpers import digits_data  # noqa: E402

SIZE = 16


def digits16(seed: int = 0):
    """((x_train (1297, 1, 16, 16), y_train), (x_test (500, 1, 16, 16), y_test)), pixels in [0, 1]."""
    (xtr, ytr), (xte, yte) = digits_data(seed)
    up = lambda x: F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)  # noqa: E731
    return (up(xtr), ytr), (up(xte), yte)


def conv_bn(c_in, c_out, k=1, stride=1, groups=1, act=nn.ReLU) -> nn.Sequential:
    """Conv2d (no bias) + BatchNorm2d [+ activation], torchvision's Conv2dNormActivation."""
    layers = [nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]
    return nn.Sequential(*layers, act()) if act else nn.Sequential(*layers)


class Net(nn.Module):
    """stem conv 3x3 + BN + activation -> blocks -> [head 1x1 conv + BN + activation] -> global pool -> Linear."""

    def __init__(self, stem: int, blocks, width: int, head: int = 0, act=nn.ReLU, n_out: int = 10):
        super().__init__()
        self.stem = conv_bn(1, stem, 3, act=act)
        self.blocks = nn.Sequential(*blocks)
        self.head = conv_bn(width, head, act=act) if head else nn.Identity()
        self.classifier = nn.Linear(head or width, n_out)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class XBlock(nn.Module):
    """ResNeXt / RegNetY bottleneck: 1x1 conv + BN + ReLU, 3x3 conv with ``groups`` (stride) + BN + ReLU,
    optional squeeze-excitation (squeeze width a quarter of the block input, as RegNetY), 1x1 conv + BN,
    identity or projection shortcut, ReLU."""

    def __init__(self, c_in, width, c_out, groups, stride=1, se=False):
        super().__init__()
        self.a = conv_bn(c_in, width)
        self.b = conv_bn(width, width, 3, stride, groups)
        self.se = tm.SqueezeExcite(width, max(2, c_in // 4)) if se else nn.Identity()
        self.c = conv_bn(width, c_out, act=None)
        self.proj = conv_bn(c_in, c_out, 1, stride, act=None) if stride != 1 or c_in != c_out else None

    def forward(self, x):
        y = self.c(self.se(self.b(self.a(x))))
        return F.relu(y + (x if self.proj is None else self.proj(x)))


def _stages(block, widths, first, **kw):
    """Two blocks per stage (the first of each stage after the first with stride 2); ``block(c_in, w, **kw)``."""
    out, c = [], first
    for i, w in enumerate(widths):
        out += [block(c, w, 1 if i == 0 else 2, **kw), block(w, w, 1, **kw)]
        c = w
    return out


def resnet18():
    """ResNet-18's layout: 4 stages x 2 basic blocks, widths 8-16-32-64."""
    return Net(8, _stages(tm.BasicBlock, (8, 16, 32, 64), 8), 64)


def resnet50():
    """ResNet-50's bottleneck (1x1, 3x3 with the stride, 1x1 expanding 4x): 3 stages x 2 blocks."""
    blocks = _stages(lambda c, w, s: tm.Bottleneck(c, w // 4, w, s), (32, 64, 128), 16)
    return Net(16, blocks, 128)


def resnext():
    """ResNeXt bottlenecks (cardinality 4, bottleneck width twice ResNet-50's): 2 stages x 2 blocks."""
    blocks = _stages(lambda c, w, s: XBlock(c, w // 2, w, 4, s), (32, 64), 16)
    return Net(16, blocks, 64)


def regnet():
    """RegNetY: bottleneck ratio 1, group width 8, SE; 2 stages x 2 blocks (24, 48 channels), all stride 2
    at each stage's start, as RegNet."""
    blocks, c = [], 16
    for w in (24, 48):
        blocks += [XBlock(c, w, w, w // 8, 2, se=True), XBlock(w, w, w, w // 8, 1, se=True)]
        c = w
    return Net(16, blocks, 48)


def efficientnet():
    """EfficientNet's MBConv (expand 4, depthwise 3x3, SE, project; identity shortcut where shapes allow),
    SiLU, a 1x1 head conv."""
    blocks = [tm.MBConv(16, 16), tm.MBConv(16, 24, stride=2), tm.MBConv(24, 24), tm.MBConv(24, 40, stride=2)]
    return Net(16, blocks, 40, head=64, act=nn.SiLU)


class Inception(nn.Module):
    """GoogLeNet's block: 1x1 ‖ 1x1 -> 3x3 ‖ 1x1 -> 3x3 (torchvision's "5x5" branch) ‖ max-pool 3x3 -> 1x1,
    every conv + BN + ReLU, concatenated along the channels."""

    def __init__(self, c_in, c1, c3r, c3, c5r, c5, cp):
        super().__init__()
        self.b1 = conv_bn(c_in, c1)
        self.b2 = nn.Sequential(conv_bn(c_in, c3r), conv_bn(c3r, c3, 3))
        self.b3 = nn.Sequential(conv_bn(c_in, c5r), conv_bn(c5r, c5, 3))
        self.b4 = conv_bn(c_in, cp)

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(F.max_pool2d(x, 3, 1, 1))], 1)


def inception():
    """Stem, two Inception blocks, max-pool, a third block, pooled Linear head."""
    blocks = [Inception(16, 8, 8, 12, 4, 6, 6), Inception(32, 12, 12, 16, 4, 8, 8), nn.MaxPool2d(2),
              Inception(44, 16, 12, 20, 4, 8, 8)]
    return Net(16, blocks, 52)


class SqueezeNet(nn.Module):
    """SqueezeNet 1.1's layout: conv 3x3 + ReLU, Fire x2, max-pool, Fire x2, dropout, 1x1 classifier conv,
    global pooling, every conv He-initialised (``kaiming_uniform_``, zero biases; PyTorch's default init leaves
    this BatchNorm-free net at chance after 8 epochs). SqueezeNet's ReLU after the classifier conv is left out:
    with it the net reached 36-47% held-out accuracy in 8 epochs, without it 68-81%."""

    def __init__(self, n_out: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.fires = nn.Sequential(tm.Fire(16, 4, 8), tm.Fire(16, 4, 8), nn.MaxPool2d(2), tm.Fire(16, 8, 16),
                                   tm.Fire(32, 8, 16))
        self.drop = nn.Dropout(0.2)
        self.classifier = nn.Conv2d(32, n_out, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.drop(self.fires(F.relu(self.stem(x))))
        return torch.flatten(F.adaptive_avg_pool2d(self.classifier(x), 1), 1)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of (B, C, H, W) by permuting to channels-last (torchvision's LayerNorm2d)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class CNBlock(nn.Module):
    """ConvNeXt block: depthwise 7x7, permute to channels-last, LayerNorm, Linear 4c, GELU, Linear c, permute
    back, layer scale (a parameter of shape (c, 1, 1) read in forward), residual add."""

    def __init__(self, c, layer_scale: float = 0.1):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pw1 = nn.Linear(c, 4 * c)
        self.pw2 = nn.Linear(4 * c, c)
        self.layer_scale = nn.Parameter(torch.full((c, 1, 1), layer_scale))

    def forward(self, x):
        y = self.pw2(F.gelu(self.pw1(self.norm(self.dw(x).permute(0, 2, 3, 1)))))
        return x + self.layer_scale * y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """Patchify stem (2x2 stride 2) + LayerNorm2d, 2 blocks of 16, LayerNorm2d + 2x2 stride-2 conv, 2 blocks of
    32, global pooling, LayerNorm, Linear."""

    def __init__(self, widths=(16, 32), n_out: int = 10):
        super().__init__()
        a, b = widths
        self.stem = nn.Sequential(nn.Conv2d(1, a, 2, 2), LayerNorm2d(a))
        self.stage1 = nn.Sequential(CNBlock(a), CNBlock(a))
        self.down = nn.Sequential(LayerNorm2d(a), nn.Conv2d(a, b, 2, 2))
        self.stage2 = nn.Sequential(CNBlock(b), CNBlock(b))
        self.norm = nn.LayerNorm(b)
        self.classifier = nn.Linear(b, n_out)

    def forward(self, x):
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.classifier(self.norm(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


def channel_shuffle(x, groups: int):
    """(B, C, H, W) -> the channels regrouped as torchvision's ShuffleNet-V2 does (view, transpose, view)."""
    b, c, h, w = x.size()
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, -1, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNet-V2 unit. Stride 1: split the channels in halves, the second through 1x1 + BN + ReLU,
    depthwise 3x3 + BN, 1x1 + BN + ReLU, concatenated with the first, shuffled. Stride 2: both halves see the
    whole input (the first through depthwise 3x3 stride 2 + BN, 1x1 + BN + ReLU)."""

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        half, self.stride = c_out // 2, stride
        c2 = c_in if stride > 1 else half
        self.branch1 = nn.Sequential(conv_bn(c_in, c_in, 3, stride, c_in, act=None), conv_bn(c_in, half)) \
            if stride > 1 else nn.Identity()
        self.branch2 = nn.Sequential(conv_bn(c2, half), conv_bn(half, half, 3, stride, half, act=None),
                                     conv_bn(half, half))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), 1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), 1)
        return channel_shuffle(out, 2)


def shufflenet():
    """ShuffleNet-V2's layout: stem, two stages (a stride-2 unit and a stride-1 unit; 32, 64 channels), a
    1x1 conv5 of 128, pooled Linear head."""
    blocks = [ShuffleUnit(16, 32, 2), ShuffleUnit(32, 32), ShuffleUnit(32, 64, 2), ShuffleUnit(64, 64)]
    return Net(16, blocks, 64, head=128)


MODELS = {"ResNet-18": resnet18, "ResNet-50": resnet50, "ResNeXt": resnext, "Inception": inception,
          "SqueezeNet": SqueezeNet, "RegNetY": regnet, "EfficientNet": efficientnet, "ConvNeXt": ConvNeXt,
          "ShuffleNet-V2": shufflenet}
