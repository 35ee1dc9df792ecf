"""Small architectures for the lsprune.torch tests (torchvision is not a dependency)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    """Linear -> activation [-> Dropout] -> Linear."""

    def __init__(self, d_in=12, hidden=32, d_out=6, act=nn.ReLU, dropout=0.0):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.act = act()
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc2(self.drop(self.act(self.fc1(x))))


class DeepMLP(nn.Module):
    """A stack of Linear -> Tanh layers (a chain of pairs)."""

    def __init__(self, widths=(16, 48, 48, 48, 48, 8)):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return x


class VGG(nn.Module):
    """Conv -> BN -> ReLU -> MaxPool blocks, flatten -> Linear -> ReLU -> Dropout -> Linear."""

    def __init__(self, c=(8, 12, 16), n_out=5, in_hw=16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c[0])
        self.conv2 = nn.Conv2d(c[0], c[1], 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c[1])
        self.conv3 = nn.Conv2d(c[1], c[2], 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        hw = in_hw // 4
        self.fc1 = nn.Linear(c[2] * hw * hw, 24)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(24, n_out)

    def forward(self, x):
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.avg_pool2d(self.conv3(x).relu(), 2)
        x = x.view(x.size(0), -1)
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    def __init__(self, cin, width, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A tiny ResNet: stem, a few residual blocks, global pooling, Linear."""

    def __init__(self, block="basic", widths=(8, 16), n_out=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            if block == "basic":
                blocks += [BasicBlock(cin, w, stride), BasicBlock(w, w)]
                cin = w
            else:
                blocks += [Bottleneck(cin, w, 2 * w, stride), Bottleneck(2 * w, w, 2 * w)]
                cin = 2 * w
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, n_out)

    def forward(self, x):
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: expand 1x1 -> BN -> ReLU6 -> depthwise 3x3 -> BN -> ReLU6 -> project 1x1 -> BN."""

    def __init__(self, cin, cout, expand=4, stride=1):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, n_out=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True))
        self.blocks = nn.Sequential(InvertedResidual(8, 8), InvertedResidual(8, 12, stride=2),
                                    InvertedResidual(12, 12))
        self.head = nn.Linear(12, n_out)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(x.mean((2, 3)))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block; the FFN (Linear -> GELU -> Linear) sits inside a residual."""

    def __init__(self, d=16, heads=2, ff=48):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.ff1 = nn.Linear(d, ff)
        self.act = nn.GELU()
        self.ff2 = nn.Linear(ff, d)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.ff2(self.act(self.ff1(self.ln2(x))))


class Transformer(nn.Module):
    def __init__(self, d=16, n_layers=2, ff=48, n_out=4):
        super().__init__()
        self.blocks = nn.ModuleList(TransformerBlock(d, 2, ff) for _ in range(n_layers))
        self.head = nn.Linear(d, n_out)

    def forward(self, x):  # x: (B, T, d)
        for blk in self.blocks:
            x = blk(x)
        return self.head(x.mean(1))


class ConvVariants(nn.Module):
    """Stride, padding, dilation, bias/no bias, reflect padding, a grouped conv and a depthwise conv."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 10, 3, stride=2, padding=2, dilation=2, bias=True)
        self.c2 = nn.Conv2d(10, 12, (3, 2), stride=(1, 2), padding=(1, 0), bias=False)
        self.c3 = nn.Conv2d(12, 12, 3, padding="same", padding_mode="reflect")
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.c4 = nn.Conv2d(12, 8, 1, bias=False)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)  # grouped: mixes channels within groups
        self.c5 = nn.Conv2d(8, 6, 3)

    def forward(self, x):
        x = F.silu(self.c1(x))
        x = torch.sigmoid(self.c2(x))
        x = F.leaky_relu(self.c3(x), 0.1)
        x = self.c4(F.hardswish(self.dw(x)))
        x = self.c5(F.relu(self.g(F.relu(x))))
        return x.flatten(1)


class Branchy(nn.Module):
    """Patterns that are not prunable: residual add, concat, second consumer, LayerNorm, grouped consumer."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)  # output + residual add
        self.c = nn.Conv2d(8, 6, 1)  # output feeds concat
        self.d = nn.Conv2d(8, 6, 1)
        self.e = nn.Conv2d(12, 8, 1)  # output feeds two consumers
        self.f1 = nn.Conv2d(8, 4, 1)
        self.f2 = nn.Conv2d(8, 4, 1)
        self.g = nn.Conv2d(8, 8, 1)  # followed by a grouped conv consumer
        self.h = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.lin1 = nn.Linear(8, 16)  # LayerNorm in between
        self.ln = nn.LayerNorm(16)
        self.lin2 = nn.Linear(16, 3)

    def forward(self, x):
        a = F.relu(self.a(x))
        b = self.b(a) + a
        cat = torch.cat([self.c(b), self.d(b)], 1)
        e = F.relu(self.e(cat))
        f = self.f1(e) + self.f2(e)
        h = self.h(F.relu(self.g(torch.cat([f, f], 1))))
        v = h.mean((2, 3))
        return self.lin2(self.ln(self.lin1(v)))


