"""verl's reference step through klservice equals verl's own reference worker, inside verl's trainer.

What runs, all of it verl 0.9.1's own code on CPU (the CPU shims are listed in conftest.py;
no module is stubbed):

- TransferQueue for real (its controller and two storage units in Ray actors, one
  module-scoped Ray instance of 4 CPUs), holding each batch as verl's agent loop writes it:
  per-sample unpadded ``prompts``, ``responses``, ``input_ids``, ``attention_mask``,
  ``position_ids``, ``response_mask`` / ``loss_mask`` (with zeros inside responses: tool
  tokens), ``rm_scores``, ``uid``.
- verl's ``PPOTrainerSync`` (the V1 trainer of ``trainer.v1.trainer_mode=sync``), built from
  verl's own Hydra config, and its ``_compute_ref_log_prob`` calling verl's reference worker
  ``ActorRolloutRefWorker(role="ref")`` (FSDP2 engine, float32) on the ``KVBatchMeta``: the
  oracle. The same step of `served_trainer_class(PPOTrainerSync)` fills ``ref_log_prob``
  from the klservice server instead; both are read back from TransferQueue and compared,
  for a tiny random Llama and the embedded SmolLM2-135M, at temperature 1 and 0.7.
- the served trainer's ``_init_tokenizer`` (tokenizer check against the served model) and
  ``_init_resource_pool_mgr`` (no reference role is mapped), and verl's
  ``_compute_advantage`` (``apply_kl_penalty``: KL in the reward, GRPO) and
  ``_compute_metrics`` (``compute_data_metrics``) on the served ``ref_log_prob``: the KL is
  logged as ``actor/reward_kl_penalty``.

What cannot run here, and why:

- verl's ``fit`` loop, so no training step and no reward curve: rollouts in verl 0.9.1 are
  served only by vLLM, SGLang or TensorRT-LLM replicas (``verl/workers/rollout``:
  ``vllm_rollout``, ``sglang_rollout``, ``trtllm_rollout``), launched on GPU resources of the
  Ray resource pool (``ResourcePoolManager`` requests ``num_gpus`` per node;
  ``trainer.n_gpus_per_node`` workers with one GPU each); there is no CPU rollout.
- ``PPOTrainer._setup`` as a whole (it builds the Ray worker groups on GPU bundles and the
  rollout replicas, above); its parts that decide the reference, ``_init_tokenizer`` and
  ``_init_resource_pool_mgr``, run here.
- ``_compute_old_log_prob`` and ``_update_actor``: they need the actor worker
  (``ActorRolloutRefWorker(role="actor_rollout")``), which builds a rollout engine; the
  policy log-probs ``old_log_probs`` are therefore taken from verl's reference worker on the
  *other* model (a different policy with the same tokenizer), so that the KL is not zero.
"""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest
import torch

from klservice_client import TokenizerMismatch
from klservice_client.integrations.verl import MultimodalInputsRefused, served_trainer_class

TOLERANCE = 1e-5
VOCAB = 49152

# (prompt length, response length, response_mask zeros at these response positions: tool tokens)
SAMPLES = [
    (3, 5, ()),
    (7, 2, ()),
    (1, 9, (3, 4, 5)),
    (12, 4, (1,)),
    (5, 11, (0, 6, 7, 8)),
    (2, 1, ()),
    (9, 6, (2, 3)),
    (4, 8, ()),
]

FIGURES: dict[str, float] = {}
"""Max |served - verl| per case, printed at the end of the run."""


@pytest.fixture(scope="module")
def transfer_queue(tiny_dir, verl_config):
    """TransferQueue as verl's TaskRunner starts it (verl's transfer_queue config), in a local Ray of 4 CPUs."""
    import ray
    import transfer_queue as tq

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    tq.init(verl_config(tiny_dir).transfer_queue)
    yield tq
    tq.close()
    ray.shutdown()


def nested(rows):
    return torch.nested.as_nested_tensor(list(rows), layout=torch.jagged)


