"""Probe: layer listing, layer resolution, per-unit reductions against brute force, hook hygiene."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from atlas_builder.errors import AtlasError
from atlas_builder.probe import LayerInfo, Probe, list_layers, reduce_output, resolve_layers, unit_count

import fixtures_models


class TupleOut(nn.Module):
    def forward(self, x):
        return x, x * 2


class WithTuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.pair = TupleOut()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        a, b = self.pair(x)
        return self.fc(a + b)


class SharedAct(nn.Module):
    """One ReLU module called twice in a forward."""

    def __init__(self):
        super().__init__()
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.act(x) - 1.0)


def token_model():
    torch.manual_seed(4)
    return nn.Sequential(OrderedDict([("proj", nn.Linear(5, 6)), ("act", nn.GELU()), ("norm", nn.LayerNorm(6))]))


def all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def batch(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- list_layers / resolve_layers -------------------------------------------

def test_list_layers_shapes_and_default_flags():
    model = fixtures_models.tiny_cnn()
    layers = list_layers(model, batch(2, 1, 8, 8))
    assert all(isinstance(layer, LayerInfo) for layer in layers)
    table = {layer.name: (layer.module_type, layer.shape, layer.default) for layer in layers}
    assert table == {
        "conv": ("Conv2d", (4, 8, 8), True),
        "relu": ("ReLU", (4, 8, 8), True),
        "pool": ("AdaptiveAvgPool2d", (4, 2, 2), False),
        "flatten": ("Flatten", (16,), False),
        "fc": ("Linear", (3,), True),
    }
    assert [layer.name for layer in layers] == ["conv", "relu", "pool", "flatten", "fc"]  # module order
    by_name = {layer.name: layer for layer in layers}
    assert by_name["conv"].n_units == 4 and by_name["conv"].spatial == (8, 8)
    assert by_name["fc"].n_units == 3 and by_name["fc"].spatial is None
    assert all(layer.probeable for layer in layers)
    assert all_hooks(model) == 0


def test_list_layers_tokens_and_non_tensor_outputs():
    layers = {layer.name: layer for layer in list_layers(token_model(), batch(2, 7, 5))}
    assert layers["proj"].shape == (7, 6)
    assert layers["proj"].n_units == 6 and layers["proj"].spatial == (1, 7)
    assert layers["act"].default and not layers["norm"].default
    model = WithTuple()
    layers = {layer.name: layer for layer in list_layers(model, batch(3, 4))}
    assert layers["pair"].shape is None and not layers["pair"].probeable and layers["pair"].n_units == 0
    assert layers["fc"].shape == (2,)
    assert all_hooks(model) == 0


def test_list_layers_removes_hooks_when_forward_fails():
    model = fixtures_models.tiny_cnn()
    with pytest.raises(RuntimeError):
        list_layers(model, batch(2, 3, 8, 8))  # 3 channels into a 1-channel conv
    assert all_hooks(model) == 0


def test_unit_count():
    assert unit_count((4, 8, 8)) == 4
    assert unit_count((7, 6)) == 6
    assert unit_count((3,)) == 3
    assert unit_count(None) == 0 and unit_count(()) == 0


def test_resolve_unknown_layer_lists_valid_names():
    with pytest.raises(AtlasError) as info:
        resolve_layers(fixtures_models.tiny_cnn(), ["conv", "convv"], "tiny-cnn")
    message = str(info.value)
    assert "model 'tiny-cnn' has no layer 'convv'" in message
    assert "valid layer names are: conv, relu, pool, flatten, fc" in message


def test_resolve_default_layers():
    assert resolve_layers(fixtures_models.tiny_cnn(), ()) == ["conv", "relu", "fc"]
    assert resolve_layers(fixtures_models.tiny_mlp(), []) == ["fc1", "act", "fc2"]
    assert resolve_layers(token_model(), ()) == ["proj", "act"]


def test_resolve_requested_layers_keeps_order_without_duplicates():
    model = fixtures_models.tiny_cnn()
    assert resolve_layers(model, ("fc", "pool", "fc")) == ["fc", "pool"]
    assert resolve_layers(model, ["flatten"]) == ["flatten"]  # any named module may be requested


def test_resolve_default_without_probeable_modules():
    model = nn.Sequential(nn.Flatten(), nn.Identity())
    with pytest.raises(AtlasError, match="has no conv, linear or activation modules"):
        resolve_layers(model, (), "odd")


# --- Probe values against brute force -----------------------------------------

def test_probe_conv_max_and_position_and_linear_identity():
    model = fixtures_models.tiny_cnn().eval()
    x = batch(5, 1, 8, 8)
    with torch.no_grad():
        conv_out = model.conv(x)
        relu_out = model.relu(conv_out)
        pool_out = model.pool(relu_out)
        fc_out = model.fc(model.flatten(pool_out))
        with Probe(model, ["conv", "relu", "pool", "fc"]) as probe:
            out = model(x)
    torch.testing.assert_close(out, fc_out)
    assert probe.shapes == {"conv": (4, 8, 8), "relu": (4, 8, 8), "pool": (4, 2, 2), "fc": (3,)}
    for name, raw in (("conv", conv_out), ("relu", relu_out), ("pool", pool_out)):
        values, positions = raw.flatten(2).max(dim=2)
        torch.testing.assert_close(probe.values[name], values, rtol=0, atol=0)
        assert probe.values[name].shape == (5, 4) and probe.values[name].dtype == torch.float32
        assert probe.positions[name].dtype == torch.int64
    # conv values are distinct reals: the argmax position is unique, flat index h * W + w
    expected_values, expected_pos = conv_out.flatten(2).max(dim=2)
    assert torch.equal(probe.positions["conv"], expected_pos)
    for b in range(5):
        for c in range(4):
            h, w = divmod(int(probe.positions["conv"][b, c]), 8)
            assert float(conv_out[b, c, h, w]) == float(probe.values["conv"][b, c])
    torch.testing.assert_close(probe.values["fc"], fc_out, rtol=0, atol=0)
    assert torch.equal(probe.positions["fc"], torch.full((5, 3), -1))
    # the values are not trivially equal across layers (max of conv != max of relu somewhere)
    assert not torch.equal(probe.values["conv"], probe.values["pool"])


def test_probe_mean_reduction():
    model = fixtures_models.tiny_cnn().eval()
    x = batch(4, 1, 8, 8, seed=1)
    with torch.no_grad():
        conv_out = model.conv(x)
        with Probe(model, ["conv", "fc"], reduce="mean") as probe:
            model(x)
    torch.testing.assert_close(probe.values["conv"], conv_out.flatten(2).mean(dim=2), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(probe.values["conv"], conv_out.flatten(2).max(dim=2).values)
    assert torch.equal(probe.positions["conv"], conv_out.flatten(2).argmax(dim=2))  # still where it peaked
    torch.testing.assert_close(probe.values["fc"], model(x).detach(), rtol=0, atol=0)


def test_probe_token_outputs_max_over_tokens():
    model = token_model().eval()
    x = batch(3, 7, 5, seed=2)
    with torch.no_grad():
        proj = model.proj(x)
        with Probe(model, ["proj"]) as probe:
            model(x)
    values, positions = proj.max(dim=1)  # over T -> [B, D]
    assert probe.shapes["proj"] == (7, 6)
    torch.testing.assert_close(probe.values["proj"], values, rtol=0, atol=0)
    assert torch.equal(probe.positions["proj"], positions)
    assert probe.values["proj"].shape == (3, 6)


def test_probe_shared_module_reports_last_call():
    model = SharedAct()
    x = batch(2, 3, 4, 4, seed=3)
    with Probe(model, ["act"]) as probe:
        model(x)
    last = torch.relu(torch.relu(x) - 1.0)
    torch.testing.assert_close(probe.values["act"], last.flatten(2).max(dim=2).values, rtol=0, atol=0)


def test_probe_values_are_float32_for_half_outputs():
    out = batch(2, 3, seed=5).half()
    values, positions = reduce_output(out, "max")
    assert values.dtype == torch.float32 and positions.shape == (2, 3)
    torch.testing.assert_close(values, out.float(), rtol=0, atol=0)


# --- hook hygiene and errors --------------------------------------------------

def test_hooks_removed_after_with_block():
    model = fixtures_models.tiny_cnn()
    with Probe(model, ["conv", "fc"]):
        assert len(model.conv._forward_hooks) == 1 and len(model.fc._forward_hooks) == 1
        assert all_hooks(model) == 2
    assert len(model.conv._forward_hooks) == 0 and len(model.fc._forward_hooks) == 0
    assert all_hooks(model) == 0


def test_hooks_removed_when_forward_raises_inside_block():
    model = fixtures_models.tiny_cnn()
    with pytest.raises(RuntimeError):
        with Probe(model, ["conv", "relu", "fc"]):
            assert all_hooks(model) == 3
            model(batch(2, 3, 8, 8))  # wrong channel count: the conv raises
    assert all_hooks(model) == 0


def test_tuple_output_layer_is_atlas_error_and_hooks_are_removed():
    model = WithTuple()
    with pytest.raises(AtlasError) as info:
        with Probe(model, ["pair", "fc"]):
            model(batch(2, 4))
    message = str(info.value)
    assert "layer 'pair' (TupleOut) returns tuple, not a tensor" in message
    assert "submodule" in message
    assert all_hooks(model) == 0


@pytest.mark.parametrize("shape", [(2, 3, 4, 5, 6), (7,)])
def test_reduce_output_rejects_unsupported_ranks(shape):
    with pytest.raises(AtlasError) as info:
        reduce_output(torch.zeros(shape), "max")
    assert f"layer output of shape {shape} is not supported" in str(info.value)
    assert "[B, C, H, W]" in str(info.value)


def test_reduce_output_on_known_values():
    out = torch.tensor([[[[1.0, 9.0], [3.0, 4.0]], [[-1.0, -2.0], [-3.0, -0.5]]]])  # [1, 2, 2, 2]
    values, positions = reduce_output(out, "max")
    assert values.tolist() == [[9.0, -0.5]] and positions.tolist() == [[1, 3]]
    values, positions = reduce_output(out, "mean")
    assert values.tolist() == [[4.25, -1.625]] and positions.tolist() == [[1, 3]]
