"""HFBackend gives the same numbers as the textbook full-logits computation, without its memory."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from klservice_client import tokenizer_fingerprint

from klservice.backends._files import model_revision
from klservice.backends.base import group_by_prompt
from klservice.backends.hf import HFBackend

# Ragged lengths and starts, including start == 1 (score everything) and start == len (nothing).
LENGTHS = (3, 17, 64, 120, 200, 9)
STARTS = (1, 16, 30, 1, 150, 9)


def ragged_sequences(vocab_size: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, size=n, dtype=np.int64) for n in LENGTHS]


def grpo_batch(vocab_size: int, seed: int = 5) -> tuple[list[np.ndarray], list[int]]:
    """Groups of responses sharing a prompt (one group of single-token responses), mixed with unrelated sequences."""
    rng = np.random.default_rng(seed)
    sequences, starts = ragged_sequences(vocab_size, seed), list(STARTS)
    for prompt_length, response_lengths in [(20, (1, 7, 30, 12)), (40, (25, 25, 3)), (16, (1, 1))]:
        prompt = rng.integers(0, vocab_size, size=prompt_length, dtype=np.int64)
        for n in response_lengths:
            sequences.append(np.concatenate([prompt, rng.integers(0, vocab_size, size=n, dtype=np.int64)]))
            starts.append(prompt_length)
    order = rng.permutation(len(sequences))  # groups need not be contiguous
    return [sequences[i] for i in order], [starts[i] for i in order]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_batched_score_matches_plain_forward(tiny_backend, plain_model, reference, temperature):
    sequences = ragged_sequences(tiny_backend.info().vocab_size)
    got = tiny_backend.score(sequences, STARTS, temperature).values  # one call: one right-padded batch
    assert len(got) == len(sequences)
    for seq, start, values in zip(sequences, STARTS, got):
        assert values.dtype == np.float32 and values.shape == (len(seq) - start,)
        np.testing.assert_allclose(values, reference(plain_model, seq, start, temperature), atol=1e-5, rtol=0)


def test_shared_prompts_are_computed_once_with_the_same_values(tiny_backend, plain_model, reference):
    sequences, starts = grpo_batch(49152)
    shapes = []  # of every forward, seen at the input embedding
    embeddings = tiny_backend._model.get_input_embeddings()
    hook = embeddings.register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape)))
    try:
        scored = tiny_backend.score(sequences, starts, temperature=0.7)
    finally:
        hook.remove()
    got = scored.values
    assert scored.tokens_saved == 3 * 20 + 2 * 40 + 1 * 16  # each group's prompt computed once, not per member
    for seq, start, values in zip(sequences, starts, got):
        np.testing.assert_allclose(values, reference(plain_model, seq, start, 0.7), atol=1e-5, rtol=0)
    # One packed forward of real tokens: each unrelated sequence's inputs (the one with nothing to score left out),
    # and each group's prompt once followed by its members' continuations.
    rows = 0
    for group in group_by_prompt(sequences, starts):
        if len(group) > 1:
            prompt = starts[group[0]]
            rows += prompt + sum(len(sequences[i]) - 1 - prompt for i in group)
        elif len(sequences[group[0]]) > starts[group[0]]:
            rows += len(sequences[group[0]]) - 1
    assert shapes == [(1, rows)]
    assert scored.positions == rows


def test_packed_and_padded_forwards_give_the_same_values(tiny_llama_dir, tiny_backend, plain_model, reference):
    """The packed forward (the default) runs the real tokens of all sequences in one row; the padded one (the
    fallback, ``kernel="none"``) a [count × longest] batch. Same values, either way equal to the plain forward of
    each sequence alone."""
    packing, padded = tiny_backend, HFBackend(tiny_llama_dir, progress=False, kernel="none")
    assert packing.packs and packing.kernel == "sdpa" and not padded.packs and padded.kernel is None
    sequences = ragged_sequences(49152, seed=3)
    shapes = []
    hooks = [backend._model.get_input_embeddings().register_forward_hook(
        lambda m, args, out: shapes.append(tuple(args[0].shape))) for backend in (packing, padded)]
    try:
        packed_values = packing.score(sequences, STARTS, 0.7).values
        padded_values = padded.score(sequences, STARTS, 0.7).values
    finally:
        for hook in hooks:
            hook.remove()
    inputs = [len(seq) - 1 for seq, start in zip(sequences, STARTS) if len(seq) > start]
    assert shapes == [(1, sum(inputs)), (len(inputs), max(inputs))]
    for seq, start, packed, plain in zip(sequences, STARTS, packed_values, padded_values):
        np.testing.assert_allclose(packed, plain, atol=1e-5, rtol=0)
        np.testing.assert_allclose(packed, reference(plain_model, seq, start, 0.7), atol=1e-5, rtol=0)


def test_prompt_sharing_can_be_turned_off(tiny_llama_dir, tiny_backend):
    backend = HFBackend(tiny_llama_dir, progress=False, share_prompts=False)
    sequences, starts = grpo_batch(49152)
    shapes = []
    hook = backend._model.get_input_embeddings().register_forward_hook(lambda m, args, out: shapes.append(args[0].shape))
    try:
        scored = backend.score(sequences, starts)
    finally:
        hook.remove()
    got = scored.values
    assert len(shapes) == 1 and scored.tokens_saved == 0  # one packed forward, every sequence whole
    assert shapes[0][1] == sum(len(seq) - 1 for seq, start in zip(sequences, starts) if len(seq) > start)
    for plain, shared in zip(got, tiny_backend.score(sequences, starts).values):
        np.testing.assert_allclose(plain, shared, atol=1e-5, rtol=0)


def test_small_chunks_give_the_same_values(tiny_llama_dir, plain_model, reference):
    """Blocks of 1000 vocab rows (not a divisor of 49152) and 64 positions change no value."""
    backend = HFBackend(tiny_llama_dir, progress=False, vocab_chunk=1000, token_chunk=64)
    sequence = np.random.default_rng(2).integers(0, 49152, size=400, dtype=np.int64)
    (values,) = backend.score([sequence], [1], temperature=0.9).values
    np.testing.assert_allclose(values, reference(plain_model, sequence, 1, 0.9), atol=1e-5, rtol=0)


def test_full_forward_fallback_gives_the_same_values(tiny_llama_dir, plain_model, reference):
    """The path used for architectures whose body + head cannot be separated is exact too."""
    backend = HFBackend(tiny_llama_dir, progress=False, vocab_chunk=5000, kernel="none")
    backend._head_on_hidden = False
    sequences = ragged_sequences(49152, seed=3)
    for seq, start, values in zip(sequences, STARTS, backend.score(sequences, STARTS, 0.7).values):
        np.testing.assert_allclose(values, reference(plain_model, seq, start, 0.7), atol=1e-5, rtol=0)


def test_info_describes_the_model(tiny_backend, tiny_llama_dir, default_model_dir):
    info = tiny_backend.info()
    assert (info.backend, info.dtype, info.device) == ("hf", "float32", "cpu")
    assert (info.vocab_size, info.max_length) == (49152, 512)
    assert (info.bos_token_id, info.eos_token_id, info.pad_token_id) == (1, 2, 2)
    assert info.name == str(tiny_llama_dir)
    assert info.revision == model_revision(tiny_llama_dir)
    # The SmolLM2 tokenizer with other weights: same fingerprint, other revision.
    assert info.tokenizer_fingerprint == tokenizer_fingerprint(AutoTokenizer.from_pretrained(default_model_dir))
    assert info.revision != model_revision(default_model_dir)


def test_max_length_is_capped_by_the_user(tiny_llama_dir):
    assert HFBackend(tiny_llama_dir, progress=False, max_length=100).info().max_length == 100
    assert HFBackend(tiny_llama_dir, progress=False, max_length=10_000).info().max_length == 512


def test_revision_is_stable_and_follows_the_weights(tiny_backend, tiny_llama_dir, make_tiny_model, llama_config):
    again = HFBackend(tiny_llama_dir, progress=False).info()
    assert again.revision == tiny_backend.info().revision
    perturbed = make_tiny_model("perturbed", llama_config(), perturb="model.layers.1.mlp.down_proj.weight")
    info = HFBackend(perturbed, progress=False).info()
    assert info.revision != again.revision
    assert info.tokenizer_fingerprint == again.tokenizer_fingerprint


def test_bfloat16_agrees_with_float32(tiny_llama_dir, tiny_backend):
    backend = HFBackend(tiny_llama_dir, progress=False, dtype="bfloat16")
    assert backend.info().dtype == "bfloat16"
    sequences = ragged_sequences(49152)
    low = np.concatenate(backend.score(sequences, STARTS).values)
    high = np.concatenate(tiny_backend.score(sequences, STARTS).values)
    assert low.dtype == np.float32
    error = np.abs(low - high)
    # bfloat16 rounding of activations and logits (|logit| ~ 10 here): ~0.03 on average, rarely above 0.1.
    assert error.mean() < 0.05 and error.max() < 0.25
    assert error.max() > 0  # it really ran in bfloat16


@pytest.mark.parametrize(
    "model_type, extra",
    [
        ("qwen2", {}),
        ("mistral", {"sliding_window": 16}),
        ("gemma2", {"final_logit_softcapping": 3.0, "head_dim": 16, "attn_logit_softcapping": None,
                    "sliding_window": 24}),
        ("granite", {"logits_scaling": 4.0}),
        ("cohere", {"logit_scale": 0.5}),
    ],
)
def test_other_architectures_use_the_separate_head_exactly(model_type, extra, make_tiny_model, reference):
    """Body + LM head (+ soft-capping / logit scaling) and shared prompts reproduce each architecture's own logits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=49152,
        max_position_embeddings=512,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        **extra,
    )
    folder = make_tiny_model(model_type, config)
    backend = HFBackend(folder, progress=False)
    assert backend._head_on_hidden  # the memory-saving path, not the fallback
    assert backend.packs  # ... and the packed forward, prompts shared
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    sequences, starts = grpo_batch(49152, seed=4)
    for seq, start, values in zip(sequences, starts, backend.score(sequences, starts, 0.7).values):
        np.testing.assert_allclose(values, reference(plain, seq, start, 0.7), atol=1e-5, rtol=0)


