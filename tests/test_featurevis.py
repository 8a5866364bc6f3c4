"""Feature visualization: the optimizer loop, its pieces, the stage's helpers and the media encodings.

Every test uses fixed seeds and tiny images (8x8 to 16x16, 16-64 steps) so the file runs in
a few seconds on two CPU cores.
"""

from __future__ import annotations

import io
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from atlas_builder import featurevis as fv
from atlas_builder import media, visualize
from atlas_builder.config import FeatureVisSection
from atlas_builder.errors import AtlasError
from atlas_builder.sources import AtlasDataset

import fixtures_models

UNITS = [0, 1, 2, 3]
SEEDS = [11, 12, 13, 14]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: one intra-op thread is fastest, and with two threads on a busy
    2-core machine the spin-waiting makes each op ~50x slower. Restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def image(seeds, channels: int, height: int, width: int) -> fv.FourierImage:
    """The parametrization render optimizes: one Fourier image per seed."""
    return fv.FourierImage(len(seeds), channels, height, width, list(seeds))


def conv_acts(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.conv(images)


def edge_model(units: int = 1) -> nn.Module:
    """conv(1 -> units, 3x3, no padding, no bias) + ReLU; unit 0 a vertical-edge detector
    ([[-1, 0, 1]] * 3), unit 1 (if any) its transpose, a horizontal-edge detector."""
    kernel = torch.tensor([[-1.0, 0.0, 1.0]] * 3)
    conv = nn.Conv2d(1, units, 3, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.stack([kernel, kernel.T][:units]).unsqueeze(1))
    return nn.Sequential(OrderedDict([("conv", conv), ("relu", nn.ReLU())]))


def gradient_energy(x: torch.Tensor) -> tuple[float, float]:
    """(energy of differences along the width = vertical edges, along the height = horizontal edges)."""
    along_w = ((x[..., :, 1:] - x[..., :, :-1]) ** 2).sum()
    along_h = ((x[..., 1:, :] - x[..., :-1, :]) ** 2).sum()
    return float(along_w), float(along_h)


def column_variance(x: torch.Tensor) -> float:
    """How much the image changes from column to column: variance of the column means."""
    return float(x.mean(-2).var(-1).mean())


def row_variance(x: torch.Tensor) -> float:
    return float(x.mean(-1).var(-1).mean())


# --- 1. gradient ascent ------------------------------------------------------------------

def test_gradient_ascent_raises_every_unit_and_the_negative_objective_lowers_it():
    model = fixtures_models.tiny_cnn()
    start = fv.channel(UNITS)(conv_acts(model, fv.FourierImage(4, 1, 16, 16, SEEDS)()))
    one = fv.render(model, "conv", fv.channel(UNITS), image(SEEDS, 1, 16, 16), steps=1, seed=5, n_frames=4)
    many = fv.render(model, "conv", fv.channel(UNITS), image(SEEDS, 1, 16, 16), steps=48, seed=5, n_frames=4)
    # `activation` is the objective on the returned images, without transforms
    torch.testing.assert_close(many.activation, fv.channel(UNITS)(conv_acts(model, many.images)))
    assert (many.activation > one.activation).all(), (one.activation, many.activation)
    assert (many.activation > start).all(), (start, many.activation)

    negative = fv.render(model, "conv", -fv.channel(UNITS), image(SEEDS, 1, 16, 16), steps=48, seed=5, n_frames=4)
    lowered = fv.channel(UNITS)(conv_acts(model, negative.images))
    torch.testing.assert_close(negative.activation, -lowered)
    assert (lowered < start).all(), (start, lowered)
    assert (lowered < many.activation).all()


def test_render_leaves_the_model_as_it_was():
    model = fixtures_models.tiny_cnn()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = fv.render(model, "relu", fv.channel([0, 1]), image([1, 2], 1, 8, 8), steps=4, n_frames=4)
    assert model.training
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.conv._forward_hooks and not model.relu._forward_hooks
    assert result.images.shape == (2, 1, 8, 8)
    assert result.frames.shape == (len(result.frame_steps), 2, 1, 8, 8)
    assert result.frame_steps == fv.frame_schedule(4, 4)


# --- 2. batching -------------------------------------------------------------------------

def test_a_batch_of_units_equals_each_unit_alone():
    model = fixtures_models.tiny_cnn()
    together = fv.render(model, "conv", fv.channel(UNITS), image(SEEDS, 1, 16, 16), steps=32, seed=5, n_frames=4)
    for i, (unit, image_seed) in enumerate(zip(UNITS, SEEDS)):
        alone = fv.render(model, "conv", fv.channel([unit]), image([image_seed], 1, 16, 16), steps=32, seed=5, n_frames=4)
        torch.testing.assert_close(together.images[i], alone.images[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(together.activation[i], alone.activation[0], atol=1e-4, rtol=0)
    # and the units really got different images (the comparison above is not vacuous)
    assert (together.images[0] - together.images[1]).abs().max() > 0.05


# --- 4. planted units ----------------------------------------------------------------------

def test_planted_edge_detectors_get_edges_along_their_axis():
    """conv + ReLU: the mean of relu(derivative) is largest for stripes across the filter's axis,
    so the vertical-edge unit gets vertical edges (differences along the width) and the
    horizontal-edge unit, its transpose, gets horizontal ones."""
    model = edge_model(units=2)
    units = [0] * 4 + [1] * 4  # four images of the vertical-edge unit, four of the horizontal one
    result = fv.render(model, "relu", fv.channel(units), image(list(range(8)), 1, 16, 16), steps=48,
                       transforms=fv.no_transforms(16, 16), seed=1)
    assert (result.activation > 0.5).all(), result.activation  # from ~0 on the grey start
    vertical, horizontal = result.images[:4], result.images[4:]
    # energy of the differences along each axis (about 1.3x: the first 1/8 of the steps optimize
    # the ReLU's input, whose optimum is a ramp, before the edges form)
    vertical_w, vertical_h = gradient_energy(vertical)
    horizontal_w, horizontal_h = gradient_energy(horizontal)
    assert vertical_w > 1.2 * vertical_h, (vertical_w, vertical_h)
    assert horizontal_h > 1.2 * horizontal_w, (horizontal_w, horizontal_h)
    # stripes: the image varies from column to column far more than from row to row (~9x)
    assert column_variance(vertical) > 3 * row_variance(vertical)
    assert row_variance(horizontal) > 3 * column_variance(horizontal)


def test_planted_linear_edge_unit_gets_a_left_to_right_ramp():
    """Without the ReLU the mean response of a zero-sum derivative filter only sees the borders
    (it telescopes to right columns minus left columns), so the image gets dark on the side the
    filter weighs negatively and bright on the other, and stays level along the other axis."""
    model = edge_model(units=2)
    result = fv.render(model, "conv", fv.channel([0] * 4 + [1] * 4), image(list(range(8)), 1, 16, 16), steps=48,
                       transforms=fv.no_transforms(16, 16), seed=1)
    x = result.images
    left_to_right = x[..., :, -4:].mean((1, 2, 3)) - x[..., :, :4].mean((1, 2, 3))
    top_to_bottom = x[..., -4:, :].mean((1, 2, 3)) - x[..., :4, :].mean((1, 2, 3))
    assert (left_to_right[:4] > 0.5).all() and (top_to_bottom[:4].abs() < 0.2).all(), (left_to_right, top_to_bottom)
    assert (top_to_bottom[4:] > 0.5).all() and (left_to_right[4:].abs() < 0.2).all(), (left_to_right, top_to_bottom)


# --- 5. seeds ------------------------------------------------------------------------------

def test_render_is_deterministic_and_seeded():
    model = fixtures_models.tiny_cnn()

    def go(seed=3, image_seeds=(1, 2)):
        return fv.render(model, "conv", fv.channel([0, 1]), image(list(image_seeds), 1, 12, 12), steps=16, seed=seed,
                         n_frames=4)

    a, b = go(), go()
    assert torch.equal(a.images, b.images) and torch.equal(a.frames, b.frames)
    assert torch.equal(a.activation, b.activation)
    other_transforms = go(seed=4)
    assert (other_transforms.images - a.images).abs().max() > 1e-3
    other_images = go(image_seeds=(5, 6))
    assert (other_images.images - a.images).abs().max() > 1e-3


def test_fourier_image_start_depends_on_the_image_seed_not_the_batch_position():
    pair = fv.FourierImage(2, 3, 9, 9, [7, 8])()
    alone = fv.FourierImage(1, 3, 9, 9, [8])()
    torch.testing.assert_close(pair[1], alone[0], rtol=0, atol=1e-7)
    assert (pair[0] - pair[1]).abs().max() > 1e-4
    again = fv.FourierImage(2, 3, 9, 9, [8, 7])()
    torch.testing.assert_close(again[1], pair[0], rtol=0, atol=1e-7)


# --- 6. parametrization --------------------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("height,width", [(8, 8), (7, 9), (9, 7), (16, 12)])
def test_fourier_image_shape_and_range(channels, height, width):
    for sd in (0.01, 5.0):  # 5.0 drives the sigmoid to its ends
        param = fv.FourierImage(2, channels, height, width, [1, 2], sd=sd)
        image = param()
        assert image.shape == (2, channels, height, width)
        assert image.min() >= 0 and image.max() <= 1
        assert image.std() > 0  # not a constant image
        image.sum().backward()
        assert param.spectrum.grad is not None and param.spectrum.grad.abs().sum() > 0
    assert image.max() - image.min() > 0.5
    start = fv.FourierImage(2, channels, height, width, [1, 2])()
    assert (start - 0.5).abs().max() < 0.25  # sd=0.01: a faint texture on grey, not saturated


def test_fourier_image_colours_are_correlated_like_natural_images():
    rgb = fv.FourierImage(2, 3, 16, 16, [1, 2])().detach()
    corr = torch.corrcoef(rgb.transpose(0, 1).flatten(1))
    # lucid's decorrelated colour space: luminance dominates (independent channels would give ~0)
    assert (corr[0, 1:] > 0.5).all(), corr


def test_fourier_image_starts_near_grey_at_any_size():
    """lucid/lucent: at sd=0.01 the start is grey within ~0.003 at any size."""
    def spread(size):
        return float((fv.FourierImage(1, 3, size, size, [0])().detach() - 0.5).abs().mean())

    assert spread(224) < 0.01, spread(224)
    assert spread(224) < 3 * spread(8)


# --- 7. transforms -------------------------------------------------------------------------

def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_each_transform_keeps_batch_and_channels():
    x = torch.rand(2, 3, 12, 12, generator=gen(1))
    padded = fv.pad(2)(x, gen())
    assert padded.shape == (2, 3, 16, 16)
    assert torch.equal(padded[..., 2:-2, 2:-2], x)
    assert torch.all(padded[..., 0, :] == 0.5) and torch.all(padded[..., :, -1] == 0.5)

    cropped = fv.jitter(3)(x, gen())
    assert cropped.shape == (2, 3, 9, 9)
    windows = [x[..., oy:oy + 9, ox:ox + 9] for oy in range(4) for ox in range(4)]
    assert any(torch.equal(cropped, w) for w in windows)

    assert fv.random_scale([0.5])(x, gen()).shape == (2, 3, 6, 6)
    assert fv.random_scale([1.25])(x, gen()).shape == (2, 3, 15, 15)
    assert torch.equal(fv.random_scale([1.0])(x, gen()), x)

    assert fv.random_rotate([7])(x, gen()).shape == (2, 3, 12, 12)
    assert torch.equal(fv.random_rotate([0])(x, gen()), x)
    torch.testing.assert_close(fv.random_rotate([180])(x, gen()), x.flip(2, 3), rtol=0, atol=1e-5)

    assert fv.resize_to(5, 7)(x, gen()).shape == (2, 3, 5, 7)
    assert torch.equal(fv.resize_to(12, 12)(x, gen()), x)
    assert fv.compose([fv.pad(1), fv.jitter(2), fv.resize_to(4, 6)])(x, gen()).shape == (2, 3, 4, 6)
    assert fv.no_transforms(6, 5)(x, gen()).shape == (2, 3, 6, 5)


@pytest.mark.parametrize("height,width", [(8, 8), (32, 32), (7, 9)])
def test_standard_transforms_return_the_image_size_and_are_seeded(height, width):
    x = torch.rand(3, 1, height, width, generator=gen(2))
    t = fv.standard_transforms(height, width)
    outputs = [t(x, gen(seed)) for seed in range(6)]
    for out in outputs:
        assert out.shape == (3, 1, height, width)
    assert torch.equal(t(x, gen(4)), outputs[4])
    assert any(not torch.allclose(outputs[0], out) for out in outputs[1:])


def test_random_transforms_draw_from_the_generator():
    x = torch.rand(1, 2, 12, 12, generator=gen(7))
    crops = [fv.jitter(3)(x, gen(seed)) for seed in range(12)]
    assert len({tuple(c.flatten().tolist()) for c in crops}) > 3  # several windows
    assert torch.equal(fv.jitter(3)(x, gen(5)), crops[5])
    sizes = {fv.random_scale([0.5, 1.0, 2.0])(x, gen(seed)).shape[-1] for seed in range(12)}
    assert sizes == {6, 12, 24}
    rotated = [fv.random_rotate([-10, 0, 10])(x, gen(seed)) for seed in range(12)]
    assert len({tuple(r.flatten().tolist()) for r in rotated}) == 3
    t = fv.compose([fv.jitter(2), fv.jitter(2)])  # one generator drives the whole pipeline
    g = gen(3)
    first, second = t(x, g), t(x, g)
    assert first.shape == second.shape == (1, 2, 8, 8)
    assert torch.equal(t(x, gen(3)), first)


def test_transforms_are_differentiable():
    x = torch.rand(1, 1, 16, 16, requires_grad=True)
    fv.standard_transforms(16, 16)(x, gen()).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# --- 8. objectives -------------------------------------------------------------------------

@pytest.fixture
def acts4():
    return torch.randn(3, 5, 7, 6, generator=gen(3))


def test_objectives_compose(acts4):
    units = [4, 0, 2]
    c, n = fv.channel(units), fv.neuron(units)
    torch.testing.assert_close((c + 2 * n)(acts4), c(acts4) + 2 * n(acts4))
    torch.testing.assert_close((c * 3 - n)(acts4), 3 * c(acts4) - n(acts4))
    torch.testing.assert_close((-c)(acts4), -c(acts4))
    assert torch.equal((c - c)(acts4), torch.zeros(3))
    assert (c + 2 * n).name == "channel + 2 * neuron"
    assert (-c).name == "-channel"


def test_channel_and_neuron_against_brute_force(acts4):
    units = [4, 0, 2]
    b, _, h, w = acts4.shape
    expected_channel = torch.stack([acts4[i, units[i]].mean() for i in range(b)])
    expected_neuron = torch.stack([acts4[i, units[i], h // 2, w // 2] for i in range(b)])
    torch.testing.assert_close(fv.channel(units)(acts4), expected_channel)
    torch.testing.assert_close(fv.neuron(units)(acts4), expected_neuron)

    tokens = torch.randn(3, 5, 4, generator=gen(4))  # [B, T, D]: units index D, positions T
    # 5 tokens = a class token and a 2 x 2 patch grid: the objective is the mean over the patches alone
    torch.testing.assert_close(fv.channel([3, 1, 0])(tokens),
                               torch.stack([tokens[i, 1:, u].mean() for i, u in enumerate([3, 1, 0])]))
    square = tokens[:, 1:]  # 4 tokens, a 2 x 2 grid with no class token: the mean over all of them
    torch.testing.assert_close(fv.channel([3, 1, 0])(square),
                               torch.stack([square[i, :, u].mean() for i, u in enumerate([3, 1, 0])]))
    torch.testing.assert_close(fv.neuron([3, 1, 0])(tokens),
                               torch.stack([tokens[i, 2, u] for i, u in enumerate([3, 1, 0])]))

    flat = torch.randn(3, 6, generator=gen(5))
    expected = torch.stack([flat[i, u] for i, u in enumerate([5, 0, 3])])
    torch.testing.assert_close(fv.channel([5, 0, 3])(flat), expected)
    torch.testing.assert_close(fv.neuron([5, 0, 3])(flat), expected)

    with pytest.raises(AtlasError):
        fv.channel([0])(torch.zeros(1, 1, 1, 1, 1))


def test_neuron_picks_the_centre():
    acts = torch.zeros(2, 2, 5, 4)
    acts[0, 1, 2, 2] = 7.0  # centre of a 5x4 map: row 5 // 2, column 4 // 2
    acts[1, 0, 2, 2] = 3.0
    acts[1, 0, 0, 0] = 100.0  # off-centre: ignored
    torch.testing.assert_close(fv.neuron([1, 0])(acts), torch.tensor([7.0, 3.0]))


def test_diversity_prefers_dissimilar_images_within_a_group():
    v = torch.tensor([1.0, 2.0, 0.0, 0.0])
    w = torch.tensor([0.0, 0.0, 3.0, 1.0])
    flat = torch.stack([v, v, v, w])  # group (0, 1) identical; group (2, 3) orthogonal
    div = fv.diversity(2)(flat)
    torch.testing.assert_close(div, torch.tensor([-1.0, -1.0, 0.0, 0.0]))  # image 2 == image 0: other group

    g = gen(6)
    a = torch.rand(1, 3, 4, 4, generator=g)
    b = torch.zeros(1, 3, 4, 4)
    b[0, 0] = 1.0  # one channel only: a very different Gram matrix
    maps = torch.cat([a, a, a, b])
    div = fv.diversity(2)(maps)
    torch.testing.assert_close(div[:2], torch.tensor([-1.0, -1.0]))
    assert (div[2:] > div[:2].max() + 0.2).all(), div


# --- 9. frame schedule ---------------------------------------------------------------------

@pytest.mark.parametrize("steps,n_frames", [(1, 16), (2, 2), (16, 4), (48, 12), (256, 16), (10, 100), (1000, 7)])
def test_frame_schedule(steps, n_frames):
    marks = fv.frame_schedule(steps, n_frames)
    assert marks[0] == 1 and marks[-1] == steps
    assert all(a < b for a, b in zip(marks, marks[1:]))
    assert len(marks) <= n_frames + 1
    assert len(marks) == min(steps, len(marks))
    if steps >= 4 * n_frames:
        assert len(marks) >= n_frames - 1  # log-spaced marks barely collide when there is room


def test_frame_schedule_with_one_frame_is_the_last_step():
    assert fv.frame_schedule(32, 1) == [32]
    assert fv.frame_schedule(32, 0) == [32]


# --- 10. MLP on flat input -----------------------------------------------------------------

def test_render_an_mlp_layer_on_images():
    model = fixtures_models.tiny_mlp()
    result = fv.render(model, "fc1", fv.channel([0, 1, 4]), image([1, 2, 3], 1, 8, 8), steps=16, n_frames=4)
    assert result.images.shape == (3, 1, 8, 8)
    assert result.images.min() >= 0 and result.images.max() <= 1
    with torch.no_grad():
        fc1 = model.fc1(result.images.flatten(1))
    torch.testing.assert_close(result.activation, fc1[torch.arange(3), torch.tensor([0, 1, 4])])
    start = fv.FourierImage(3, 1, 8, 8, [1, 2, 3])().detach()
    with torch.no_grad():
        before = model.fc1(start.flatten(1))[torch.arange(3), torch.tensor([0, 1, 4])]
    assert (result.activation > before).all()


# --- 11. the stage's helpers ----------------------------------------------------------------

def test_first_layer():
    assert visualize.first_layer(fixtures_models.tiny_cnn()) == "conv"
    assert visualize.first_layer(fixtures_models.tiny_mlp()) == "fc1"
    assert visualize.first_layer(fixtures_models.planted_mlp()) == "fc"
    assert visualize.first_layer(nn.Sequential(nn.ReLU(), nn.Flatten())) is None


def test_weight_maps():
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 4, 3)
    maps = visualize.weight_maps(conv, (1, 8, 8))
    assert maps.shape == (4, 3, 3)
    np.testing.assert_allclose(maps, conv.weight.detach().mean(1).numpy())
    conv3 = nn.Conv2d(3, 2, 5)
    np.testing.assert_allclose(visualize.weight_maps(conv3, (3, 8, 8)), conv3.weight.detach().mean(1).numpy())

    fc = nn.Linear(64, 5)
    maps = visualize.weight_maps(fc, (1, 8, 8))
    assert maps.shape == (5, 8, 8)
    np.testing.assert_array_equal(maps, fc.weight.detach().view(5, 8, 8).numpy())
    assert maps[2, 1, 3] == fc.weight[2, 1 * 8 + 3].item()  # row-major: input pixel (1, 3)
    assert visualize.weight_maps(fc, (1, 4, 4)) is None  # the weights do not match the image
    assert visualize.weight_maps(nn.ReLU(), (1, 8, 8)) is None


def test_derived_seed():
    assert visualize.derived_seed(0, "m", "conv", 3, "positive") == visualize.derived_seed(0, "m", "conv", 3, "positive")
    seeds = {visualize.derived_seed(0, "m", "conv", u, "positive") for u in range(200)}
    assert len(seeds) == 200
    assert all(0 <= s < 2 ** 32 for s in seeds)
    base = visualize.derived_seed(0, "m", "conv", 3, "positive")
    assert base != visualize.derived_seed(0, "m", "conv", 3, "negative")
    assert base != visualize.derived_seed(1, "m", "conv", 3, "positive")
    assert base != visualize.derived_seed(0, "m", "fc", 3, "positive")


def test_input_shape():
    def dataset(x):
        return AtlasDataset([(x, 0)], ("a",), (), (), "", "")

    assert visualize.input_shape(dataset(torch.zeros(1, 8, 8)), FeatureVisSection()) == (1, 8, 8)
    assert visualize.input_shape(dataset(torch.zeros(3, 8, 6)), FeatureVisSection(size=32)) == (3, 32, 32)
    assert visualize.input_shape(dataset(torch.zeros(10)), FeatureVisSection()) is None


# --- 12. media -----------------------------------------------------------------------------

def test_weight_heatmap_colours():
    image = media.weight_heatmap(np.array([[2.0, 0.0, -2.0, 1.0]]))
    assert image.mode == "RGB" and image.size == (4, 1)
    red, white, blue, pale_red = (image.getpixel((i, 0)) for i in range(4))
    assert white == (255, 255, 255)
    assert red == (255, 38, 38)
    assert blue == (38, 115, 255)
    assert pale_red[0] == 255 and pale_red[1] == pale_red[2] and 38 < pale_red[1] < 255  # half strength
    assert media.weight_heatmap(np.zeros((2, 2))).getpixel((1, 1)) == (255, 255, 255)


def test_tensor_image():
    x = torch.tensor([[[0.0, 0.5], [1.0, 2.0]]])
    gray = media.tensor_image(x)
    assert gray.mode == "L" and gray.size == (2, 2)
    assert np.array(gray).tolist() == [[0, 128], [255, 255]]
    rgb = media.tensor_image(torch.stack([x[0], torch.zeros(2, 2), torch.ones(2, 2)]))
    assert rgb.mode == "RGB" and rgb.getpixel((1, 0)) == (128, 0, 255)


def test_render_reads_the_pages_measure_on_the_final_images():
    """`measure` is the unit's value as the scan takes it on dataset examples (max or mean over positions) on
    the final images, beside the objective the optimizer maximized (the channel mean)."""
    from atlas_builder.accumulators import unit_values
    from atlas_builder.hooks import Capture

    model = fixtures_models.tiny_cnn()
    units = [0, 2, 3]
    for reduce in ("max", "mean"):
        result = fv.render(model, "conv", fv.channel(units), image([1, 2, 3], 1, 16, 16), steps=12,
                           measure=fv.measured(units, reduce))
        with torch.no_grad(), Capture(model, ["conv"]) as capture:
            capture(result.images)
        values = unit_values(capture.outputs["conv"], reduce)[torch.arange(3), torch.tensor(units)]
        torch.testing.assert_close(result.measured, values)
        means = capture.outputs["conv"].flatten(2).mean(2)[torch.arange(3), torch.tensor(units)]
        torch.testing.assert_close(result.activation, means)  # the objective: the channel mean
    assert fv.render(model, "conv", fv.channel([0]), image([1], 1, 16, 16), steps=2).measured is None


def test_negative_image_of_a_post_relu_unit_lowers_its_pre_activation_below_the_dataset_minimum():
    """A ReLU's output stops at 0, which a grey image reaches; its input (take="input") goes lower than on any
    dataset example, while the measure stays the ReLU's own output."""
    from atlas_builder.visualize import pre_activation

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16 * 16, 2)).eval()
    data = torch.rand(512, 1, 16, 16)
    with torch.no_grad():
        dataset_min = model[0](data).flatten(2).mean(2).min(0).values  # each unit's lowest channel mean
    units = [0, 1, 2, 3]
    pre = fv.render(model, "1", -fv.channel(units), image([5, 6, 7, 8], 1, 16, 16), steps=48, take="input",
                    measure=fv.measured(units))
    assert (-pre.activation < dataset_min).all()  # the pre-activation, below every dataset example's
    with torch.no_grad():
        relu_max = model[1](model[0](pre.images)).flatten(2).amax(2)[torch.arange(4), torch.tensor(units)]
    torch.testing.assert_close(pre.measured, relu_max)  # measured after the ReLU, as the dataset examples
    out = fv.render(model, "1", -fv.channel(units), image([5, 6, 7, 8], 1, 16, 16), steps=48)
    assert (-out.activation >= 0).all()  # the unit itself cannot go below its floor
    assert pre_activation(nn.ReLU()) and pre_activation(nn.GELU()) and pre_activation(nn.Softplus())
    assert not any(pre_activation(m) for m in (nn.Sigmoid(), nn.Tanh(), nn.Conv2d(1, 1, 1), nn.Linear(1, 1)))


def test_a_planted_pattern_unit_gets_an_image_at_least_as_strong_as_its_pattern():
    """A conv filter equal to a pattern (+1 where it is bright, -1 where dark): an image holding the pattern
    (at a contrast of 0.2 to 0.8) is a strong input, and the feature visualization must reach at least that,
    in the pages' measure (the max over positions). Without the random transforms: on a 16-px image the
    standard ones (jitter, scale, rotate) cost it (3.8 against the pattern's 5.0 after 256 steps, measured),
    which is the transforms' robustness trade, not the optimizer's reach, which is what this checks."""
    torch.manual_seed(0)
    bright = (torch.rand(5, 5) > 0.5).float()
    conv = nn.Conv2d(1, 2, 5, padding=2, bias=False)
    with torch.no_grad():
        conv.weight[0, 0] = 2 * bright - 1  # unit 0: the pattern
        conv.weight[1, 0] = torch.randn(5, 5)  # unit 1: anything else
    model = nn.Sequential(conv, nn.ReLU()).eval()
    picture = torch.full((1, 1, 16, 16), 0.5)
    picture[0, 0, 5:10, 6:11] = 0.2 + 0.6 * bright
    with torch.no_grad():
        pattern = model(picture)[0, 0].max()
    result = fv.render(model, "1", fv.channel([0]), image([3], 1, 16, 16), steps=128,
                       transforms=fv.no_transforms(16, 16), measure=fv.measured([0]))
    assert pattern > 0 and result.measured[0] >= pattern


def test_lossy_media_are_capped_in_bytes_by_a_lower_quality(monkeypatch):
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8), "RGB")
    y, x = np.mgrid[0:224, 0:224]
    smooth = Image.fromarray(np.stack([x, y, x // 2 + y // 2], -1).astype(np.uint8), "RGB")
    free = media.encode_webp(noise, media.POSITIVE_QUALITY, media.STILL_SIDE)
    cap = int(len(free) * 0.8)
    capped = media.encode_webp(noise, media.POSITIVE_QUALITY, media.STILL_SIDE, cap)
    assert len(free) > cap >= len(capped)  # detail beyond the cap: a lower quality
    with Image.open(io.BytesIO(capped)) as webp:
        assert webp.size == (160, 160)
    floor = media.encode_webp(noise, media.POSITIVE_QUALITY, media.STILL_SIDE, 100)  # unreachable: the floor
    assert floor == media.encode_webp(noise, media.MIN_QUALITY, media.STILL_SIDE)
    assert media.encode_webp(smooth, 60, 160, cap) == media.encode_webp(smooth, 60, 160)  # under: untouched
    frames = [smooth.rotate(10 * i) for i in range(8)]
    monkeypatch.setattr(media, "ANIMATION_MAX_BYTES", 10**9)
    free = media.encode_animation(frames)
    monkeypatch.setattr(media, "ANIMATION_MAX_BYTES", int(len(free) * 0.8))
    assert len(free) * 0.8 >= len(media.encode_animation(frames))


def test_encode_animation_ends_on_the_final_image():
    model = fixtures_models.tiny_cnn()
    result = fv.render(model, "conv", fv.channel([2]), image([9], 1, 16, 16), steps=24, n_frames=6)
    assert torch.equal(result.frames[-1], result.images)  # the last frame is the final image
    frames = [media.tensor_image(f[0]) for f in result.frames]
    data = media.encode_animation(frames)
    with Image.open(io.BytesIO(data)) as webp:
        assert webp.format == "WEBP"
        assert webp.is_animated and webp.n_frames == len(frames)
        webp.seek(webp.n_frames - 1)
        last = np.array(webp.convert("L"))
        webp.seek(0)
        first = np.array(webp.convert("L"))
    np.testing.assert_array_equal(last, np.array(frames[-1]))  # lossless at this size
    np.testing.assert_array_equal(first, np.array(frames[0]))
    assert not np.array_equal(first, last)


def test_a_relu_unit_that_is_off_on_the_grey_start_still_gets_going():
    """The ReLU's output has no gradient where the unit is off; the first steps optimize its input."""
    torch.manual_seed(0)
    fc = nn.Linear(64, 2)
    with torch.no_grad():
        fc.bias.copy_(-0.5 * fc.weight.sum(1) - 0.2)  # -0.2 on a grey image: off near the grey start
    model = nn.Sequential(nn.Flatten(), fc, nn.ReLU())
    start = fv.render(model, "2", fv.channel([0, 1]), image([0, 1], 1, 8, 8), steps=1, transforms=fv.no_transforms(8, 8))
    assert (start.activation == 0).all()
    result = fv.render(model, "2", fv.channel([0, 1]), image([0, 1], 1, 8, 8), steps=64, transforms=fv.no_transforms(8, 8))
    assert (result.activation > 0).all(), result.activation


# --- the optimizer -------------------------------------------------------------------------

def test_render_takes_its_parametrization_and_optimizer_and_uses_torch_adam():
    """render optimizes the parameters of the parametrization it is given, with torch.optim.Adam (fused on
    the CPU) unless told otherwise; any optimizer factory works."""
    made = []

    def sgd(params):
        made.append(torch.optim.SGD(params, lr=0.5))
        return made[-1]

    model = fixtures_models.tiny_cnn()
    param = image(SEEDS[:2], 1, 8, 8)
    before = param.spectrum.detach().clone()
    fv.render(model, "conv", fv.channel(UNITS[:2]), param, steps=3, n_frames=2, optimizer=sgd)
    assert len(made) == 1 and made[0].param_groups[0]["params"][0] is param.spectrum
    assert not torch.equal(before, param.spectrum.detach())  # the given module's own parameters moved
    adam = fv.adam(0.05)([torch.zeros(3, requires_grad=True)])
    assert type(adam) is torch.optim.Adam and adam.defaults["fused"] and adam.defaults["lr"] == 0.05


def test_negative_image_of_a_resnet_block_lowers_the_sum_before_its_final_relu():
    """A torchvision BasicBlock ends in the second call of its shared `relu`, on the residual sum: that call
    is found by one forward, Capture(call=2, take="input") takes exactly that sum (checked against the
    block's own arithmetic), and the negative image pushes it below every dataset example's, which the
    block's output (stuck at 0) cannot show."""
    from torchvision.models.resnet import BasicBlock

    from atlas_builder.hooks import Capture, final_activations

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), BasicBlock(4, 4), nn.Flatten(),
                          nn.Linear(4 * 16 * 16, 2)).eval()
    data = torch.rand(256, 1, 16, 16)
    block = model[1]
    with torch.no_grad():
        x = model[0](data)
        summed = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x))))) + x  # the block's sum
        with Capture(model, ["1.relu"], take="input", call=2) as capture:
            capture(data)
    torch.testing.assert_close(capture.outputs["1.relu"], summed)
    with pytest.raises(AtlasError, match="runs more than once"), Capture(model, ["1.relu"]) as capture:
        capture(data)  # the first call only, strictly, still refuses a reused module

    assert final_activations(model, ["1", "0", "3"], data[:1]) == {"1": ("1.relu", 2)}
    modules = dict(model.named_modules())
    assert visualize.negative_targets(model, ["1", "0"], modules, (1, 16, 16), None, torch.device("cpu")) == \
        {"1": ("1.relu", 2, "input:1.relu")}
    vit_like = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4)))
    assert final_activations(vit_like, ["1"], torch.rand(1, 4)) == {}  # ends in a linear: minimized itself

    units = [0, 1, 2, 3]
    dataset_min = summed.flatten(2).mean(2).min(0).values
    pre = fv.render(model, "1.relu", -fv.channel(units), image([5, 6, 7, 8], 1, 16, 16), steps=48, take="input",
                    call=2, measure=fv.measured(units))
    assert (-pre.activation < dataset_min).all()
    with torch.no_grad():
        block_max = model[1](model[0](pre.images)).flatten(2).amax(2)[torch.arange(4), torch.tensor(units)]
    torch.testing.assert_close(pre.measured, block_max)  # measured on the block's output, as its examples
