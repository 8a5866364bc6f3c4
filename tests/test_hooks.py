"""Hooks: Capture against direct computation, stopping, calls per forward, layer listing and resolution, hygiene."""

from __future__ import annotations

import subprocess
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from atlas_builder.errors import AtlasError, ForwardError
from atlas_builder.hooks import (Capture, LayerInfo, describe_layer, layer_sources, list_layers, resolve_layers,
                                 unit_count)

import fixtures_models

PACKAGE = Path(__file__).resolve().parent.parent / "atlas_builder"


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


class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x


class SharedReLU(nn.Module):
    """One ReLU module called twice per forward (as torchvision's BasicBlock does)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.block = nn.Module()
        self.block.fc1, self.block.relu, self.block.fc2 = nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)
        self.after = Counter()

    def forward(self, x):
        b = self.block
        return self.after(b.relu(b.fc2(b.relu(b.fc1(x)))))


def token_model():
    torch.manual_seed(4)
    return nn.Sequential(OrderedDict([("proj", nn.Linear(5, 6)), ("act", nn.GELU()), ("norm", nn.LayerNorm(6))]))


def all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def batch(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_only_the_hooks_module_registers_hooks():
    found = subprocess.run(["grep", "-rln", "--include=*.py", "register_forward", str(PACKAGE)], capture_output=True,
                           text=True)
    assert [Path(p).name for p in found.stdout.split()] == ["hooks.py"]


# --- Capture against direct computation -------------------------------------------------

def test_capture_outputs_equal_each_modules_own_output():
    model = fixtures_models.tiny_cnn().eval()
    x = batch(5, 1, 8, 8)
    with torch.no_grad():
        conv = model.conv(x)
        relu = model.relu(conv)
        pool = model.pool(relu)
        fc = model.fc(model.flatten(pool))
        with Capture(model, ["conv", "relu", "pool", "fc"]) as capture:
            out = capture(x)
    torch.testing.assert_close(out, fc, rtol=0, atol=0)
    for name, expected in (("conv", conv), ("relu", relu), ("pool", pool), ("fc", fc)):
        torch.testing.assert_close(capture.outputs[name], expected, rtol=0, atol=0)
    assert capture.shapes == {"conv": (4, 8, 8), "relu": (4, 8, 8), "pool": (4, 2, 2), "fc": (3,)}
    assert capture.calls == {"conv": 1, "relu": 1, "pool": 1, "fc": 1}


def test_capture_sink_sees_the_live_output_before_a_later_inplace_op():
    model = nn.Sequential(OrderedDict([("fc", nn.Linear(4, 3)), ("relu", nn.ReLU(inplace=True))])).eval()
    x = batch(6, 4)
    seen = {}
    with torch.no_grad():
        with Capture(model, ["fc"], sink=lambda name, out: seen.setdefault(name, out.clone())) as cap:
            cap(x)
        with Capture(model, ["fc"]) as kept:
            kept(x)
        expected = model.fc(x)
    torch.testing.assert_close(seen["fc"], expected, rtol=0, atol=0)  # not ReLU'd by the in-place op after it
    torch.testing.assert_close(kept.outputs["fc"], expected, rtol=0, atol=0)  # a copy, taken in the hook
    assert (expected < 0).any()


def test_capture_stop_ends_the_forward_after_the_last_layer():
    model = nn.Sequential(OrderedDict([("conv", nn.Conv2d(1, 2, 3)), ("relu", nn.ReLU()), ("after", Counter())]))
    x = torch.rand(2, 1, 6, 6)
    with Capture(model, ["conv", "relu"], stop=True) as capture:
        for _ in range(3):
            assert capture(x) is None
    assert model.after.calls == 0  # nothing after the last captured layer ran
    torch.testing.assert_close(capture.outputs["relu"], torch.relu(model.conv(x)))
    model(x)
    assert model.after.calls == 1


def test_capture_grad_keeps_the_graph_and_take_input_gives_the_layers_input():
    model = nn.Sequential(OrderedDict([("fc", nn.Linear(4, 3)), ("relu", nn.ReLU())]))
    x = batch(2, 4).requires_grad_(True)
    with Capture(model, ["relu"], stop=True, grad=True, take="input") as capture:
        capture(x)
    before_relu = capture.outputs["relu"]
    torch.testing.assert_close(before_relu, model.fc(x))
    before_relu.sum().backward()
    torch.testing.assert_close(x.grad, model.fc.weight.sum(0).expand(2, 4))


# --- calls per forward --------------------------------------------------------------------

def test_a_module_the_forward_reuses_is_refused_with_what_to_probe_instead():
    model = SharedReLU()
    with pytest.raises(AtlasError) as info:
        with Capture(model, ["block.relu"], model_name="shared") as capture:
            capture(batch(3, 4))
    message = str(info.value)
    assert "layer 'block.relu' of model 'shared' runs more than once in one forward pass" in message
    assert "'block'" in message and "atlas layers CONFIG" in message
    assert all_hooks(model) == 0


def test_a_layer_that_never_runs_is_an_error():
    model = WithTuple()
    model.unused = nn.ReLU()  # held, never called
    with pytest.raises(AtlasError, match="layer 'unused' of model 'm' is never called"):
        with Capture(model, ["fc", "unused"], model_name="m") as capture:
            capture(batch(2, 4))
    assert all_hooks(model) == 0


def test_list_layers_counts_calls_and_reused_modules_are_no_default():
    model = SharedReLU()
    layers = {layer.name: layer for layer in list_layers(model, batch(2, 4))}
    assert layers["block.relu"].calls == 2 and not layers["block.relu"].default
    assert not layers["block.relu"].probeable
    assert layers["block.fc1"].calls == 1 and layers["block.fc1"].default  # its ReLU is reused: the fc itself
    assert resolve_layers(model, (), "shared", list(layers.values())) == ["block.fc1", "block.fc2"]
    assert all_hooks(model) == 0


# --- list_layers / resolve_layers -------------------------------------------------------

def test_list_layers_shapes_and_default_flags():
    model = fixtures_models.tiny_cnn()
    layers = list_layers(model, batch(2, 1, 8, 8))
    assert all(isinstance(layer, LayerInfo) for layer in layers)
    table = {layer.name: (layer.module_type, layer.shape, layer.default) for layer in layers}
    assert table == {
        "conv": ("Conv2d", (4, 8, 8), False),  # one layer with the ReLU after it, probed there
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
    assert layers["act"].default and not layers["norm"].default and not layers["proj"].default
    model = WithTuple()
    layers = {layer.name: layer for layer in list_layers(model, batch(3, 4))}
    assert layers["pair"].shape is None and not layers["pair"].probeable and layers["pair"].n_units == 0
    assert layers["fc"].shape == (2,)
    assert all_hooks(model) == 0


def test_list_layers_removes_hooks_when_forward_fails():
    model = fixtures_models.tiny_cnn()
    with pytest.raises(ForwardError, match="Conv2d|channels"):
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
    for model, x, expected in ((fixtures_models.tiny_cnn(), batch(1, 1, 8, 8), ["relu", "fc"]),
                               (fixtures_models.tiny_mlp(), batch(1, 1, 8, 8), ["act", "fc2"]),
                               (token_model(), batch(1, 7, 5), ["act"])):
        assert resolve_layers(model, (), "m", list_layers(model, x)) == expected
        assert resolve_layers(model, ()) == expected  # without a forward: by module structure alone


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)) + x)


def test_default_rule_pairs_conv_norm_activation_and_probes_blocks_at_their_output():
    model = nn.Sequential(OrderedDict([
        ("stem", nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())),
        ("blocks", nn.Sequential(Residual(4), Residual(4))),  # blocks of a stack: their outputs
        ("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
        ("head", nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Dropout(), nn.Linear(8, 3)))]))
    infos = list_layers(model.eval(), batch(2, 1, 6, 6))
    assert resolve_layers(model, (), "m", infos) == ["stem.2", "blocks.0", "blocks.1", "head.1", "head.3"]
    shapes = {i.name: i.shape for i in infos}
    assert describe_layer(model, "stem.2", shapes["stem.2"]) == "Conv2d+ReLU 4×6×6"
    assert describe_layer(model, "blocks.1", shapes["blocks.1"]) == "Residual 4×6×6"
    assert describe_layer(model, "head.1", shapes["head.1"]) == "Linear+Sigmoid 4→8"
    assert describe_layer(model, "head.3", shapes["head.3"]) == "Linear 8→3"
    assert layer_sources(model) == {"stem.2": "stem.0", "head.1": "head.0"}


def test_default_rule_on_torchvision_models():
    """ResNet-50: the stem, its 16 bottlenecks and fc; VGG16: 13 conv ReLUs and the classifier's three."""
    import torchvision

    for name, n_layers, n_units in (("resnet50", 18, 16168), ("vgg16", 16, 13416)):
        model = torchvision.models.get_model(name, weights=None).eval()
        infos = list_layers(model, batch(1, 3, 64, 64))
        layers = resolve_layers(model, (), name, infos)
        by_name = {i.name: i for i in infos}
        assert (len(layers), sum(by_name[l].n_units for l in layers)) == (n_layers, n_units), name
    wrapped = nn.Sequential(nn.Identity(), model)  # a backbone inside a stack is looked into, not one block
    assert resolve_layers(wrapped, (), "w", list_layers(wrapped, batch(1, 3, 64, 64))) == [f"1.{l}" for l in layers]
    assert layers[:2] == ["features.1", "features.3"] and layers[-3:] == ["classifier.1", "classifier.4",
                                                                         "classifier.6"]


