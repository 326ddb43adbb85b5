"""`kl.distillation_divergence` against autograd of independent computations written here.

On the whole vocabulary (no rest bucket) each divergence must be the full-vocabulary one; on a truncated support,
the divergence over the support's ids plus one bucket for the rest of the mass, computed here from the full
softmax with torch and differentiated by autograd, must equal the library's value and its analytic gradient with
respect to every student logit: on the support, and outside it through the rest bucket (``grad_rest · p(j)``).
`kl.distillation_surrogate`'s autograd gradient must be that gradient too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from klservice_client import kl

V, POSITIONS = 50, 6


def logits(seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(POSITIONS, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def oracle(z: torch.Tensor, teacher_logits: torch.Tensor, support: torch.Tensor | None, kind: str, beta: float):
    """The divergence at each position, written out: buckets of the support's ids and (where the support is not
    the whole vocabulary) the rest, from the full softmaxes."""
    s_full, t_full = torch.softmax(z, -1), torch.softmax(teacher_logits, -1)
    if support is None:
        q, p = s_full, t_full
    else:
        s_support, t_support = s_full.gather(-1, support), t_full.gather(-1, support)
        q = torch.cat([s_support, 1 - s_support.sum(-1, keepdim=True)], -1)
        p = torch.cat([t_support, 1 - t_support.sum(-1, keepdim=True)], -1)
    if kind == "forward":
        return (p * (p.log() - q.log())).sum(-1)
    if kind == "reverse":
        return (q * (q.log() - p.log())).sum(-1)
    m = beta * p + (1 - beta) * q
    return beta * (p * (p.log() - m.log())).sum(-1) + (1 - beta) * (q * (q.log() - m.log())).sum(-1)


CASES = [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9)]


@pytest.mark.parametrize("kind, beta", CASES)
def test_on_the_whole_vocabulary_it_is_the_full_divergence_and_its_gradient(kind, beta):
    z, teacher = logits(1).requires_grad_(True), logits(2)
    expected = oracle(z, teacher, None, kind, beta)
    (gradient,) = torch.autograd.grad(expected.sum(), z)
    ids = torch.arange(V).expand(POSITIONS, V)
    result = kl.distillation_divergence(
        torch.log_softmax(z.detach(), -1), torch.log_softmax(teacher, -1), kind=kind, beta=beta,
        student_rest=torch.full((POSITIONS,), float("-inf"), dtype=torch.float64),
        teacher_rest=torch.full((POSITIONS,), float("-inf"), dtype=torch.float64),
    )
    torch.testing.assert_close(result.value, expected.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(result.grad_support.gather(-1, torch.argsort(ids, -1)), gradient, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind, beta", CASES)
@pytest.mark.parametrize("k", [1, 5, 20])
def test_on_a_truncated_support_value_and_gradient_match_autograd_inside_and_outside_it(kind, beta, k):
    z, teacher = logits(3).requires_grad_(True), logits(4)
    support = torch.topk(teacher, k, -1).indices  # the teacher's top-k, as the server answers them
    expected = oracle(z, teacher, support, kind, beta)
    (gradient,) = torch.autograd.grad(expected.sum(), z)
    student, teacher_log = torch.log_softmax(z.detach(), -1), torch.log_softmax(teacher, -1)
    outside = torch.ones(POSITIONS, V, dtype=torch.bool).scatter(-1, support, False)
    result = kl.distillation_divergence(
        student.gather(-1, support), teacher_log.gather(-1, support), kind=kind, beta=beta,
        student_rest=torch.logsumexp(student.masked_fill(~outside, float("-inf")), -1),
        teacher_rest=torch.logsumexp(teacher_log.masked_fill(~outside, float("-inf")), -1),
    )
    torch.testing.assert_close(result.value, expected.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(result.grad_support, gradient.gather(-1, support), rtol=1e-8, atol=1e-12)
    outside_gradient = result.grad_rest[:, None] * student.exp()
    torch.testing.assert_close(outside_gradient[outside], gradient[outside], rtol=1e-8, atol=1e-12)
    # The surrogate's gradient is that gradient, everywhere.
    z_again = z.detach().clone().requires_grad_(True)
    (surrogate_gradient,) = torch.autograd.grad(kl.distillation_surrogate(z_again, support, result), z_again)
    torch.testing.assert_close(surrogate_gradient, gradient, rtol=1e-8, atol=1e-12)


def test_numpy_in_numpy_out_and_rest_from_the_support_by_default():
    student = np.log(np.array([[0.5, 0.2], [0.1, 0.1]]))
    teacher = np.log(np.array([[0.4, 0.4], [0.3, 0.1]]))
    result = kl.distillation_divergence(student, teacher, kind="forward")
    assert isinstance(result.value, np.ndarray) and result.value.shape == (2,)
    # Buckets [0.5, 0.2, 0.3] and [0.4, 0.4, 0.2]; [0.1, 0.1, 0.8] and [0.3, 0.1, 0.6], written out.
    p, q = np.array([[0.4, 0.4, 0.2], [0.3, 0.1, 0.6]]), np.array([[0.5, 0.2, 0.3], [0.1, 0.1, 0.8]])
    np.testing.assert_allclose(result.value, (p * np.log(p / q)).sum(-1), rtol=1e-12)
    np.testing.assert_allclose(kl.rest_logmass(student), np.log([0.3, 0.8]), rtol=1e-12)


def test_a_masked_entry_counts_in_the_rest_and_bad_arguments_are_refused():
    student = np.log(np.array([[0.5, 0.2, 0.1]]))
    teacher = np.log(np.array([[0.4, 0.4, 0.1]]))
    masked = kl.distillation_divergence(student, teacher, kind="reverse", support_mask=np.array([[1, 1, 0]]))
    without = kl.distillation_divergence(student[:, :2], teacher[:, :2], kind="reverse")
    np.testing.assert_allclose(masked.value, without.value, rtol=1e-12)
    assert masked.grad_support[0, 2] == 0
    with pytest.raises(ValueError, match="kind: 'tvd' is not one of forward, reverse, jsd"):
        kl.distillation_divergence(student, teacher, kind="tvd")
    with pytest.raises(ValueError, match="beta: 1.0 must lie strictly between 0 and 1"):
        kl.distillation_divergence(student, teacher, kind="jsd", beta=1.0)


def test_a_rest_rounded_to_nothing_gives_finite_values_and_gradients():
    """A student whose float32 top log-prob rounds to 0.0 (rest -inf), and a teacher rest of -inf (what the server
    answers where the rest is below 1e-16): finite values and gradients, not inf and NaN."""
    for kind in kl.DISTILLATION_KINDS:
        result = kl.distillation_divergence(np.array([[0.0]]), np.array([[np.log(0.9)]]), kind=kind,
                                            teacher_rest=np.array([-np.inf]))
        assert np.isfinite(result.value).all() and np.isfinite(result.grad_support).all(), kind
        assert np.isfinite(result.grad_rest).all(), kind


def test_the_surrogate_leaves_a_masked_entry_in_the_rest_even_where_padding_repeats_an_id():
    """Padding that repeats a real support id (TRL pads ids with 0) and is masked out: the surrogate's gradient is
    the divergence's, the masked entry's mass in the rest."""
    z, teacher = logits(5).requires_grad_(True), logits(6)
    support = torch.topk(teacher, 4, -1).indices
    padded = torch.cat([support, support[:, :1]], -1)  # a fifth entry repeating the first
    mask = torch.tensor([True] * 4 + [False]).expand(POSITIONS, 5)
    expected = oracle(z, teacher, support, "forward", 0.5)
    (gradient,) = torch.autograd.grad(expected.sum(), z)
    student, teacher_log = torch.log_softmax(z.detach(), -1), torch.log_softmax(teacher, -1)
    outside = torch.ones(POSITIONS, V, dtype=torch.bool).scatter(-1, support, False)
    result = kl.distillation_divergence(
        student.gather(-1, padded), teacher_log.gather(-1, padded), kind="forward", support_mask=mask,
        student_rest=torch.logsumexp(student.masked_fill(~outside, float("-inf")), -1),
        teacher_rest=torch.logsumexp(teacher_log.masked_fill(~outside, float("-inf")), -1),
    )
    torch.testing.assert_close(result.value, expected.detach(), rtol=1e-9, atol=1e-12)
    z_again = z.detach().clone().requires_grad_(True)
    (surrogate,) = torch.autograd.grad(kl.distillation_surrogate(z_again, padded, result, support_mask=mask), z_again)
    torch.testing.assert_close(surrogate, gradient, rtol=1e-8, atol=1e-12)
