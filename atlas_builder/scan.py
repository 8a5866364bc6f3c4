"""Scan: one streaming pass of a model over the dataset, per-unit statistics out.

Owns the accumulators (each with update / merge / finalize, memory
independent of the dataset's size, so shards from several processes can be
combined) and the loop that feeds them from a `Probe`:
- `TopK`: the k highest activations of every unit with example id and
  argmax position; ties go to the lower example id, so the result does not
  depend on batch size or shard order;
- `Moments`: count, mean and max of every unit;
- the model's prediction and confidence on every example.

Runs under `torch.inference_mode()` on the device it is given. Does not
write anything: the caller hands the `ModelScan` to the store.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .probe import LayerInfo, Probe
from .sources import AtlasDataset, LoadedModel


class TopK:
    """Streaming top-k of every unit: values, example ids and positions, [U, <=k] each."""

    def __init__(self, n_units: int, k: int):
        self.k = k
        self.values = torch.empty(n_units, 0)
        self.ids = torch.empty(n_units, 0, dtype=torch.long)
        self.positions = torch.empty(n_units, 0, dtype=torch.long)

    def update(self, values: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor) -> None:
        """values, positions: [B, U]; ids: [B] example ids of the batch rows."""
        values, positions = values.detach().float().cpu().T, positions.detach().cpu().T
        ids = ids.detach().cpu().view(1, -1).expand_as(values)
        self._keep(torch.cat([self.values, values], 1), torch.cat([self.ids, ids], 1),
                   torch.cat([self.positions, positions], 1))

    def merge(self, other: "TopK") -> None:
        self._keep(torch.cat([self.values, other.values], 1), torch.cat([self.ids, other.ids], 1),
                   torch.cat([self.positions, other.positions], 1))

    def _keep(self, values, ids, positions) -> None:
        by_id = torch.argsort(ids, dim=1, stable=True)  # ties then fall to the lower id
        values, ids, positions = values.gather(1, by_id), ids.gather(1, by_id), positions.gather(1, by_id)
        order = torch.argsort(values, dim=1, descending=True, stable=True)[:, : self.k]
        self.values, self.ids, self.positions = values.gather(1, order), ids.gather(1, order), positions.gather(1, order)

    def finalize(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.values.numpy(), self.ids.numpy(), self.positions.numpy()


class Moments:
    """Streaming count, mean and max of every unit."""

    def __init__(self, n_units: int):
        self.count = 0
        self.sum = torch.zeros(n_units, dtype=torch.float64)
        self.max = torch.full((n_units,), -torch.inf, dtype=torch.float64)

    def update(self, values: torch.Tensor) -> None:
        values = values.detach().to(torch.float64).cpu()
        self.count += values.shape[0]
        self.sum += values.sum(0)
        self.max = torch.maximum(self.max, values.amax(0))

    def merge(self, other: "Moments") -> None:
        self.count += other.count
        self.sum += other.sum
        self.max = torch.maximum(self.max, other.max)

    def finalize(self) -> dict[str, np.ndarray]:
        return {"mean": (self.sum / max(self.count, 1)).numpy(), "max": self.max.numpy()}


@dataclass
class LayerScan:
    info: LayerInfo
    topk_values: np.ndarray  # [U, k] float32, descending
    topk_ids: np.ndarray  # [U, k] example ids
    topk_positions: np.ndarray  # [U, k] flat argmax position (-1 for flat outputs)
    mean: np.ndarray  # [U]
    max: np.ndarray  # [U]


@dataclass
class ModelScan:
    model: str
    layers: list[LayerScan]
    labels: np.ndarray  # [N] label of every example, -1 when unknown
    predicted: np.ndarray | None  # [N] int, or None when the output is not [N, classes]
    confidence: np.ndarray | None  # [N] softmax probability of the prediction
    n_examples: int
    seconds: float
    accuracy: float | None = None  # on labelled examples whose label is a valid class index


def scan_model(model: LoadedModel, dataset: AtlasDataset, layers: list[str], top_k: int, batch_size: int,
               reduce: str, device: torch.device, progress: bool = True) -> ModelScan:
    """Stream the dataset through the model once and summarize every unit of `layers`."""
    start = time.perf_counter()
    net = model.module.to(device)
    loader = DataLoader(dataset.data, batch_size=batch_size, shuffle=False)
    topks: dict[str, TopK] = {}
    moments: dict[str, Moments] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    predicted, confidence, label_batches = [], [], []
    seen = 0
    with Probe(net, layers, reduce) as probe, torch.inference_mode():
        for x, y in tqdm(loader, desc=f"scan {model.name}", unit="batch", disable=not progress, leave=False):
            out = net(x.to(device))
            ids = torch.arange(seen, seen + x.shape[0])
            seen += x.shape[0]
            label_batches.append(torch.as_tensor(y).view(-1))
            for name in layers:
                values, positions = probe.values[name], probe.positions[name]
                if name not in topks:
                    shapes[name] = probe.shapes[name]
                    topks[name] = TopK(values.shape[1], top_k)
                    moments[name] = Moments(values.shape[1])
                topks[name].update(values, ids, positions)
                moments[name].update(values)
            if isinstance(out, torch.Tensor) and out.dim() == 2:
                prob = out.float().softmax(1)
                conf, pred = prob.max(1)
                predicted.append(pred.cpu())
                confidence.append(conf.cpu())
    net.to("cpu")
    result_layers = []
    modules = dict(net.named_modules())
    for name in layers:
        values, ids, positions = topks[name].finalize()
        m = moments[name].finalize()
        info = LayerInfo(name, type(modules[name]).__name__, shapes[name], True)
        result_layers.append(LayerScan(info, values, ids, positions, m["mean"], m["max"]))
    pred = torch.cat(predicted).numpy() if len(predicted) and sum(len(p) for p in predicted) == seen else None
    conf = torch.cat(confidence).numpy() if pred is not None else None
    labels = torch.cat(label_batches).numpy().astype(np.int64) if label_batches else np.zeros(0, np.int64)
    accuracy = None
    if pred is not None:
        valid = labels >= 0
        if valid.any():
            accuracy = float((pred[valid] == labels[valid]).mean())
    return ModelScan(model.name, result_layers, labels, pred, conf, seen, time.perf_counter() - start, accuracy)
