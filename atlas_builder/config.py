"""Atlas configuration: TOML file -> frozen dataclasses, validated in one place.

Owns the schema of `atlas.toml` (sections, keys, types, defaults) and every
error message about it. Does not load models or data: it only checks that
what the config names is well formed (and that local paths exist).

A config looks like::

    [atlas]
    name = "demo"                 # slug: data/<name>/ holds the store
    [site]
    title = "Neuron Atlas demo"
    [dataset]
    source = "builtin:digits"
    [scan]
    top_k = 9
    [[models]]
    name = "digits-mlp"
    source = "builtin:digits-mlp"

Relative paths in the file are resolved against the file's own folder.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import urls
from .errors import AtlasError

SLUG = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")  # used with fullmatch
DEVICES = ("auto", "cpu", "cuda")
REDUCTIONS = ("max", "mean", "cls")
PRECISIONS = ("float32", "bfloat16", "float16")
FV_OBJECTIVES = ("channel", "neuron")
FV_TRANSFORMS = ("standard", "none")
MODEL_KINDS = ("builtin", "torchvision", "hf", "import")
DATASET_KINDS = ("builtin", "imagefolder", "torchvision", "text", "import")


class ConfigError(AtlasError):
    """A config file that cannot be used; the message names the key and the fix."""


@dataclass(frozen=True)
class AtlasSection:
    name: str = "atlas"  # slug; the store lives in <data_dir>/<name>/
    seed: int = 0  # seeds every random choice (subsets, training, sampling)
    device: str = "auto"  # auto = cuda when present, else cpu
    data_dir: Path = Path("data")  # build cache: store, media, demo weights
    site_dir: Path = Path("site")  # where the static site is written


@dataclass(frozen=True)
class SiteSection:
    title: str = "Neuron Atlas"  # shown in every page header
    base_url: str = ""  # public URL of the site root (permalinks, citations, sitemap.xml); "" = unknown
    citation_author: str = ""  # BibTeX author(s) of the atlas, "A and B"; "" = the site title
    citation_year: int = 0  # year in citations; 0 = the year of SOURCE_DATE_EPOCH, else none
    version: str = ""  # the atlas's version, in citations ("1.0"); "" = none
    input_pages: int = 50  # inputs (a seeded sample) that get a page of per-layer heatmaps; 0 = none
    attribution_steps: int = 32  # integrated-gradients steps of the input pages' attributions; 0 = no attributions
    unit_attributions: bool = False  # unit pages: gradient x input of each top example (a backward pass per
    # example and unit: minutes on the demo, hours for a whole ResNet-50 on a CPU; `atlas plan` counts its bytes)
    budget_total_mb: int = 1024  # the build fails when the site is larger (GitHub Pages' soft limit: 1 GB)
    budget_file_mb: int = 100  # ... or when any one file is larger (GitHub's hard limit: 100 MB)
    show_timings: bool = False  # stage timings on the about page (then two builds differ in those bytes)


@dataclass(frozen=True)
class DatasetSection:
    source: str = "builtin:digits"  # builtin:digits | imagefolder:PATH | torchvision:Name | text:PATH | pkg.mod:factory
    root: Path | None = None  # torchvision datasets: where the files are
    download: bool = False  # torchvision datasets: allow downloading (never in tests or the demo)
    limit: int = 0  # use a seeded random subset of this many examples; 0 = all
    resize: int = 0  # resize the shorter side to this many pixels; 0 = keep
    crop: int = 0  # centre crop to this square size after resizing; 0 = none
    mean: tuple[float, ...] = ()  # per-channel normalization mean; () = none
    std: tuple[float, ...] = ()  # per-channel normalization std; same length as mean
    context: int = 64  # text datasets: tokens in a window (an example), at most the model's context length
    stride: int = 0  # text datasets: tokens from one window's start to the next; 0 = context (no overlap)

    @property
    def kind(self) -> str:
        return source_kind(self.source, DATASET_KINDS)

    @property
    def target(self) -> str:
        return source_target(self.source)


@dataclass(frozen=True)
class ScanSection:
    top_k: int = 9  # dataset examples kept per unit
    batch_size: int = 128  # examples per forward pass
    reduce: str = "max"  # a unit's value over positions or tokens: max | mean | cls (a ViT's class token alone)
    active_threshold: float = 0.0  # a unit is active where its activation exceeds this
    histogram_bins: int = 30  # bins of each unit's activation histogram (over the sample)
    sample_size: int = 2000  # seeded sample of examples whose activations are kept (histogram, redundancy, maps)
    range_bins: int = 10  # activation quantiles (of the sample) a unit page shows examples from, 0 = none
    range_examples: int = 3  # examples shown from each quantile, a seeded pick of the sample rows in it
    # labelled examples of each class (a seeded pick) whose activation x gradient estimates each unit's effect on
    # that class's logit (one forward and backward pass per batch; 0 = none): 4 x 1,000 ImageNet classes = 4,000
    effect_per_class: int = 4
    saturated_fraction: float = 0.99  # active on at least this fraction of positions of all inputs: saturated
    redundant_correlation: float = 0.95  # correlation with another unit of the layer from which it is redundant
    class_selective: float = 0.6  # selectivity index from which a unit is labelled class-selective
    buffer_mb: int = 64  # memory for activations buffered between accumulator updates, with their update's
    workers: int = 0  # DataLoader worker processes (e.g. 4 with a GPU); 0 = load in the main process
    precision: str = "float32"  # forward pass precision: float32 | bfloat16 | float16 (autocast; see README)


@dataclass(frozen=True)
class FeatureVisSection:
    enabled: bool = True  # render a feature visualization of every probed unit
    steps: int = 256  # optimizer steps per run
    lr: float = 0.05  # Adam learning rate on the image's Fourier coefficients
    batch_size: int = 64  # units optimized together in one run
    frames: int = 8  # animation frames, log-spaced over the steps (each about 0.6 KB at 80 px)
    objective: str = "channel"  # channel (mean over positions) | neuron (centre position)
    negative: bool = True  # also render the image that minimizes each unit
    transforms: str = "standard"  # standard (lucid's pad/jitter/scale/rotate) | none
    size: int = 0  # square image size in pixels; 0 = the dataset's image size
    # images per unit in its diversity row (lucid's diversity term, optimized as one batch; 0 = none, else 2-8):
    # each costs about half a unit's feature-vis time and ~1.5 KB, so it is off unless asked for (the demo: 4)
    diversity: int = 0


@dataclass(frozen=True)
class EmbedSection:
    enabled: bool = True  # compute unit and input maps (PCA, UMAP) and nearest units
    n_neighbors: int = 15  # UMAP's neighbourhood size (capped below the number of points)
    neighbours: int = 8  # nearest units listed on each unit page


@dataclass(frozen=True)
class DictionarySection:
    path: Path | None = None  # a folder in SAELens's format (cfg.json, sae_weights.safetensors), or none with builtin
    builtin: str = ""  # instead of path: "byte-lm-sae", the demo's TopK SAE, trained by the build on its model
    hook: str = ""  # module path whose output it encodes; "" = cfg.json's hook_name
    name: str = "sae"  # its latents are the layer <hook>.<name> (a child module of the hook point)


@dataclass(frozen=True)
class ModelSection:
    name: str  # slug used in URLs: <model>/<layer>/<unit>/
    source: str  # builtin:NAME | torchvision:NAME | hf:PATH (a saved transformers causal LM) | pkg.mod:factory
    title: str = ""  # human name; "" = the name
    weights: str = ""  # torchvision weights enum name (e.g. DEFAULT); "" = random init
    checkpoint: Path | None = None  # state_dict file loaded with weights_only=True
    layers: tuple[str, ...] = ()  # module paths to probe; () = one per representation (see README: default layers)
    units: int = 0  # probe only each layer's first N units (trial builds); 0 = all
    unsafe_pickle: bool = False  # load the checkpoint with weights_only=False: runs code in the file; trusted files only
    dictionaries: tuple[DictionarySection, ...] = ()  # [[models.dictionaries]]: SAEs whose latents are units

    @property
    def kind(self) -> str:
        return source_kind(self.source, MODEL_KINDS)

    @property
    def target(self) -> str:
        return source_target(self.source)

    @property
    def display_title(self) -> str:
        return self.title or self.name


@dataclass(frozen=True)
class AtlasConfig:
    atlas: AtlasSection
    site: SiteSection
    dataset: DatasetSection
    scan: ScanSection
    featurevis: FeatureVisSection = FeatureVisSection()
    embed: EmbedSection = EmbedSection()
    models: tuple[ModelSection, ...] = field(default_factory=tuple)
    path: Path | None = None  # the file it was read from
    base_dir: Path = Path(".")  # relative paths inside the file resolve against this

    def resolve(self, value: str | Path) -> Path:
        """A path written in the config, made absolute against the config's folder."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else Path(os.path.normpath(self.base_dir / p))  # "examples/../site": "site"

    @property
    def store_dir(self) -> Path:
        return self.atlas.data_dir / self.atlas.name

    def model(self, name: str) -> ModelSection:
        for m in self.models:
            if m.name == name:
                return m
        raise ConfigError(f"no model named {name!r}; models are: {', '.join(m.name for m in self.models)}")


