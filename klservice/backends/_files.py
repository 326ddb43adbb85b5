"""Where a model's files are, what a load may read, and the content hashes that identify them.

Shared by every backend that loads a Hugging Face folder, so the same folder gets the same
revision whichever backend serves it. No torch here.

A load reads only what it can bound: `check_folder` refuses, before anything is opened, a folder
holding anything but regular files and folders (a FIFO blocks whoever opens it; a link to
``/dev/zero`` reads for ever), and a safetensors file whose size is not what its header declares;
`hash_files` reads each file for exactly the size seen then, and refuses a file that changed
meanwhile. A `LoadGuard` lets whoever waits on a load give it up (its deadline passed, its caller
left, the server is stopping): the next block read raises `LoadAbandoned`.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import threading
import time
from collections.abc import Iterable
from pathlib import Path

BLOCK_SIZE = 1 << 20
"""Files are hashed in 1 MiB blocks, so a multi-GB checkpoint never sits in memory twice."""
SAFETENSORS_HEADER_LIMIT = 100 << 20
"""Largest safetensors header accepted (the format's own limit)."""


class ModelFileError(ValueError):
    """A file of a model folder cannot be loaded as it is (the message names it and says why)."""


class LoadAbandoned(Exception):
    """The load was given up (`LoadGuard.abandon`) while it read its files."""


class LoadGuard:
    """Shared by a load's worker thread and whoever waits on it: what it reads now (`reading`), and whether it was
    given up. `check()`, called between blocks read, raises `LoadAbandoned` once it was, or once `deadline` (a
    time.monotonic() value) has passed."""

    def __init__(self, deadline: float | None = None):
        self.deadline = deadline
        self.reading: str | None = None
        self._abandoned = threading.Event()
        self.reason = ""

    def abandon(self, reason: str) -> None:
        self.reason = reason
        self._abandoned.set()

    def check(self) -> None:
        if self._abandoned.is_set():
            raise LoadAbandoned(self.reason or "the load was given up")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise LoadAbandoned("its deadline passed")


_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket"}


def check_folder(folder: Path, guard: LoadGuard | None = None) -> dict[Path, int]:
    """The regular files under `folder` (links followed) and their sizes; ModelFileError naming the first entry that
    is anything else (a FIFO, a device, a socket, a dangling or looping link), or a safetensors file whose size is
    not the one its header declares. Nothing is opened but safetensors headers (regular files by then)."""
    files: dict[Path, int] = {}
    # A linked folder is listed among the folders and not walked (nothing in a model folder needs one); a dangling or
    # looping link is listed among the files.
    for root, _, names in os.walk(folder, followlinks=False):
        for name in sorted(names):
            path = Path(root) / name
            files[path] = _regular_size(path, path.relative_to(folder).as_posix())
    for path, size in files.items():
        if path.suffix == ".safetensors":
            if guard is not None:
                guard.check()
                guard.reading = str(path)
            _, end = safetensors_header(path)
            if end != size:
                raise ModelFileError(
                    f"{path.relative_to(folder)}: {size} bytes, but its header declares {end}; the file is "
                    f"{'truncated' if size < end else 'longer than its tensors'}"
                )
    return files


def _regular_size(path: Path, relative: str) -> int:
    """The size of `path` (links followed); ModelFileError naming `relative` unless it is a readable regular file."""
    try:
        info = path.stat()
    except OSError as error:
        raise ModelFileError(f"{relative}: cannot be read ({error.strerror or error})") from None
    if not stat.S_ISREG(info.st_mode):
        kind = _KINDS.get(stat.S_IFMT(info.st_mode), "not a regular file")
        raise ModelFileError(f"{relative}: {kind}, not a regular file (a model folder holds regular files only)")
    return info.st_size


def safetensors_header(path: Path) -> tuple[dict, int]:
    """(tensors, declared file size) of a safetensors file: its header without ``__metadata__``, and 8 + the header's
    length + the end of its last tensor's data. ModelFileError where it is no safetensors file."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > SAFETENSORS_HEADER_LIMIT:
                raise ModelFileError(f"{path.name}: not a safetensors file (header of {length} bytes)")
            header = json.loads(handle.read(length))
        header.pop("__metadata__", None)
        end = 0
        for tensor in header.values():
            [int(dimension) for dimension in tensor["shape"]]
            end = max(end, int(tensor["data_offsets"][1]))
    except ModelFileError:
        raise
    except (OSError, struct.error, ValueError, KeyError, TypeError, AttributeError, IndexError) as error:
        raise ModelFileError(f"{path.name}: not a readable safetensors file ({type(error).__name__}: {error})") from None
    return header, 8 + length + end

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


def hash_files(folder: Path, files: Iterable[Path], guard: LoadGuard | None = None) -> str:
    """sha256 hex over (relative name, size, content) of each file, in name order. Each must be a regular file and
    is read for exactly the size it has when opened: ModelFileError where it is not one, or shrinks or grows while
    it is read. `guard` is checked between blocks."""
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.relative_to(folder).as_posix()):
        relative = path.relative_to(folder).as_posix()
        if guard is not None:
            guard.reading = str(path)
        size = _regular_size(path, relative)  # checked before opening: opening a FIFO blocks
        name = relative.encode()
        digest.update(len(name).to_bytes(8, "little") + name + size.to_bytes(8, "little"))
        with open(path, "rb") as fh:
            left = size
            while left:
                if guard is not None:
                    guard.check()
                block = fh.read(min(BLOCK_SIZE, left))
                if not block:
                    raise ModelFileError(f"{relative}: shrank while it was read ({size} bytes when opened)")
                digest.update(block)
                left -= len(block)
            if os.fstat(fh.fileno()).st_size != size or fh.read(1):
                raise ModelFileError(f"{relative}: changed while it was read ({size} bytes when opened)")
    return digest.hexdigest()


def model_revision(folder: Path, guard: LoadGuard | None = None) -> str:
    """Content hash of everything that determines the log-probs: weights, config.json and tokenizer files.

    config.json is included although it is not weights: changing e.g. rope_theta changes every
    value, and a cache keyed on the revision must not serve stale numbers.
    """
    weights = weight_files(folder)
    if not weights:
        raise FileNotFoundError(f"{folder}: no *.safetensors or *.bin weight files")
    config = [folder / "config.json"] if (folder / "config.json").is_file() else []
    return hash_files(folder, weights + tokenizer_files(folder) + config, guard)

