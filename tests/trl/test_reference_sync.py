"""sync_ref_model through the service: KLServiceGRPOTrainer's reference resets against TRL's own.

The oracle is TRL itself: a GRPOTrainer with a local reference model, which TRL's
SyncRefModelCallback mixes in place, trained beside a KLServiceGRPOTrainer whose reference is
a model of its own on a real server (LoadModel from loopback), on the same checkpoint, data,
seeds and steps. The reference log-probs each computes at every step, and the policies they
train, must agree; after a sync with alpha = 1 the reference is the policy itself.
"""

from __future__ import annotations

import pytest
import torch

from klservice_client import KLClient
from tests.server.test_metrics_and_health import scrape
from tests.trl.trl_helpers import length_reward, perturb

STEPS = 3
LEARNING_RATE = 0.01  # the policy moves visibly at each step, so a missed sync or a missed mix shows


@pytest.fixture(scope="module")
def start_checkpoint(tmp_path_factory, tiny_model_dir):
    """The policy's initial checkpoint: the tiny Llama perturbed, so it is not the model the server serves."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    perturb(model, seed=5)
    path = tmp_path_factory.mktemp("start-checkpoint")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def operator_server(start_server, tmp_path_factory):
    """A server on the tiny model that takes LoadModel from loopback (no auth file)."""
    return start_server(allow_admin_from_loopback=True, cache_dir=str(tmp_path_factory.mktemp("server-cache")))


def policy_logps(trainer, batch) -> torch.Tensor:
    """The policy's log-probs of a generation batch now (TRL's own method, nothing intercepted)."""
    from trl import GRPOTrainer

    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    with torch.no_grad():
        return GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, ids, attention, batch["completion_ids"].size(1)
        )[0].detach().clone()


def record_batches(trainer) -> list[dict]:
    """Wrap the trainer's generation step: keep, per generation batch, the tokens, TRL's reference log-probs
    and the policy's log-probs at generation time."""
    batches = []
    generate = trainer._generate_and_score_completions

    def recorded(inputs):
        out = generate(inputs)
        batches.append({
            "completion_ids": out["completion_ids"].clone(),
            "mask": out["completion_mask"].bool(),
            "ref": out["ref_per_token_logps"].detach().clone(),
            "policy": policy_logps(trainer, out),
        })
        return out

    trainer._generate_and_score_completions = recorded
    return batches


