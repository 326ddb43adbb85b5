"""Property tests (hypothesis): finiteness, signs, numpy/torch agreement, output types."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from klservice_client import kl

from kl_testlib import all_spec_fields

PROPERTY_SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

VALID_SPECS = []
for _fields in all_spec_fields():
    try:
        VALID_SPECS.append(kl.KLSpec(**_fields.kwargs()))
    except ValueError:
        pass

FLOATS = dict(allow_nan=False, allow_infinity=False)


@st.composite
def batches(draw, max_sequences=5, max_length=8):
    """Ragged batch: logp in [-50, 0], |delta| <= 80, |log w| <= 15 (float64 numpy)."""
    lengths = draw(st.lists(st.integers(0, max_length), min_size=0, max_size=max_sequences))
    n = sum(lengths)
    logp = np.array(draw(st.lists(st.floats(-50.0, 0.0, **FLOATS), min_size=n, max_size=n)), dtype=np.float64)
    delta = np.array(draw(st.lists(st.floats(-80.0, 80.0, **FLOATS), min_size=n, max_size=n)), dtype=np.float64)
    log_w = np.array(draw(st.lists(st.floats(-15.0, 15.0, **FLOATS), min_size=n, max_size=n)), dtype=np.float64)
    return dict(lengths=lengths, logp=logp, ref=logp - delta, old=logp - log_w)


def outputs(result):
    return {name: getattr(result, name) for name in ("k1", "k2", "k3", "coef", "coef_principled")}


@PROPERTY_SETTINGS
@given(batch=batches(), dtype=st.sampled_from([np.float32, np.float64]), with_old=st.booleans())
def test_presets_finite(batch, dtype, with_old):
    """Every preset gives finite outputs and diagnostics for |delta| <= 80, |log w| <= 15, in float32 too."""
    for name, preset in kl.PRESETS.items():
        old = batch["old"].astype(dtype) if (with_old or preset.spec.needs_old_logprobs) else None
        out = kl.compute_kl(batch["logp"].astype(dtype), batch["ref"].astype(dtype), batch["lengths"], name,
                            old_logprobs=old)
        for field, value in outputs(out).items():
            assert value.dtype == dtype, (name, field)
            assert np.isfinite(value).all(), (name, field, value)
        for field, value in vars(out.diagnostics).items():
            assert np.isfinite(value), (name, field, value)


@PROPERTY_SETTINGS
@given(batch=batches(), dtype=st.sampled_from([np.float32, np.float64]))
def test_k2_k3_non_negative(batch, dtype):
    out = kl.compute_kl(batch["logp"].astype(dtype), batch["ref"].astype(dtype), batch["lengths"])
    assert (out.k2 >= 0).all()
    assert (out.k3 >= 0).all(), out.k3[out.k3 < 0]
    # k3 - k1 = e^-delta - 1 > -1.
    assert (out.k3 >= out.k1 - 1 - np.finfo(dtype).eps * (1 + np.abs(out.k1))).all()


@PROPERTY_SETTINGS
@given(batch=batches(), spec=st.sampled_from(VALID_SPECS + list(kl.PRESETS)), with_old=st.booleans())
def test_numpy_and_torch_agree(batch, spec, with_old):
    spec_obj = kl.resolve_spec(spec)
    old = batch["old"] if (with_old or spec_obj.needs_old_logprobs) else None
    lengths = batch["lengths"]
    np_out = kl.compute_kl(batch["logp"], batch["ref"], lengths, spec, old_logprobs=old)
    torch_out = kl.compute_kl(
        torch.tensor(batch["logp"]), torch.tensor(batch["ref"]), torch.tensor(lengths, dtype=torch.int64), spec,
        old_logprobs=None if old is None else torch.tensor(old),
    )
    # k3 = expm1(-d) + d cancels for tiny d: numpy's and torch's expm1 may differ by an ulp of d,
    # so allow ~eps * |d| (times the largest weight) besides the relative 1e-12.
    weight = np.exp(min(np.abs(batch["logp"] - batch["old"]).sum(), 80.0)) if old is not None else 1.0
    slack = 4 * np.finfo(np.float64).eps * (np.abs(np_out.k1).max(initial=0.0) + 1) * weight
    for field, value in outputs(np_out).items():
        other = outputs(torch_out)[field]
        assert isinstance(other, torch.Tensor) and other.dtype == torch.float64
        np.testing.assert_allclose(other.numpy(), value, rtol=1e-12, atol=slack, err_msg=field)
    for field, value in vars(np_out.diagnostics).items():
        assert getattr(torch_out.diagnostics, field) == pytest.approx(value, rel=1e-12, abs=slack), field


@PROPERTY_SETTINGS
@given(batch=batches(max_sequences=3, max_length=4), dtype=st.sampled_from([np.float32, np.float64]))
def test_output_type_follows_input(batch, dtype):
    logp, ref, old, lengths = (batch["logp"].astype(dtype), batch["ref"].astype(dtype), batch["old"].astype(dtype),
                               batch["lengths"])
    torch_dtype = {np.float32: torch.float32, np.float64: torch.float64}[dtype]

    np_out = kl.compute_kl(logp, ref, lengths, "principled_off_policy", old_logprobs=old)
    for field, value in outputs(np_out).items():
        assert isinstance(value, np.ndarray) and value.dtype == dtype, field

    torch_out = kl.compute_kl(torch.from_numpy(logp), torch.from_numpy(ref), lengths, "principled_off_policy",
                              old_logprobs=torch.from_numpy(old))
    for field, value in outputs(torch_out).items():
        assert isinstance(value, torch.Tensor) and value.dtype == torch_dtype, field

    # Mixed: a numpy ref (and old) with a torch logp gives torch, in logp's dtype.
    mixed = kl.compute_kl(torch.from_numpy(logp), ref.astype(np.float64), lengths, "principled_off_policy",
                          old_logprobs=old)
    for field, value in outputs(mixed).items():
        assert isinstance(value, torch.Tensor) and value.dtype == torch_dtype, field
        # Same library, same dtype, same values as the all-torch call (ref is exactly representable).
        np.testing.assert_array_equal(value.numpy(), outputs(torch_out)[field].numpy())

    # importance_weights follows the same rule.
    w = kl.importance_weights(torch.from_numpy(logp), old, lengths, "sequence")
    assert isinstance(w, torch.Tensor) and w.shape == (len(logp),)
    assert isinstance(kl.importance_weights(logp, old, lengths), np.ndarray)


@PROPERTY_SETTINGS
@given(batch=batches())
def test_importance_weights_definition(batch):
    logp, old, lengths = batch["logp"], batch["old"], batch["lengths"]
    np.testing.assert_allclose(kl.importance_weights(logp, old, lengths, "token"), np.exp(logp - old), rtol=1e-12)
    ends = np.cumsum(lengths)
    expected = np.concatenate(
        [np.full(n, np.exp(min((logp - old)[end - n:end].sum(), 80.0))) for n, end in zip(lengths, ends)]
        + [np.zeros(0)]
    )
    np.testing.assert_allclose(kl.importance_weights(logp, old, lengths, "sequence"), expected, rtol=1e-12)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@PROPERTY_SETTINGS
@given(batch=batches(), spec=st.sampled_from(VALID_SPECS))
def test_float32_close_to_float64(batch, spec):
    """float32 estimator values track float64 within what float32 inputs allow, for every spec.

    (Coefficients are not compared: with sequence weights W up to e^80 times k3 up to e^80, some
    non-preset specs overflow float32 -- hence the filtered warning; the presets stay finite.)
    """
    old = batch["old"] if spec.needs_old_logprobs else None
    out64 = kl.compute_kl(batch["logp"], batch["ref"], batch["lengths"], spec, old_logprobs=old)
    out32 = kl.compute_kl(
        batch["logp"].astype(np.float32), batch["ref"].astype(np.float32), batch["lengths"], spec,
        old_logprobs=None if old is None else old.astype(np.float32),
    )
    for field in ("k1", "k2", "k3"):
        a, b = outputs(out32)[field], outputs(out64)[field]
        assert np.isfinite(a).all()
        # delta itself is only known to float32 precision of logp and ref (|logp|, |ref| <= 130).
        d_err = 130 * np.finfo(np.float32).eps * 4
        # |k2'| = |delta| = sqrt(2 k2); |k3'| = |1 - e^-delta| <= k3 + |delta| <= k3 + 80.
        if field == "k1":
            bound = d_err
        elif field == "k2":
            bound = d_err * (2 * np.sqrt(b) + 1)
        else:
            bound = d_err * (b + 81)
        assert np.all(np.abs(a - b) <= bound + 1e-5 * np.abs(b)), field
