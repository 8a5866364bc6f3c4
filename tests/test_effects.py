"""explain.class_effects, effect_examples and top_effects against direct computations: per example, the
gradient of its own class's logit with respect to a layer's output, times the output, summed over each unit's
positions, averaged per class; a layer feeding the classifier gets the classifier's weights; no hooks left."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from atlas_builder import explain
from atlas_builder.errors import ForwardError


def mlp(n_classes: int = 4, inplace: bool = False) -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(OrderedDict([
        ("fc1", nn.Linear(6, 7)), ("act", nn.ELU(inplace=inplace)), ("drop", nn.Dropout(0.5)),
        ("fc2", nn.Linear(7, n_classes))]))


def cnn(n_classes: int = 4) -> nn.Module:
    torch.manual_seed(6)
    return nn.Sequential(OrderedDict([
        ("conv", nn.Conv2d(2, 3, 3, padding=1)), ("relu", nn.Tanh()), ("pool", nn.AdaptiveAvgPool2d(2)),
        ("flatten", nn.Flatten()), ("fc", nn.Linear(12, n_classes))]))


class Tokens(nn.Module):
    """[B, T, F] -> tokens [B, T, D] (`embed`, `act`) -> mean over tokens -> logits."""

    def __init__(self, n_classes: int = 4):
        super().__init__()
        torch.manual_seed(7)
        self.embed, self.act, self.head = nn.Linear(3, 5), nn.GELU(), nn.Linear(5, n_classes)

    def forward(self, x):
        return self.head(self.act(self.embed(x)).mean(1))


class SwinTransformerBlock(nn.Module):
    """Named as torchvision's: [B, C, H, W] in, a channels-last map [B, H, W, C'] out."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(2, 3)

    def forward(self, x):
        return torch.tanh(self.mix(x.permute(0, 2, 3, 1)))


class Swin(nn.Module):
    def __init__(self, n_classes: int = 4):
        super().__init__()
        torch.manual_seed(8)
        self.block, self.head = SwinTransformerBlock(), nn.Linear(3 * 4 * 4, n_classes)

    def forward(self, x):
        return self.head(self.block(x).permute(0, 3, 1, 2).flatten(1) ** 2)


def data(shape, n: int = 30, n_classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g) * 2
    labels = np.arange(n) % (n_classes + 1) - 1  # -1 (unknown) and 0..n_classes-1
    return x, labels


def slow_effects(net: nn.Module, layer: str, x: torch.Tensor, labels: np.ndarray, ids: np.ndarray,
                 n_classes: int, last: bool = False) -> np.ndarray:
    """The obvious way: per example a forward, the gradient of its own logit w.r.t. the layer output, times
    the output, summed over positions; then per-class means (NaN for a class with no example)."""
    net.eval()
    module = net.get_submodule(layer)
    rows, classes = [], []
    for i in ids:
        c = int(labels[i])
        if not 0 <= c < n_classes:
            continue
        kept = {}
        handle = module.register_forward_hook(lambda m, a, out: kept.__setitem__("out", out))
        try:
            logits = net(x[i:i + 1])
        finally:
            handle.remove()
        out = kept["out"]
        (grad,) = torch.autograd.grad(logits[0, c], out)
        prod = (out * grad)[0].detach()
        if last:
            prod = prod.permute(2, 0, 1)
        if prod.dim() == 1:  # flat [U]
            rows.append(prod)
        elif prod.dim() == 2:  # tokens [T, D]
            rows.append(prod.sum(0))
        else:  # a map [C, H, W]
            rows.append(prod.reshape(prod.shape[0], -1).sum(1))
        classes.append(c)
    effects = torch.stack(rows).double().numpy()  # [n, U]
    out = np.full((effects.shape[1], n_classes), np.nan)
    for c in range(n_classes):
        pick = np.asarray(classes) == c
        if pick.any():
            out[:, c] = effects[pick].mean(0)
    return out


def load_from(x: torch.Tensor):
    return lambda ids: x[torch.as_tensor(np.asarray(ids), dtype=torch.long)]


def test_conv_mlp_tokens_and_channels_last_match_the_slow_way():
    cases = [(cnn(), ["conv", "relu", "pool"], (2, 5, 5), False, 3), (mlp(), ["fc1", "act", "drop"], (6,), False, 7),
             (Tokens(), ["embed", "act"], (4, 3), False, 5),  # a token layer's unit: its feature D
             (Swin(), ["block"], (2, 4, 4), True, 3)]  # a channels-last map's unit: its channel, the last dim
    for net, layers, shape, last, units in cases:
        x, labels = data(shape)
        ids = np.arange(len(x))
        got = explain.class_effects(net, layers, load_from(x), ids, labels, 4, batch_size=7, device="cpu")
        assert list(got) == layers
        for layer in layers:
            want = slow_effects(net, layer, x, labels, ids, 4, last=last)
            assert got[layer].dtype == np.float32 and got[layer].shape == want.shape == (units, 4)
            assert np.isnan(got[layer]).sum() == 0
            np.testing.assert_allclose(got[layer], want, rtol=1e-5, atol=1e-6, err_msg=f"{type(net).__name__} {layer}")