def test_resolve_requested_layers_keeps_order_without_duplicates():
    model = fixtures_models.tiny_cnn()
    assert resolve_layers(model, ("fc", "pool", "fc")) == ["fc", "pool"]
    assert resolve_layers(model, ["flatten"]) == ["flatten"]  # any named module may be requested


def test_resolve_default_without_probeable_modules():
    model = nn.Sequential(nn.Flatten(), nn.Identity())
    with pytest.raises(AtlasError, match="has no conv, linear or block modules"):
        resolve_layers(model, (), "odd")


# --- hygiene and errors --------------------------------------------------------------------

def test_hooks_removed_after_with_block():
    model = fixtures_models.tiny_cnn()
    with Capture(model, ["conv", "fc"]):
        assert len(model.conv._forward_hooks) == 1 and len(model.fc._forward_hooks) == 1
        assert all_hooks(model) == 2
    assert all_hooks(model) == 0
    with Capture(model, ["relu"], take="input"):
        assert len(model.relu._forward_pre_hooks) == 1
    assert all_hooks(model) == 0


def test_hooks_removed_when_forward_raises_and_the_models_error_is_named():
    model = fixtures_models.tiny_cnn()
    with pytest.raises(ForwardError) as info:
        with Capture(model, ["conv", "relu", "fc"], model_name="tiny") as capture:
            assert all_hooks(model) == 3
            capture(batch(2, 3, 8, 8))  # wrong channel count: the conv raises
    assert str(info.value).startswith("model 'tiny' raised RuntimeError in its forward pass on a batch of inputs of "
                                      "shape 2x3x8x8")
    assert all_hooks(model) == 0
    assert model(batch(2, 1, 8, 8)).shape == (2, 3)  # and the model works as before