def put_batch(tq, seed: int = 0, samples=SAMPLES, n: int = 2):
    """A ragged batch, as verl's agent loop puts it into TransferQueue; returns its KVBatchMeta."""
    from tensordict import NonTensorStack, TensorDict

    generator = torch.Generator().manual_seed(seed)
    prompts, responses, masks, scores = [], [], [], []
    for prompt_length, response_length, tools in samples:
        prompts.append(torch.randint(0, VOCAB, (prompt_length,), generator=generator))
        responses.append(torch.randint(0, VOCAB, (response_length,), generator=generator))
        mask = torch.ones(response_length, dtype=torch.int64)
        mask[list(tools)] = 0
        masks.append(mask)
        score = torch.zeros(response_length)
        score[-1] = float(torch.rand((), generator=generator))
        scores.append(score)
    sequences = [torch.cat([p, r]) for p, r in zip(prompts, responses)]
    batch_id = uuid.uuid4().hex  # verl's keys: {uid}_{session id}_{index}; n sessions (samples) per prompt
    uids = [f"{batch_id}-{index // n}" for index in range(len(samples))]
    fields = TensorDict({
        "prompts": nested(prompts),
        "responses": nested(responses),
        "input_ids": nested(sequences),
        "attention_mask": nested(torch.ones_like(s) for s in sequences),
        "position_ids": nested(torch.arange(len(s)) for s in sequences),
        "response_mask": nested(masks),
        "loss_mask": nested(masks),
        "rm_scores": nested(scores),
        "num_turns": torch.full((len(samples),), 2),
        "uid": NonTensorStack(*uids),
    }, batch_size=[len(samples)])
    keys = [f"{uid}_{index % n}_0" for index, uid in enumerate(uids)]
    tags = [{"status": "success", "global_steps": 1, "min_global_steps": 1, "max_global_steps": 1}] * len(samples)
    return tq.kv_batch_put(keys=keys, partition_id="train", fields=fields, tags=tags)


def read(tq, batch, field: str) -> list[torch.Tensor]:
    return list(tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=[field])[field].unbind(0))


def klservice_args(target: str, model: str) -> list[str]:
    return [f"+klservice.target={target}", f"+klservice.model={model}", "algorithm.use_kl_in_reward=true"]


def verl_reference(tq, batch, config, worker, micro_batch_size: int | None = None) -> list[torch.Tensor]:
    """``ref_log_prob`` as verl's own trainer step computes it, with its reference worker.

    `micro_batch_size`: the sequences per forward (default: the config's,
    ``actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu``)."""
    from verl.trainer.ppo.v1 import PPOTrainerSync

    if micro_batch_size is not None:
        batch.extra_info["micro_batch_size_per_gpu"] = micro_batch_size
    else:
        batch.extra_info.pop("micro_batch_size_per_gpu", None)
    trainer = PPOTrainerSync(config)
    trainer.ref_in_actor = False
    trainer.ref_policy_wg = worker
    trainer._compute_ref_log_prob(batch, metrics={})
    return read(tq, batch, "ref_log_prob")


def served_trainer(config):
    """The served-reference trainer as `KLServiceTaskRunner` builds it, through its tokenizer step."""
    from verl.trainer.ppo.v1 import PPOTrainerSync

    trainer = served_trainer_class(PPOTrainerSync)(config)
    trainer._init_tokenizer()
    return trainer


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("model", ["tiny", "smollm2"])
def test_served_ref_log_prob_equals_verls_reference(verl_config, transfer_queue, target, model_dirs, reference_workers, model,
                                                    temperature):
    tq = transfer_queue
    config = verl_config(model_dirs[model], f"actor_rollout_ref.rollout.temperature={temperature}",
                         *klservice_args(target, model))
    batch = put_batch(tq, seed=round(100 * temperature) + (7 if model == "smollm2" else 0))
    expected = verl_reference(tq, batch, config, reference_workers(model))

    trainer = served_trainer(config)
    metrics: dict = {}
    trainer._compute_ref_log_prob(batch, metrics)
    served = read(tq, batch, "ref_log_prob")

    masks = read(tq, batch, "response_mask")
    assert [len(v) for v in served] == [len(m) for m in masks] == [len(e) for e in expected]
    assert sum(int((m == 0).sum()) for m in masks) > 0, "the batch has tool tokens"
    diff = max(float((s - e).abs().max()) for s, e in zip(served, expected))
    FIGURES[f"{model} T={temperature}"] = diff
    tolerance = TOLERANCE
    if model == "smollm2":
        # 30 layers in float32: verl's own reference moves by more than 1e-5 with the shapes of its forward. The
        # bound is then what verl itself varies by on this batch (micro-batches of 4 against one sequence each).
        alone = verl_reference(tq, batch, config, reference_workers(model), micro_batch_size=1)
        noise = max(float((a - e).abs().max()) for a, e in zip(alone, expected))
        FIGURES[f"{model} T={temperature}: verl's own, micro-batch 4 vs 1"] = noise
        tolerance = max(TOLERANCE, 2 * noise)
    assert diff <= tolerance
    tools = torch.cat([s[m == 0] for s, m in zip(served, masks)])
    assert (tools < 0).all(), "tool tokens are scored (a log-prob), as verl's reference scores them"
    assert metrics["klservice/reference_seconds"] > 0


