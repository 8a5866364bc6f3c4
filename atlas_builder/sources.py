"""Sources: turn a config's model and dataset sections into live objects.

Models: `builtin:digits-mlp|digits-cnn` (trained and cached by demo_models),
`torchvision:<name>` with optional `weights` (torchvision's own loader;
`weights=""` means random init, which is what runs offline), an import path
`package.module:factory`, and optionally a state_dict `checkpoint` loaded with
`weights_only=True` (a file that pickles other objects too is loaded with
`weights_only=False` only under the model's `unsafe_pickle = true`, with an
AtlasWarning).

Models `builtin:byte-lm` and datasets `builtin:pydoc` are the demo's language model and its text (demo_lm).

Datasets: `builtin:digits` (the held-out split of scikit-learn's bundled
digits), `imagefolder:PATH`, `torchvision:<Name>` (root + download flag) and
`package.module:factory` (a callable returning a map-style dataset of
`(image, label)` pairs, image a PIL image or a CHW tensor in [0, 1]), and
`text:PATH` (text cut into windows of token ids: `text`). A model factory may
return `(model, tokenizer)`: a language model and the tokenizer of its text.
Preprocessing (resize, centre crop, normalize) comes from the config and is
applied with torchvision transforms; its inverse turns inputs back into
images for the site.

This module does not run models over data (hooks/scan do) nor write files.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import inspect
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn
from torch.utils.data import Dataset
from torchvision.transforms import v2

from . import demo_lm, demo_models, dictionaries, text
from .config import AtlasConfig, DatasetSection, ModelSection
from .errors import AtlasError, AtlasWarning
from .hooks import run_after


# --- models -----------------------------------------------------------------

@dataclass
class LoadedModel:
    section: ModelSection
    module: nn.Module
    fingerprint: str  # hash of architecture name and every parameter/buffer
    info: dict[str, Any]  # shown on the model page (e.g. training record)
    tokenizer: Any = None  # a language model's own tokenizer (its factory returned one), else None

    @property
    def name(self) -> str:
        return self.section.name


def load_model(section: ModelSection, cfg: AtlasConfig) -> LoadedModel:
    """Build the model a config section names, with its weights, in eval mode on the CPU."""
    info: dict[str, Any] = {"source": section.source}
    tokenizer = None
    if section.kind == "builtin":
        builtin = demo_lm.load_builtin if section.target == "byte-lm" else demo_models.load_builtin
        module, record = builtin(section.target, cfg.atlas.data_dir, cfg.atlas.seed)
        info.update(record)
    elif section.kind == "hf":
        module, tokenizer = _hf_model(section, cfg)
    elif section.kind == "torchvision":
        module = _torchvision_model(section)
        classes = weights_classes(section)
        if classes:
            info["classes"] = classes  # the names of the output units, for predictions and unit titles
    else:
        module = _call_factory(section.source, "model", f"models[{section.name}].source")
        if isinstance(module, tuple) and len(module) == 2 and isinstance(module[0], nn.Module):
            module, tokenizer = module  # a language model and its tokenizer
            text.vocab_size(tokenizer)
        if not isinstance(module, nn.Module):
            raise AtlasError(f"model factory {section.source!r} returned {type(module).__name__}, "
                             f"not a torch.nn.Module; make it return the model")
    if section.checkpoint is not None:
        _load_checkpoint(module, section.checkpoint, section.unsafe_pickle)
        info["checkpoint"] = section.checkpoint.name
    for j, d in enumerate(section.dictionaries):  # after the checkpoint: its keys are the model's own
        folder = demo_lm.builtin_dictionary(d.builtin, module, cfg.atlas.data_dir, cfg.atlas.seed) if d.builtin \
            else d.path
        info.setdefault("dictionaries", []).append(dictionaries.attach(
            module, folder, d.name, d.hook, f"models[{section.name}].dictionaries[{j}]"))
    module.eval()
    info["parameters"] = sum(p.numel() for p in module.parameters())
    return LoadedModel(section, module, model_fingerprint(module), info, tokenizer)


def _hf_model(section: ModelSection, cfg: AtlasConfig):
    """A Hugging Face causal LM saved in a local folder, and its tokenizer beside it (nothing downloaded).
    The model returns its logits [B, T, vocab] (a forward hook set here turns its output object into them),
    without a key-value cache."""
    try:
        import transformers
    except ImportError:
        raise AtlasError(f"models[{section.name}].source {section.source!r} needs the transformers package: "
                         f"pip install -e '.[hf]'") from None
    folder = cfg.resolve(section.target)
    try:
        module = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise AtlasError(f"models[{section.name}].source: {str(folder)!r} cannot be loaded as a transformers "
                         f"causal language model and its tokenizer ({_first_line(exc)}); save both there with "
                         f"save_pretrained") from None
    return logits_only(module), tokenizer


def logits_only(module: nn.Module) -> nn.Module:
    """A transformers causal LM made to return its logits tensor (a forward hook on it turns its output
    object into them), without a key-value cache."""
    module.config.use_cache = False
    run_after(module, lambda out: getattr(out, "logits", out))
    return module


def weights_classes(section: ModelSection) -> list[str]:
    """The class names of a torchvision model's weights (`meta["categories"]`, e.g. ImageNet's 1,000), or []
    without weights. Needs no download: the names are part of torchvision's code."""
    import torchvision

    if not section.weights:
        return []
    enum = torchvision.models.get_model_weights(section.target)
    return list(enum.verify(section.weights).meta.get("categories") or [])