class DeepConv(nn.Module):
    """A plain stack of 3x3 conv -> ReLU layers for the sequential vs independent comparison."""

    def __init__(self, width=16, depth=5):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3, width, 3, padding=1)] +
                                   [nn.Conv2d(width, width, 3, padding=1) for _ in range(depth - 1)])
        self.out = nn.Conv2d(width, 4, 1)

    def forward(self, x):
        for c in self.convs:
            x = F.relu(c(x))
        return self.out(x)


class KwargsMLP(nn.Module):
    """Traceable model called with dict batches ``{"features": x}`` and an optional argument."""

    def __init__(self, d_in=10, hidden=24, d_out=5):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, features, offset=None, scale=1.0):
        h = torch.relu(self.fc1(features))
        if offset is not None:
            h = h + offset
        return self.fc2(h) * scale


class ControlFlowMLP(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self, d_in=10, hidden=24, d_out=5):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x):
        if x.sum() > 1e9:  # never true, but fx cannot know
            x = x * 0
        return self.fc2(F.gelu(self.fc1(x)))


class TinyTextModel(nn.Module):
    """Token model taking dict batches ``{"input_ids", "attention_mask"}``; the mask check makes it untraceable."""

    def __init__(self, vocab=50, d=16, ff=40, n_out=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.ln = nn.LayerNorm(d)
        self.ff1 = nn.Linear(d, ff)
        self.act = nn.GELU()
        self.ff2 = nn.Linear(ff, d)
        self.head = nn.Linear(d, n_out)

    def forward(self, input_ids, attention_mask=None):
        x = self.emb(input_ids)
        if attention_mask is not None and bool((attention_mask == 0).all()):  # data-dependent: untraceable
            raise ValueError("every position is padding")
        x = x + self.ff2(self.act(self.ff1(self.ln(x))))
        m = attention_mask[..., None].to(x.dtype) if attention_mask is not None else torch.ones_like(x[..., :1])
        return self.head((x * m).sum(1) / m.sum(1))


class SmallResNet(nn.Module):
    """A ResNet-style CNN for coupled groups: stem conv+BN, three basic blocks (the third with a stride-2
    downsample), global pooling, Linear head. Two residual streams: the stem's (read by every block of
    width ``w``) and the third block's (read by the head)."""

    def __init__(self, c_in=1, w=16, w2=32, n_out=10):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, w, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.layers = nn.Sequential(BasicBlock(w, w), BasicBlock(w, w), BasicBlock(w, w2, stride=2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w2, n_out)

    def forward(self, x):
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class TwoHeadMLP(nn.Module):
    """One hidden layer read by two Linear heads (a multi-consumer group); the heads' outputs are concatenated."""

    def __init__(self, d_in=12, hidden=32, d_out=4):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.act = nn.GELU()
        self.head1 = nn.Linear(hidden, d_out)
        self.head2 = nn.Linear(hidden, d_out, bias=False)

    def forward(self, x):
        h = self.act(self.fc1(x))
        return torch.cat([self.head1(h), self.head2(h)], 1)


class InceptionToy(nn.Module):
    """A stem (conv+BN+ReLU) feeding a 1x1 and a 3x3 branch (a multi-consumer group); each branch is pooled
    and read by its own Linear (pairs); the two logits are summed."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.a = nn.Conv2d(c, 6, 1)
        self.b = nn.Conv2d(c, 6, 3, padding=1, bias=False)
        self.fa = nn.Linear(6 * 4, 5)
        self.fb = nn.Linear(6 * 4, 5)

    def forward(self, x):
        s = F.relu(self.bn(self.stem(x)))
        a = torch.flatten(F.adaptive_avg_pool2d(F.relu(self.a(s)), 2), 1)
        b = torch.flatten(F.adaptive_avg_pool2d(torch.tanh(self.b(s)), 2), 1)
        return self.fa(a) + self.fb(b)


def init_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (random init would make BN the identity)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model


class InceptionConcat(nn.Module):
    """An Inception-style block: a stem feeding a 1x1 branch, a 1x1 -> 3x3 branch (with BN) and a pool -> 1x1
    branch, concatenated along the channels (three concat slices) and read, after a max-pool, by a 1x1 and a
    3x3 conv whose outputs are concatenated again and read by a Linear head after a flatten."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.b1 = nn.Conv2d(c, 4, 1)
        self.b2a = nn.Conv2d(c, 6, 1)
        self.b2b = nn.Conv2d(6, 5, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(5)
        self.b3 = nn.Conv2d(c, 3, 1)
        self.r1 = nn.Conv2d(12, 7, 1)
        self.r2 = nn.Conv2d(12, 4, 3, padding=1)
        self.fc = nn.Linear(11 * 4, 3)

    def forward(self, x):
        h = F.relu(self.stem(x))
        c = torch.cat([F.relu(self.b1(h)), F.relu(self.bn(self.b2b(F.relu(self.b2a(h))))),
                       self.b3(F.max_pool2d(h, 3, 1, 1))], 1)
        c = F.max_pool2d(c, 2)
        y = torch.cat([self.r1(c), self.r2(c)], 1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(y), 2), 1))


class Fire(nn.Module):
    """SqueezeNet's Fire module: squeeze 1x1, then expand1x1 ‖ expand3x3 concatenated."""

    def __init__(self, c_in, s, e):
        super().__init__()
        self.squeeze = nn.Conv2d(c_in, s, 1)
        self.expand1x1 = nn.Conv2d(s, e, 1)
        self.expand3x3 = nn.Conv2d(s, e, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1x1(x)), F.relu(self.expand3x3(x))], 1)


