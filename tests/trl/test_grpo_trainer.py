"""KLServiceGRPOTrainer: a real TRL GRPOTrainer against a real klservice server on the tiny Llama.

The oracles are TRL itself (its own trainer with a local reference model) and autograd (the
gradient of TRL's loss with and without the KL term, against beta * c * grad(logp) with c
written out from the definitions in docs, not taken from the code under test).
"""

from __future__ import annotations

import pytest
import torch

from klservice_client import TokenizerMismatch, kl
from tests.server.test_metrics_and_health import job_labels, scrape
from tests.trl.trl_helpers import BETA, length_reward, perturb

BATCH = 4


def make_trainer(tiny_model_dir, tokenizer, dataset, config, **kwargs):
    from klservice_client.integrations.trl import KLServiceGRPOTrainer

    return KLServiceGRPOTrainer(
        model=str(tiny_model_dir),
        reward_funcs=length_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        **kwargs,
    )


def generate(trainer, dataset, seed: int = 1) -> dict:
    """One generation batch, as TRL's training step makes it (sampling seeded)."""
    from transformers import set_seed

    trainer.model.train()
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps  # set by train()
    set_seed(seed)
    return trainer._generate_and_score_completions([dataset[i] for i in range(BATCH)])


@pytest.mark.slow
@pytest.mark.parametrize("mask_truncated", [False, True], ids=["all-completions", "mask-truncated"])
def test_reference_mode_equals_trl_with_a_local_reference(
    mask_truncated, tiny_model_dir, tokenizer, dataset, grpo_config, trl_server
):
    from trl import GRPOTrainer

    from klservice_client.integrations.trl import ServedReference

    config = dict(mask_truncated_completions=mask_truncated)
    local = GRPOTrainer(
        model=str(tiny_model_dir),
        reward_funcs=length_reward,
        args=grpo_config(**config),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    served = make_trainer(tiny_model_dir, tokenizer, dataset, grpo_config(**config), klservice=trl_server.target)
    assert isinstance(local.ref_model, torch.nn.Module)
    assert isinstance(served.ref_model, ServedReference)  # no local reference model was loaded
    assert served.beta == BETA and served.args.beta == BETA
    for trainer in (local, served):
        perturb(trainer.model)  # policy != reference, so the KL term is not zero

    a, b = generate(local, dataset), generate(served, dataset)
    assert torch.equal(a["completion_ids"], b["completion_ids"])
    assert torch.equal(a["completion_mask"], b["completion_mask"])
    mask = a["completion_mask"].bool()
    assert (a["prompt_mask"] == 0).any(), "the batch should have left-padded prompts"
    assert (~mask).any(), "the batch should have right-padded (or masked) completions"
    if mask_truncated:
        assert (~mask).all(dim=1).any(), "the batch should have a masked truncated completion"

    ref_local, ref_served = a["ref_per_token_logps"], b["ref_per_token_logps"]
    assert ref_served.dtype == torch.float32 and ref_served.shape == ref_local.shape
    assert (ref_local - ref_served).abs()[mask].max() < 1e-5
    assert torch.equal(ref_served[~mask], torch.zeros_like(ref_served[~mask]))  # TRL's padding value

    loss_local = local.compute_loss(local.model, a)
    loss_served = served.compute_loss(served.model, b)
    assert local._metrics["train"]["kl"][-1] > 1e-4  # the KL term is really in these losses
    assert loss_served.item() == pytest.approx(loss_local.item(), rel=1e-5, abs=1e-7)


# The gradient coefficient of each spec, from the definitions (delta = logp - ref, w = exp(logp - old)).
COEFFICIENTS = {
    "principled": lambda delta, w: delta,
    "ppo_k1_in_reward": lambda delta, w: delta,
    "grpo_k3_as_loss": lambda delta, w: 1 - torch.exp(-delta),
    "principled_off_policy": lambda delta, w: w * delta,
    # Reference mode: TRL's own KL term, k3 times the differentiable ratio (use_bias_correction_kl=True).
    None: lambda delta, w: w * delta,
}


def trl_normalised(loss_type: str, per_token, mask, max_completion_length: int):
    """TRL's reduction of a per-token loss for `loss_type` (one accumulation step)."""
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token * mask).sum() / mask.sum()
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (per_token.size(0) * max_completion_length)
    raise AssertionError(loss_type)


def flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec,loss_type",
    [
        ("principled", "grpo"),
        ("grpo_k3_as_loss", "grpo"),
        ("ppo_k1_in_reward", "grpo"),
        ("principled_off_policy", "grpo"),
        ("principled_off_policy", "bnpo"),
        ("grpo_k3_as_loss", "dr_grpo"),
        (None, "grpo"),
    ],
    ids=lambda v: str(v),
)
def test_kl_gradient_is_beta_c_grad_logp(spec, loss_type, tiny_model_dir, tokenizer, dataset, grpo_config, trl_server):
    from trl import GRPOTrainer

    config = grpo_config(loss_type=loss_type)
    trainer = make_trainer(tiny_model_dir, tokenizer, dataset, config, klservice=trl_server.target, kl_spec=spec)
    perturb(trainer.model)
    inputs = generate(trainer, dataset)
    model = trainer.model
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    width = inputs["completion_ids"].size(1)

    def policy_logps():  # TRL's own policy log-probs (the base class's method, nothing intercepted)
        return GRPOTrainer._get_per_token_logps_and_entropies(trainer, model, ids, attention, width)[0]

    # Off-policy samples: a behaviour policy that differs from the current one by noise.
    with torch.no_grad():
        noise = torch.randn(inputs["completion_ids"].shape, generator=torch.Generator().manual_seed(3))
        inputs["old_per_token_logps"] = policy_logps() + 0.3 * noise

    def loss_grad(beta: float) -> torch.Tensor:
        trainer.beta = beta
        model.zero_grad()
        trainer.compute_loss(model, inputs).backward()
        return flat_grad(model)

    kl_grad = loss_grad(BETA) - loss_grad(0.0)
    trainer.beta = BETA

    model.zero_grad()
    logp = policy_logps()
    delta = logp.detach() - inputs["ref_per_token_logps"]
    weight = torch.exp(logp.detach() - inputs["old_per_token_logps"])
    coef = COEFFICIENTS[spec](delta, weight)
    mask = inputs["completion_mask"].float()
    (BETA * trl_normalised(loss_type, coef * logp, mask, config.max_completion_length)).backward()
    expected = flat_grad(model)

    assert expected.abs().max() > 1e-6
    assert (kl_grad - expected).abs().max() <= 1e-4 * expected.abs().max() + 1e-8


@pytest.mark.slow
def test_coefficient_mode_logs_diagnostics_and_the_job_reaches_server_metrics(
    tiny_model_dir, tokenizer, dataset, grpo_config, trl_server
):
    config = grpo_config(run_name="grpo-pytest-run")
    trainer = make_trainer(
        tiny_model_dir, tokenizer, dataset, config, klservice=trl_server.target, kl_spec="grpo_k3_as_loss",
        log_kl_grad_norm=True,
    )
    perturb(trainer.model)
    inputs = generate(trainer, dataset)
    trainer.compute_loss(trainer.model, inputs)
    logged = trainer._metrics["train"]

    # The same diagnostics, computed here from TRL's tensors with the KL library.
    mask = inputs["completion_mask"].bool()
    from trl import GRPOTrainer

    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad():
        logp = GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, ids, attention, inputs["completion_ids"].size(1)
        )[0]
    expected = kl.compute_kl(
        logp[mask], inputs["ref_per_token_logps"][mask], mask.sum(1)[mask.any(1)].tolist(), spec="grpo_k3_as_loss"
    ).diagnostics
    assert logged["kl/k3_mean"][-1] == pytest.approx(expected.k3_mean_per_token, rel=1e-4)
    assert logged["kl/k1_mean"][-1] == pytest.approx(expected.k1_mean_per_token, rel=1e-4, abs=1e-7)
    assert logged["kl/coef_bias_abs_mean"][-1] == pytest.approx(expected.coef_bias_abs_mean, rel=1e-4)
    assert logged["kl/is_weight_mean"][-1] == pytest.approx(1.0)
    assert logged["kl/is_truncated_fraction"][-1] == 0.0
    assert logged["kl/grad_norm"][-1] > 0
    assert len(logged["kl/reference_seconds"]) == 1  # one reference fetch per generation batch

    samples = scrape(trl_server.metrics_url)
    scored = int(mask.sum())
    # Score at generation time, ComputeKL at the loss: both under the run's name.
    assert samples["klservice_tokens_scored_total", job_labels("grpo-pytest-run", model=trl_server.model)] == 2 * scored
    assert samples["klservice_kl_k3_mean", job_labels("grpo-pytest-run", model=trl_server.model)] == pytest.approx(
        expected.k3_mean_per_token, rel=1e-4
    )


def test_a_tokenizer_of_another_vocabulary_is_refused(tiny_model_dir, tokenizer, dataset, grpo_config, trl_server):
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(tiny_model_dir)
    other.add_tokens(["<an-extra-token>"])
    with pytest.raises(TokenizerMismatch, match="fingerprint"):
        make_trainer(tiny_model_dir, other, dataset, grpo_config(), klservice=trl_server.target)


def test_bad_arguments_fail_before_training(tiny_model_dir, tokenizer, dataset, grpo_config, trl_server):
    from klservice_client import KLClient

    with pytest.raises(ValueError, match="unknown preset"):
        make_trainer(tiny_model_dir, tokenizer, dataset, grpo_config(), klservice=trl_server.target, kl_spec="no_such_preset")
    with pytest.raises(ValueError, match="sync_ref_model"):
        make_trainer(tiny_model_dir, tokenizer, dataset, grpo_config(sync_ref_model=True), klservice=trl_server.target)
    with KLClient(trl_server.target) as client, pytest.raises(ValueError, match="job_id"):
        make_trainer(tiny_model_dir, tokenizer, dataset, grpo_config(), klservice=client, job_id="x")