def source_kind(source: str, kinds: tuple[str, ...]) -> str:
    """The kind of a `kind:target` source string; `pkg.mod:factory` is kind `import`."""
    head, _, _ = source.partition(":")
    return head if head in kinds else "import"


def source_target(source: str) -> str:
    head, _, tail = source.partition(":")
    return tail if head in ("builtin", "imagefolder", "torchvision", "text", "hf") else source


# --- loading and validation (the one place) ---------------------------------

SECTIONS = {
    "atlas": AtlasSection,
    "site": SiteSection,
    "dataset": DatasetSection,
    "scan": ScanSection,
    "featurevis": FeatureVisSection,
    "embed": EmbedSection,
}


def load_config(path: str | Path) -> AtlasConfig:
    """Read and validate an atlas TOML file; raise ConfigError with a clear message."""
    path = Path(path)
    if _is(path, "dir", "config path"):
        raise ConfigError(f"config path {str(path)!r} is a directory, not a file; pass the atlas TOML file itself")
    if not _is(path, "file", "config path"):
        raise ConfigError(f"config file {str(path)!r} does not exist; pass the path of an atlas TOML file "
                          f"(see examples/demo.toml)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc}); save the file as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read ({exc.strerror or exc}); "
                          f"check its permissions") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc}); fix the syntax at that line") from None
    return parse_config(raw, base=path.resolve().parent, path=path)