def logged(trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_reference_resets_equal_trls_sync_ref_model_callback(
    alpha, start_checkpoint, tokenizer, dataset, grpo_config, operator_server, tmp_path
):
    from transformers import set_seed
    from trl import GRPOTrainer
    from trl.trainer.callbacks import SyncRefModelCallback

    from klservice_client.integrations.trl import KLServiceGRPOTrainer

    def config():
        return grpo_config(
            sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=alpha, max_steps=STEPS,
            learning_rate=LEARNING_RATE, run_name=f"sync-{alpha}",
        )

    common = dict(model=str(start_checkpoint), reward_funcs=length_reward, train_dataset=dataset,
                  processing_class=tokenizer)
    local = GRPOTrainer(args=config(), **common)
    assert any(isinstance(callback, SyncRefModelCallback) for callback in local.callback_handler.callbacks)
    sync_dir = tmp_path / "reference-sync"
    served = KLServiceGRPOTrainer(
        args=config(), klservice=operator_server.target, reference_sync_dir=sync_dir, **common
    )
    name = served.reference_model
    assert name == f"sync-{alpha}-reference"
    assert not any(isinstance(callback, SyncRefModelCallback) for callback in served.callback_handler.callbacks)

    loads, infos = [], []
    load_model = served.kl_client.load_model

    def counted_load(*args, **kwargs):
        loads.append(kwargs.get("mixup_alpha"))
        infos.append(load_model(*args, **kwargs))
        return infos[-1]

    served.kl_client.load_model = counted_load
    local_batches, served_batches = record_batches(local), record_batches(served)
    for trainer in (local, served):
        set_seed(0)  # Trainer seeds at construction only: the same sampling for both runs
        trainer.train()

    # Same samples at every step; the reference log-probs agree at each, the later ones after a reset.
    assert len(local_batches) == len(served_batches) == STEPS
    differences = []
    for step, (a, b) in enumerate(zip(local_batches, served_batches), start=1):
        assert torch.equal(a["completion_ids"], b["completion_ids"]), f"step {step}: the samples differ"
        assert torch.equal(a["mask"], b["mask"])
        mask = a["mask"]
        differences.append(float((b["ref"] - a["ref"]).abs()[mask].max()))
        assert differences[-1] < 1e-5, f"step {step}: the served reference is not TRL's ({differences[-1]:.3g})"
        assert (b["policy"] - a["policy"]).abs()[mask].max() < 1e-5, f"step {step}: the policies differ"
        # What TRL's reference is at that step: the initial policy, then after each sync (1 - alpha) ref + alpha policy.
        gap = float((a["ref"] - a["policy"]).abs()[mask].max())
        if step == 1 or alpha == 1.0:
            assert gap < 1e-5, f"step {step}: the reference should be the policy itself"
        else:
            assert gap > 1e-3, f"step {step}: the reference should be a mix, not the policy"
    print(f"alpha={alpha}: max |served - TRL| reference log-prob per step: {differences}")
    pairs = zip(local.model.parameters(), served.model.parameters(), strict=True)
    drift = max(float((p.detach() - q.detach()).abs().max()) for p, q in pairs)
    print(f"alpha={alpha}: max |served - TRL| policy weight after {STEPS} steps: {drift:.3g}")
    assert drift < 1e-4  # same steps, same weights (up to the float32 noise of the reference log-probs)

    # One LoadModel to start (as it is), then one per sync (mixed); the calls are pinned to the last one.
    assert loads == [None] + [alpha] * STEPS
    info = infos[-1]
    assert info.generation == 1 + STEPS and info.mixup_alpha == alpha
    assert logged(served, "kl/reference_generation") == [1.0, 2.0, 3.0]  # the load each step's batch saw
    with KLClient(operator_server.target) as operator:
        samples = scrape(operator_server.metrics_url)
        assert samples["klservice_model_loads_total", (("model", name), ("result", "ok"))] == 1 + STEPS
        assert list(sync_dir.iterdir()) == []  # the server read every folder; the mixed weights are its own
        # training over, the run's reference left the server (and the trainer's pin with it)
        assert name not in [model.name for model in operator.list_models()]
        assert served.kl_client.pinned_revision(model=name) is None and served.ref_model.info is None


def test_sync_ref_model_needs_a_sync_dir_and_a_name_of_its_own(
    tiny_model_dir, tokenizer, dataset, grpo_config, operator_server, tmp_path
):
    from klservice_client.integrations.trl import KLServiceGRPOTrainer

    common = dict(model=str(tiny_model_dir), reward_funcs=length_reward, train_dataset=dataset,
                  processing_class=tokenizer, klservice=operator_server.target)
    with pytest.raises(ValueError, match=r"sync_ref_model=True needs reference_sync_dir="):
        KLServiceGRPOTrainer(args=grpo_config(sync_ref_model=True), **common)
    with pytest.raises(ValueError, match="the server's default model"):
        KLServiceGRPOTrainer(args=grpo_config(sync_ref_model=True), reference_sync_dir=tmp_path,
                             reference_model=operator_server.model, **common)
    with pytest.raises(ValueError, match="reference_model: 'no spaces please'"):
        KLServiceGRPOTrainer(args=grpo_config(sync_ref_model=True), reference_sync_dir=tmp_path,
                             reference_model="no spaces please", **common)


def test_a_reference_used_before_training_is_loaded_then(
    start_checkpoint, tokenizer, dataset, grpo_config, operator_server, tmp_path
):
    from klservice_client.integrations.trl import KLServiceGRPOTrainer
    from tests.trl.test_grpo_trainer import generate

    sync_dir = tmp_path / "reference-sync"
    trainer = KLServiceGRPOTrainer(
        model=str(start_checkpoint), reward_funcs=length_reward, train_dataset=dataset, processing_class=tokenizer,
        args=grpo_config(sync_ref_model=True, run_name="sync-before-train"), klservice=operator_server.target,
        reference_sync_dir=sync_dir,
    )
    assert trainer.ref_model.info is None  # nothing is loaded before it is needed
    inputs = generate(trainer, dataset)  # as evaluate() before train() would
    info = trainer.ref_model.info
    assert info.name == "sync-before-train-reference" and info.generation == 1 and info.mixup_alpha is None
    assert trainer.kl_client.pinned_revision(model=info.name) == info.revision
    mask = inputs["completion_mask"].bool()
    assert (inputs["ref_per_token_logps"] - policy_logps(trainer, inputs)).abs()[mask].max() < 1e-5
    assert len(list(sync_dir.iterdir())) == 1  # the next, mixing load reads it again: it stays until then
    with KLClient(operator_server.target) as operator:
        operator.unload_model(info.name)