def test_batched_equals_one_at_a_time_and_a_sample_of_ids():
    net = cnn()
    x, labels = data((2, 5, 5))
    ids = np.array([1, 4, 6, 9, 12, 13, 20, 28])
    one = explain.class_effects(net, ["conv", "pool"], load_from(x), ids, labels, 4, batch_size=1, device="cpu")
    many = explain.class_effects(net, ["conv", "pool"], load_from(x), ids, labels, 4, batch_size=32, device="cpu")
    for layer in one:
        np.testing.assert_allclose(many[layer], one[layer], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(many[layer], slow_effects(net, layer, x, labels, ids, 4), rtol=1e-5, atol=1e-6)


def test_an_inplace_op_after_the_layer_does_not_change_its_effect():
    """fc1 followed by ELU(inplace=True): the effect is of fc1's own output (its in-place update would
    otherwise stand in for it), so equal to the one of the same net without in-place ops."""
    x, labels = data((6,))
    ids = np.arange(len(x))
    got = explain.class_effects(mlp(inplace=True), ["fc1", "act"], load_from(x), ids, labels, 4, 8, "cpu")
    for layer in ("fc1", "act"):
        np.testing.assert_allclose(got[layer], slow_effects(mlp(), layer, x, labels, ids, 4), rtol=1e-5, atol=1e-6)


def test_a_layer_feeding_the_classifier_gets_its_weights_and_the_output_layer_none():
    x, labels = data((6,))
    ids = np.arange(len(x))
    net = mlp()
    rows: set = set()
    got = explain.class_effects(net, ["fc1", "act", "drop", "fc2"], load_from(x), ids, labels, 4, 8, "cpu",
                                output_layer="fc2", weight_rows=rows)
    weights = net.fc2.weight.detach().numpy().T
    assert set(got) == {"fc1", "act", "drop"} and rows == {"act", "drop"}  # dropout (eval) hands act on as it is
    np.testing.assert_array_equal(got["act"], weights)
    np.testing.assert_array_equal(got["drop"], weights)
    np.testing.assert_allclose(got["fc1"], slow_effects(net, "fc1", x, labels, ids, 4), rtol=1e-5, atol=1e-6)
    # the estimate of such a layer is exact: the class's mean activation times the weight
    plain = explain.class_effects(net, ["act"], load_from(x), ids, labels, 4, 8, "cpu")["act"]
    with torch.no_grad():
        acts = net[:2](x).numpy()
    means = np.stack([acts[labels == c].mean(0) for c in range(4)], 1)
    np.testing.assert_allclose(plain, means * weights, rtol=1e-5, atol=1e-6)

    conv = cnn()
    rows = set()
    x, labels = data((2, 5, 5))
    got = explain.class_effects(conv, ["pool", "flatten", "fc"], load_from(x), ids, labels, 4, 8, "cpu",
                                output_layer="fc", weight_rows=rows)
    assert set(got) == {"pool", "flatten"} and rows == {"flatten"}  # pool is 3 units x 4 positions, not 12 inputs
    np.testing.assert_array_equal(got["flatten"], conv.fc.weight.detach().numpy().T)
    np.testing.assert_allclose(got["pool"], slow_effects(conv, "pool", x, labels, ids, 4), rtol=1e-5, atol=1e-6)


def test_classes_without_examples_are_nan_and_bad_outputs_fail():
    x, labels = data((6,))
    labels = np.where(labels >= 2, 0, labels)  # no example of classes 2 and 3
    ids = np.arange(len(x))
    got = explain.class_effects(mlp(), ["fc1", "act"], load_from(x), ids, labels, 4, 8, "cpu", output_layer="fc2")
    assert np.isnan(got["fc1"][:, 2:]).all() and np.isfinite(got["fc1"][:, :2]).all()
    assert np.isfinite(got["act"]).all()  # weights: every class
    assert explain.class_effects(mlp(), ["fc1"], load_from(x), ids[labels[ids] < 0], labels, 4, 8, "cpu") == {}

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 4)

        def forward(self, x):
            return self.fc(x), x

    with pytest.raises(ValueError, match="logits"):
        explain.class_effects(Pair(), ["fc"], load_from(x), ids, labels, 4, 8, "cpu")
    with pytest.raises(ValueError, match="logits"):
        explain.class_effects(mlp(n_classes=3), ["fc1"], load_from(x), ids, labels, 4, 8, "cpu")


