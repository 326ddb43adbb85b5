"""The ``on_policy_distillation`` preset: the per-token reverse KL to the teacher, undiscounted.

On-policy distillation (docs/kl-math.md#on-policy-distillation): the student samples, the
served model (the teacher) scores the same tokens as ``ref``, and the trainer's per-token
advantage is ``-(log p_student - log p_teacher)`` with discount 0. The expected values
here are computed with numpy from the two log-probs, never with the library's formulas.
"""

from __future__ import annotations

import numpy as np
import pytest

from klservice_client import kl

from kl_testlib import LENGTHS, make_batch

SEEDS = (0, 1, 2)


def distill(student, teacher, lengths=LENGTHS):
    return kl.compute_kl(student, teacher, list(lengths), "on_policy_distillation")


@pytest.mark.parametrize("seed", SEEDS)
def test_coefficient_is_student_minus_teacher_log_prob(seed):
    batch = make_batch(seed)
    student, teacher = batch["logp"], batch["ref"]
    out = distill(student, teacher)
    expected = np.subtract(student, teacher)  # log p_student(x_t) - log p_teacher(x_t), token by token
    np.testing.assert_allclose(out.coef, expected, rtol=1e-12, atol=1e-12)
    # The advantage of the recipe is its negation; the logged k1 is the same per-token estimate.
    np.testing.assert_allclose(-out.coef, teacher - student, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out.k1, expected, rtol=1e-12, atol=1e-12)
    # Its batch mean is the per-token reverse-KL estimate a distillation run logs.
    assert out.diagnostics.k1_mean_per_token == pytest.approx(expected.mean(), rel=1e-12)
    # And it is the principled on-policy coefficient: no bias reported.
    assert out.diagnostics.coef_bias_abs_mean <= 1e-12


def test_the_spec_is_k1_in_reward_per_token_on_policy():
    spec = kl.resolve_spec("on_policy_distillation")
    assert spec == kl.KLSpec(estimator="k1", mode="in_reward", aggregation="token")
    assert not spec.needs_old_logprobs
    # The same coefficient as PPO's per-token k1 penalty: one implementation, two names.
    assert spec == kl.resolve_spec("ppo_k1_in_reward")


@pytest.mark.parametrize("seed", SEEDS)
def test_no_discounting_a_token_ignores_every_other_token(seed):
    """Token t's coefficient depends on token t alone: not on later tokens (no reward-to-go)
    nor on where the sequences begin and end."""
    batch = make_batch(seed)
    student, teacher = batch["logp"], batch["ref"]
    base = distill(student, teacher).coef
    rng = np.random.default_rng(seed)
    for t in rng.choice(len(student), size=5, replace=False):
        changed_student, changed_teacher = student.copy(), teacher.copy()
        changed_student[t] -= 1.5
        changed_teacher[t] += 0.25
        coef = distill(changed_student, changed_teacher).coef
        others = np.arange(len(student)) != t
        np.testing.assert_array_equal(coef[others], base[others])
        assert coef[t] == pytest.approx(base[t] - 1.75, abs=1e-12)
    # Regrouping the same tokens into other sequences changes nothing either.
    total = len(student)
    for lengths in ([total], [1] * total, [total - 4, 0, 4]):
        np.testing.assert_array_equal(distill(student, teacher, lengths).coef, base)
    # Whereas reward-to-go (discount 1) does mix in later tokens: the check above can fail.
    rtg = kl.compute_kl(student, teacher, list(LENGTHS), "ppo_k1_reward_to_go").coef
    assert not np.allclose(rtg, base)
