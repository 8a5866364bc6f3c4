"""The two demo models (`builtin:digits-mlp`, `builtin:digits-cnn`) and their training.

Both read 1x8x8 digit images with pixels in [0, 1] (scikit-learn's bundled
`load_digits`, so nothing is downloaded) and carry their own input
normalization as their first module, so the dataset needs no mean/std and
feature visualization can optimize plain [0, 1] images.

- digits-mlp: the classic [784, 20, 10] MNIST net at the digits' size,
  [64, 20, 10] with a ReLU hidden layer.
- digits-cnn: two 3x3 conv layers (16 and 32 channels) and a linear readout.

Training is deterministic (seeded, full-batch-free minibatches in a seeded
order, on one thread so that float sums do not depend on the number of
cores) and takes a few seconds. Weights are cached under `<data_dir>/models/`
with a JSON record of the held-out accuracy; a cache hit loads with
`weights_only=True`. The train/test split is fixed (seed 0) and shared with
the `builtin:digits` dataset, whose examples are the held-out test split.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import atomic
from .errors import AtlasError

DIGITS_MEAN = 0.305  # mean pixel of load_digits()/16
DIGITS_STD = 0.380  # its std
SPLIT_SEED = 0  # the train/test split never changes with the atlas seed
TEST_FRACTION = 0.3
TRAIN_EPOCHS = 40
TRAIN_VERSION = 2  # bump when the architectures or the training recipe change (invalidates caches)


class Normalize(nn.Module):
    """(x - mean) / std as a module, so the model owns its preprocessing."""

    def __init__(self, mean: float, std: float):
        super().__init__()
        self.register_buffer("mean", torch.tensor([mean]).view(1, 1, 1, 1))
        self.register_buffer("std", torch.tensor([std]).view(1, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def digits_mlp() -> nn.Module:
    return nn.Sequential(OrderedDict([
        ("normalize", Normalize(DIGITS_MEAN, DIGITS_STD)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(64, 20)),
        ("relu1", nn.ReLU()),
        ("fc2", nn.Linear(20, 10)),
    ]))


def digits_cnn() -> nn.Module:
    return nn.Sequential(OrderedDict([
        ("normalize", Normalize(DIGITS_MEAN, DIGITS_STD)),
        ("conv1", nn.Conv2d(1, 16, 3, padding=1)),
        ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(16, 32, 3, padding=1)),
        ("relu2", nn.ReLU()),
        ("pool", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()),
        ("fc", nn.Linear(32 * 4 * 4, 10)),
    ]))


ARCHITECTURES = {"digits-mlp": digits_mlp, "digits-cnn": digits_cnn}


def digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, 1, 8, 8] float32 in [0, 1] and labels [N] int64 of the fixed train or test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(images, labels, test_size=TEST_FRACTION,
                                              random_state=SPLIT_SEED, stratify=labels)
    if split == "train":
        return x_tr, y_tr
    if split == "test":
        return x_te, y_te
    raise ValueError(split)


def load_builtin(name: str, data_dir: Path, seed: int) -> tuple[nn.Module, dict]:
    """The trained demo model `name` and its training record, training it if not cached."""
    if name not in ARCHITECTURES:
        raise AtlasError(f"unknown builtin model {name!r}; builtin models are: {', '.join(ARCHITECTURES)}")
    key = f"{name}|{seed}|{TRAIN_EPOCHS}|{TRAIN_VERSION}"
    return cached_training(ARCHITECTURES[name](), name, key, data_dir, lambda model: train(model, seed))


def cached_training(model: nn.Module, name: str, key: str, data_dir: Path, train_fn) -> tuple[nn.Module, dict]:
    """`model` with the weights cached under `<data_dir>/models/<name>-<hash of key>.pt` (loaded with
    `weights_only=True`) and its JSON record beside them; without a cache, train_fn(model) trains it (on one
    thread: `one_thread`) and returns the record, and both are written."""
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    folder = Path(data_dir) / "models"
    weights_path, record_path = folder / f"{name}-{digest}.pt", folder / f"{name}-{digest}.json"
    if weights_path.is_file() and record_path.is_file():
        model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
        record = json.loads(record_path.read_text())
        record.pop("train_seconds", None)  # caches written before it was dropped (see train)
        return model.eval(), record
    record = one_thread(train_fn, model)
    atomic.write_with(weights_path, lambda f: torch.save(model.state_dict(), f))
    atomic.write_text(record_path, json.dumps(record, indent=1, sort_keys=True))
    return model.eval(), record


def one_thread(fn, *args):
    """fn(*args) on one thread: kernels split reductions by thread count, and trained weights must not depend
    on the number of cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


def train(model: nn.Module, seed: int) -> dict:
    """Deterministic Adam training on the train split (run on one thread: cached_training); returns its record
    (accuracy, epochs, sizes).

    The record holds no timing: it becomes the model's info in the store and
    on the model page, and two builds must give the same bytes (the build
    report times training as part of "train/load").
    """
    x_tr, y_tr = (torch.from_numpy(a) for a in digits_split("train"))
    x_te, y_te = (torch.from_numpy(a) for a in digits_split("test"))
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for module in model.modules():  # re-initialize from the seed, whatever ran before
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(TRAIN_EPOCHS):  # on one thread (cached_training)
        order = torch.randperm(len(x_tr), generator=gen)
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            opt.zero_grad()
            loss_fn(model(x_tr[idx]), y_tr[idx]).backward()
            opt.step()
    model.eval()
    with torch.inference_mode():
        accuracy = (model(x_te).argmax(1) == y_te).float().mean().item()
    return {"test_accuracy": round(accuracy, 6),
            "epochs": TRAIN_EPOCHS, "seed": seed, "train_examples": len(x_tr), "test_examples": len(x_te)}
