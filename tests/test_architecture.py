"""architecture.py: the torch.fx graph of a small ResNet (shapes, links to every probed layer, collapsed
blocks) and the module tree of a model fx cannot trace."""

from __future__ import annotations

import re

import torch
import torchvision

from atlas_builder import architecture
from atlas_builder.hooks import list_layers, resolve_layers
import fixtures_models


def small_resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=5).eval()


def test_resnet_graph_has_its_operations_and_shapes():
    desc = architecture.describe(small_resnet(), torch.rand(1, 3, 32, 32))
    assert desc["method"] == "torch.fx" and desc["note"] is None
    nodes = {n["id"]: n for n in desc["nodes"]}
    assert nodes["conv1"]["shape"] == [64, 16, 16] and nodes["conv1"]["kind"] == "Conv2d"
    assert nodes["fc"]["shape"] == [5] and nodes["fc"]["group"] == ""
    assert nodes["layer1_0_conv1"]["group"] == "layer1.0" and nodes["layer1_0_conv1"]["module"] == "layer1.0.conv1"
    add = next(n for n in desc["nodes"] if n["kind"] == "add" and n["group"] == "layer2.0")
    sources = {a for a, b in desc["edges"] if b == add["id"]}
    assert sources == {"layer2_0_bn2", "layer2_0_downsample_1"}  # the residual sum of the block and its shortcut
    assert desc["groups"]["layer2"] == "Sequential" and desc["groups"]["layer2.0"] == "BasicBlock"


def test_resnet_svg_links_every_probed_layer_and_collapses_its_blocks():
    net = small_resnet()
    x = torch.rand(1, 3, 32, 32)
    probed = resolve_layers(net, (), "r18", list_layers(net, x, "r18"))
    assert "layer1.0" in probed and "fc" in probed
    links = {layer: f"../r18/{layer}/index.html" for layer in probed}
    html = str(architecture.render(architecture.describe(net, x), links))
    linked = set(re.findall(r'<a href="([^"#]+)"><title>', html))
    assert linked == set(links.values())  # each probed layer's box links to its page, and nothing else does
    # the top level shows layer1..4 as single boxes; each opens a <details> with its blocks, each block one more
    top = html.split('<details', 1)[0]
    assert top.count("<rect") == 12  # input, conv1, bn1, relu, maxpool, layer1-4, avgpool, flatten, fc
    assert all(f'href="#arch-layer{i}"' in top for i in range(1, 5)) and "layer1.0.conv1" not in top
    for group in ("layer1", "layer1-0", "layer4-1", "layer2-0-downsample"):
        assert f'<details class="arch-group" id="arch-{group}">' in html
    assert "64×8×8" in html and "512×1×1" in html  # shapes on the edges


def test_untraceable_model_gets_its_module_tree_and_a_note():
    net = fixtures_models.untraceable_tokens()
    desc = architecture.describe(net, torch.rand(1, 3, 16, 16))
    assert desc["method"] == "module tree" and desc["edges"] == []
    assert desc["note"].startswith("torch.fx could not trace this model (TraceError: ")
    assert [n["id"] for n in desc["nodes"]] == ["patch", "attention", "head"]
    html = str(architecture.render(desc, {"attention": "attention/index.html"}))
    assert '<a href="attention/index.html">attention</a>' in html and "HandRolledAttention" in html
    assert 'data-method="module tree"' in html and "torch.fx could not trace" in html


def test_names_are_escaped():
    class Tricky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.add_module("<b>x</b>", torch.nn.Linear(2, 2))

        def forward(self, x):
            return getattr(self, "<b>x</b>")(x)

    net = Tricky()
    html = str(architecture.render(architecture.describe(net, torch.rand(1, 2)), {"<b>x</b>": "a/index.html"}))
    assert "<b>" not in html and "&lt;b&gt;x&lt;/b&gt;" in html
