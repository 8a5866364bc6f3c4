"""explain.py and the token helpers against direct computations: integrated gradients' completeness, attention
weights recomputed from a MultiheadAttention's input, rollout, the notes; hooks.token_grid; reduce = "cls"."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from atlas_builder import explain
from atlas_builder.accumulators import reduce_positions, unit_values
from atlas_builder.hooks import token_grid
import fixtures_models


def smooth_net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(6 * 8 * 8, 4)).eval()


def test_integrated_gradients_are_complete():
    """IG's attributions sum to f(x) - f(baseline) (within 1 % at 64 steps), for each example and its target."""
    net = smooth_net()
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 3, 1, 2, 0])
    attr = explain.integrated_gradients(net, x, steps=64, batch_size=128, target=target)
    assert attr.shape == x.shape
    with torch.no_grad():
        rows = torch.arange(5)
        gap = net(x)[rows, target] - net(torch.zeros_like(x))[rows, target]
    sums = attr.sum((1, 2, 3)).detach()
    np.testing.assert_allclose(sums.numpy(), gap.numpy(), rtol=0.01, atol=1e-4 * float(gap.abs().max()))


def test_gradient_x_input_of_a_linear_model_is_weight_times_input():
    lin = nn.Linear(6, 3)
    x = torch.randn(4, 6)
    attr = explain.gradient_x_input(lin, x, torch.tensor([2, 0, 1, 2]))
    np.testing.assert_allclose(attr.numpy(), (lin.weight[[2, 0, 1, 2]] * x).detach().numpy(), atol=1e-7, rtol=1e-6)


def test_pooled_sums_channels_and_pools_by_area():
    attr = torch.arange(2 * 3 * 64 * 64, dtype=torch.float32).reshape(2, 3, 64, 64)
    out = explain.pooled(attr, side=32)
    assert out.shape == (2, 32, 32)
    summed = attr.sum(1)
    np.testing.assert_allclose(out[1, 3, 5], summed[1, 6:8, 10:12].mean().item(), rtol=1e-6)


def test_unit_attribution_is_of_the_unit_value_in_the_scans_measure():
    """gradient × input of unit_value equals the one of a direct computation of the unit's max over positions."""
    net = smooth_net()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    units = torch.tensor([4, 0, 2])
    got = explain.gradient_x_input(explain.unit_value(net, "1", units, "max"), x)
    expected = explain.gradient_x_input(lambda v: net[:2](v)[torch.arange(3), units].flatten(1).amax(1), x)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-7)


def test_attention_weights_match_need_weights_and_leave_outputs_unchanged():
    vit = fixtures_models.tiny_vit()
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = vit(x)
    weights, rolled = explain.attention_maps(vit, x)
    with torch.no_grad():
        after = vit(x)
    torch.testing.assert_close(after, before, rtol=0, atol=0)  # reading them changed nothing
    names = [f"encoder.layers.encoder_layer_{i}.self_attention" for i in (0, 1)]
    assert list(weights) == names
    # the direct computation: run each block's attention with need_weights=True on its own input
    inputs = {}
    blocks = vit.encoder.layers
    with torch.no_grad():
        h = vit._process_input(x)
        h = torch.cat([vit.class_token.expand(3, -1, -1), h], 1) + vit.encoder.pos_embedding
        for i, block in enumerate(blocks):
            inputs[i] = block.ln_1(h)
            h = block(h)
        for i, name in enumerate(names):
            q = inputs[i]
            _, direct = blocks[i].self_attention(q, q, q, need_weights=True, average_attn_weights=False)
            torch.testing.assert_close(weights[name], direct, rtol=1e-5, atol=1e-6)
    assert weights[names[0]].shape == (3, 2, 17, 17)
    # rollout by hand: (A0 + I) normalized, then (A1 + I) normalized times it; the class token's row
    a = [w.mean(1) + torch.eye(17) for w in (weights[n] for n in names)]
    a = [m / m.sum(-1, keepdim=True) for m in a]
    expected = (a[1] @ a[0])[:, 0, 1:].reshape(3, 4, 4)
    torch.testing.assert_close(rolled, expected)
    cls = explain.class_attention(weights[names[1]])
    torch.testing.assert_close(cls, weights[names[1]][:, :, 0, 1:].reshape(3, 2, 4, 4))


def test_explain_inputs_of_a_cnn_and_of_a_model_with_hand_rolled_attention():
    net = smooth_net()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    ex = explain.explain_inputs(net, x, {"1": np.array([[0, 1], [2, 3], [5, 4]])}, "max", steps=8,
                                batch_size=16, token_layers=False)
    assert set(ex.classes) == {"integrated gradients", "gradient × input"}
    assert ex.classes["integrated gradients"].shape == (3, 8, 8)
    with torch.no_grad():
        np.testing.assert_array_equal(ex.targets, net(x).argmax(1).numpy())
    assert ex.units["1"].shape == (3, 2, 8, 8)
    assert ex.attention == {} and ex.rollout is None and ex.notes == []
    direct = explain.gradient_x_input(explain.unit_value(net, "1", torch.tensor([5]), "max"), x[2:3])
    np.testing.assert_allclose(ex.units["1"][2, 0], direct.sum(1)[0].numpy(), rtol=1e-5, atol=1e-7)

    odd = fixtures_models.untraceable_tokens()
    ex = explain.explain_inputs(odd, torch.rand(2, 3, 16, 16), {}, "max", steps=4, batch_size=8, token_layers=True)
    assert ex.attention == {} and ex.rollout is None
    assert ex.notes == ["no attention maps: this model's attention (HandRolledAttention) is not a "
                        "torch.nn.MultiheadAttention, whose weights the atlas can recompute from its input"]


def test_attributions_off_with_zero_steps():
    ex = explain.explain_inputs(smooth_net(), torch.randn(2, 3, 8, 8), {"1": np.array([[0], [1]])}, "max", 0, 8,
                                False)
    assert ex.classes == {} and ex.units == {}


@pytest.mark.parametrize("tokens, grid", [(197, (1, 14, 14)), (17, (1, 4, 4)), (16, (0, 4, 4)), (7, (0, 1, 7)),
                                          (2, (0, 1, 2))])
def test_token_grid(tokens, grid):
    assert token_grid(tokens) == grid


def test_reduce_cls_takes_the_class_token_of_token_outputs_only():
    tokens = torch.randn(2, 5, 3)  # [B, T, D]
    np.testing.assert_array_equal(unit_values(tokens, "cls").numpy(), tokens[:, 0].numpy())
    np.testing.assert_array_equal(unit_values(tokens, "max").numpy(), tokens.amax(1).numpy())
    conv = torch.randn(2, 3, 4, 4)  # a conv map under "cls": its max
    np.testing.assert_array_equal(reduce_positions(conv.flatten(2), "cls", False).numpy(),
                                  conv.flatten(2).amax(-1).numpy())


class Detached(nn.Module):
    """A forward autograd cannot go back through: its input is detached."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 4)

    def forward(self, x):
        return self.fc(x.detach().flatten(1))


def test_a_model_without_input_gradients_gets_a_note_not_a_traceback():
    ex = explain.explain_inputs(Detached().eval(), torch.randn(2, 3, 8, 8), {"fc": np.array([[0], [1]])}, "max", 4,
                                8, False)
    assert ex.classes == {} and ex.units == {} and ex.targets is None
    assert len(ex.notes) == 1 and ex.notes[0].startswith("no attributions: the gradient of this model's output "
                                                         "with respect to its input could not be taken (")