def _torchvision_model(section: ModelSection) -> nn.Module:
    import torchvision

    available = torchvision.models.list_models()
    if section.target not in available:
        close = difflib.get_close_matches(section.target, available, n=5, cutoff=0.5) or sorted(available)[:8]
        raise AtlasError(f"unknown torchvision model {section.target!r}; did you mean one of {', '.join(close)}? "
                         f"(torchvision.models.list_models() lists all {len(available)})")
    try:
        return torchvision.models.get_model(section.target, weights=section.weights or None)
    except (ValueError, KeyError) as exc:
        raise AtlasError(f"torchvision model {section.target!r}: weights {section.weights!r} not usable ({exc}); "
                         f"use e.g. weights = \"DEFAULT\", or leave it empty for random weights") from None
    except OSError as exc:  # includes URLError: no network and no cached file
        raise AtlasError(f"torchvision model {section.target!r}: weights {section.weights!r} could not be "
                         f"downloaded or read ({exc}); put the file in torch's hub cache, use checkpoint = "
                         f"\"PATH\", or weights = \"\" for random weights") from None


def _load_checkpoint(module: nn.Module, path: Path, unsafe_pickle: bool = False) -> None:
    """Load a state_dict file into module with weights_only=True.

    A file that weights_only refuses (it pickles more than tensors) is loaded
    with weights_only=False only when the config sets unsafe_pickle = true,
    and then with an AtlasWarning: unpickling can run any code in the file.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling/format problem is the file's, not ours
        refused = _weights_only_refusal(exc)
        if not unsafe_pickle:
            if refused is not None:
                raise AtlasError(f"checkpoint {str(path)!r} holds more than tensors, so torch.load(weights_only=True) "
                                 f"refuses it ({refused}); save just the weights with "
                                 f"torch.save(model.state_dict(), path), or, only if you trust the file (unpickling "
                                 f"can run any code in it), set unsafe_pickle = true in its [[models]] "
                                 f"section") from None
            raise AtlasError(f"checkpoint {str(path)!r} cannot be read as a state_dict with weights_only=True "
                             f"({type(exc).__name__}: {_first_line(exc)}); "
                             f"save it with torch.save(model.state_dict(), path)") from None
        warnings.warn(AtlasWarning(
            f"checkpoint {str(path)!r} is loaded with weights_only=False because unsafe_pickle = true: unpickling "
            f"can run any code the file holds; use only files you trust"), stacklevel=2)
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise AtlasError(f"checkpoint {str(path)!r} cannot be read even with unsafe_pickle = true "
                             f"({type(exc2).__name__}: {_first_line(exc2)}); "
                             f"save it with torch.save(model.state_dict(), path)") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise AtlasError(f"checkpoint {str(path)!r} holds a {type(state).__name__}, not a state_dict; "
                         f"save it with torch.save(model.state_dict(), path)")
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:400].rstrip(".")
        raise AtlasError(f"checkpoint {str(path)!r} does not match the model: {first}; "
                         f"check that the config's model source is the architecture it was saved from") from None


def _weights_only_refusal(exc: Exception) -> str | None:
    """What torch.load(weights_only=True) refused (e.g. 'Unsupported global: ...'), None for other failures."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    if not isinstance(exc, pickle.UnpicklingError) or "Unsupported global" not in text:
        return None
    detail = text[text.index("Unsupported global"):].splitlines()[0]
    return detail.split(" was not an allowed global")[0].strip()


def _first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, without terminal escape codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def model_fingerprint(module: nn.Module) -> str:
    h = hashlib.sha1(type(module).__qualname__.encode())
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()[:16]


# --- datasets ---------------------------------------------------------------

