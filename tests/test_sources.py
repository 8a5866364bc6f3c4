"""Sources: models (torchvision, import path, checkpoints) and datasets (imagefolder, builtin, factories)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from atlas_builder.config import load_config
from atlas_builder.errors import AtlasError
from atlas_builder.sources import AtlasDataset, load_dataset, load_model, model_fingerprint

import fixtures_models
from conftest import write_config

# small image folders with the default top_k = 9: the build's top_k warning is expected here
pytestmark = pytest.mark.filterwarnings("ignore:scan.top_k = 9 is more than")


# --- factories referred to as `test_sources:NAME` ---------------------------

def empty_dataset():
    return []


def not_a_dataset():
    return 42


def not_a_model():
    return "a string"


def broken_model():
    raise ValueError("boom")


class _Unnamed(torch.utils.data.Dataset):
    """12 examples with labels 0..3 and no `classes` attribute."""

    def __len__(self):
        return 12

    def __getitem__(self, i):
        return torch.full((1, 2, 2), i / 12), i % 4


def unnamed_dataset():
    return _Unnamed()


# --- helpers ----------------------------------------------------------------

def model_config(tmp_path, source: str, extra: str = "", dataset: str = ""):
    path = write_config(tmp_path, f"""
        [atlas]
        data_dir = "{tmp_path / 'data'}"
        {dataset}
        [[models]]
        name = "m"
        source = "{source}"
        {extra}
        """)
    cfg = load_config(path)
    return cfg, cfg.models[0]


def dataset_config(tmp_path, body: str, seed: int = 0, name: str = "atlas.toml"):
    path = write_config(tmp_path, f"""
        [atlas]
        seed = {seed}
        [dataset]
        {body}
        [[models]]
        name = "m"
        source = "fixtures_models:tiny_cnn"
        """, name=name)
    return load_config(path)


# --- models -----------------------------------------------------------------

def test_torchvision_resnet18_random_init(tmp_path):
    cfg, section = model_config(tmp_path, "torchvision:resnet18", 'weights = ""')
    loaded = load_model(section, cfg)
    assert isinstance(loaded.module, nn.Module)
    assert type(loaded.module).__name__ == "ResNet"
    n = sum(p.numel() for p in loaded.module.parameters())
    assert n == 11_689_512
    assert loaded.info["parameters"] == n
    assert loaded.info["source"] == "torchvision:resnet18"
    assert not loaded.module.training  # eval mode
    assert loaded.name == "m"
    assert len(loaded.fingerprint) == 16


def test_unknown_torchvision_model_lists_names(tmp_path):
    cfg, section = model_config(tmp_path, "torchvision:resnet1800")
    with pytest.raises(AtlasError) as info:
        load_model(section, cfg)
    message = str(info.value)
    assert "unknown torchvision model 'resnet1800'" in message
    assert "resnet18, " in message  # the closest available names


def test_unusable_torchvision_weights_is_atlas_error(tmp_path):
    cfg, section = model_config(tmp_path, "torchvision:resnet18", 'weights = "NO_SUCH_WEIGHTS"')
    with pytest.raises(AtlasError, match=r"torchvision model 'resnet18': weights 'NO_SUCH_WEIGHTS' not usable"):
        load_model(section, cfg)


def test_import_path_factory(tmp_path):
    cfg, section = model_config(tmp_path, "fixtures_models:tiny_cnn")
    loaded = load_model(section, cfg)
    reference = fixtures_models.tiny_cnn()
    assert [n for n, _ in loaded.module.named_modules()] == ["", "conv", "relu", "pool", "flatten", "fc"]
    for (name, a), (_, b) in zip(loaded.module.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.info["parameters"] == 4 * 9 + 4 + 16 * 3 + 3
    assert not loaded.module.training
    # the same weights give the same fingerprint; other weights another one
    assert loaded.fingerprint == model_fingerprint(reference)
    assert loaded.fingerprint != model_fingerprint(fixtures_models.tiny_mlp())


@pytest.mark.parametrize("source, expected", [
    ("no_such_package_xyz:factory", "cannot import 'no_such_package_xyz'"),
    ("fixtures_models:no_such_factory", "'fixtures_models' has no callable 'no_such_factory'"),
    ("fixtures_models:TinyDataset", "not a torch.nn.Module"),
    ("test_sources:not_a_model", "returned str, not a torch.nn.Module"),
    ("test_sources:broken_model", "raised ValueError: boom"),
])
def test_bad_import_path_model(tmp_path, source, expected):
    cfg, section = model_config(tmp_path, source)
    with pytest.raises(AtlasError) as info:
        load_model(section, cfg)
    assert expected in str(info.value)


def test_checkpoint_round_trip(tmp_path):
    model = fixtures_models.tiny_cnn()
    with torch.no_grad():
        model.conv.weight.copy_(torch.arange(36, dtype=torch.float32).view(4, 1, 3, 3) / 10)
        model.fc.bias.fill_(-2.5)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    cfg, section = model_config(tmp_path, "fixtures_models:tiny_cnn", 'checkpoint = "w.pt"')
    loaded = load_model(section, cfg)
    state = loaded.module.state_dict()
    assert set(state) == set(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor), name
    assert loaded.module.fc.bias.tolist() == [-2.5, -2.5, -2.5]
    assert loaded.info["checkpoint"] == "w.pt"
    assert loaded.fingerprint == model_fingerprint(model)
    assert loaded.fingerprint != model_fingerprint(fixtures_models.tiny_cnn())


def test_checkpoint_wrapped_in_state_dict_key(tmp_path):
    model = fixtures_models.tiny_cnn()
    with torch.no_grad():
        model.fc.weight.fill_(0.25)
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, tmp_path / "w.pt")
    cfg, section = model_config(tmp_path, "fixtures_models:tiny_cnn", 'checkpoint = "w.pt"')
    loaded = load_model(section, cfg)
    assert torch.equal(loaded.module.fc.weight, torch.full((3, 16), 0.25))


def test_checkpoint_of_other_architecture(tmp_path):
    torch.save(fixtures_models.tiny_mlp().state_dict(), tmp_path / "mlp.pt")
    cfg, section = model_config(tmp_path, "fixtures_models:tiny_cnn", 'checkpoint = "mlp.pt"')
    with pytest.raises(AtlasError) as info:
        load_model(section, cfg)
    message = str(info.value)
    assert "does not match the model" in message
    assert "mlp.pt" in message
    assert "\n" not in message


@pytest.mark.parametrize("content, expected", [
    (b"this is not a checkpoint", "cannot be read as a state_dict with weights_only=True"),
    (None, "holds a Tensor, not a state_dict"),
])
def test_unreadable_checkpoint(tmp_path, content, expected):
    path = tmp_path / "bad.pt"
    if content is None:
        torch.save(torch.zeros(3), path)
    else:
        path.write_bytes(content)
    cfg, section = model_config(tmp_path, "fixtures_models:tiny_cnn", 'checkpoint = "bad.pt"')
    with pytest.raises(AtlasError, match=expected):
        load_model(section, cfg)


# --- datasets ---------------------------------------------------------------

MEAN = (0.5, 0.4, 0.3)
STD = (0.2, 0.25, 0.3)


def write_images(root, size=(8, 8), per_class=3, seed=0):
    """PNG files root/classA/*, root/classB/*; returns {(class, index): HxWx3 uint8 array}."""
    rng = np.random.default_rng(seed)
    pixels = {}
    for cls in ("classA", "classB"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, size=(size[0], size[1], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"img{i}.png")
            pixels[(cls, i)] = arr
    return pixels


def test_imagefolder_dataset_normalization_and_inverse(tmp_path):
    pixels = write_images(tmp_path / "images")
    cfg = dataset_config(tmp_path, f"""
        source = "imagefolder:images"
        resize = 8
        mean = {list(MEAN)}
        std = {list(STD)}
        """)
    ds = load_dataset(cfg)
    assert isinstance(ds, AtlasDataset)
    assert len(ds) == 6
    assert ds.class_names == ("classA", "classB")
    assert ds.mean == MEAN and ds.std == STD
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    for i, key in enumerate([(c, j) for c in ("classA", "classB") for j in range(3)]):
        x, label = ds.data[i]
        assert isinstance(x, torch.Tensor) and x.dtype == torch.float32
        assert tuple(x.shape) == (3, 8, 8)
        assert label == (0 if key[0] == "classA" else 1)
        raw = torch.from_numpy(pixels[key]).permute(2, 0, 1).float() / 255
        torch.testing.assert_close(x, (raw - mean) / std, atol=1e-5, rtol=0)
        back = np.asarray(ds.to_image(x))
        assert back.shape == (8, 8, 3) and back.dtype == np.uint8
        assert np.abs(back.astype(int) - pixels[key].astype(int)).max() <= 1
    # normalization actually changed the values (the inverse is not a no-op)
    assert ds.data[0][0].min() < 0


def test_imagefolder_resize_and_crop(tmp_path):
    write_images(tmp_path / "images", size=(8, 12))  # H x W
    cfg = dataset_config(tmp_path, 'source = "imagefolder:images"\nresize = 4')
    assert tuple(load_dataset(cfg).data[0][0].shape) == (3, 4, 6)  # shorter side to 4
    cfg = dataset_config(tmp_path, 'source = "imagefolder:images"\nresize = 4\ncrop = 4', name="b.toml")
    ds = load_dataset(cfg)
    x = ds.data[0][0]
    assert tuple(x.shape) == (3, 4, 4)
    assert 0 <= float(x.min()) and float(x.max()) <= 1  # no normalization: [0, 1]
    assert ds.to_image(x).size == (4, 4)


def test_to_image_grayscale_without_normalization():
    ds = AtlasDataset(data=[], class_names=(), mean=(), std=(), description="", fingerprint="")
    x = torch.tensor([[[0.0, 0.5], [1.0, 2.0]]])  # values above 1 are clamped
    img = ds.to_image(x)
    assert img.mode == "L"
    assert np.asarray(img).tolist() == [[0, 128], [255, 255]]


def test_imagefolder_limit_is_seeded_and_repeatable(tmp_path):
    write_images(tmp_path / "images", per_class=10)
    full = load_dataset(dataset_config(tmp_path, 'source = "imagefolder:images"', name="full.toml"))
    a = load_dataset(dataset_config(tmp_path, 'source = "imagefolder:images"\nlimit = 5', name="a.toml"))
    b = load_dataset(dataset_config(tmp_path, 'source = "imagefolder:images"\nlimit = 5', name="b.toml"))
    assert len(full) == 20 and len(a) == 5 and len(b) == 5
    items_a = [a.data[i] for i in range(5)]
    items_b = [b.data[i] for i in range(5)]
    for (xa, la), (xb, lb) in zip(items_a, items_b):
        assert torch.equal(xa, xb) and la == lb
    assert a.fingerprint == b.fingerprint != full.fingerprint
    # the subset is 5 distinct examples of the full set, in dataset order
    full_items = [full.data[i] for i in range(20)]
    where = [next(j for j, (xf, _) in enumerate(full_items) if torch.equal(xf, x)) for x, _ in items_a]
    assert where == sorted(set(where))
    assert [full_items[j][1] for j in where] == [label for _, label in items_a]
    # limit >= size keeps everything
    c = load_dataset(dataset_config(tmp_path, 'source = "imagefolder:images"\nlimit = 50', name="c.toml"))
    assert len(c) == 20


def test_limit_depends_on_seed(tmp_path):
    a = load_dataset(dataset_config(tmp_path, 'source = "builtin:digits"\nlimit = 30', seed=0, name="a.toml"))
    b = load_dataset(dataset_config(tmp_path, 'source = "builtin:digits"\nlimit = 30', seed=1, name="b.toml"))
    xa = torch.stack([a.data[i][0] for i in range(30)])
    xb = torch.stack([b.data[i][0] for i in range(30)])
    assert not torch.equal(xa, xb)
    assert a.fingerprint != b.fingerprint


def test_builtin_digits(tmp_path):
    ds = load_dataset(dataset_config(tmp_path, 'source = "builtin:digits"'))
    assert len(ds) == 540
    assert ds.class_names == tuple(str(i) for i in range(10))
    xs, labels = zip(*(ds.data[i] for i in range(len(ds))))
    x = torch.stack(xs)
    assert tuple(x.shape) == (540, 1, 8, 8)
    assert x.dtype == torch.float32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert sorted(set(labels)) == list(range(10))
    assert all(isinstance(label, int) for label in labels)
    assert ds.to_image(x[0]).mode == "L"


def test_import_dataset_factory_class_names(tmp_path):
    ds = load_dataset(dataset_config(tmp_path, 'source = "fixtures_models:tiny_dataset"'))
    assert len(ds) == 40
    assert ds.class_names == ("zero", "one", "two")
    x, label = ds.data[4]
    assert torch.equal(x, fixtures_models.tiny_dataset()[4][0]) and label == 1


def test_import_dataset_without_classes_names_them_from_labels(tmp_path):
    ds = load_dataset(dataset_config(tmp_path, 'source = "test_sources:unnamed_dataset"'))
    assert ds.class_names == ("0", "1", "2", "3")
    assert len(ds) == 12


@pytest.mark.parametrize("source, expected", [
    ("test_sources:empty_dataset", "is empty"),
    ("test_sources:not_a_dataset", "returned int, not a map-style dataset"),
    ("builtin:cifar", "unknown builtin dataset 'cifar'"),
    ("no_such_package_xyz:data", "cannot import 'no_such_package_xyz'"),
])
def test_bad_dataset_source(tmp_path, source, expected):
    cfg = dataset_config(tmp_path, f'source = "{source}"')
    with pytest.raises(AtlasError) as info:
        load_dataset(cfg)
    assert expected in str(info.value)


def test_imagefolder_without_images_is_atlas_error(tmp_path):
    (tmp_path / "images" / "classA").mkdir(parents=True)  # a class folder, but no image files
    cfg = dataset_config(tmp_path, 'source = "imagefolder:images"')
    with pytest.raises(AtlasError, match="one sub-folder per class"):
        load_dataset(cfg)


def test_normalization_with_wrong_channel_count_is_atlas_error(tmp_path):
    cfg = load_config(write_config(tmp_path, """
        [dataset]
        source = "builtin:digits"
        mean = [0.5, 0.5, 0.5]
        std = [0.2, 0.2, 0.2]
        [[models]]
        name = "m"
        source = "fixtures_models:tiny_mlp"
        """))
    with pytest.raises(AtlasError, match=r"3 values but the images have 1 channel"):
        load_dataset(cfg)