def test_the_temperature_reaches_the_server(verl_config, transfer_queue, target, model_dirs):
    """The equality above could not tell temperatures apart if the values barely moved with it."""
    tq = transfer_queue
    batch = put_batch(tq, seed=5)
    values = {}
    for temperature in (1.0, 0.7):
        config = verl_config(model_dirs["tiny"], f"actor_rollout_ref.rollout.temperature={temperature}",
                             *klservice_args(target, "tiny"))
        served_trainer(config)._compute_ref_log_prob(batch, {})
        values[temperature] = torch.cat(read(tq, batch, "ref_log_prob"))
    assert float((values[1.0] - values[0.7]).abs().max()) > 100 * TOLERANCE


def test_no_reference_role_is_mapped(verl_config, target, model_dirs):
    """verl maps ActorRolloutRef when KL is on (its worker then loads the reference); the served trainer does not."""
    from verl.trainer.ppo.utils import Role
    from verl.trainer.ppo.v1 import PPOTrainerSync

    config = verl_config(model_dirs["tiny"], *klservice_args(target, "tiny"))
    own = PPOTrainerSync(config)
    own._init_resource_pool_mgr()
    assert Role.ActorRolloutRef in own.role_worker_mapping

    trainer = served_trainer_class(PPOTrainerSync)(config)
    trainer._init_resource_pool_mgr()
    assert Role.ActorRollout in trainer.role_worker_mapping
    assert Role.ActorRolloutRef not in trainer.role_worker_mapping
    assert Role.RefPolicy not in trainer.role_worker_mapping
    assert trainer.resource_pool_manager.mapping[Role.ActorRollout] == "global_pool"


def test_kl_in_reward_is_applied_and_logged(verl_config, transfer_queue, target, model_dirs, reference_workers):
    """verl's own _compute_advantage (apply_kl_penalty, GRPO) and _compute_metrics on the served ref_log_prob."""
    tq = transfer_queue
    batch = put_batch(tq, seed=11)
    policy_config = verl_config(model_dirs["smollm2"])
    policy = verl_reference(tq, batch, policy_config, reference_workers("smollm2"))  # a policy != the reference
    from tensordict import TensorDict

    tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id,
                    fields=TensorDict({"old_log_probs": nested(policy)}, batch_size=[len(policy)]))

    config = verl_config(model_dirs["tiny"], *klservice_args(target, "tiny"), "algorithm.adv_estimator=grpo",
                         "actor_rollout_ref.rollout.n=2", "algorithm.kl_ctrl.kl_coef=0.1")
    from verl.utils.debug import marked_timer

    trainer = served_trainer(config)
    metrics: dict = {}
    timing_raw: dict = {}
    with marked_timer("step", timing_raw):  # steps 5 and 7 of verl's _step_once, timed as verl times them
        with marked_timer("ref", timing_raw):
            trainer._compute_ref_log_prob(batch, metrics)
        with marked_timer("adv", timing_raw):
            trainer._compute_advantage(batch, metrics)

    ref = read(tq, batch, "ref_log_prob")
    masks = read(tq, batch, "response_mask")
    scores = read(tq, batch, "rm_scores")
    rewards = read(tq, batch, "token_level_rewards")
    kl_per_sequence = [float(((p - r) * m).sum() / m.sum()) for p, r, m in zip(policy, ref, masks)]
    assert metrics["actor/reward_kl_penalty"] == pytest.approx(np.mean(kl_per_sequence), rel=1e-5)
    assert metrics["actor/reward_kl_penalty_coeff"] == pytest.approx(0.1)
    for score, reward, p, r, m in zip(scores, rewards, policy, ref, masks):
        torch.testing.assert_close(reward, score - 0.1 * (p - r) * m, rtol=1e-5, atol=1e-6)

    trainer._init_resource_pool_mgr()  # _compute_metrics counts the pool's GPUs for its throughput metrics
    trainer._compute_metrics(batch, metrics, timing_raw=timing_raw, global_steps=1, epoch=0)
    assert "critic/score/mean" in metrics and "critic/rewards/mean" in metrics and "timing_s/ref" in metrics
    mean_score = np.mean([float(s.sum()) for s in scores])
    assert metrics["critic/score/mean"] == pytest.approx(mean_score, rel=1e-5)
    # the KL penalty moved the rewards away from the scores, by what the KL logged says
    assert metrics["critic/rewards/mean"] != pytest.approx(metrics["critic/score/mean"], rel=1e-6)


