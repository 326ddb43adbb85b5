"""Monte-Carlo gradients from compute_kl's coefficients against the exact KL gradient.

A categorical policy pi_theta = softmax(theta) over V tokens is a one-token "language
model": every sample y is a one-token sequence with logp = log pi_theta(y). The exact
reverse-KL gradient is

    grad_theta KL(pi_theta || pi_ref) = sum_y pi(y) (log pi(y) - log pi_ref(y)) (e_y - pi),

and an implementation with coefficient c has the per-sample gradient c * grad log pi(y) =
c * (e_y - pi). Averaged over N samples (from pi_theta on-policy, from pi_old off-policy)
it must land within a few standard errors of the exact gradient for principled settings,
and far from it for the biased ones of docs/kl-math.md.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from klservice_client import kl

V = 32
N = 200_000
PRINCIPLED_Z = 4.0
BIASED_Z = 6.0


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(20251001)
    theta = rng.normal(0.0, 1.0, V)
    log_pi = log_softmax(theta)
    # A reference far from the policy (KL ~ 1 nat), so the biased coefficients are far off too.
    log_ref = log_softmax(rng.normal(0.0, 1.0, V))
    # The behaviour policy: a perturbed policy, as after a few updates on the same rollouts.
    log_old = log_softmax(theta + rng.normal(0.0, 0.5, V))
    pi = np.exp(log_pi)
    exact = (pi * (log_pi - log_ref)) @ (np.eye(V) - pi[None, :])  # sum_y pi(y) delta(y) (e_y - pi)
    samples = {
        "on": rng.choice(V, size=N, p=pi),
        "off": rng.choice(V, size=N, p=np.exp(log_old) / np.exp(log_old).sum()),
    }
    return dict(theta=theta, log_pi=log_pi, log_ref=log_ref, log_old=log_old, pi=pi, exact=exact, samples=samples)


def test_exact_gradient_matches_autograd(problem):
    """The closed form above is the gradient of KL(softmax(theta) || pi_ref)."""
    theta = torch.tensor(problem["theta"], requires_grad=True)
    log_pi = torch.log_softmax(theta, 0)
    kl_value = (log_pi.exp() * (log_pi - torch.tensor(problem["log_ref"]))).sum()
    kl_value.backward()
    np.testing.assert_allclose(theta.grad.numpy(), problem["exact"], rtol=1e-10, atol=1e-14)
    assert kl_value.item() > 0.5  # the reference really is far


def test_score_function(problem):
    """grad_theta log softmax(theta)[y] = e_y - pi."""
    theta = torch.tensor(problem["theta"], requires_grad=True)
    for y in (0, 7, V - 1):
        (grad,) = torch.autograd.grad(torch.log_softmax(theta, 0)[y], theta)
        np.testing.assert_allclose(grad.numpy(), np.eye(V)[y] - problem["pi"], rtol=1e-12, atol=1e-15)


def monte_carlo(problem, spec, sampling: str):
    """(mean gradient, its standard error per component) from compute_kl's coefficients."""
    y = problem["samples"][sampling]
    logp, ref, old = problem["log_pi"][y], problem["log_ref"][y], problem["log_old"][y]
    spec = kl.resolve_spec(spec)
    # On-policy samples come from pi_theta itself: the behaviour log-probs are the policy's.
    behaviour = old if sampling == "off" else logp
    n = len(y)
    out = kl.compute_kl(logp, ref, np.ones(n, dtype=np.int64), spec, old_logprobs=behaviour)
    c = np.asarray(out.coef, dtype=np.float64)
    pi = problem["pi"]
    # Per-sample gradient g_i = c_i (e_{y_i} - pi), averaged without an N x V matrix:
    #   sum_i g_ij = S_j - pi_j sum_i c_i, S_j = sum of c_i over samples with y_i = j;
    #   sum_i g_ij^2 = Q_j (1 - 2 pi_j) + pi_j^2 sum_i c_i^2, Q_j = sum of c_i^2 over y_i = j.
    s = np.bincount(y, weights=c, minlength=V)
    q = np.bincount(y, weights=c * c, minlength=V)
    mean = (s - pi * c.sum()) / n
    second = (q * (1 - 2 * pi) + pi**2 * (c * c).sum()) / n
    stderr = np.sqrt(np.maximum(second - mean**2, 0.0) * n / (n - 1) / n)
    return mean, stderr