def parse_config(raw: dict[str, Any], base: Path = Path("."), path: Path | None = None) -> AtlasConfig:
    """Validate a parsed TOML document (a dict) into an AtlasConfig."""
    where = f"{path}: " if path else ""
    allowed = set(SECTIONS) | {"models"}
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"{where}unknown section [{key}]; allowed sections are "
                              f"{', '.join(sorted(allowed))}")
    sections = {}
    for name, cls in SECTIONS.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{where}[{name}] must be a table, got {_type_name(table)}")
        sections[name] = _build(cls, table, f"{name}", where, base)
    models_raw = raw.get("models", [])
    if not isinstance(models_raw, list) or not all(isinstance(m, dict) for m in models_raw):
        raise ConfigError(f"{where}models must be an array of tables ([[models]]), got {_type_name(models_raw)}")
    if not models_raw:
        raise ConfigError(f"{where}no [[models]] given; add at least one, e.g. "
                          f"[[models]] name = \"digits-mlp\" source = \"builtin:digits-mlp\"")
    models = tuple(_model_section(m, i, where, base) for i, m in enumerate(models_raw))
    cfg = AtlasConfig(models=models, path=path, base_dir=base, **sections)
    _check(cfg, where)
    return cfg


def _model_section(table: dict[str, Any], i: int, where: str, base: Path) -> ModelSection:
    """A [[models]] table, with its [[models.dictionaries]] tables."""
    table = dict(table)
    raw = table.pop("dictionaries", [])
    if not isinstance(raw, list) or not all(isinstance(d, dict) for d in raw):
        raise ConfigError(f"{where}models[{i}].dictionaries must be an array of tables ([[models.dictionaries]]), "
                          f"got {_type_name(raw)}")
    dictionaries = []
    for j, d in enumerate(raw):
        section = _build(DictionarySection, d, f"models[{i}].dictionaries[{j}]", where, base)
        if (section.path is None) == (not section.builtin):
            raise ConfigError(f"{where}models[{i}].dictionaries[{j}] needs path = \"FOLDER\" (SAELens's saved "
                              f"format: cfg.json and sae_weights.safetensors)"
                              + (", or builtin = \"...\", not both" if section.builtin else ""))
        if section.path is not None and not _is(section.path, "dir", f"models[{i}].dictionaries[{j}].path", where):
            raise ConfigError(f"{where}models[{i}].dictionaries[{j}].path: folder {str(section.path)!r} does not "
                              f"exist")
        if not re.fullmatch(r"[A-Za-z_]\w*", section.name):
            raise ConfigError(f"{where}models[{i}].dictionaries[{j}].name {section.name!r} must be an identifier "
                              f"(letters, digits, _): it becomes a module name")
        dictionaries.append(section)
    return dataclasses.replace(_build(ModelSection, table, f"models[{i}]", where, base),
                               dictionaries=tuple(dictionaries))


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