def test_multimodal_batches_are_refused(verl_config, transfer_queue, target, model_dirs):
    from tensordict import NonTensorStack, TensorDict

    tq = transfer_queue
    batch = put_batch(tq, seed=3)
    media = [{"pixel_values": torch.zeros(1, 3)} if i == 2 else {} for i in range(len(batch.keys))]
    batch = tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id,
                            fields=TensorDict({"multi_modal_inputs": NonTensorStack(*media)}, batch_size=[len(media)]))
    trainer = served_trainer(verl_config(model_dirs["tiny"], *klservice_args(target, "tiny")))
    with pytest.raises(MultimodalInputsRefused, match="multi_modal_inputs of sample 2 .*pixel_values"):
        trainer._compute_ref_log_prob(batch, {})


def test_a_tokenizer_the_server_does_not_serve_is_refused(verl_config, target, model_dirs, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dirs["tiny"])
    tokenizer.add_tokens(["<a-token-the-server-lacks>"])
    folder = tmp_path / "other-tokenizer"
    import shutil

    shutil.copytree(model_dirs["tiny"], folder)
    tokenizer.save_pretrained(folder)
    with pytest.raises(TokenizerMismatch):
        served_trainer(verl_config(folder, *klservice_args(target, "tiny")))


def test_the_job_id_is_the_experiment_name_unless_given(verl_config, target, model_dirs):
    from verl.trainer.ppo.v1 import PPOTrainerSync

    trainer = served_trainer(verl_config(model_dirs["tiny"], *klservice_args(target, "tiny"),
                                         "trainer.experiment_name=grpo-run-7"))
    assert trainer.kl_client.job_id == "grpo-run-7"
    trainer = served_trainer(verl_config(model_dirs["tiny"], *klservice_args(target, "tiny"), "+klservice.job_id=mine"))
    assert trainer.kl_client.job_id == "mine"
    assert PPOTrainerSync.__name__ in served_trainer_class(PPOTrainerSync).__name__


def test_the_entry_point_refuses_a_config_without_the_klservice_group(model_dirs, tmp_path):
    """``python -m klservice_client.integrations.verl`` composes verl's own config and checks it before Ray starts."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "klservice_client.integrations.verl", f"actor_rollout_ref.model.path={model_dirs['tiny']}"]
    env = {name: value for name, value in os.environ.items() if not name.startswith("VERL_")}  # verl's own platform
    # Hydra writes its run folder (outputs/DATE/TIME) under the working directory: a temporary one.
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode != 0
    assert "klservice.target: required" in result.stderr
    result = subprocess.run(command + ["+klservice.target=127.0.0.1:1", "+klservice.port=2"], capture_output=True,
                            text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode != 0
    assert "klservice.port: unknown key" in result.stderr
