"""The launcher runs OpenRLHF's own train_ppo_ray with the served reference, as far as a CPU lets it.

``python -m klservice_client.integrations.openrlhf`` runs ``openrlhf.cli.train_ppo_ray`` itself:
its parser and checks, then ``train()``, which here builds the policy's ``RayActorGroup``
(``PolicyModelActor``), a `ServedReferenceGroup` where it built ``ReferenceModelActor``'s group,
OpenRLHF's ``PPOTrainer`` actor (tokenizer, prompt dataset, experience maker, holding the served
group), and then initialises the models: the served group checks the served model's tokenizer
against ``--actor.model_name_or_path``, and ``PolicyModelActor.init_model_from_pretrained`` stops
at its first CUDA call (``DeepspeedStrategy.setup_distributed`` -> ``torch.cuda.set_device``, which
a CPU build of torch does not have). ``--vllm.sync_backend gloo``: with the default "nccl" the
policy actor first reads ``vllm.__version__``, and vLLM is a stub here. Ray schedules the policy actor on the session cluster's logical GPU (there is
no device). What could not run after that point, and why: tests/openrlhf/test_experience.py.
"""

from __future__ import annotations

import json

import pytest


def test_the_launcher_runs_train_ppo_ray_with_no_reference_actor(ray_cluster, server, tiny_dir, tmp_path, monkeypatch):
    import ray

    from klservice_client.integrations import openrlhf as integration

    built = []
    real = integration.group_for_arguments

    def recording(parsed, args):
        built.append(real(parsed, args))
        return built[-1]

    monkeypatch.setattr(integration, "group_for_arguments", recording)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"input": text}) + "\n" for text in ["Hello", "The sky is", "2 + 2 ="]))
    argv = [
        "--actor.model_name_or_path", str(tiny_dir),
        "--actor.num_gpus_per_node", "1",
        "--reward.remote_url", "http://127.0.0.1:9/reward",  # no reward model group
        "--data.prompt_dataset", str(prompts),
        "--data.input_key", "input",
        "--rollout.batch_size", "1",
        "--rollout.micro_batch_size", "1",
        "--train.batch_size", "1",
        "--rollout.temperature", "0.7",
        "--algo.kl.init_coef", "0.05",
        "--algo.advantage.estimator", "group_norm",  # no critic group (gae would build one)
        "--rollout.n_samples_per_prompt", "2",
        "--ds.attn_implementation", "sdpa",
        "--vllm.sync_backend", "gloo",  # "nccl" makes PolicyModelActor read vllm.__version__ first (no vLLM here)
        "--ckpt.path", str(tmp_path / "ckpt"),
        "--ckpt.output_dir", str(tmp_path / "out"),
        "--logger.wandb.run_name", "launcher-run",
        "--klservice.target", server,
        "--klservice.model", "tiny",
    ]
    with pytest.raises(Exception) as failure:
        integration.main(argv)
    message = str(failure.value)
    assert isinstance(failure.value, ray.exceptions.RayTaskError), message
    # The policy actor's first CUDA call (a CPU build of torch has no CUDA functions at all).
    assert "PolicyModelActor.init_model_from_pretrained" in message and "torch.cuda.set_device" in message, message

    assert len(built) == 1  # train() asked for the reference group once, and got the served one
    options = built[0].options
    assert (options.target, options.model, options.job_id, options.temperature) == (server, "tiny", "launcher-run", 0.7)
    actors = {actor["ActorClassName"] for actor in ray._private.state.actors().values()}
    assert any("PolicyModelActor" in name for name in actors), actors
    assert any("PPOTrainer" in name for name in actors), actors
    assert not any("ReferenceModelActor" in name for name in actors), actors


def test_klservice_options_are_checked():
    from klservice_client.integrations.openrlhf import split_arguments

    parsed, rest = split_arguments(["--rollout.temperature", "0.7", "--klservice.target", "h:1", "--klservice.job_id", "j"])
    assert (parsed.target, parsed.job_id, rest) == ("h:1", "j", ["--rollout.temperature", "0.7"])
    with pytest.raises(SystemExit, match="--klservice.targt"):
        split_arguments(["--klservice.target", "h:1", "--klservice.targt", "x"])
    with pytest.raises(SystemExit):
        split_arguments(["--rollout.temperature", "0.7"])  # no --klservice.target
