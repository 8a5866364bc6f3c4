"""Shared fixtures: tiny models, datasets and configs built in code with fixed seeds."""

from __future__ import annotations

import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# tests/fixtures_models.py holds import-path factories (`fixtures_models:tiny_cnn`, ...)
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


TINY_MODELS = """
[[models]]
name = "tiny-cnn"
source = "fixtures_models:tiny_cnn"
layers = ["conv", "relu", "fc"]
[[models]]
name = "tiny-mlp"
source = "fixtures_models:tiny_mlp"
layers = ["fc1", "act", "fc2"]
"""  # the two tiny import-path models most test configs end with


def write_config(folder: Path, body: str, name: str = "atlas.toml") -> Path:
    """Write a TOML config (dedented) into folder and return its path."""
    path = folder / name
    path.write_text(textwrap.dedent(body).lstrip(), encoding="utf-8")
    return path


def atlas_section(folder: Path, name: str) -> str:
    """The [atlas] table of a test config whose store and site live in `folder`."""
    return (f'[atlas]\nname = "{name}"\ndata_dir = "{folder / "data"}"\nsite_dir = "{folder / "site"}"\n')


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    """A fast atlas: import-path tiny CNN + MLP over a 40-example synthetic dataset."""
    return write_tiny_config(tmp_path)


def write_tiny_config(folder: Path) -> Path:
    """The `tiny_config` atlas, its store and site in `folder`."""
    return write_config(folder, atlas_section(folder, "tiny") + """
        [site]
        title = "Tiny atlas"
        [dataset]
        source = "fixtures_models:tiny_dataset"
        [scan]
        top_k = 3
        batch_size = 16
        [featurevis]
        steps = 24
        frames = 12
        """ + TINY_MODELS)


DEMO_SITE_NAME = "atlas"  # the demo site's folder: <tmp>/pub/atlas, so it can be served from a subpath


@pytest.fixture(scope="session")
def demo_build(tmp_path_factory):
    """The demo atlas (examples/demo.toml), built once per session: (config, build report).

    Shared by the tests that only read it (test_build.py, test_browser.py); it
    takes most of a minute (training the demo models included).
    """
    from atlas_builder.build import build
    from atlas_builder.config import parse_config

    tmp = tmp_path_factory.mktemp("demo")
    raw = tomllib.loads((REPO / "examples/demo.toml").read_text())
    raw["atlas"].update(data_dir=str(tmp / "data"), site_dir=str(tmp / "pub" / DEMO_SITE_NAME))
    cfg = parse_config(raw, base=REPO / "examples")
    return cfg, build(cfg, progress=False)