@dataclass
class AtlasDataset:
    """The examples an atlas is built from, ready for the model, and how to show them."""
    data: Dataset  # yields (input tensor, label int); label -1 when unknown
    class_names: tuple[str, ...]  # index = label
    mean: tuple[float, ...]  # normalization applied, inverted for display
    std: tuple[float, ...]
    description: str
    fingerprint: str
    tokenizer: Any = None  # a text dataset's tokenizer (`text`); None for images

    @property
    def is_text(self) -> bool:
        return self.tokenizer is not None

    def __len__(self) -> int:
        return len(self.data)

    def inputs(self, ids) -> torch.Tensor:
        """The model inputs of examples `ids`, stacked [n, ...]."""
        return torch.stack([torch.as_tensor(self.data[int(i)][0]) for i in ids])

    def to_image(self, x: torch.Tensor) -> Image.Image:
        """A model input [C, H, W] back to a displayable image (normalization undone)."""
        x = x.detach().float().cpu()
        if self.mean:
            mean = torch.tensor(self.mean).view(-1, 1, 1)
            std = torch.tensor(self.std).view(-1, 1, 1)
            x = x * std + mean
        arr = (x.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        if arr.ndim == 2:
            arr = arr[None]
        if arr.shape[0] == 1:
            return Image.fromarray(arr[0], mode="L")
        return Image.fromarray(np.ascontiguousarray(arr[:3].transpose(1, 2, 0)), mode="RGB")


class _Transformed(Dataset):
    """A source dataset of (image, label) with a transform and an optional subset of indices."""

    def __init__(self, base, transform, indices: list[int] | None):
        self.base, self.transform, self.indices = base, transform, indices

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.base)

    def __getitem__(self, i: int):
        item = self.base[self.indices[i] if self.indices is not None else i]
        image, label = item if isinstance(item, (tuple, list)) else (item, -1)
        return self.transform(image), int(label)


