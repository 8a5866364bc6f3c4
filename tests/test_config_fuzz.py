"""Config fuzzing: whatever TOML (or text) a user writes, loading it gives an AtlasConfig or a ConfigError.

Documents are generated as dicts of the real sections and keys (plus random ones) holding
values of every TOML type (strings with control characters, huge integers, NaN/Inf,
dates, arrays, tables), serialised to TOML by the small writer below; random text and
random edits of the demo config are fed in as well. Anything but AtlasConfig or an
AtlasError (ConfigError) is a bug in config.py's validation.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atlas_builder.config import SECTIONS, AtlasConfig, ConfigError, ModelSection, load_config, parse_config
from atlas_builder.errors import AtlasError
from conftest import REPO

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FIELDS = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in SECTIONS.items()}
FIELDS["models"] = [f.name for f in dataclasses.fields(ModelSection)]


# --- a tiny TOML writer --------------------------------------------------------------------------------

def toml_string(s: str) -> str:
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, (dt.datetime, dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_string(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def to_toml(doc: dict, headers: bool) -> str:
    """Top-level keys first; then tables as [headers] and arrays of tables as [[headers]] when asked."""
    plain, tables, arrays = [], [], []
    for k, v in doc.items():
        if headers and isinstance(v, dict):
            tables.append((k, v))
        elif headers and isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            arrays.append((k, v))
        else:
            plain.append(f"{toml_string(k)} = {toml_value(v)}")
    lines = plain
    for k, v in tables:
        lines += [f"[{toml_string(k)}]"] + [f"{toml_string(kk)} = {toml_value(vv)}" for kk, vv in v.items()]
    for k, items in arrays:
        for item in items:
            lines += [f"[[{toml_string(k)}]]"] + [f"{toml_string(kk)} = {toml_value(vv)}" for kk, vv in item.items()]
    return "\n".join(lines) + "\n"


# --- strategies ------------------------------------------------------------------------------------------

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
path_like = st.one_of(
    text,
    st.sampled_from(["~", "~/x", "~no-such-user-atlas/x", "a\x00b", "", ".", "/", "..", "/" + "x" * 300,
                     "/proc/1/x" * 40]),
    st.builds(lambda a, b: f"{a}/{b}", text, text),
)
source_like = st.one_of(
    text,
    st.sampled_from(["builtin:digits", "builtin:", "builtin:digits-mlp", "imagefolder:", "imagefolder:/nonexistent",
                     "imagefolder:~no-such-user-atlas", "imagefolder:a\x00b", "imagefolder:/" + "x" * 300,
                     "torchvision:", "torchvision:CIFAR10", "pkg.mod:factory", "pkg.mod:", ":factory", "a:b:c"]),
    st.builds(lambda k, t: f"{k}:{t}", st.sampled_from(["builtin", "imagefolder", "torchvision", "x.y"]), path_like),
)
scalar = st.one_of(
    st.booleans(),
    st.integers(-2**63, 2**63 - 1),
    st.sampled_from([0, -1, 1, 2**63 - 1, -2**63]),
    st.floats(allow_nan=True, allow_infinity=True),
    text, path_like, source_like,
    st.datetimes(), st.dates(), st.times(),
)
value = st.recursive(scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(text, inner, max_size=3)), max_leaves=8)


@st.composite
def table(draw, section: str):
    keys = draw(st.lists(st.one_of(st.sampled_from(FIELDS[section]), text), max_size=6, unique=True))
    return {k: draw(value) for k in keys}


@st.composite
def document(draw):
    doc = {}
    for section in draw(st.lists(st.sampled_from(list(SECTIONS) + ["models"]) | text, max_size=7, unique=True)):
        if section == "models":
            doc[section] = draw(st.one_of(st.lists(table("models"), max_size=3), value))
        elif section in SECTIONS:
            doc[section] = draw(st.one_of(table(section), table(section), value))
        else:
            doc[section] = draw(value)
    return doc


def check(load):
    """Call load(); only an AtlasConfig or an AtlasError (ConfigError) may come out."""
    try:
        cfg = load()
    except ConfigError:
        return None
    except AtlasError:
        return None
    assert isinstance(cfg, AtlasConfig)
    return cfg


# --- properties --------------------------------------------------------------------------------------------

@SETTINGS
@given(doc=document(), headers=st.booleans())
def test_random_toml_documents_load_or_raise_config_error(tmp_path_factory, doc, headers):
    source = to_toml(doc, headers)
    try:
        tomllib.loads(source)
    except tomllib.TOMLDecodeError:  # duplicate tables and the like: still a user's file, still must be handled
        pass
    path = tmp_path_factory.mktemp("fuzz", numbered=True) / "atlas.toml"
    path.write_text(source, encoding="utf-8")
    check(lambda: load_config(path))


@SETTINGS
@given(doc=document())
def test_random_dicts_parse_or_raise_config_error(doc):
    check(lambda: parse_config(doc, base=Path("/nonexistent-base")))


@SETTINGS
@given(data=st.binary(max_size=300) | st.text(max_size=300).map(lambda s: s.encode("utf-8", "surrogatepass")))
def test_random_bytes_load_or_raise_config_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz", numbered=True) / "atlas.toml"
    path.write_bytes(data)
    check(lambda: load_config(path))


DEMO = (REPO / "examples" / "demo.toml").read_text(encoding="utf-8")


@SETTINGS
@given(edits=st.lists(st.tuples(st.integers(0, len(DEMO)), st.integers(0, 8), text), min_size=1, max_size=4))
def test_random_edits_of_the_demo_config_load_or_raise_config_error(tmp_path_factory, edits):
    source = DEMO
    for at, cut, insert in edits:
        at = min(at, len(source))
        source = source[:at] + insert + source[at + cut:]
    path = tmp_path_factory.mktemp("fuzz", numbered=True) / "atlas.toml"
    path.write_text(source, encoding="utf-8", errors="surrogatepass")
    check(lambda: load_config(path))


@pytest.mark.parametrize("doc", [
    {"atlas": {"data_dir": "~no-such-user-atlas/data"}, "models": [{"name": "m", "source": "builtin:digits-mlp"}]},
    {"atlas": {"site_dir": "a\x00b"}, "models": [{"name": "m", "source": "builtin:digits-mlp"}]},
    {"dataset": {"source": "imagefolder:/" + "x" * 300}, "models": [{"name": "m", "source": "builtin:digits-mlp"}]},
    {"models": [{"name": "m", "source": "builtin:digits-mlp", "checkpoint": "/" + "x" * 300}]},
    {"dataset": {"source": "imagefolder:~no-such-user-atlas/x"}, "models": [{"name": "m", "source": "builtin:x"}]},
])
def test_paths_that_cannot_be_paths_are_config_errors(doc):
    """Found by the fuzzer: an unknown ~user, a NUL character or a name too long for the OS."""
    with pytest.raises(ConfigError):
        parse_config(doc, base=Path("/nonexistent-base"))


def test_the_writer_round_trips():
    doc = {"atlas": {"name": "x\n\"y\"\\", "seed": -2**63}, "scan": {"top_k": 3, "lr": float("inf")},
           "models": [{"name": "m", "layers": ["a", "b"], "t": dt.date(2020, 1, 2)}], "z": {"n": {"m": [1, "a"]}}}
    for headers in (True, False):
        assert tomllib.loads(to_toml(doc, headers)) == doc