def _build(cls: type, table: dict[str, Any], prefix: str, where: str, base: Path):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in table.items():
        if key not in fields:
            raise ConfigError(f"{where}unknown key {prefix}.{key}; allowed keys in this section are "
                              f"{', '.join(sorted(fields))}")
        values[key] = _coerce(value, fields[key].type, f"{prefix}.{key}", where, base)
    missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and n not in values]
    if missing:
        raise ConfigError(f"{where}{prefix} is missing required key(s): {', '.join(missing)}")
    return cls(**values)


def _coerce(value: Any, annotation: str, key: str, where: str, base: Path):
    """Check a TOML value against a field's annotation (a string, from __future__ annotations)."""
    def bad(expected: str):
        return ConfigError(f"{where}{key} must be {expected}, got {_type_name(value)} {value!r}")

    if annotation == "str":
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if annotation == "bool":
        if not isinstance(value, bool):
            raise bad("a boolean (true or false)")
        return value
    if annotation == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad("a finite number")
        return float(value)
    if annotation == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if annotation in ("Path", "Path | None"):
        if not isinstance(value, str) or not value:
            raise bad("a non-empty path string")
        p = _user_path(value, key, where)
        return p if p.is_absolute() else base / p
    if annotation == "tuple[float, ...]":
        if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  and math.isfinite(v) for v in value):
            raise bad("an array of finite numbers")
        return tuple(float(v) for v in value)
    if annotation == "tuple[str, ...]":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad("an array of strings")
        return tuple(value)
    raise AssertionError(f"unhandled annotation {annotation}")  # a bug in this module, not the config