def test_a_sinks_own_error_passes_through_unchanged():
    def sink(name, out):
        raise KeyError("ours")

    model = fixtures_models.tiny_cnn()
    with pytest.raises(KeyError, match="ours"):
        with Capture(model, ["conv"], sink=sink) as capture:
            capture(batch(1, 1, 8, 8))
    assert all_hooks(model) == 0


def test_unknown_layer_in_capture_lists_valid_names():
    with pytest.raises(AtlasError, match="has no layer 'nope'; valid layer names are: conv, relu"):
        with Capture(fixtures_models.tiny_cnn(), ["conv", "nope"]):
            pass


def test_tuple_output_layer_is_atlas_error_and_hooks_are_removed():
    model = WithTuple()
    with pytest.raises(AtlasError) as info:
        with Capture(model, ["pair", "fc"]) as capture:
            capture(batch(2, 4))
    message = str(info.value)
    assert "layer 'pair' (TupleOut) of the model (WithTuple) returns tuple, not a tensor" in message
    assert "submodule" in message
    assert all_hooks(model) == 0


def test_channels_last_swin_maps_are_reported_as_conv_maps():
    """torchvision's Swin blocks return [B, H, W, C]: Capture reports [B, C, H, W] (units are channels)."""
    from torchvision.models import SwinTransformer

    from atlas_builder.hooks import Capture, channels_last

    torch.manual_seed(0)
    net = SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[2, 2], window_size=[2, 2],
                          num_classes=3).eval()
    x = torch.rand(2, 3, 16, 16)
    raw = {}
    handle = net.features[1][0].register_forward_hook(lambda m, a, out: raw.__setitem__("block", out))
    try:
        with torch.no_grad():
            net(x)
    finally:
        handle.remove()
    assert raw["block"].shape == (2, 4, 4, 8)  # channels last
    assert channels_last(net.features[1]) and channels_last(net.features[2]) and not channels_last(net.head)
    with Capture(net, ["features.1.0", "features.2", "head"]) as capture, torch.no_grad():
        capture(x)
    assert capture.shapes == {"features.1.0": (8, 4, 4), "features.2": (16, 2, 2), "head": (3,)}
    torch.testing.assert_close(capture.outputs["features.1.0"], raw["block"].permute(0, 3, 1, 2))
