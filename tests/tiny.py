"""Tiny networks for brute-force checks (an MLP, a conv net with BN and a residual add, a
ResNeXt-like one whose grouped convs make structures of several channels, and one with
BatchNorm1d on a flattened feature map and in an MLP head)."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class TinyMLP(nn.Module):
    def __init__(self, d_in=6, hidden=5, classes=3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.out(torch.tanh(self.fc2(torch.tanh(self.fc1(x.flatten(1))))))


class TinyResNet(nn.Module):
    def __init__(self, in_ch=2, width=3, classes=4):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        h = F.softplus(self.bn1(self.conv1(x)))
        r = F.softplus(self.bn2(self.conv2(h)))
        h = F.softplus(h + self.bn3(self.conv3(r)))
        return self.fc(h.mean((2, 3)))


class TinyResNeXt(nn.Module):
    """conv → BN → grouped conv (2 groups) → BN, added to the first conv's channels → linear:
    each structure of the residual channels is 2 channels, one in each group."""

    def __init__(self, in_ch=2, width=6, classes=4):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        h = F.softplus(self.bn1(self.conv1(x)))
        h = F.softplus(h + self.bn2(self.conv2(h)))
        return self.fc(h.mean((2, 3)))


class TinyHead(nn.Module):
    """conv → BN → softplus → conv, its map flattened to [B, C, H·W] for a BatchNorm1d →
    softplus → mean → linear → BatchNorm1d ([B, C]) → softplus → linear."""

    def __init__(self, in_ch=2, width=3, hidden=4, classes=4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(in_ch, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm1d(width)
        self.fc1, self.bn3, self.fc2 = nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.Linear(hidden, classes)

    def forward(self, x):
        h = F.softplus(self.bn1(self.conv1(x)))
        h = F.softplus(self.bn2(self.conv2(h).flatten(2))).mean(2)
        return self.fc2(F.softplus(self.bn3(self.fc1(h))))


def randomize_batchnorm(model, generator=None):
    """Non-trivial running statistics and affine parameters, so eval-mode BN matters."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.uniform_(-0.3, 0.3, generator=generator)
                m.running_var.uniform_(0.5, 1.5, generator=generator)
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.uniform_(-0.3, 0.3, generator=generator)
    return model


class TinyFolds(nn.Module):
    """Every reader of a bias-free layer's output: BatchNorm2d after a convolution (conv2 with no
    tangent on its input when d = 1, conv3 with one); conv3's output read by its BatchNorm and
    by a ReLU; a convolution read by a ReLU only; BatchNorm1d on [B, C] after a bias-free linear
    layer."""

    def __init__(self, in_ch=2, width=3, hidden=4, classes=4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(in_ch, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv4 = nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False)
        self.lin, self.bn4 = nn.Linear(width, hidden, bias=False), nn.BatchNorm1d(hidden)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        c = self.conv3(h)
        h = F.relu(self.bn3(c) + F.relu(c))
        h = F.relu(self.conv4(h)).mean((2, 3))
        return self.fc(F.relu(self.bn4(self.lin(h))))


class TinyInPlace(nn.Module):
    """A depthwise convolution (no gate site: its channels are its input's structure) reads h,
    then h is added to in place, then the depthwise output reaches its BatchNorm: a layer whose
    tangent is computed by its reader must read its input's tangent as it was."""

    def __init__(self, in_ch=2, width=3, classes=4):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(in_ch, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv0, self.bn0 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width, 1, bias=False)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        a = F.relu(self.bn_a(self.conv_a(x)))
        h = self.bn1(self.conv1(a))
        d = self.dw(h)
        h += F.relu(self.bn0(self.conv0(a)))
        out = F.relu(self.bn2(d)) + h
        return self.fc(F.relu(self.conv3(out)).mean((2, 3)))


class TinyGLU(nn.Module):
    """A gated linear unit written as chunk + multiply: conv1's 6 channels split in halves a, b
    and a · sigmoid(b) → 3 channels, then conv2 — with ``residual``, its output added to the
    GLU's: one structure is channels j and j + 3 of conv1 (with channel j of conv2). With
    ``groups`` G, conv2 is a grouped conv over the GLU's channels: a structure is then channel
    position j of its G groups, with both halves of each (2G channels of conv1)."""

    def __init__(self, in_ch=2, width=3, classes=4, residual=True, groups=1):
        super().__init__()
        self.residual = residual
        self.conv1, self.bn1 = nn.Conv2d(in_ch, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False, groups=groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        a, b = self.bn1(self.conv1(x)).chunk(2, 1)
        h = a * torch.sigmoid(b)
        r = self.bn2(self.conv2(h))
        h = F.softplus(h + r if self.residual else r)
        return self.fc(h.mean((2, 3)))
