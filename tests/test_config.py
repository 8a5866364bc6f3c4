"""Config loading: the demo config, every kind of bad config, relative paths, and the CLI's error line."""

from __future__ import annotations

from pathlib import Path

import pytest

from atlas_builder import cli
from atlas_builder.config import AtlasConfig, ConfigError, load_config
from atlas_builder.errors import AtlasError

from conftest import REPO, write_config

MODEL = """
[[models]]
name = "tiny-cnn"
source = "fixtures_models:tiny_cnn"
"""


def test_demo_config_loads():
    cfg = load_config(REPO / "examples" / "demo.toml")
    assert isinstance(cfg, AtlasConfig)
    assert [m.name for m in cfg.models] == ["digits-mlp", "digits-cnn"]
    assert [m.source for m in cfg.models] == ["builtin:digits-mlp", "builtin:digits-cnn"]
    assert all(m.kind == "builtin" for m in cfg.models)
    assert cfg.models[1].display_title == "Digits CNN (2 conv layers)"
    assert cfg.dataset.source == "builtin:digits"
    assert (cfg.dataset.kind, cfg.dataset.target) == ("builtin", "digits")
    assert cfg.atlas.name == "demo"
    assert cfg.atlas.device == "auto"
    assert (cfg.scan.top_k, cfg.scan.batch_size, cfg.scan.reduce) == (9, 128, "max")
    assert cfg.base_dir == (REPO / "examples").resolve()
    assert cfg.model("digits-cnn") is cfg.models[1]


def test_minimal_config_gets_defaults(tmp_path):
    cfg = load_config(write_config(tmp_path, MODEL))
    assert cfg.atlas.name == "atlas" and cfg.atlas.seed == 0 and cfg.atlas.device == "auto"
    assert cfg.dataset.source == "builtin:digits"
    assert cfg.dataset.mean == () and cfg.dataset.std == ()
    assert cfg.scan.top_k == 9
    assert cfg.models[0].kind == "import" and cfg.models[0].target == "fixtures_models:tiny_cnn"
    assert cfg.models[0].display_title == "tiny-cnn"
    assert cfg.models[0].layers == () and cfg.models[0].checkpoint is None


def test_model_lookup_by_unknown_name_lists_names(tmp_path):
    cfg = load_config(write_config(tmp_path, MODEL))
    with pytest.raises(ConfigError, match="no model named 'nope'; models are: tiny-cnn"):
        cfg.model("nope")