def test_embedded_model_knows_the_capital_of_france(default_model_dir):
    backend = HFBackend(default_model_dir, progress=False)
    ids = backend.tokenizer("The capital of France is Paris").input_ids
    assert backend.tokenizer.convert_ids_to_tokens(ids[-1]) == "ĠParis"
    (values,) = backend.score([np.asarray(ids)], [len(ids) - 1]).values
    assert values[0] == pytest.approx(-0.258, abs=0.05)


def test_a_multi_head_model_packs_with_the_same_values(make_tiny_model, llama_config, reference):
    """Every key head its own (no grouped-query sharing): the packed forward equals the plain one."""
    from transformers import AutoModelForCausalLM

    folder = make_tiny_model("mha", llama_config(num_key_value_heads=4))
    backend = HFBackend(folder, progress=False)
    assert backend.packs
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    sequences, starts = grpo_batch(49152, seed=6)
    for seq, start, values in zip(sequences, starts, backend.score(sequences, starts, 0.7).values):
        np.testing.assert_allclose(values, reference(plain, seq, start, 0.7), atol=1e-5, rtol=0)


def test_the_embedded_model_packs_within_its_own_batching_noise(default_model_dir):
    """SmolLM2 on real text, two groups sharing prompts and a sequence alone: the packed call against each sequence
    scored alone. Its 30 float32 layers move by about 1e-5 with the shape of a batch, so the bound is 1e-5 or, where
    larger, twice the plain forward's own difference between two batch compositions of these sequences (all
    together in one padded batch, and one by one), the load-time check's rule: the packed call is one more
    composition, and its matrix products' rounding depends on the CPU (on an AMD EPYC the packed call stayed within
    1x that noise; on an Intel Xeon it measured 1.7e-5 against the plain forward's 1.3e-5)."""
    from klservice.backends.hf.checks import plain_log_probs

    backend = HFBackend(default_model_dir, progress=False)
    tokenizer = backend.tokenizer
    sequences, starts = [], []
    for prompt, responses in [
        ("The capital of France is", [" Paris. It is a big city with many museums.", " Paris, of course.", " a city"]),
        ("Write a short poem about the sea. The sea", [" is blue and deep, it sings to me.", " whispers"]),
    ]:
        prompt_ids = tokenizer(prompt).input_ids
        for response in responses:
            sequences.append(np.asarray(prompt_ids + tokenizer(response).input_ids))
            starts.append(len(prompt_ids))
    sequences.append(np.asarray(tokenizer("Once upon a time there was a small dog who liked to run.").input_ids))
    starts.append(1)
    scored = backend.score(sequences, starts)
    assert scored.tokens_saved == 2 * 5 + 1 * 10
    alone = np.concatenate([backend.score([seq], [start]).values[0] for seq, start in zip(sequences, starts)])
    model, device = backend._model, backend._device
    noise = float(np.abs(plain_log_probs(model, sequences, starts, device, together=True)
                         - plain_log_probs(model, sequences, starts, device, together=False)).max())
    worst = float(np.abs(np.concatenate(scored.values) - alone).max())
    assert worst <= max(1e-5, 2 * noise), (worst, noise)