def _check(cfg: AtlasConfig, where: str) -> None:
    a, d, s = cfg.atlas, cfg.dataset, cfg.scan
    if not SLUG.fullmatch(a.name):
        raise ConfigError(f"{where}atlas.name {a.name!r} must be a slug: lowercase letters, digits, '-' or '_'")
    if a.device not in DEVICES:
        raise ConfigError(f"{where}atlas.device {a.device!r} is not allowed; use one of {', '.join(DEVICES)}")
    if cfg.embed.n_neighbors < 2:
        raise ConfigError(f"{where}embed.n_neighbors must be at least 2, got {cfg.embed.n_neighbors}")
    if cfg.embed.neighbours < 0:
        raise ConfigError(f"{where}embed.neighbours must be 0 or more, got {cfg.embed.neighbours}")
    fv = cfg.featurevis
    for key in ("steps", "batch_size", "frames"):
        if getattr(fv, key) < 1:
            raise ConfigError(f"{where}featurevis.{key} must be at least 1, got {getattr(fv, key)}")
    if fv.lr <= 0:
        raise ConfigError(f"{where}featurevis.lr must be greater than 0, got {fv.lr}")
    if fv.size < 0:
        raise ConfigError(f"{where}featurevis.size must be 0 (the dataset's size) or more, got {fv.size}")
    if fv.diversity != 0 and not 2 <= fv.diversity <= 8:
        raise ConfigError(f"{where}featurevis.diversity must be 0 (none) or 2 to 8 images per unit, got "
                          f"{fv.diversity}")
    if fv.objective not in FV_OBJECTIVES:
        raise ConfigError(f"{where}featurevis.objective {fv.objective!r} is not allowed; use one of "
                          f"{', '.join(FV_OBJECTIVES)}")
    if fv.transforms not in FV_TRANSFORMS:
        raise ConfigError(f"{where}featurevis.transforms {fv.transforms!r} is not allowed; use one of "
                          f"{', '.join(FV_TRANSFORMS)}")
    site = cfg.site
    for key in ("input_pages", "citation_year", "attribution_steps"):
        if getattr(site, key) < 0:
            raise ConfigError(f"{where}site.{key} must be 0 or more, got {getattr(site, key)}")
    for key in ("budget_total_mb", "budget_file_mb"):
        if getattr(site, key) < 1:
            raise ConfigError(f"{where}site.{key} must be at least 1, got {getattr(site, key)}")
    if site.base_url and not re.fullmatch(r"https?://[^\s<>\"']+", site.base_url):
        raise ConfigError(f"{where}site.base_url {site.base_url!r} must be an http(s) URL such as "
                          f"\"https://user.github.io/atlas/\", or \"\"")
    if a.seed < 0:
        raise ConfigError(f"{where}atlas.seed must be 0 or more, got {a.seed}")
    for key in ("top_k", "batch_size", "histogram_bins", "buffer_mb"):
        if getattr(s, key) < 1:
            raise ConfigError(f"{where}scan.{key} must be at least 1, got {getattr(s, key)}")
    if s.precision not in PRECISIONS:
        raise ConfigError(f"{where}scan.precision {s.precision!r} is not allowed; use one of {', '.join(PRECISIONS)}")
    if s.workers < 0:
        raise ConfigError(f"{where}scan.workers must be 0 or more, got {s.workers}")
    for key, most in (("sample_size", None), ("range_bins", 100), ("range_examples", 20), ("effect_per_class", None)):
        if getattr(s, key) < 0 or (most is not None and getattr(s, key) > most):
            raise ConfigError(f"{where}scan.{key} must be 0 or more{f' and at most {most}' if most else ''}, "
                              f"got {getattr(s, key)}")
    for key in ("saturated_fraction", "class_selective"):
        if not 0 <= getattr(s, key) <= 1:
            raise ConfigError(f"{where}scan.{key} must be between 0 and 1, got {getattr(s, key)}")
    if not -1 <= s.redundant_correlation <= 1:
        raise ConfigError(f"{where}scan.redundant_correlation must be between -1 and 1, got {s.redundant_correlation}")
    if s.top_k < 1:
        raise ConfigError(f"{where}scan.top_k must be at least 1, got {s.top_k}")
    if s.batch_size < 1:
        raise ConfigError(f"{where}scan.batch_size must be at least 1, got {s.batch_size}")
    if s.reduce not in REDUCTIONS:
        raise ConfigError(f"{where}scan.reduce {s.reduce!r} is not allowed; use one of {', '.join(REDUCTIONS)}")
    for key in ("limit", "resize", "crop"):
        if getattr(d, key) < 0:
            raise ConfigError(f"{where}dataset.{key} must be 0 or more, got {getattr(d, key)}")
    if len(d.mean) != len(d.std):
        raise ConfigError(f"{where}dataset.mean and dataset.std must have the same length "
                          f"(one value per channel), got {len(d.mean)} and {len(d.std)}")
    if any(v <= 0 for v in d.std):
        raise ConfigError(f"{where}dataset.std values must be greater than 0, got {list(d.std)}")
    _check_source(d.source, "dataset.source", DATASET_KINDS, where)
    if d.kind == "imagefolder":
        _user_path(d.target, "dataset.source", where)
        folder = cfg.resolve(d.target)
        if not _is(folder, "dir", "dataset.source", where):
            raise ConfigError(f"{where}dataset.source: image folder {str(folder)!r} does not exist; "
                              f"point it at a folder with one sub-folder per class")
    if d.kind == "text":
        _user_path(d.target, "dataset.source", where)
        if not cfg.resolve(d.target).exists():
            raise ConfigError(f"{where}dataset.source: text {str(cfg.resolve(d.target))!r} does not exist; point it "
                              f"at a UTF-8 .txt file, a .jsonl file with a \"text\" field, or a folder of them")
        if d.context < 2:
            raise ConfigError(f"{where}dataset.context must be at least 2 tokens, got {d.context}")
        if not 0 <= d.stride:
            raise ConfigError(f"{where}dataset.stride must be 0 (= context) or more, got {d.stride}")
        if d.mean or d.resize or d.crop:
            raise ConfigError(f"{where}dataset.mean/std/resize/crop are for images; a text dataset has none of "
                              f"them: remove them")
    if d.kind == "torchvision" and d.root is None:
        raise ConfigError(f"{where}dataset.root is required for torchvision datasets (the folder holding its files)")
    names = set()
    for i, m in enumerate(cfg.models):
        if not SLUG.fullmatch(m.name):
            raise ConfigError(f"{where}models[{i}].name {m.name!r} must be a slug: lowercase letters, digits, "
                              f"'-' or '_' (it becomes part of the URL)")
        if m.name in urls.SITE_FOLDERS:  # a model's folder sits beside them
            raise ConfigError(f"{where}models[{i}].name {m.name!r} is the name of one of the site's own folders "
                              f"({', '.join(sorted(urls.SITE_FOLDERS))}); choose another name")
        if m.name in names:
            raise ConfigError(f"{where}models[{i}].name {m.name!r} is used twice; model names must be unique")
        names.add(m.name)
        _check_source(m.source, f"models[{i}].source", MODEL_KINDS, where)
        if m.kind == "hf" and not _is(cfg.resolve(_user_path(m.target, f"models[{i}].source", where)), "dir",
                                      f"models[{i}].source", where):
            raise ConfigError(f"{where}models[{i}].source: {str(cfg.resolve(m.target))!r} is not a folder; point "
                              f"hf:PATH at a folder saved by save_pretrained (the model and its tokenizer)")
        if m.checkpoint is not None and not _is(m.checkpoint, "file", f"models[{i}].checkpoint", where):
            raise ConfigError(f"{where}models[{i}].checkpoint: file {str(m.checkpoint)!r} does not exist")
        if m.units < 0:
            raise ConfigError(f"{where}models[{i}].units must be 0 (every unit) or more, got {m.units}")
        if m.weights and m.kind != "torchvision":
            raise ConfigError(f"{where}models[{i}].weights is only for torchvision models; "
                              f"use checkpoint = \"PATH\" for others")


