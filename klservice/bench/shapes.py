"""Models in the shapes of real ones, with random weights: what ``klservice bench --model-shape`` runs on.

Speed depends on a model's shape, not on its weights, and nothing is downloaded here; so the GPU
figures at real sizes come from a Llama of the same shape as SmolLM2-1.7B or a 7B Llama (Llama 2's
7B: 4096 hidden, 32 layers, 11008 intermediate, 32k vocabulary), initialised with a fixed seed in the
compute dtype on the bench's device (seconds on a GPU, where a CPU takes minutes) and saved once under
the cache directory. The token ids are random, so the tokenizer saved with it is made here: one
word-level token per id (``t0``, ``t1``, ...), which needs neither a hub nor the embedded model, so a
host with only torch and transformers can run the bench.

Example::

    folder = shaped_model("smollm2-1.7b", cache_dir, dtype="bfloat16", device="cuda")   # ~3.4 GB, written once
"""

from __future__ import annotations

from pathlib import Path

SHAPES: dict[str, dict] = {
    "smollm2-1.7b": {
        "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
        "num_key_value_heads": 32, "vocab_size": 49152, "max_position_embeddings": 8192, "rope_theta": 130000.0,
        "tie_word_embeddings": True, "rms_norm_eps": 1e-5,
    },
    "llama-7b": {
        "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 8192, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
    },
}
"""LlamaConfig arguments of each shape (the model's own config.json values; the context raised to 8192 so that
(d)'s 8k sequence fits)."""

PARAMETERS = {"smollm2-1.7b": 1_711_376_384, "llama-7b": 6_738_415_616}
"""Parameter count of each shape (the real models': SmolLM2-1.7B, Llama-2-7B)."""


def shape_config(name: str, **overrides):
    """The LlamaConfig of shape `name` (ValueError naming the known ones otherwise)."""
    from transformers import LlamaConfig

    if name not in SHAPES:
        raise ValueError(f"--model-shape {name!r}: expected one of {', '.join(SHAPES)}")
    return LlamaConfig(**{**SHAPES[name], "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, **overrides})


def id_tokenizer(vocab_size: int):
    """A fast tokenizer with one word-level token per id (``t0`` .. ``t{vocab_size - 1}``, whitespace-separated):
    enough for a model scored on random ids, and made without any download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="t0", bos_token="t1", eos_token="t2",
                                   pad_token="t2")


def shaped_model(name: str, cache_dir: str | Path | None, dtype: str = "bfloat16", progress: bool = True,
                 device: str = "cpu", **overrides) -> Path:
    """The folder of a random model of shape `name` (`SHAPES`) in `dtype`, written once under `cache_dir` (default:
    klservice's cache, as for the embedded model) and reused; built on `device`; `overrides` change the config
    (tests)."""
    import torch
    from transformers import LlamaForCausalLM

    from klservice.backends.hf import TORCH_DTYPES
    from klservice.default_model import default_cache_dir

    config = shape_config(name, **overrides)
    suffix = "".join(f"-{key}{value}" for key, value in sorted(overrides.items()))
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = root / "shapes" / f"{name}{suffix}-{dtype}-seed0"
    if (folder / "config.json").exists():
        return folder
    if progress:
        print(f"writing a random {name} ({dtype}, built on {device}) to {folder} (once)", flush=True)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(TORCH_DTYPES[dtype])  # initialise in the compute dtype: half the memory of float32
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    partial = folder.with_name(folder.name + ".partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(partial)
    id_tokenizer(config.vocab_size).save_pretrained(partial)
    del model
    partial.rename(folder)
    return folder
