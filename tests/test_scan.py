"""Scan accumulators and the scan loop against brute-force computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from atlas_builder.probe import reduce_output
from atlas_builder.scan import Moments, TopK, scan_model
from atlas_builder.sources import AtlasDataset, LoadedModel
from atlas_builder.config import ModelSection

import fixtures_models


def brute_topk(values: np.ndarray, k: int):
    """values [N, U] -> per unit the k largest values and their example ids (ties: lower id first)."""
    out_v, out_i = [], []
    for u in range(values.shape[1]):
        order = sorted(range(values.shape[0]), key=lambda n: (-values[n, u], n))[:k]
        out_i.append(order)
        out_v.append(values[order, u])
    return np.array(out_v), np.array(out_i)


def feed(acc: TopK, values: torch.Tensor, positions: torch.Tensor, start: int, batch: int):
    for i in range(0, values.shape[0], batch):
        v, p = values[i:i + batch], positions[i:i + batch]
        acc.update(v, torch.arange(start + i, start + i + v.shape[0]), p)


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_topk_matches_brute_force(batch):
    g = torch.Generator().manual_seed(0)
    values = torch.randn(50, 6, generator=g)
    values[10:14, 2] = 5.0  # a tie at the top: lower ids must win
    positions = torch.randint(0, 16, (50, 6), generator=g)
    acc = TopK(6, 5)
    feed(acc, values, positions, 0, batch)
    v, ids, pos = acc.finalize()
    bv, bi = brute_topk(values.numpy(), 5)
    np.testing.assert_allclose(v, bv)
    np.testing.assert_array_equal(ids, bi)
    np.testing.assert_array_equal(pos, positions.numpy()[bi, np.arange(6)[:, None]])
    assert list(ids[2, :4]) == [10, 11, 12, 13]


def test_topk_merge_of_two_shards_equals_one_pass():
    g = torch.Generator().manual_seed(1)
    values = torch.randn(80, 4, generator=g).round(decimals=1)  # many ties
    positions = torch.randint(0, 9, (80, 4), generator=g)
    whole = TopK(4, 7)
    feed(whole, values, positions, 0, 16)
    a, b = TopK(4, 7), TopK(4, 7)
    feed(b, values[40:], positions[40:], 40, 16)  # second shard first: order must not matter
    feed(a, values[:40], positions[:40], 0, 16)
    b.merge(a)
    for x, y in zip(whole.finalize(), b.finalize()):
        np.testing.assert_array_equal(x, y)


def test_topk_keeps_all_when_fewer_examples_than_k():
    acc = TopK(2, 10)
    acc.update(torch.tensor([[1.0, 2.0], [3.0, 0.0]]), torch.tensor([0, 1]), torch.zeros(2, 2, dtype=torch.long))
    v, ids, _ = acc.finalize()
    assert v.shape == (2, 2)
    np.testing.assert_array_equal(ids, [[1, 0], [0, 1]])


def test_moments_match_brute_force_and_merge():
    g = torch.Generator().manual_seed(2)
    values = torch.randn(100, 5, generator=g) * 3 + 1
    one = Moments(5)
    for i in range(0, 100, 13):
        one.update(values[i:i + 13])
    a, b = Moments(5), Moments(5)
    a.update(values[:30])
    b.update(values[30:])
    a.merge(b)
    for m in (one.finalize(), a.finalize()):
        np.testing.assert_allclose(m["mean"], values.double().mean(0).numpy(), rtol=1e-10)
        np.testing.assert_allclose(m["max"], values.double().amax(0).numpy())


def test_scan_model_matches_brute_force_on_random_cnn():
    model = fixtures_models.tiny_cnn()
    data = fixtures_models.tiny_dataset()
    dataset = AtlasDataset(data, ("a", "b", "c"), (), (), "test", "fp")
    loaded = LoadedModel(ModelSection("tiny", "fixtures_models:tiny_cnn"), model, "fp", {"parameters": 0})
    result = scan_model(loaded, dataset, ["conv", "fc"], top_k=4, batch_size=7, reduce="max",
                        device=torch.device("cpu"), progress=False)
    x = data.images
    with torch.inference_mode():
        conv_out = model.conv(x)
        logits = model(x)
    values, positions = reduce_output(conv_out, "max")
    bv, bi = brute_topk(values.numpy(), 4)
    conv = result.layers[0]
    assert conv.info.shape == (4, 8, 8) and conv.info.n_units == 4 and conv.info.spatial == (8, 8)
    np.testing.assert_allclose(conv.topk_values, bv, rtol=1e-6)
    np.testing.assert_array_equal(conv.topk_ids, bi)
    np.testing.assert_array_equal(conv.topk_positions, positions.numpy()[bi, np.arange(4)[:, None]])
    np.testing.assert_allclose(conv.mean, values.double().mean(0).numpy(), rtol=1e-5)
    fc = result.layers[1]
    assert (fc.topk_positions == -1).all()
    np.testing.assert_allclose(fc.max, logits.amax(0).numpy(), rtol=1e-6)
    np.testing.assert_array_equal(result.predicted, logits.argmax(1).numpy())
    np.testing.assert_array_equal(result.labels, data.labels.numpy())
    assert result.n_examples == 40
    assert result.accuracy == pytest.approx(float((logits.argmax(1) == data.labels).float().mean()))