class FireNet(nn.Module):
    """A SqueezeNet-style CNN: conv stem, two Fire modules, a 1x1 classifier conv and global pooling."""

    def __init__(self, c_in=1, n_out=10):
        super().__init__()
        self.conv = nn.Conv2d(c_in, 16, 3, padding=1)
        self.fire1 = Fire(16, 6, 8)
        self.fire2 = Fire(16, 8, 10)
        self.classifier = nn.Conv2d(20, n_out, 1)

    def forward(self, x):
        x = self.fire2(F.max_pool2d(self.fire1(F.relu(self.conv(x))), 2))
        return torch.flatten(F.adaptive_avg_pool2d(self.classifier(x), 1), 1)


class SqueezeExcite(nn.Module):
    """torchvision-style squeeze-excitation: global average pool, 1x1 conv (squeeze), SiLU, 1x1 conv
    (excitation), sigmoid, the input multiplied by the gate."""

    def __init__(self, c, r):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, r, 1)
        self.fc2 = nn.Conv2d(r, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.silu(self.fc1(self.pool(x)))))


class SqueezeExciteLinear(nn.Module):
    """Squeeze-excitation with Linear layers on ``x.mean((2, 3))`` and the gate indexed back to (B, C, 1, 1)."""

    def __init__(self, c, r):
        super().__init__()
        self.fc1 = nn.Linear(c, r)
        self.fc2 = nn.Linear(r, c)

    def forward(self, x):
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))
        return x * s[:, :, None, None]


