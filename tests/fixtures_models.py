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


# --- hostile inputs for tests/test_bad_input.py -------------------------------------------------

def empty_dataset() -> Dataset:
    """A map-style dataset with no examples."""
    return TinyDataset(n=0)


def rgb_dataset() -> Dataset:
    """40 random 3x8x8 images: the wrong input shape for tiny_mlp (Linear(64, ...))."""
    ds = TinyDataset()
    ds.images = ds.images.repeat(1, 3, 1, 1)
    return ds


class Pair(nn.Module):
    """Returns a tuple (x, -x): not a tensor, so not probeable."""

    def forward(self, x):
        return x, -x


class First(nn.Module):
    def forward(self, pair):
        return pair[0]


def tuple_model() -> nn.Module:
    """flatten -> fc -> pair (returns a tuple) -> first -> relu."""
    torch.manual_seed(5)
    return nn.Sequential(OrderedDict([
        ("flatten", nn.Flatten()), ("fc", nn.Linear(64, 3)), ("pair", Pair()), ("first", First()), ("relu", nn.ReLU()),
    ]))


class Raises(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 3)

    def forward(self, x):
        raise RuntimeError("boom: this model cannot run")


def raising_model() -> nn.Module:
    """A model whose forward always raises RuntimeError."""
    torch.manual_seed(6)
    return Raises()


class Poison(nn.Module):
    """Unit 0: NaN on every other example; unit 1: +Inf everywhere; units 2, 3 untouched."""

    def forward(self, x):
        x = x.clone()
        x[::2, 0] = float("nan")
        x[:, 1] = float("inf")
        return x


def nan_mlp() -> nn.Module:
    """flatten -> fc(64 -> 4) -> poison -> relu: the relu layer has a NaN unit (0) and an Inf unit (1)."""
    torch.manual_seed(7)
    return nn.Sequential(OrderedDict([
        ("flatten", nn.Flatten()), ("fc", nn.Linear(64, 4)), ("poison", Poison()), ("relu", nn.ReLU()),
    ]))


class SigintOnSecondCall(nn.Module):
    """Sends SIGINT to its own process on the second forward (as Ctrl-C in the middle of a scan would)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 3)
        self.calls = 0

    def forward(self, x):
        import signal

        self.calls += 1
        if self.calls == 2:
            # raise() delivers to this thread and the handler runs before it returns, so the KeyboardInterrupt
            # comes from here (os.kill may land on a torch worker thread, and the main thread then takes it at
            # its next check, which can fall in a garbage collector's __del__, where it is swallowed)
            signal.raise_signal(signal.SIGINT)
        return self.fc(x.flatten(1))


def sigint_model() -> nn.Module:
    torch.manual_seed(8)
    return SigintOnSecondCall()


class TrainingMeta:
    """A custom object some training scripts pickle into their checkpoints (refused by weights_only=True)."""

    def __init__(self, epochs: int = 3):
        self.epochs = epochs


def tiny_rgb_mlp() -> nn.Module:
    """For 3x8x8 inputs (an image folder's images are RGB)."""
    torch.manual_seed(2)
    return nn.Sequential(nn.Flatten(), nn.Linear(192, 5), nn.ReLU(), nn.Linear(5, 2))


# --- a tiny ViT (torchvision's VisionTransformer) -----------------------------------------------

PLANTED_PATCH = 5  # tiny_vit's unit 0 of encoder_layer_0 fires on this patch (row 1, column 1 of its 4x4 grid)


def tiny_vit() -> nn.Module:
    """torchvision's VisionTransformer on 3x16x16 inputs: 4x4 patches of 4 px, a class token, 2 blocks of width
    16 (2 heads), 3 classes. Planted: feature 0 of the token at patch PLANTED_PATCH gets +8 from the position
    embedding, so unit 0 of `encoder.layers.encoder_layer_0` fires there on every image (the residual carries it)."""
    from torchvision.models import VisionTransformer

    torch.manual_seed(9)
    model = VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                              num_classes=3)
    with torch.no_grad():
        model.encoder.pos_embedding[0, 1 + PLANTED_PATCH, 0] += 8.0
    return model.eval()


def tiny_rgb_dataset() -> Dataset:
    """40 random 3x16x16 images with labels 0..2."""
    ds = TinyDataset()
    g = torch.Generator().manual_seed(10)
    ds.images = torch.rand(len(ds), 3, 16, 16, generator=g)
    return ds


class HandRolledAttention(nn.Module):
    """Self-attention that is not a torch.nn.MultiheadAttention: the atlas cannot read its weights."""

    def forward(self, x):
        weights = torch.softmax(x @ x.transpose(1, 2) / x.shape[-1] ** 0.5, dim=-1)
        return x + weights @ x


class UntraceableTokens(nn.Module):
    """A token model fx cannot trace (a branch on the data) whose attention is hand-rolled: 3x16x16 inputs ->
    a 4x4 grid of 8-wide patch tokens -> attention -> 3 classes."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.attention = HandRolledAttention()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)  # [B, 16, 8]
        if tokens.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            tokens = tokens * 1.0
        return self.head(self.attention(tokens).mean(1))


def untraceable_tokens() -> nn.Module:
    torch.manual_seed(11)
    return UntraceableTokens().eval()


def tiny_lm() -> nn.Module:
    """A seeded, untrained 2-block byte-level transformer (demo_lm.ByteTransformer), 32 wide, context 32."""
    from atlas_builder.demo_lm import ByteTransformer

    torch.manual_seed(0)
    return ByteTransformer(context=32, width=32, layers=2, heads=2, hidden=64).eval()


def tiny_lm_with_tokenizer():
    """tiny_lm with a tokenizer of its own (the byte tokenizer, returned as a factory of a language model does)."""
    from atlas_builder.text import ByteTokenizer

    return tiny_lm(), ByteTokenizer()