def test_no_hooks_left_outputs_and_mode_unchanged_no_parameter_grads():
    net = cnn()
    x, labels = data((2, 5, 5))
    net.train()
    before = net.eval()(x).detach().clone()
    net.train()
    explain.class_effects(net, ["conv", "relu", "flatten"], load_from(x), np.arange(len(x)), labels, 4, 8, "cpu",
                          output_layer="fc")
    assert net.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
    assert all(p.grad is None for p in net.parameters())
    torch.testing.assert_close(net.eval()(x), before, rtol=0, atol=0)
    with pytest.raises(ForwardError):
        explain.class_effects(net, ["conv"], lambda ids: torch.zeros(len(ids), 5), np.arange(3), labels, 4, 8, "cpu")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


def test_effect_examples_is_seeded_capped_per_class_and_respects_labels():
    labels = np.random.default_rng(0).integers(-1, 6, size=200)
    labels[labels == 4] = 3  # class 4 empty
    labels[np.flatnonzero(labels == 2)[3:]] = 5  # class 2 has 3 examples
    ids = explain.effect_examples(labels, 5, per_class=10, seed=1)
    assert ids.dtype == np.int64 and (np.diff(ids) > 0).all()
    np.testing.assert_array_equal(ids, explain.effect_examples(labels, 5, per_class=10, seed=1))
    assert not np.array_equal(ids, explain.effect_examples(labels, 5, per_class=10, seed=2))
    picked = labels[ids]
    assert ((picked >= 0) & (picked < 5)).all()  # -1 and 5 skipped
    counts = np.bincount(picked, minlength=5)
    assert counts.tolist() == [10, 10, 3, 10, 0]
    np.testing.assert_array_equal(ids[picked == 2], np.flatnonzero(labels == 2))
    assert len(explain.effect_examples(labels, 5, per_class=0, seed=1)) == 0
    assert len(explain.effect_examples(np.zeros(0, np.int64), 3, per_class=4, seed=1)) == 0


def brute_top(row: np.ndarray, k: int, sign: int) -> list[tuple[int, float]]:
    found = sorted((-sign * v, c) for c, v in enumerate(row) if not np.isnan(v) and sign * v > 0)
    return [(c, -sign * s) for s, c in found[:k]]


def test_top_effects_against_a_brute_force_sort():
    rng = np.random.default_rng(3)
    effects = rng.normal(size=(40, 9)).astype(np.float32)
    effects[rng.random(effects.shape) < 0.2] = np.nan
    effects[0] = np.abs(effects[0])  # pushes nothing down
    effects[1] = np.nan
    effects[2] = 0.0  # zero is neither up nor down
    effects[3] = [0.5, 0.5, 0.5, 0.5, -0.2, -0.2, np.nan, 0.1, -0.3]  # ties: the lower class first
    for k in (1, 3, 5, 12):
        up_c, up_v, down_c, down_v = explain.top_effects(effects, k)
        assert up_c.shape == up_v.shape == down_c.shape == down_v.shape == (40, k)
        for u, row in enumerate(effects):
            for sign, classes, values in ((1, up_c, up_v), (-1, down_c, down_v)):
                want = brute_top(row, k, sign)
                n = len(want)
                assert classes[u, :n].tolist() == [c for c, _ in want], (u, k, sign)
                np.testing.assert_array_equal(values[u, :n], np.float32([v for _, v in want]))
                assert (classes[u, n:] == -1).all() and np.isnan(values[u, n:]).all()
    up_c, _, down_c, _ = explain.top_effects(effects, 5)
    assert (down_c[0] == -1).all() and (up_c[1] == -1).all() and (up_c[2] == -1).all() and (down_c[2] == -1).all()
    assert up_c[3].tolist() == [0, 1, 2, 3, 7] and down_c[3].tolist() == [8, 4, 5, -1, -1]


@pytest.mark.parametrize("with_nan", [False, True])
def test_top_effects_of_a_vocabulary_take_the_topk_path_and_pick_the_same(with_nan):
    """Over many classes (a language model's tokens: more than 8 k) top_effects takes torch.topk's
    candidates; ties at the k-th value, rows with fewer than k entries each way and NaN pick as the
    brute-force sort does."""
    rng = np.random.default_rng(4)
    effects = np.round(rng.normal(size=(30, 400)), 1).astype(np.float32)  # 1 decimal: many ties
    effects[0] = np.abs(effects[0])
    effects[1, 3:] = 0.0  # three classes up or down, the rest neither
    effects[2] = 0.7  # every class tied
    if with_nan:
        effects[rng.random(effects.shape) < 0.1] = np.nan
    for k in (1, 5, 10):
        up_c, up_v, down_c, down_v = explain.top_effects(effects, k)
        for u, row in enumerate(effects):
            for sign, classes in ((1, up_c), (-1, down_c)):
                want = brute_top(row, k, sign)
                assert classes[u].tolist() == [c for c, _ in want] + [-1] * (k - len(want)), (u, k, sign)
