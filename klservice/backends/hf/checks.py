"""Load-time self-checks: each fast path against the model's own forward, at the dtype's own noise.

The backend computes log-probs its own way (body, then its head; a packed row; chunked layers). At
load it checks each way on a probe batch against the model's plain forward (full logits, one padded
batch) and falls back where a check fails, logging why. The tolerance is the dtype's noise: the plain
forward's own difference between two batch compositions of the same sequences (all together, and one
by one), doubled, and at least a floor relative to the values (1e-4 in float32; 1e-2 in float16, 2e-2 in
bfloat16, whose rounding a GPU's kernels show as soon as a batch changes shape). So a bfloat16 model
keeps its fast paths when they are as close to the plain forward as the plain forward is to itself.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from klservice.backends.hf.attention import (
    TREE_ATTENTION, Kernel, TreeCall, UnsupportedAttention, kernels_for,
)

if TYPE_CHECKING:
    from klservice.backends.hf.backend import HFBackend

log = logging.getLogger(__name__)

FLOORS = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
"""Smallest tolerance of a check, relative to the largest |log-prob| of the probe (at least 1)."""
PROBE_SCALE = {"cpu": 1, "cuda": 40}
"""How much longer the probe's sequences are on a device: on CUDA, long enough to fill FlexAttention's 128-row
blocks, full and partial."""
CHUNK_CHECK_ROWS = 5
"""Rows per chunk when the chunked layers are checked: several chunks per probe sequence."""
PROBE_WINDOW = 1024
"""Longest sliding window the probe reaches past (its plain forward materialises full logits); a longer one is
applied from the window each layer passes to the attention function, as for shorter ones, unchecked here."""


@dataclasses.dataclass(frozen=True)
class Agreement:
    """How far a path's log-probs are from the plain forward's, and what that was held to."""

    difference: float
    """Largest |path - plain forward| over the probe's log-probs."""
    noise: float
    """Largest |plain forward together - plain forward one by one|: the dtype's noise."""
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.difference <= self.tolerance

    def __str__(self) -> str:
        return f"max |difference| {self.difference:.3g} against {self.tolerance:.3g} (plain forward's own noise {self.noise:.3g})"


@dataclasses.dataclass(frozen=True)
class Probe:
    """The probe batch and the plain forward's log-probs of it (concatenated, sequence after sequence)."""

    sequences: list[np.ndarray]
    starts: list[int]
    expected: np.ndarray
    noise: float

    def agreement(self, actual: np.ndarray, dtype: torch.dtype) -> Agreement:
        floor = FLOORS.get(dtype, 2e-2) * max(1.0, float(np.abs(self.expected).max()))
        difference = float(np.abs(actual - self.expected).max())
        return Agreement(difference, self.noise, max(floor, 2 * self.noise))


