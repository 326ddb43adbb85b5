"""`surrogate_loss`: its gradient is beta * c * (normalisation), and with compute_kl's c it
reproduces the gradient of the original KL loss written directly in torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from klservice_client import kl

from kl_testlib import LENGTHS, make_batch, spans


def normalisation(kind: str, lengths, constant=None) -> np.ndarray:
    """Per-token factor d(normalised sum)/d(term_t), written out with python loops."""
    n_tokens = sum(lengths)
    if kind == "token_mean":
        return np.full(n_tokens, 1.0 / n_tokens)
    if kind == "sum":
        return np.ones(n_tokens)
    if kind == "constant":
        return np.full(n_tokens, 1.0 / constant)
    nonempty = sum(1 for n in lengths if n > 0)
    out = np.zeros(n_tokens)
    for start, end in spans(lengths):
        if end > start:
            out[start:end] = 1.0 / ((end - start) * nonempty)
    return out


@pytest.mark.parametrize("coef_kind", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("kind", "constant"), [("token_mean", None), ("sequence_mean", None), ("constant", 4096.0), ("sum", None)])
def test_gradient_is_beta_c_times_normalisation(kind, constant, dtype, coef_kind):
    rng = np.random.default_rng(0)
    n = sum(LENGTHS)
    coef = rng.normal(size=n) * np.exp(rng.normal(size=n) * 3)
    logp = torch.tensor(-rng.exponential(size=n), dtype=dtype, requires_grad=True)
    beta = 0.05
    coef_in = coef if coef_kind == "numpy" else torch.tensor(coef)
    loss = kl.surrogate_loss(coef_in, logp, LENGTHS, beta=beta, normalization=kind, constant=constant)
    assert loss.dim() == 0 and loss.dtype == dtype
    (grad,) = torch.autograd.grad(loss, logp)
    expected = beta * coef.astype(np.float64 if dtype == torch.float64 else np.float32) * normalisation(kind, LENGTHS, constant)
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    np.testing.assert_allclose(grad.numpy(), expected, rtol=rtol, atol=0)
    # The value is the same normalised sum.
    value = (beta * coef * logp.detach().double().numpy() * normalisation(kind, LENGTHS, constant)).sum()
    assert loss.item() == pytest.approx(value, rel=rtol, abs=1e-12)


def test_coefficient_is_detached():
    """A coefficient that carries a graph does not leak gradient through the surrogate."""
    logp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64, requires_grad=True)
    coef = logp * 3  # depends on logp
    loss = kl.surrogate_loss(coef, logp, [3], normalization="sum")
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, coef.detach())


def test_empty_sequences_do_not_count_in_sequence_mean():
    logp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64, requires_grad=True)
    loss = kl.surrogate_loss(np.array([1.0, 1.0, 1.0]), logp, [0, 2, 0, 1, 0], normalization="sequence_mean")
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64))


def _grpo_loss(logp, ref, lengths, normalization):
    """GRPO's KL term, k3 = exp(ref - logp) - (ref - logp) - 1, as its trainers write it."""
    log_ratio = ref - logp
    k3 = torch.exp(log_ratio) - log_ratio - 1
    if normalization == "token_mean":
        return k3.mean()
    per_sequence = [k3[a:b].mean() for a, b in spans(lengths) if b > a]
    return torch.stack(per_sequence).mean()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("normalization", ["token_mean", "sequence_mean"])
def test_reproduces_grpo_k3_as_loss(seed, normalization):
    batch = make_batch(seed)
    logp = torch.tensor(batch["logp"], requires_grad=True)
    ref = torch.tensor(batch["ref"])
    beta = 0.04
    (expected,) = torch.autograd.grad(beta * _grpo_loss(logp, ref, LENGTHS, normalization), logp)

    out = kl.compute_kl(logp.detach(), ref, LENGTHS, "grpo_k3_as_loss")
    (grad,) = torch.autograd.grad(kl.surrogate_loss(out.coef, logp, LENGTHS, beta=beta, normalization=normalization), logp)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("seed", [0, 1])
def test_reproduces_trl_bias_corrected_k3(seed):
    """TRL's use_bias_correction_kl: w * k3 with w = exp(logp - old) carrying gradient, token mean."""
    batch = make_batch(seed)
    logp = torch.tensor(batch["logp"], requires_grad=True)
    ref, old = torch.tensor(batch["ref"]), torch.tensor(batch["old"])
    beta = 0.1
    log_ratio = ref - logp
    k3 = torch.exp(log_ratio) - log_ratio - 1
    loss = beta * (torch.exp(logp - old) * k3).mean()
    (expected,) = torch.autograd.grad(loss, logp)

    out = kl.compute_kl(logp.detach(), ref, LENGTHS, "trl_bias_corrected_k3", old_logprobs=old)
    (grad,) = torch.autograd.grad(kl.surrogate_loss(out.coef, logp, LENGTHS, beta=beta), logp)
    # TRL's expression adds w * e^30-sized terms that cancel; compare against their size
    # (see conftest.assert_gradient_close), not just the (small) result.
    magnitude = beta * torch.exp(logp - old).detach() * (torch.exp(log_ratio).detach() + 1 + log_ratio.abs().detach())
    magnitude = magnitude / len(logp)
    assert torch.all((grad - expected).abs() <= 1e-9 * expected.abs() + 1e-13 * magnitude)


def test_reproduces_ppo_reward_to_go_under_constant_normalisation():
    """The KL part of a REINFORCE/PPO loss with gamma = 1: -sum_t A_t logp_t with A_t = -beta * sum_{t'>=t} delta_t'."""
    batch = make_batch(0)
    logp = torch.tensor(batch["logp"], requires_grad=True)
    ref = torch.tensor(batch["ref"])
    beta, constant = 0.02, 64.0
    delta = (logp - ref).detach()
    advantages = torch.zeros_like(delta)
    for a, b in spans(LENGTHS):
        for t in range(a, b):
            advantages[t] = -beta * delta[t:b].sum()
    (expected,) = torch.autograd.grad(-(advantages * logp).sum() / constant, logp)

    out = kl.compute_kl(logp.detach().numpy(), batch["ref"], LENGTHS, "ppo_k1_reward_to_go")
    loss = kl.surrogate_loss(out.coef, logp, LENGTHS, beta=beta, normalization="constant", constant=constant)
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-14)