def _user_path(value: str, key: str, where: str) -> Path:
    """A path string from the file, with ~ expanded; a ConfigError if it cannot be a path."""
    if "\x00" in value:
        raise ConfigError(f"{where}{key} {value!r} contains a NUL character, which no path can hold; remove it")
    try:
        return Path(value).expanduser()
    except RuntimeError:  # ~name of a user that does not exist, or no home directory
        raise ConfigError(f"{where}{key} {value!r}: cannot expand {value.split('/')[0]!r} (no such user or home "
                          f"directory); write the path in full") from None


def _is(path: Path, kind: str, key: str, where: str = "") -> bool:
    """path.is_dir() / is_file(), with an OS error (name too long, no permission) as a ConfigError."""
    try:
        return path.is_dir() if kind == "dir" else path.is_file()
    except OSError as exc:
        raise ConfigError(f"{where}{key}: {str(path)[:200]!r} cannot be checked ({exc.strerror or exc}); "
                          f"fix the path") from None


def _check_source(source: str, key: str, kinds: tuple[str, ...], where: str) -> None:
    kind = source_kind(source, kinds)
    target = source_target(source)
    if kind == "import":
        if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", source):
            raise ConfigError(f"{where}{key} {source!r} is not understood; use one of "
                              f"{', '.join(k + ':...' for k in kinds if k != 'import')} "
                              f"or an import path 'package.module:factory'")
    elif not target:
        raise ConfigError(f"{where}{key} {source!r} names no {kind} target after the ':'")
