"""Text: tokenizers, text sources cut into windows, and tokens made readable.

Owns the `text:PATH` dataset (a UTF-8 `.txt` file, a `.jsonl` file with a `text` field on each line, or a
folder of them, read in sorted order): its documents tokenized and joined into one stream of token ids (a
document ends with the tokenizer's separator), cut into windows of `context` tokens every `stride` tokens.
Each window is stored once, as a row of an int64 matrix; an example is a window, and a position in it is a
token (so a unit's top example is the window where it fired most, at the token where it did).

Tokenizers: the model's own when its factory returns one (a Hugging Face tokenizer, or anything with
`encode(text) -> ids` and `decode([id]) -> str`), else `ByteTokenizer`, built in: a token is a UTF-8 byte
(256 of them, nothing to download). `visible` shows a token's text with its whitespace made visible.

This module does not run models (scan does) and writes no files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import AtlasError

TEXT_SUFFIXES = (".txt", ".jsonl")
VISIBLE = {" ": "·", "\n": "↵", "\t": "→", "\r": "␍"}  # how whitespace shows in a token


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0..255). A character of several bytes is several tokens; each shows as its
    character where it is a whole one, else as its byte (`\\xe2`)."""
    vocab_size = 256
    name = "bytes (built in)"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="backslashreplace")


def vocab_size(tokenizer) -> int:
    """How many token ids a tokenizer has (`vocab_size`, or len() of a Hugging Face tokenizer)."""
    size = getattr(tokenizer, "vocab_size", None)
    try:
        size = max(int(size or 0), len(tokenizer))
    except TypeError:
        pass
    if not size:
        raise AtlasError(f"tokenizer {type(tokenizer).__name__} has no vocab_size; give it one (the number of "
                         f"token ids)")
    return int(size)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text`, without special tokens where the tokenizer takes that option."""
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:  # a tokenizer without the option
        return list(tokenizer.encode(text))


def token_text(tokenizer, token: int) -> str:
    """One token as its tokenizer decodes it alone."""
    return tokenizer.decode([int(token)])


def visible(text: str, spaces: bool = True) -> str:
    """A token's text with its whitespace made visible (a space as ·, a newline as ↵), ∅ for none; spaces
    False: spaces stay spaces (a token in a running context)."""
    return "".join(VISIBLE.get(c, c) if spaces or c != " " else c for c in text) or "∅"


def read_documents(path: Path) -> list[tuple[str, str]]:
    """[(source name, text)] of a text source: a .txt file, a .jsonl file (a document per line, its `text`),
    or a folder of them (sorted, recursively). Bytes that are not UTF-8 are an error naming file and offset."""
    if not path.exists():
        raise AtlasError(f"text dataset {str(path)!r} does not exist; point dataset.source at a .txt or .jsonl "
                         f"file or a folder of them (text:PATH)")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES) if path.is_dir() \
        else [path]
    if not files:
        raise AtlasError(f"text dataset folder {str(path)!r} holds no .txt or .jsonl file")
    docs = []
    for file in files:
        if file.suffix not in TEXT_SUFFIXES:
            raise AtlasError(f"text dataset {str(file)!r} is neither .txt nor .jsonl; give a UTF-8 .txt file, a "
                             f".jsonl file with a \"text\" field on each line, or a folder of them")
        raw = file.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise AtlasError(f"text dataset file {str(file)!r} is not UTF-8 (byte {exc.start}: "
                             f"{raw[exc.start:exc.start + 1]!r}); convert it (e.g. iconv -t UTF-8) or leave it "
                             f"out") from None
        if file.suffix == ".txt":
            docs.append((file.name, text))
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise AtlasError(f"{str(file)!r} line {n} is not JSON ({exc.msg}); each line of a .jsonl text "
                                 f"dataset is an object with a \"text\" field") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise AtlasError(f"{str(file)!r} line {n} has no \"text\" string; each line of a .jsonl text "
                                 f"dataset is an object with a \"text\" field")
            docs.append((f"{file.name}:{n}", record["text"]))
    return docs


def windows(ids: np.ndarray, context: int, stride: int) -> np.ndarray:
    """[N, context] int64: the windows of a token stream, one every `stride` tokens (the last one ends at
    most `stride - 1` tokens before the stream's end)."""
    if len(ids) < context:
        return np.zeros((0, context), np.int64)
    starts = np.arange(0, len(ids) - context + 1, stride)
    return np.stack([ids[s:s + context] for s in starts]).astype(np.int64)


@dataclass
class TextWindows(Dataset):
    """Windows of token ids as a map-style dataset of (LongTensor[context], -1): text has no labels."""
    tokens: np.ndarray  # [N, context] int64

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int):
        return torch.from_numpy(self.tokens[int(i)]), -1


def tokenize(docs: list[tuple[str, str]], tokenizer, context: int, stride: int) -> np.ndarray:
    """The windows (`windows`) of the documents' tokens, each document followed by a newline's tokens."""
    stream: list[int] = []
    for _, text in docs:
        stream.extend(encode(tokenizer, text if text.endswith("\n") else text + "\n"))
    out = windows(np.asarray(stream, dtype=np.int64), context, stride)
    if not len(out):
        raise AtlasError(f"the text dataset has {len(stream)} tokens, fewer than one window of dataset.context = "
                         f"{context}; give it more text or lower dataset.context")
    return out