# (id, TOML body, substrings the message must contain)
BAD_CONFIGS = [
    ("malformed-toml", '[atlas\nname = "x"\n' + MODEL, ["not valid TOML", "fix the syntax"]),
    ("unknown-section", '[sitee]\ntitle = "x"\n' + MODEL,
     ["unknown section [sitee]", "allowed sections are atlas, dataset, embed, featurevis, models, scan, site"]),
    ("unknown-key", "[scan]\ntopk = 3\n" + MODEL,
     ["unknown key scan.topk", "allowed keys in this section are active_threshold, batch_size, buffer_mb"]),
    ("unknown-model-key", MODEL + 'wieghts = "DEFAULT"\n',
     ["unknown key models[0].wieghts", "checkpoint, dictionaries, layers, name, source, title, units, unsafe_pickle, weights"]),
    ("negative-units", MODEL + "units = -1\n", ["models[0].units must be 0 (every unit) or more, got -1"]),
    ("string-for-int", '[scan]\ntop_k = "9"\n' + MODEL, ["scan.top_k must be an integer, got a string '9'"]),
    ("bool-for-int", "[scan]\nbatch_size = true\n" + MODEL,
     ["scan.batch_size must be an integer, got a boolean True"]),
    ("float-for-int", "[atlas]\nseed = 1.5\n" + MODEL, ["atlas.seed must be an integer, got a float 1.5"]),
    ("string-for-bool", '[dataset]\ndownload = "yes"\n' + MODEL,
     ["dataset.download must be a boolean (true or false), got a string 'yes'"]),
    ("mean-not-numbers", '[dataset]\nmean = ["a"]\nstd = [1.0]\n' + MODEL,
     ["dataset.mean must be an array of finite numbers"]),
    ("layers-not-strings", MODEL + "layers = [1, 2]\n", ["models[0].layers must be an array of strings"]),
    ("empty-path", '[atlas]\ndata_dir = ""\n' + MODEL, ["atlas.data_dir must be a non-empty path string"]),
    ("section-not-table", 'scan = 3\n' + MODEL, ["[scan] must be a table, got an integer"]),
    ("no-models", '[atlas]\nname = "x"\n', ["no [[models]] given", "[[models]]"]),
    ("models-not-array", '[models]\nname = "a"\nsource = "builtin:digits-mlp"\n',
     ["models must be an array of tables ([[models]])"]),
    ("model-missing-source", '[[models]]\nname = "a"\n', ["models[0] is missing required key(s): source"]),
    ("bad-atlas-name", '[atlas]\nname = "My Atlas"\n' + MODEL,
     ["atlas.name 'My Atlas' must be a slug", "lowercase letters, digits, '-' or '_'"]),
    ("bad-model-name", '[[models]]\nname = "Tiny CNN"\nsource = "fixtures_models:tiny_cnn"\n',
     ["models[0].name 'Tiny CNN' must be a slug", "lowercase letters, digits"]),
    ("duplicate-model-names", MODEL + MODEL,
     ["models[1].name 'tiny-cnn' is used twice", "must be unique"]),
    ("model-named-like-a-site-folder", '[[models]]\nname = "sql"\nsource = "fixtures_models:tiny_cnn"\n',
     ["models[0].name 'sql' is the name of one of the site's own folders", "choose another name"]),
    ("unknown-device", '[atlas]\ndevice = "tpu"\n' + MODEL,
     ["atlas.device 'tpu' is not allowed", "use one of auto, cpu, cuda"]),
    ("unknown-reduce", '[scan]\nreduce = "median"\n' + MODEL,
     ["scan.reduce 'median' is not allowed", "use one of max, mean"]),
    ("zero-top-k", "[scan]\ntop_k = 0\n" + MODEL, ["scan.top_k must be at least 1, got 0"]),
    ("zero-batch", "[scan]\nbatch_size = 0\n" + MODEL, ["scan.batch_size must be at least 1, got 0"]),
    ("one-diverse", "[featurevis]\ndiversity = 1\n" + MODEL,
     ["featurevis.diversity must be 0 (none) or 2 to 8 images per unit, got 1"]),
    ("negative-limit", "[dataset]\nlimit = -1\n" + MODEL, ["dataset.limit must be 0 or more, got -1"]),
    ("mean-std-length", "[dataset]\nmean = [0.5, 0.5, 0.5]\nstd = [0.2]\n" + MODEL,
     ["dataset.mean and dataset.std must have the same length", "got 3 and 1"]),
    ("zero-std", "[dataset]\nmean = [0.5]\nstd = [0]\n" + MODEL, ["dataset.std values must be greater than 0"]),
    ("imagefolder-missing", '[dataset]\nsource = "imagefolder:no_such_images"\n' + MODEL,
     ["dataset.source: image folder", "no_such_images", "does not exist", "one sub-folder per class"]),
    ("torchvision-dataset-without-root", '[dataset]\nsource = "torchvision:CIFAR10"\n' + MODEL,
     ["dataset.root is required for torchvision datasets"]),
    ("missing-checkpoint", MODEL + 'checkpoint = "weights/missing.pt"\n',
     ["models[0].checkpoint: file", "missing.pt", "does not exist"]),
    ("weights-on-import-model", MODEL + 'weights = "DEFAULT"\n',
     ["models[0].weights is only for torchvision models", "checkpoint"]),
    ("bad-model-source", '[[models]]\nname = "a"\nsource = "not a source"\n',
     ["models[0].source 'not a source' is not understood", "builtin:..., torchvision:...",
      "'package.module:factory'"]),
    ("bad-dataset-source", '[dataset]\nsource = "digits"\n' + MODEL,
     ["dataset.source 'digits' is not understood",
      "builtin:..., imagefolder:..., torchvision:...", "'package.module:factory'"]),
    ("empty-source-target", '[[models]]\nname = "a"\nsource = "torchvision:"\n',
     ["models[0].source 'torchvision:' names no torchvision target"]),
]