def test_monte_carlo_moments_match_a_direct_computation(problem):
    """The bincount shortcut in `monte_carlo` against an explicit n x V matrix of per-sample gradients."""
    y = problem["samples"]["on"][:2000]
    mean, stderr = monte_carlo(dict(problem, samples={"on": y}), "grpo_k3_as_loss", "on")
    c = 1 - np.exp(-(problem["log_pi"][y] - problem["log_ref"][y]))
    g = c[:, None] * (np.eye(V)[y] - problem["pi"][None, :])
    np.testing.assert_allclose(mean, g.mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stderr, g.std(0, ddof=1) / np.sqrt(len(y)), rtol=1e-6, atol=1e-12)


PRINCIPLED = [
    pytest.param("principled", "on", id="principled-on"),
    pytest.param("verl_k3_plus", "on", id="verl_k3_plus-on"),
    pytest.param("ppo_k1_in_reward", "on", id="ppo_k1_in_reward-on"),
    # The student samples, the reference is the teacher: c = delta follows grad KL(student || teacher).
    pytest.param("on_policy_distillation", "on", id="on_policy_distillation-on"),
    pytest.param("principled_off_policy", "off", id="principled_off_policy-off"),
    pytest.param("trl_bias_corrected_k3", "off", id="trl_bias_corrected_k3-off"),
    pytest.param(kl.KLSpec(estimator="k2", mode="as_loss", importance_sampling="sequence"), "off",
                 id="sg(W)k2-token-seqIS-off"),
    pytest.param(kl.KLSpec(estimator="k2", mode="as_loss", aggregation="sequence", importance_sampling="sequence"),
                 "off", id="sg(W)k2-sequence-off"),
    pytest.param(kl.KLSpec(estimator="k3", mode="as_loss", aggregation="sequence", importance_sampling="sequence",
                           differentiable_weight=True), "off", id="Wk3-sequence-differentiable-off"),
    pytest.param(kl.KLSpec(estimator="k1", mode="in_reward", importance_sampling="token"), "off",
                 id="sg(w)k1-in-reward-off"),
    # Unbiased but noisier: E_old[w grad log pi] = 0 removes the "+1".
    pytest.param(kl.KLSpec(estimator="k1", mode="as_loss", importance_sampling="token", differentiable_weight=True),
                 "off", id="wk1-differentiable-off"),
    # Principled on-policy too when the weights are all 1.
    pytest.param("principled_off_policy", "on", id="principled_off_policy-on"),
]

BIASED = [
    pytest.param(kl.KLSpec(estimator="k1", mode="as_loss"), "on", id="k1-as-loss-on"),
    pytest.param("grpo_k3_as_loss", "on", id="grpo_k3_as_loss-on"),
    pytest.param("principled", "off", id="unweighted-k2-as-loss-off"),
    pytest.param("grpo_k3_as_loss", "off", id="unweighted-k3-as-loss-off"),
    pytest.param(kl.KLSpec(estimator="k3", mode="as_loss", importance_sampling="token"), "off", id="sg(w)k3-off"),
    pytest.param(kl.KLSpec(estimator="k2", mode="in_reward"), "on", id="k2-in-reward-on"),
    pytest.param(kl.KLSpec(estimator="k3", mode="in_reward"), "on", id="k3-in-reward-on"),
]


@pytest.mark.parametrize(("spec", "sampling"), PRINCIPLED)
def test_principled_settings_are_unbiased(problem, spec, sampling):
    mean, stderr = monte_carlo(problem, spec, sampling)
    z = (mean - problem["exact"]) / stderr
    assert np.abs(z).max() < PRINCIPLED_Z, f"max |z| = {np.abs(z).max():.2f} at component {np.abs(z).argmax()}"
    # And the estimate is precise enough for the biased checks to mean something.
    assert np.linalg.norm(stderr) < 0.1 * np.linalg.norm(problem["exact"])


@pytest.mark.parametrize(("spec", "sampling"), BIASED)
def test_biased_settings_are_detected(problem, spec, sampling):
    mean, stderr = monte_carlo(problem, spec, sampling)
    z = (mean - problem["exact"]) / stderr
    assert np.abs(z).max() > BIASED_Z, f"max |z| = {np.abs(z).max():.2f}: bias not detected"


def test_k1_as_loss_has_zero_expected_gradient(problem):
    """c = 1: E_pi[grad log pi] = 0, i.e. no regularisation at all."""
    mean, stderr = monte_carlo(problem, kl.KLSpec(estimator="k1", mode="as_loss"), "on")
    assert np.abs(mean / stderr).max() < PRINCIPLED_Z


def test_k3_as_loss_expectation_is_pi_minus_ref(problem):
    """E_pi[(1 - pi_ref/pi)(e_y - pi)] = pi - pi_ref: the paper's first-order approximation."""
    mean, stderr = monte_carlo(problem, "grpo_k3_as_loss", "on")
    expected = problem["pi"] - np.exp(problem["log_ref"])
    assert np.abs((mean - expected) / stderr).max() < PRINCIPLED_Z