def probe_batch(vocab_size: int, scale: int = 1, window: int | None = None) -> tuple[list[np.ndarray], list[int]]:
    """Two groups sharing prompts of different lengths (ragged members, one a single token), two sequences alone,
    and past a sliding window where the model has one. Lengths grow with `scale`; ids are fixed and spread out."""
    rng_offset = iter(range(1, 1000))

    def tokens(n: int) -> np.ndarray:
        return (np.arange(n, dtype=np.int64) * 7919 + 104729 * next(rng_offset)) % vocab_size

    sequences: list[np.ndarray] = []
    starts: list[int] = []
    groups = [(6 * scale, [3 * scale, 1, 5 * scale]), (4 * scale, [4 * scale, 7 * scale])]
    if window:
        groups.append((window // 2 + 3, [window // 2 + 9, 2]))
    for prompt_length, responses in groups:
        prompt = tokens(prompt_length)
        for n in responses:
            sequences.append(np.concatenate([prompt, tokens(n)]))
            starts.append(prompt_length)
    for length, start in [(12 * scale, 1), (5 * scale, 2)] + ([(window + 5, 1)] if window else []):
        sequences.append(tokens(length))
        starts.append(start)
    return sequences, starts


def plain_log_probs(model, sequences: list[np.ndarray], starts: list[int], device, together: bool) -> np.ndarray:
    """The model's own forward: full logits, log_softmax, gather; all sequences in one right-padded batch
    (`together`) or one at a time. Concatenated over the sequences' scored tokens."""
    def run(batch: list[np.ndarray], batch_starts: list[int]) -> list[np.ndarray]:
        width = max(len(seq) for seq in batch)
        ids = np.zeros((len(batch), width), dtype=np.int64)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = seq
        input_ids = torch.from_numpy(ids).to(device)
        positions = torch.arange(width, device=device).expand(len(batch), width)
        logits = model(input_ids=input_ids, position_ids=positions, use_cache=False).logits.float()
        out = []
        for row, (seq, start) in enumerate(zip(batch, batch_starts)):
            logp = torch.log_softmax(logits[row, start - 1 : len(seq) - 1], dim=-1)
            out.append(logp.gather(1, input_ids[row, start : len(seq), None])[:, 0].cpu().numpy())
        return out

    with torch.inference_mode():
        if together:
            return np.concatenate(run(sequences, starts))
        return np.concatenate([run([seq], [start])[0] for seq, start in zip(sequences, starts)])


def make_probe(backend: "HFBackend") -> Probe:
    """The probe batch of `backend`'s model and device, with the plain forward's log-probs and noise."""
    device = backend._device
    window = sliding_window(backend._model.config)
    reach = window if window and window <= PROBE_WINDOW else None
    sequences, starts = probe_batch(backend._vocab_size, PROBE_SCALE.get(device.type, 1), reach)
    expected = plain_log_probs(backend._model, sequences, starts, device, together=True)
    alone = plain_log_probs(backend._model, sequences, starts, device, together=False)
    return Probe(sequences, starts, expected, float(np.abs(expected - alone).max()))


def head_matches_model(backend: "HFBackend", probe: Probe) -> bool:
    """Whether body + the backend's head (padded) reproduce the model's own log-probs on the probe."""
    model = backend._model
    name = type(model).__name__
    if backend._head.weight is None or backend._body is model:
        log.warning("%s: no separable body/LM head; serving through the full forward", name)
        return False
    try:
        actual = _padded_log_probs(backend, probe)
    except Exception:  # an architecture whose body does not take these arguments
        log.warning("%s: body forward failed; serving through the full forward", name, exc_info=True)
        return False
    agreement = probe.agreement(actual, backend._head.weight.dtype)
    if not agreement.ok:
        log.warning("%s: body + LM head differ from the model's logits (%s); serving through the full forward "
                    "(exact, but it materialises full-vocab logits)", name, agreement)
        return False
    log.info("%s: body + LM head match the model's logits: %s", name, agreement)
    return True


def _padded_log_probs(backend: "HFBackend", probe: Probe) -> np.ndarray:
    with torch.inference_mode():
        rows = torch.cat(backend.padded_rows(probe.sequences, probe.starts))
        targets = torch.from_numpy(np.concatenate([s[t:] for s, t in zip(probe.sequences, probe.starts)]))
        return backend._head.log_probs(rows, targets.to(backend._device), 1.0).cpu().numpy()


def packed_log_probs(backend: "HFBackend", sequences, starts, kernel: Kernel, chunk_rows: int | None = None) -> np.ndarray:
    """The packed path's log-probs (concatenated in sequence order) with `kernel`, layers chunked by `chunk_rows`
    (None: as the backend would)."""
    todo = [i for i, (seq, start) in enumerate(zip(sequences, starts)) if len(seq) > start]
    with torch.inference_mode():
        layout = backend.layout(sequences, starts, todo)
        hidden = backend.packed_hidden(layout, kernel, chunk_rows)
        values = backend._head.log_probs(hidden, layout.targets, 1.0, rows=layout.rows).cpu().numpy()
    by_sequence = dict(zip(layout.order, np.split(values, np.cumsum(layout.counts)[:-1])))
    return np.concatenate([by_sequence[i] for i in todo])


def choose_kernel(backend: "HFBackend", probe: Probe, forced: str | None = None) -> list[Kernel]:
    """The attention kernels of the packed path, best first: of those that run here (`attention.kernels_for`, or
    the one named by `forced`), the ones whose packed log-probs agree with the plain forward on the probe, the
    fastest first where several do (timed on a GRPO-shaped row). Empty (calls run padded, prompts not shared)
    where none does. Also checks the chunked layers (`chunking.py`) with the first, and turns chunking off where
    they differ."""
    from klservice.backends.hf.backend import register_tree_attention

    model = backend._model
    name = type(model).__name__
    window = sliding_window(model.config)
    if window == 0:
        log.warning("%s: chunked attention (or a layer type not known here); calls run padded, prompts not shared", name)
        return []
    dtype = backend._head.weight.dtype
    kernels = [k for k in kernels_for(backend._device, dtype) if forced is None or k.name == forced]
    if not kernels:
        raise ValueError(f"attention kernel {forced!r} does not run on {backend._device} in {dtype}")
    previous = model.config._attn_implementation
    try:
        register_tree_attention()
        model.set_attn_implementation(TREE_ATTENTION)
    except Exception:
        log.warning("%s: cannot take a custom attention function; calls run padded, prompts not shared", name,
                    exc_info=True)
        return []
    passed = []
    for kernel in kernels:
        try:
            actual = packed_log_probs(backend, probe.sequences, probe.starts, kernel, chunk_rows=probe_tokens(probe))
        except (UnsupportedAttention, NotImplementedError) as error:
            log.info("%s: attention kernel %s does not apply (%s)", name, kernel.name, error)
            continue
        except Exception:
            log.warning("%s: attention kernel %s failed on the probe", name, kernel.name, exc_info=True)
            continue
        agreement = probe.agreement(actual, dtype)
        if agreement.ok:
            log.info("%s: packed forward with the %s kernel matches the plain forward: %s", name, kernel.name, agreement)
            passed.append(kernel)
        else:
            log.warning("%s: packed forward with the %s kernel differs from the plain forward: %s", name,
                        kernel.name, agreement)
    if not passed:
        log.warning("%s: no packed attention kernel reproduces the plain forward; calls run padded, prompts not "
                    "shared", name)
        model.set_attn_implementation(previous)
        return []
    if len(passed) > 1:
        passed = fastest(backend, passed)
    _check_chunking(backend, passed[0], probe)
    return passed


def probe_tokens(probe: Probe) -> int:
    """A chunk size that leaves the probe unchunked."""
    return sum(len(seq) for seq in probe.sequences) + 1


def _check_chunking(backend: "HFBackend", kernel: Kernel, probe: Probe) -> None:
    name = type(backend._model).__name__
    try:
        actual = packed_log_probs(backend, probe.sequences, probe.starts, kernel, chunk_rows=CHUNK_CHECK_ROWS)
        agreement = probe.agreement(actual, backend._head.weight.dtype)
    except Exception:
        log.warning("%s: chunked layers failed; long calls run unchunked (more memory)", name, exc_info=True)
        backend._chunker.enabled = False
        return
    if not agreement.ok:
        log.warning("%s: chunked layers differ from whole ones (%s); long calls run unchunked (more memory)", name,
                    agreement)
        backend._chunker.enabled = False
    else:
        log.info("%s: chunked layers match whole ones: %s", name, agreement)


def fastest(backend: "HFBackend", kernels: list[Kernel], groups: int = 4, members: int = 8) -> list[Kernel]:
    """`kernels` by the time they take to attend a GRPO-shaped packed row (`groups` prompts of 512 tokens, `members`
    responses of 256 each) with the model's head counts and dtype, fastest first: one plan and one `attend` per
    layer, best of three."""
    from klservice.backends.hf.layout import build_layout

    config = backend._model.config.get_text_config() if hasattr(backend._model.config, "get_text_config") \
        else backend._model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layers = len(backend._chunker.layers)
    device, dtype = backend._device, backend._head.weight.dtype
    sequences, starts, shared, index = [], [], [], 0
    for g in range(groups):
        prompt = np.full(512, g, dtype=np.int64)
        shared.append(list(range(index, index + members)))
        for _ in range(members):
            sequences.append(np.concatenate([prompt, np.zeros(257, dtype=np.int64)]))
            starts.append(512)
            index += 1
    layout = build_layout(sequences, starts, shared, [], device)
    generator = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(layout.tokens, heads, head_dim, device=device, dtype=dtype, generator=generator)
    k, v = (torch.randn(layout.tokens, kv_heads, head_dim, device=device, dtype=dtype, generator=generator)
            for _ in range(2))
    timings = {}
    for kernel in kernels:
        best = float("inf")
        try:
            for _ in range(3):
                _synchronize(device)
                begin = time.perf_counter()
                with torch.inference_mode():
                    call = TreeCall(layout, kernel)
                    for _ in range(layers):
                        call.attend(q, k, v, head_dim ** -0.5, None)
                _synchronize(device)
                best = min(best, time.perf_counter() - begin)
        except Exception:  # it passed on the probe but fails at this size: last
            log.warning("attention kernel %s failed on a %d-token row", kernel.name, layout.tokens, exc_info=True)
        timings[kernel.name] = best
    ranked = sorted(kernels, key=lambda kernel: timings[kernel.name])
    log.info("attention kernels on a %d-token GRPO row, %d layers: %s; using %s", layout.tokens, layers,
             ", ".join(f"{name} {seconds * 1e3:.1f} ms" for name, seconds in timings.items()), ranked[0].name)
    return ranked


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sliding_window(config) -> int | None:
    """The attention window of the model's sliding-window layers, None if it has none (Qwen2 declares a window but
    uses it only with `use_sliding_window`; `layer_types`, where given, says which layers slide). 0 for attention
    that is neither full nor sliding (Llama 4's chunked attention, any layer type not known here): nothing is
    packed then."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None) or ()
    if getattr(text, "attention_chunk_size", None) or any(
        str(kind) not in ("full_attention", "sliding_attention") for kind in layer_types
    ):
        return 0
    window = getattr(text, "sliding_window", None)
    if not window or getattr(text, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None and not any("sliding" in str(kind) for kind in layer_types):
        return None
    return int(window)