@pytest.mark.parametrize("body, expected", [(b, e) for _, b, e in BAD_CONFIGS], ids=[i for i, _, _ in BAD_CONFIGS])
def test_bad_config_is_a_config_error_naming_the_key(tmp_path, body, expected):
    path = write_config(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert isinstance(info.value, AtlasError)
    assert message.startswith(f"{path}: "), message  # every message names the file
    assert "\n" not in message, message  # the CLI shows it as one line
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    message = str(info.value)
    assert f"config file {str(missing)!r} does not exist" in message
    assert "examples/demo.toml" in message


def test_relative_paths_resolve_against_config_folder(tmp_path, monkeypatch):
    folder = tmp_path / "project" / "conf"
    (folder / "images" / "cats").mkdir(parents=True)
    (folder / "weights").mkdir()
    (folder / "weights" / "w.pt").write_bytes(b"x")
    write_config(folder, """
        [atlas]
        data_dir = "cache"
        site_dir = "../public"
        [dataset]
        source = "imagefolder:images"
        root = "tv"
        [[models]]
        name = "tiny-cnn"
        source = "fixtures_models:tiny_cnn"
        checkpoint = "weights/w.pt"
        """)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative to the cwd these paths would not exist
    # the config path itself is relative to the cwd; what is inside it is relative to its folder
    cfg = load_config(Path("..") / "project" / "conf" / "atlas.toml")
    base = folder.resolve()
    assert cfg.base_dir == base
    assert cfg.atlas.data_dir == base / "cache"
    assert cfg.atlas.site_dir == base / ".." / "public"
    assert cfg.atlas.site_dir.resolve() == (tmp_path / "project" / "public").resolve()
    assert cfg.dataset.root == base / "tv"
    assert cfg.models[0].checkpoint == base / "weights" / "w.pt"
    assert cfg.resolve(cfg.dataset.target) == base / "images"
    assert cfg.resolve(cfg.dataset.target).is_dir()
    assert cfg.store_dir == base / "cache" / "atlas"
    absolute = tmp_path / "abs"
    assert cfg.resolve(str(absolute)) == absolute


def test_cli_prints_one_error_line_and_exits_2(tmp_path, capsys):
    bad = write_config(tmp_path, '[scan]\ntop_k = "9"\n' + MODEL)
    rc = cli.main(["build", str(bad)])
    out, err = capsys.readouterr()
    assert rc == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("atlas: error: ")
    assert "scan.top_k must be an integer" in lines[0]
    assert "Traceback" not in err


def test_cli_missing_config_file(tmp_path, capsys):
    rc = cli.main(["layers", str(tmp_path / "missing.toml")])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("atlas: error: config file ")
    assert "Traceback" not in err


def test_cli_debug_reraises(tmp_path):
    bad = write_config(tmp_path, '[atlas]\ndevice = "tpu"\n' + MODEL)
    with pytest.raises(ConfigError, match="atlas.device 'tpu' is not allowed"):
        cli.main(["--debug", "build", str(bad)])


@pytest.mark.parametrize("body, expected", [
    ('[atlas]\nname = "demo\\n"\n', "atlas.name"),  # a trailing newline is not a slug
    ("[atlas]\nseed = -1\n", "atlas.seed must be 0 or more"),
    ("[dataset]\nmean = [nan]\nstd = [1.0]\n", "dataset.mean must be an array of finite numbers"),
    ("[dataset]\nmean = [0.5]\nstd = [inf]\n", "dataset.std must be an array of finite numbers"),
    ("[scan]\nsaturated_fraction = 1.5\n", "scan.saturated_fraction must be between 0 and 1"),
    ("[scan]\nactive_threshold = true\n", "scan.active_threshold must be a finite number"),
    ("[scan]\nsample_size = -5\n", "scan.sample_size must be 0 or more"),
    ("[scan]\nrange_bins = 101\n", "scan.range_bins must be 0 or more and at most 100"),
    ("[scan]\nrange_examples = -1\n", "scan.range_examples must be 0 or more and at most 20"),
    ("[scan]\neffect_per_class = -2\n", "scan.effect_per_class must be 0 or more, got -2"),
])
def test_more_bad_values(tmp_path, body, expected):
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[")):
        load_config(write_config(tmp_path, body + MODEL))


def test_config_path_that_is_a_folder(tmp_path):
    with pytest.raises(ConfigError, match="is a directory, not a file"):
        load_config(tmp_path)