class _ArrayDataset(Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = torch.from_numpy(images), labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


def build_transform(d: DatasetSection) -> v2.Compose:
    steps: list = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if d.resize:
        steps.append(v2.Resize(d.resize, antialias=True))
    if d.crop:
        steps.append(v2.CenterCrop(d.crop))
    if d.mean:
        steps.append(v2.Normalize(list(d.mean), list(d.std)))
    steps.append(v2.ToPureTensor())
    return v2.Compose(steps)


def load_dataset(cfg: AtlasConfig, tokenizer=None) -> AtlasDataset:
    """The dataset the config names, preprocessed, optionally a seeded subset. A text dataset is tokenized
    with `tokenizer` (its model's), or by bytes (`text.ByteTokenizer`) without one."""
    d = cfg.dataset
    if d.kind == "text":
        return _text_dataset(cfg, tokenizer or text.ByteTokenizer())
    if d.kind == "builtin":
        if d.target == "pydoc":
            return _text_dataset(cfg, tokenizer or text.ByteTokenizer())
        if d.target != "digits":
            raise AtlasError(f"unknown builtin dataset {d.target!r}; the builtin datasets are 'digits' (images) and "
                             f"'pydoc' (text)")
        images, labels = demo_models.digits_split("test")
        base, classes = _ArrayDataset(images, labels), tuple(str(i) for i in range(10))
        ident = f"builtin:digits|test|{demo_models.SPLIT_SEED}|{demo_models.TEST_FRACTION}"
    elif d.kind == "imagefolder":
        base, classes, ident = _image_folder(cfg.resolve(d.target))
    elif d.kind == "torchvision":
        base, classes, ident = _torchvision_dataset(d, cfg)
    else:
        base = _call_factory(d.source, "dataset", "dataset.source")
        if not hasattr(base, "__getitem__") or not hasattr(base, "__len__"):
            raise AtlasError(f"dataset factory {d.source!r} returned {type(base).__name__}, "
                             f"not a map-style dataset (with __len__ and __getitem__)")
        classes = tuple(str(c) for c in getattr(base, "classes", ()) or ())
        ident = f"import:{d.source}|{len(base)}"
    n = len(base)
    if n == 0:
        raise AtlasError(f"dataset {d.source!r} is empty; point dataset.source at data with at least one example")
    indices = None
    if d.limit and d.limit < n:
        rng = np.random.default_rng(cfg.atlas.seed)
        indices = sorted(rng.choice(n, size=d.limit, replace=False).tolist())
    _check_channels(_Transformed(base, build_transform(dataclasses.replace(d, mean=(), std=())), indices), d)
    data = _Transformed(base, build_transform(d), indices)
    if cfg.scan.top_k > len(data):
        warnings.warn(AtlasWarning(
            f"scan.top_k = {cfg.scan.top_k} is more than the {len(data)} examples of dataset {d.source!r}: each unit "
            f"lists all {len(data)} as its top and bottom examples; lower scan.top_k to silence this"), stacklevel=2)
    if not classes:
        classes = _classes_from_labels(data)
    fp = hashlib.sha1(repr((ident, d.limit, d.resize, d.crop, d.mean, d.std, cfg.atlas.seed if indices else 0))
                      .encode()).hexdigest()[:16]
    return AtlasDataset(data, classes, d.mean, d.std, d.source, fp)


CONTEXT_ATTRS = ("n_positions", "max_position_embeddings", "n_ctx", "block_size", "context", "max_len")


def model_context(module: nn.Module) -> int | None:
    """A language model's context length, where it says (its config's n_positions or max_position_embeddings,
    or a context/block_size/max_len attribute), else None."""
    for owner in (getattr(module, "config", None), module):
        for attr in CONTEXT_ATTRS:
            value = getattr(owner, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def fit_dataset(cfg: AtlasConfig, model: LoadedModel, dataset: AtlasDataset, first: bool = True) -> AtlasDataset:
    """The dataset as `model` reads it: a text dataset tokenized by the model's own tokenizer where it has one
    (first: no model before it read the dataset).
    A text dataset for a model that takes images (or the reverse), two tokenizers in one atlas, or windows
    longer than the model's context are each an AtlasError saying what to change."""
    name = model.name
    takes_tokens = model.tokenizer is not None or any(isinstance(m, nn.Embedding) for m in model.module.modules())
    if not dataset.is_text:
        if model.tokenizer is not None:
            raise AtlasError(f"model {name!r} is a language model (its factory returned a tokenizer) but dataset "
                             f"{dataset.description!r} is images; give it text: dataset.source = \"text:PATH\"")
        return dataset
    if not takes_tokens:
        raise AtlasError(f"model {name!r} takes images (it has no token embedding and no tokenizer) but the "
                         f"dataset is text ({dataset.description}); give it an image dataset, or a language model "
                         f"(a factory returning (model, tokenizer))")
    context = model_context(model.module)
    if context is not None and cfg.dataset.context > context:
        raise AtlasError(f"dataset.context = {cfg.dataset.context} tokens is longer than model {name!r}'s context "
                         f"of {context}; set dataset.context to at most {context}")
    if model.tokenizer is dataset.tokenizer:
        return dataset
    if model.tokenizer is None:  # it reads the text as it is tokenized: by bytes, it must take 256 ids
        vocab = max((m.num_embeddings for m in model.module.modules() if isinstance(m, nn.Embedding)), default=0)
        if isinstance(dataset.tokenizer, text.ByteTokenizer) and vocab and vocab < text.ByteTokenizer.vocab_size:
            raise AtlasError(f"model {name!r} has no tokenizer and its embedding has {vocab} tokens, fewer than the "
                             f"built-in byte tokenizer's 256; return (model, tokenizer) from its factory")
        return dataset
    if not first or not isinstance(dataset.tokenizer, text.ByteTokenizer):
        raise AtlasError(f"model {name!r} brings its own tokenizer, but the models before it read the text "
                         f"another way; an atlas of text holds the language models of one tokenizer: build the "
                         f"others in their own atlas")
    return load_dataset(cfg, model.tokenizer)


def _text_dataset(cfg: AtlasConfig, tokenizer) -> AtlasDataset:
    d = cfg.dataset
    docs = demo_lm.pydoc_documents("test") if d.kind == "builtin" else text.read_documents(cfg.resolve(d.target))
    tokens = text.tokenize(docs, tokenizer, d.context, d.stride or d.context)
    if d.limit and d.limit < len(tokens):
        rng = np.random.default_rng(cfg.atlas.seed)
        tokens = tokens[np.sort(rng.choice(len(tokens), size=d.limit, replace=False))]
    probe = text.encode(tokenizer, "The quick brown fox, def f(x): return 'ü'\n")  # which tokenizer it is
    h = hashlib.sha1(repr((d.source, d.context, d.stride, d.limit, cfg.atlas.seed, type(tokenizer).__name__,
                           text.vocab_size(tokenizer), probe)).encode())
    h.update(tokens.tobytes())
    description = f"{d.source} ({len(docs)} document{'s' * (len(docs) != 1)}, {len(tokens):,} windows of " \
                  f"{d.context} tokens)"
    return AtlasDataset(text.TextWindows(tokens), (), (), (), description, h.hexdigest()[:16], tokenizer)


def _check_channels(data: Dataset, d: DatasetSection) -> None:
    """Normalization must have one value per channel (or one for all); catch it here, not in the model.

    `data` is the dataset without normalization (Normalize would broadcast 1 channel to 3)."""
    if len(d.mean) <= 1:
        return
    try:
        x, _ = data[0]
    except Exception as exc:
        raise AtlasError(f"dataset {d.source!r}: the first example cannot be loaded ({type(exc).__name__}: "
                         f"{exc})") from None
    channels = x.shape[0] if x.dim() == 3 else 1
    if channels != len(d.mean):
        raise AtlasError(f"dataset.mean and dataset.std have {len(d.mean)} values but the images have "
                         f"{channels} channel(s); give one value per channel")


def _classes_from_labels(data: Dataset) -> tuple[str, ...]:
    top = max((data[i][1] for i in range(min(len(data), 10_000))), default=-1)
    return tuple(str(i) for i in range(top + 1))


def _image_folder(folder: Path):
    """An ImageFolder whose every file must be an image: an undecodable one is an error naming it.

    (Not skipped: example ids index the folder's files, and an atlas of "every image but
    the ones that failed" would silently differ from the folder it names.) Headers are
    checked up front, cheaply; a file that is cut short past its header fails when read.
    """
    from torchvision.datasets import ImageFolder

    if not folder.is_dir():
        raise AtlasError(f"image folder {str(folder)!r} does not exist; point dataset.source at "
                         f"imagefolder:PATH with one sub-folder per class")
    try:
        base = ImageFolder(str(folder), loader=_load_image)
    except (FileNotFoundError, RuntimeError) as exc:
        raise AtlasError(f"image folder {str(folder)!r}: {str(exc).rstrip('.')}; it needs one sub-folder per class "
                         f"holding .png/.jpg/... images") from None
    h = hashlib.sha1()
    bad = []
    for path, label in base.samples:
        st = Path(path).stat()
        h.update(f"{Path(path).relative_to(folder)}|{label}|{st.st_size}|{st.st_mtime_ns}".encode())
        problem = _image_problem(path)
        if problem:
            bad.append(f"{Path(path).relative_to(folder)}: {problem}")
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise AtlasError(f"image folder {str(folder)!r}: {len(bad)} of {len(base.samples)} files cannot be decoded "
                         f"as images ({bad[0]}{more}); remove or replace them, every file of the folder is used")
    return base, tuple(base.classes), f"imagefolder|{h.hexdigest()}"


def _image_problem(path: str) -> str | None:
    """Why a file is not an image PIL can open (its header only), or None."""
    try:
        with Image.open(path) as image:
            image.size
    except UnidentifiedImageError:
        return "not an image format PIL can read"
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        return f"{type(exc).__name__}: {_first_line(exc).replace(repr(path), '').replace(path, '')}".rstrip(": ")
    return None


def _load_image(path: str) -> Image.Image:
    """torchvision's default loader (RGB), with a decoding failure as an AtlasError that names the file."""
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise AtlasError(f"image {path!r} cannot be decoded ({type(exc).__name__}: {_first_line(exc)}); "
                         f"remove or replace it, every file of the image folder is used") from None


def _torchvision_dataset(d: DatasetSection, cfg: AtlasConfig):
    import torchvision.datasets as tvd

    cls = getattr(tvd, d.target, None)
    if not inspect.isclass(cls):
        raise AtlasError(f"unknown torchvision dataset {d.target!r}; use a class name from "
                         f"torchvision.datasets such as CIFAR10, MNIST, ImageNet")
    params = inspect.signature(cls).parameters
    kwargs: dict[str, Any] = {}
    if "train" in params:
        kwargs["train"] = False  # the held-out split
    elif "split" in params:
        kwargs["split"] = "val"
    if "download" in params:
        kwargs["download"] = d.download
    try:
        base = cls(str(d.root), **kwargs)
    except (RuntimeError, FileNotFoundError, OSError) as exc:
        raise AtlasError(f"torchvision dataset {d.target} could not be opened at {str(d.root)!r} ({exc}); "
                         f"put its files there or set dataset.download = true") from None
    classes = tuple(str(c) for c in getattr(base, "classes", ()) or ())
    return base, classes, f"torchvision:{d.target}|{d.root}|{kwargs}|{len(base)}"


def _call_factory(source: str, what: str, key: str):
    module_name, _, attr = source.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise AtlasError(f"{key}: cannot import {module_name!r} ({exc}); make sure the package is installed "
                         f"or on PYTHONPATH") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise AtlasError(f"{key}: {module_name!r} has no callable {attr!r} to build the {what}")
    try:
        return factory()
    except Exception as exc:
        raise AtlasError(f"{key}: the {what} factory {source!r} raised {type(exc).__name__}: {exc}") from None
