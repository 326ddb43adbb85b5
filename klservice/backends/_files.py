"""Where a model's files are, and the content hashes that identify them.

Shared by every backend that loads a Hugging Face folder, so the same folder gets the same
revision whichever backend serves it. No torch here.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

BLOCK_SIZE = 1 << 20
"""Files are hashed in 1 MiB blocks, so a multi-GB checkpoint never sits in memory twice."""

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
)
"""Files that define tokenization (vocab, merges, special tokens); chat templates are deliberately not included."""


def resolve_model_dir(model: str | os.PathLike) -> Path:
    """Return the local folder holding `model`: a folder path, or a hub id already in the local HF cache.

    klservice never downloads: a hub id that is not cached is an error that says how to fetch it.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    text = os.fspath(model)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise FileNotFoundError(f"model {text!r}: no such folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, local_files_only=True))
    except Exception as exc:  # not cached, or not a valid repo id
        raise FileNotFoundError(
            f"model {text!r} is neither a local folder nor a hub id in the local Hugging Face cache "
            f"(klservice never downloads; fetch it first, e.g. `hf download {text}`)"
        ) from exc


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint files transformers loads: *.safetensors if any (it prefers them), else *.bin."""
    safetensors = sorted(folder.glob("*.safetensors"))
    return safetensors or sorted(folder.glob("*.bin"))


def tokenizer_files(folder: Path) -> list[Path]:
    return [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]


def hash_files(folder: Path, files: Iterable[Path]) -> str:
    """sha256 hex over (relative name, size, content) of each file, in name order."""
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.relative_to(folder).as_posix()):
        name = path.relative_to(folder).as_posix().encode()
        digest.update(len(name).to_bytes(8, "little") + name + path.stat().st_size.to_bytes(8, "little"))
        with open(path, "rb") as fh:
            while block := fh.read(BLOCK_SIZE):
                digest.update(block)
    return digest.hexdigest()


def model_revision(folder: Path) -> str:
    """Content hash of everything that determines the log-probs: weights, config.json and tokenizer files.

    config.json is included although it is not weights: changing e.g. rope_theta changes every
    value, and a cache keyed on the revision must not serve stale numbers.
    """
    weights = weight_files(folder)
    if not weights:
        raise FileNotFoundError(f"{folder}: no *.safetensors or *.bin weight files")
    config = [folder / "config.json"] if (folder / "config.json").is_file() else []
    return hash_files(folder, weights + tokenizer_files(folder) + config)