class MBConv(nn.Module):
    """EfficientNet's inverted residual with SE: expand 1x1 + BN + SiLU, depthwise 3x3 + BN + SiLU, SE,
    project 1x1 + BN, and the identity shortcut when the shapes allow."""

    def __init__(self, c_in, c_out, expand=4, stride=1, se=SqueezeExcite):
        super().__init__()
        h = c_in * expand
        self.expand = nn.Conv2d(c_in, h, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(h)
        self.dw = nn.Conv2d(h, h, 3, stride=stride, padding=1, groups=h, bias=False)
        self.bn2 = nn.BatchNorm2d(h)
        self.se = se(h, max(2, c_in // 2))
        self.project = nn.Conv2d(h, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.res = stride == 1 and c_in == c_out

    def forward(self, x):
        h = F.silu(self.bn2(self.dw(F.silu(self.bn1(self.expand(x))))))
        y = self.bn3(self.project(self.se(h)))
        return x + y if self.res else y


class EfficientToy(nn.Module):
    """An EfficientNet-style CNN: stem, two MBConv blocks with SE (conv-style, then Linear-style), a 1x1 head
    conv, global pooling and a Linear classifier."""

    def __init__(self, c_in=1, n_out=10):
        super().__init__()
        self.stem = nn.Conv2d(c_in, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.b1 = MBConv(8, 8)
        self.b2 = MBConv(8, 12, stride=2, se=SqueezeExciteLinear)
        self.head = nn.Conv2d(12, 24, 1)
        self.fc = nn.Linear(24, n_out)

    def forward(self, x):
        x = self.b2(self.b1(F.silu(self.bn(self.stem(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.silu(self.head(x)), 1), 1))


class GroupedBottleneck(nn.Module):
    """A ResNeXt / RegNetY bottleneck: 1x1 conv + BN + ReLU, grouped 3x3 conv (``groups`` groups) + BN + ReLU,
    optional squeeze-excitation, 1x1 conv + BN, identity shortcut."""

    def __init__(self, c, width, groups, se=False):
        super().__init__()
        self.conv1 = nn.Conv2d(c, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.se = SqueezeExcite(width, max(2, c // 4)) if se else nn.Identity()
        self.conv3 = nn.Conv2d(width, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x):
        h = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return F.relu(x + self.bn3(self.conv3(self.se(h))))


class GroupedNet(nn.Module):
    """A small ResNeXt/RegNet-style CNN: stem, a ResNeXt bottleneck (4 groups of 4) and a RegNetY bottleneck
    (3 groups of 8, with SE), global pooling, Linear head."""

    def __init__(self, c_in=1, c=16, n_out=10):
        super().__init__()
        self.stem = nn.Conv2d(c_in, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.x1 = GroupedBottleneck(c, 16, 4)
        self.y1 = GroupedBottleneck(c, 24, 3, se=True)
        self.fc = nn.Linear(c, n_out)

    def forward(self, x):
        x = self.y1(self.x1(F.relu(self.bn(self.stem(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's channel shuffle: (B, g*n, H, W) -> view (B, g, n, H, W) -> transpose -> (B, n*g, H, W)."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNet V2's unit (torchvision's ``InvertedResidual``). Stride 1: the input is split in two halves
    (``chunk(2, dim=1)``), the second goes through the branch (1x1 conv + BN + ReLU, depthwise 3x3 + BN,
    1x1 conv + BN + ReLU) and is concatenated back after the first; stride 2: a depthwise 3x3 + BN, 1x1 conv +
    BN + ReLU side branch and the main branch both read the whole input. Then the channels are shuffled."""

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        half = c_out // 2
        self.stride = stride
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False), nn.BatchNorm2d(c_in),
                nn.Conv2d(c_in, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU())
        c2 = c_in if stride > 1 else half
        self.branch2 = nn.Sequential(
            nn.Conv2d(c2, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
            nn.Conv2d(half, half, 3, stride, 1, groups=half, bias=False), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU())

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2Toy(nn.Module):
    """A ShuffleNet V2-style CNN: conv stem, a stage of a stride-2 unit and a stride-1 unit, a 1x1 head conv,
    global pooling, Linear classifier."""

    def __init__(self, c_in=1, c=16, n_out=10):
        super().__init__()
        self.stem = nn.Conv2d(c_in, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.s1 = ShuffleUnit(8, c, stride=2)
        self.s2 = ShuffleUnit(c, c)
        self.head = nn.Conv2d(c, 24, 1)
        self.fc = nn.Linear(24, n_out)

    def forward(self, x):
        x = self.s2(self.s1(F.relu(self.bn(self.stem(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.head(x)), 1), 1))


class ConvNeXtBlock(nn.Module):
    """ConvNeXt's block in its channels-last form: depthwise 7x7 conv, ``permute(0, 2, 3, 1)``, LayerNorm over
    the channels, Linear (4x) + GELU + Linear, layer scale ``gamma``, ``permute(0, 3, 1, 2)``, residual."""

    def __init__(self, c, expand=4, layer_scale=0.5):
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pwconv1 = nn.Linear(c, expand * c)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(expand * c, c)
        self.gamma = nn.Parameter(torch.full((c,), float(layer_scale)))

    def forward(self, x):
        h = self.dwconv(x).permute(0, 2, 3, 1)
        h = self.pwconv2(self.act(self.pwconv1(self.norm(h))))
        return x + (self.gamma * h).permute(0, 3, 1, 2)


class ConvNeXtToy(nn.Module):
    """A ConvNeXt-style CNN: 2x2 patchify stem, two channels-last blocks, a 1x1 conv reading the stream
    channels-last through ``permute`` as a Linear, global pooling, Linear head."""

    def __init__(self, c_in=1, c=8, n_out=10):
        super().__init__()
        self.stem = nn.Conv2d(c_in, c, 2, stride=2)
        self.b1 = ConvNeXtBlock(c)
        self.b2 = ConvNeXtBlock(c)
        self.proj = nn.Linear(c, 16)
        self.fc = nn.Linear(16, n_out)

    def forward(self, x):
        h = self.b2(self.b1(self.stem(x)))
        h = F.gelu(self.proj(h.permute(0, 2, 3, 1)))
        return self.fc(h.mean((1, 2)))