def test_a_model_the_packed_forward_cannot_serve_falls_back_and_says_so(make_tiny_model, reference, caplog):
    """Gemma 2's attention soft-capping is not something the packed kernels do: the model is served padded,
    prompts not shared, with the same values, and the log says why."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "gemma2", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=49152, head_dim=16, attn_logit_softcapping=20.0, initializer_range=0.2,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    folder = make_tiny_model("gemma2-softcapped", config)
    with caplog.at_level("INFO", logger="klservice.backends.hf"):
        backend = HFBackend(folder, progress=False)
    assert not backend.packs and backend.kernel is None
    assert "no packed attention kernel reproduces the plain forward" in caplog.text
    assert "soft-capped" in caplog.text
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    sequences, starts = grpo_batch(49152, seed=4)
    scored = backend.score(sequences, starts, 0.7)
    assert scored.tokens_saved == 0
    for seq, start, values in zip(sequences, starts, scored.values):
        np.testing.assert_allclose(values, reference(plain, seq, start, 0.7), atol=1e-5, rtol=0)


class _ForgetsThePrompt:
    """A broken kernel for the load-time check to catch: continuations attend to themselves only, not to their
    prompt (an SDPA kernel given the layout with every prompt link removed)."""

    name = "forgets-the-prompt"

    def __init__(self):
        from klservice.backends.hf.attention import SdpaKernel

        self._sdpa = SdpaKernel()

    def supports(self, device, dtype):
        return True

    def plan(self, layout, q0, q1, kv_rows, window):
        import dataclasses

        unlinked = tuple(dataclasses.replace(segment, prompt=None) for segment in layout.segments)
        return self._sdpa.plan(dataclasses.replace(layout, segments=unlinked), q0, q1, kv_rows, window)

    def attend(self, query, key, value, plan, scale):
        return self._sdpa.attend(query, key, value, plan, scale)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_load_check_keeps_what_matches_at_the_dtypes_noise_and_drops_what_does_not(
        tiny_llama_dir, monkeypatch, caplog, dtype):
    """In float32 and in bfloat16 alike, the packed forward is kept where it is as close to the plain forward as
    the plain forward is to itself (the log gives both figures), and a kernel that computes something else is
    dropped."""
    from klservice.backends.hf import attention, checks

    monkeypatch.setattr(checks, "kernels_for", lambda device, dtype: [_ForgetsThePrompt(), attention.SdpaKernel()])
    with caplog.at_level("INFO", logger="klservice.backends.hf"):
        backend = HFBackend(tiny_llama_dir, progress=False, dtype=dtype)
    assert backend.packs and backend.kernel == "sdpa"
    lines = {record.getMessage() for record in caplog.records}
    dropped = [line for line in lines if "forgets-the-prompt kernel differs from the plain forward" in line]
    kept = [line for line in lines if "sdpa kernel matches the plain forward" in line]
    assert dropped and kept, lines
    assert "plain forward's own noise" in dropped[0] and "plain forward's own noise" in kept[0]


def test_long_rows_run_in_chunks_with_the_same_values(tiny_llama_dir, plain_model, reference):
    """Layers over a long packed row in chunks of 50 rows (keys and values gathered across chunks, the final norm in
    place): the same values as the plain forward."""
    backend = HFBackend(tiny_llama_dir, progress=False, chunk_tokens=50)
    sequences, starts = grpo_batch(49152, seed=8)
    sequences.append(np.random.default_rng(3).integers(0, 49152, size=420, dtype=np.int64))
    starts.append(1)
    for seq, start, values in zip(sequences, starts, backend.score(sequences, starts, 0.7).values):
        np.testing.assert_allclose(values, reference(plain_model, seq, start, 0.7), atol=1e-5, rtol=0)


def test_chunked_layers_keep_a_long_sequence_in_a_small_share_of_its_logits(make_tiny_model, llama_config):
    """One 3,000-token sequence through a model whose layer temporaries outweigh its vocabulary (MLP 4096 wide, 8,000
    tokens): every layer at once holds more than the sequence's full-vocab float32 logits; chunked (the default,
    sized from the call) it stays under a quarter of them, with the same values. Peak: tensor bytes live at once."""
    from klservice.bench.measure import peak_tensor_bytes

    folder = make_tiny_model("wide-mlp", llama_config(hidden_size=128, intermediate_size=4096, vocab_size=8000,
                                                      max_position_embeddings=4096))
    chunked, whole = HFBackend(folder, progress=False), HFBackend(folder, progress=False, chunk_tokens=10**6)
    sequence = np.random.default_rng(4).integers(0, 8000, size=3000, dtype=np.int64)
    logits = (len(sequence) - 1) * 8000 * 4
    (small, small_peak), (large, large_peak) = (peak_tensor_bytes(lambda: b.score([sequence], [1])) for b in
                                                (chunked, whole))
    assert large_peak > logits and small_peak < logits / 4, (small_peak / logits, large_peak / logits)
    np.testing.assert_allclose(small.values[0], large.values[0], atol=1e-5, rtol=0)


def test_models_load_without_hub_kernels(tiny_llama_dir, monkeypatch):
    """transformers 5.25 and later kernelize a model from the Hugging Face Hub unless told not to: the backend
    always tells it not to, whatever the environment says."""
    from transformers import PreTrainedModel

    asked = []
    original = PreTrainedModel.set_use_kernels

    def spy(self, use_kernels, *args, **kwargs):
        asked.append(use_kernels)
        return original(self, use_kernels, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "set_use_kernels", spy)
    monkeypatch.setenv("USE_HUB_KERNELS", "YES")
    backend = HFBackend(tiny_llama_dir, progress=False)
    assert asked and not any(asked)
    assert not backend._model.use_kernels


class _BreaksLater:
    """A kernel that passes the load-time check and fails once `broken` is set (as a compilation for a new shape
    or an out-of-memory error would while serving)."""

    name = "breaks-later"
    broken = False

    def __init__(self):
        from klservice.backends.hf.attention import SdpaKernel

        self._sdpa = SdpaKernel()

    def supports(self, device, dtype):
        return True

    def plan(self, layout, q0, q1, kv_rows, window):
        return self._sdpa.plan(layout, q0, q1, kv_rows, window)

    def attend(self, query, key, value, plan, scale):
        if self.broken:
            raise RuntimeError("the kernel failed")
        return self._sdpa.attend(query, key, value, plan, scale)


def test_a_kernel_that_fails_while_serving_hands_over_to_the_next(tiny_llama_dir, plain_model, reference,
                                                                   monkeypatch, caplog):
    from klservice.backends.hf import attention, checks

    monkeypatch.setattr(checks, "kernels_for", lambda device, dtype: [_BreaksLater(), attention.SdpaKernel()])
    monkeypatch.setattr(checks, "fastest", lambda backend, kernels: kernels)
    backend = HFBackend(tiny_llama_dir, progress=False)
    assert backend.kernel == "breaks-later"
    backend._kernels[0].broken = True
    sequences, starts = grpo_batch(49152, seed=9)
    with caplog.at_level("ERROR", logger="klservice.backends.hf"):
        scored = backend.score(sequences, starts, 0.7)
    assert backend.kernel == "sdpa" and "attention kernel breaks-later failed; the sdpa kernel serves" in caplog.text
    for seq, start, values in zip(sequences, starts, scored.values):
        np.testing.assert_allclose(values, reference(plain_model, seq, start, 0.7), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kernel", ["sdpa", "none"])
def test_a_plain_sequence_scores_the_same_beside_one_asking_for_teacher_outputs(tiny_llama_dir, kernel):
    """The scheduler puts teacher and plain requests in one call: the plain sequences' values are exactly those of a
    call without teacher outputs (their tokens take the plain head), on the packed and the padded path."""
    from klservice.backends.base import TeacherAsk

    backend = HFBackend(tiny_llama_dir, progress=False, kernel=kernel)
    sequences, starts = grpo_batch(49152, seed=12)
    asks = [None] * len(sequences)
    asks[1] = TeacherAsk(top_k=5, candidates=np.arange(2 * (len(sequences[1]) - starts[1])).reshape(-1, 2))
    mixed = backend.score(sequences, starts, 0.7, teacher=asks)
    alone = backend.score(sequences, starts, 0.7)
    for i, (got, plain) in enumerate(zip(mixed.values, alone.values)):
        if asks[i] is None:
            np.testing.assert_array_equal(got, plain)
        else:
            np.testing.assert_allclose(got, plain, atol=1e-5, rtol=0)
            assert mixed.teacher[i].top_ids.shape == (len(plain), 5)
    assert [output is None for output in mixed.teacher] == [ask is None for ask in asks]


def test_teacher_outputs_over_a_small_vocabulary_leave_no_rest_where_they_cover_it(make_tiny_model, llama_config):
    """A 300-token vocabulary: its top 256 and the other 44 ids as candidates hold all of the mass (rest -inf); the
    top 256 alone leave exactly the mass of the other 44; the top ids come most likely first."""
    from klservice.backends.base import TeacherAsk

    backend = HFBackend(make_tiny_model("small-vocab", llama_config(vocab_size=300)), progress=False)
    sequence = np.random.default_rng(5).integers(0, 300, size=9)
    (values,) = backend.score([sequence], [3]).values
    top_only, = backend.score([sequence], [3], teacher=[TeacherAsk(top_k=256)]).teacher
    others = np.stack([np.setdiff1d(np.arange(300), row) for row in top_only.top_ids])
    covered, = backend.score([sequence], [3], teacher=[TeacherAsk(top_k=256, candidates=others)]).teacher
    assert np.isneginf(covered.rest_logmass).all()
    assert (np.diff(top_only.top_logprobs, axis=1) <= 0).all()
    np.testing.assert_allclose(top_only.rest_logmass, np.log(np.exp(covered.candidate_logprobs.astype(np.float64)).sum(1)),
                               atol=1e-5, rtol=1e-5)
    total = np.logaddexp.reduce(np.concatenate([covered.top_logprobs, covered.candidate_logprobs], 1), axis=1)
    np.testing.assert_allclose(total, 0.0, atol=1e-5)
    np.testing.assert_allclose(values, backend.score([sequence], [3], teacher=[TeacherAsk(top_k=1)]).values[0],
                               atol=1e-6, rtol=0)
