"""Import-path factories used by test configs (`fixtures_models:NAME`); fixed seeds."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.utils.data import Dataset


def tiny_cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(OrderedDict([
        ("conv", nn.Conv2d(1, 4, 3, padding=1)),
        ("relu", nn.ReLU()),
        ("pool", nn.AdaptiveAvgPool2d(2)),
        ("flatten", nn.Flatten()),
        ("fc", nn.Linear(16, 3)),
    ]))


def tiny_mlp() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(OrderedDict([
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(64, 5)),
        ("act", nn.Tanh()),
        ("fc2", nn.Linear(5, 3)),
    ]))


class TinyDataset(Dataset):
    """40 random 1x8x8 images in [0, 1] with labels 0..2 and (optionally hostile) class names."""

    def __init__(self, n: int = 40, classes=("zero", "one", "two")):
        g = torch.Generator().manual_seed(3)
        self.images = torch.rand(n, 1, 8, 8, generator=g)
        self.labels = torch.arange(n) % 3
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def tiny_dataset() -> Dataset:
    return TinyDataset()


def hostile_dataset() -> Dataset:
    return TinyDataset(classes=("<script>alert(1)</script>", "\"quoted\" & 'single'", "../../etc"))


def planted_mlp() -> nn.Module:
    """fc(64 -> 4) + ReLU with planted units: 0 ordinary, 1 dead (always -1), 2 = 2 x unit 0 (redundant),
    3 constant +10 (saturated)."""
    torch.manual_seed(4)
    fc = nn.Linear(64, 4)
    with torch.no_grad():
        fc.bias[0] = -0.5 * fc.weight[0].sum()  # centred on the mean input: active about half the time
        fc.weight[1].zero_()
        fc.bias[1] = -1.0
        fc.weight[2] = 2 * fc.weight[0]
        fc.bias[2] = 2 * fc.bias[0]
        fc.weight[3].zero_()
        fc.bias[3] = 10.0
    return nn.Sequential(OrderedDict([("flatten", nn.Flatten()), ("fc", fc), ("relu", nn.ReLU())]))
