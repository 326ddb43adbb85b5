"""The served reference inside OpenRLHF's own experience maker equals OpenRLHF's own reference.

Everything here is OpenRLHF 0.11.2's own code on CPU, in float32, except the reference group:
rollouts become ``Experience`` objects through ``SamplesGenerator._process_response_into_experience``
(what it does with a vLLM engine's answer), micro-batches through
``RemoteExperienceMaker.split_rollout_samples`` (``Experience.concat_experiences``, right
padding), then ``RemoteExperienceMaker.make_experience`` dispatches the policy (a real
``RayActorGroup`` of a Ray actor running ``openrlhf.models.Actor``) and the reference, a
`ServedReferenceGroup`, and gathers their Ray object refs; ``compute_advantages_and_returns``
turns the KL into rewards and advantages. The arguments are train_ppo_ray's own parser's.

OpenRLHF's own reference, the expected values: ``openrlhf.models.Actor`` with the same weights and
``temperature=--rollout.temperature``, called as ``ReferenceModelActor.forward`` calls it
(``model(sequences, action_mask, attention_mask, ring_attn_group=..., packed_seq_lens=...)``)
on the same ``Experience`` tensors. Within 1e-5 in float32, for a tiny random Llama and the
embedded SmolLM2-135M, at temperatures 1 and 0.7, on ragged prompts and responses (right
padding inside each micro-batch) and a multi-turn sample whose observation tokens are outside
the action mask. The bound is 1e-5 or, where larger, twice the float32 noise of OpenRLHF's own
reference, as the verl suite's: the noise is the difference between its values on the padded
micro-batch and on each row alone (on the embedded model, log-probs near -20 where float32's
spacing is ~2e-6, it reaches ~1.9e-5 at temperature 0.7). The server computes the same values in
yet another batch composition (one packed row), so it may sit on the other side of the exact
value from OpenRLHF's: twice that noise apart (measured 1.7e-5 and 2.5e-5 against noises of
0.95e-5 and 1.9e-5).

What of OpenRLHF's training path could not run on this CPU, and why:

- ``ReferenceModelActor`` and ``PolicyModelActor`` themselves: their ``forward`` moves inputs to
  ``torch.cuda.current_device()``, and ``init_model_from_pretrained`` runs
  ``DeepspeedStrategy.setup_distributed`` (``torch.cuda.set_device``, ``init_device_mesh("cuda")``)
  and wraps the model in a DeepSpeed engine. The expected values therefore come from
  ``openrlhf.models.Actor`` (the module ``ReferenceModelActor`` wraps) called directly, and the
  policy group's actor runs that ``Actor`` too. ``Actor`` loads a path only in bf16 or fp16
  (``convert_to_torch_dtype``), so the float32 model is loaded by transformers and handed to it
  (and ``packing_samples=False`` set, which its loading branch sets).
- vLLM rollouts (``create_vllm_engines``, ``SamplesGenerator._generate_vllm``): vLLM's engine
  needs a GPU here; the rollouts are given as vLLM would return them (token ids, action ranges,
  rewards).
- The PPO update (``PPOTrainer.ppo_train`` -> ``PolicyModelActor.fit``, a DeepSpeed training step)
  and so the reward moving over steps: DeepSpeed's engine on the GPU. The KL OpenRLHF logs
  (``Experience.info["kl"]``) and the shaped returns are computed here by OpenRLHF's own code;
  the launcher's run up to the first CUDA call is tests/openrlhf/test_launcher.py.
- ``flash_attn.ops.triton.cross_entropy`` (OpenRLHF's fast log-softmax): triton is not installed,
  and ``log_probs_from_logits`` falls back to its own torch code, as it does on any machine
  without triton.

Stubbed imports: see tests/openrlhf/conftest.py (``vllm`` and ``flash_attn_2_cuda``: imported at
module top, never called here; every use of a stub raises).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

TOLERANCE = 1e-5

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea and the wind that moves it:",
    "2 + 2 =",
]
N_SAMPLES = 2  # responses per prompt
RESPONSE_LENGTHS = [5, 11, 3, 8, 14, 6]  # ragged: right padding inside each micro-batch of 2
MULTI_TURN = 3  # this sample's response is action, observation (outside the action mask), action


def _run_arguments(model_dir, temperature: float, *extra: str) -> list[str]:
    return [
        "--actor.model_name_or_path", str(model_dir),
        "--actor.num_gpus_per_node", "1",
        "--rollout.temperature", str(temperature),
        "--rollout.batch_size", str(len(PROMPTS)),
        "--rollout.n_samples_per_prompt", str(N_SAMPLES),
        "--rollout.micro_batch_size", "2",
        "--algo.advantage.estimator", "group_norm",
        "--algo.kl.init_coef", "0.05",
        "--logger.wandb.run_name", "pytest-openrlhf",
        *extra,
    ]


def openrlhf_actor(model_dir, temperature: float):
    """``openrlhf.models.Actor`` on the float32 weights of `model_dir`, as ReferenceModelActor holds it."""
    from openrlhf.models import Actor
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.config.use_cache = False
    actor = Actor(model, temperature=temperature)
    actor.packing_samples = False  # what Actor sets when it loads a path itself (--ds.packing_samples off)
    return actor.eval()


def openrlhf_reference(actor, experience) -> torch.Tensor:
    """``ReferenceModelActor.forward`` on `experience`, without its move to a CUDA device."""
    with torch.no_grad():
        log_probs = actor(
            experience.sequences, experience.action_mask, experience.attention_mask,
            ring_attn_group=None, packed_seq_lens=None,
        )
    return log_probs.to("cpu")


def openrlhf_reference_row_by_row(actor, experience) -> torch.Tensor:
    """OpenRLHF's reference on each row alone, without its padding: the same values up to float32 rounding.

    How far this is from the batched values is the float32 noise of OpenRLHF's own reference
    (a batch's padding changes the attention kernels' summation order).
    """
    out = torch.zeros(experience.action_mask.shape, dtype=torch.float32)
    width = experience.sequences.shape[1]
    for row in range(len(experience.sequences)):
        length = int(experience.attention_mask[row].sum())  # right padding: the real tokens come first
        columns = experience.action_mask.shape[1] - (width - length)  # the actions of tokens 1..length-1
        with torch.no_grad():
            log_probs = actor(
                experience.sequences[row : row + 1, :length],
                experience.action_mask[row : row + 1, :columns],
                experience.attention_mask[row : row + 1, :length],
            )
        out[row, :columns] = log_probs[0]
    return out


def rollout_samples(strategy, tokenizer, seed: int = 0):
    """Six rollouts as OpenRLHF's SamplesGenerator makes them from vLLM's answers (ragged, one multi-turn)."""
    from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator

    generator = torch.Generator().manual_seed(seed)
    samples_generator = SamplesGenerator(strategy, None, None, tokenizer, vllm_engines=[])
    samples = []
    for number, length in enumerate(RESPONSE_LENGTHS):
        prompt = PROMPTS[number // N_SAMPLES]
        prompt_ids = tokenizer(prompt)["input_ids"]
        response = torch.randint(0, len(tokenizer), (length,), generator=generator).tolist()
        ranges = [(len(prompt_ids), len(prompt_ids) + length)]
        if number == MULTI_TURN:  # action, then a tool's observation (not an action), then action again
            observation = tokenizer(" [tool result: 42]")["input_ids"]
            second = torch.randint(0, len(tokenizer), (4,), generator=generator).tolist()
            ranges.append((ranges[0][1] + len(observation), ranges[0][1] + len(observation) + len(second)))
            response = response + observation + second
        answer = {
            "observation_tokens": prompt_ids + response,
            "action_ranges": ranges,
            "reward": float(torch.rand((), generator=generator)),
            "scores": None,
            "rollout_log_probs": None,
            "prompt": prompt,
            "label": "",
            "truncated": False,
            "extra_logs": {},
        }
        samples.append(samples_generator._process_response_into_experience(answer, max_len=strategy.args.data.max_len))
    return samples


@pytest.fixture(scope="module")
def policy_group(ray_cluster, policy_dir):
    """A real ``RayActorGroup`` whose Ray actor runs ``openrlhf.models.Actor`` (the policy) on CPU."""
    import ray
    from openrlhf.trainer.ray.launcher import BaseModelActor, RayActorGroup

    @ray.remote(num_gpus=0)
    class PolicyForward(BaseModelActor):
        """PolicyModelActor's forward without DeepSpeed and CUDA: the Actor's log-probs at the rollout temperature."""

        def init_model_from_pretrained(self, strategy, pretrain):
            from openrlhf.models import Actor
            from transformers import AutoModelForCausalLM

            self.strategy = strategy  # used by execute_batch (is_rank_0)
            model = AutoModelForCausalLM.from_pretrained(pretrain, dtype=torch.float32).eval()
            self.model = Actor(model, temperature=strategy.args.rollout.temperature)
            self.model.packing_samples = False

        def forward(self, sequences, action_mask=None, attention_mask=None, **unused):
            with torch.no_grad():
                return self.model(sequences, action_mask, attention_mask)

    group = RayActorGroup(1, 1, PolicyForward, num_gpus_per_actor=0)

    def init(strategy):
        ray.get(group.async_init_model_from_pretrained(strategy, str(policy_dir)))
        return group

    return init


@pytest.fixture(scope="module")
def model_dirs(tiny_dir, embedded_dir):
    return {"tiny": tiny_dir, "smol": embedded_dir}


def make_experiences(openrlhf_args, server, policy_group, model_dir, model_name, temperature, *extra):
    """OpenRLHF's make_experience with the served reference; returns (maker, experiences, strategy)."""
    from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
    from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController
    from openrlhf.utils import get_strategy, get_tokenizer

    from klservice_client.integrations.openrlhf import group_for_arguments, split_arguments

    args = openrlhf_args(*_run_arguments(model_dir, temperature, *extra))
    strategy = get_strategy(args)
    tokenizer = get_tokenizer(str(model_dir), None, "left", strategy)
    parsed, rest = split_arguments(["--klservice.target", server, "--klservice.model", model_name])
    assert rest == []
    reference = group_for_arguments(parsed, args)
    assert reference.options.temperature == temperature and reference.options.job_id == "pytest-openrlhf"
    assert reference.async_init_model_from_pretrained(strategy, str(model_dir)) == []  # waits, checks the tokenizer
    maker = RemoteExperienceMaker(
        policy_group(strategy), None, None, reference, FixedKLController(args.algo.kl.init_coef), strategy, tokenizer
    )
    samples = maker.split_rollout_samples(rollout_samples(strategy, tokenizer))
    return maker, maker.make_experience(samples), strategy


def assert_ragged(experiences) -> None:
    """The batch really has right padding and a gap in an action mask (else the test would prove less)."""
    padded = [bool((e.attention_mask == 0).any()) for e in experiences]
    assert sum(padded) >= 2, "expected right padding in most micro-batches"
    gaps = [
        bool(((row[:-1] == 0) & (row[1:] == 1)).sum() > 1)  # two runs of actions: one starts again
        for e in experiences for row in e.action_mask
    ]
    assert any(gaps), "expected a multi-turn sample with observation tokens inside its response"


@pytest.mark.parametrize("temperature", [1.0, 0.7], ids=["t1", "t0.7"])
@pytest.mark.parametrize("model_name", ["tiny", "smol"])
def test_base_action_log_probs_equal_openrlhfs_reference(
    openrlhf_args, server, policy_group, model_dirs, model_name, temperature
):
    """--algo.kl.use_loss keeps the reference in Experience.base_action_log_probs: it is OpenRLHF's own."""
    model_dir = model_dirs[model_name]
    _, experiences, _ = make_experiences(
        openrlhf_args, server, policy_group, model_dir, model_name, temperature,
        "--algo.kl.use_loss", "--algo.kl.estimator", "k3",
    )
    assert_ragged(experiences)
    actor = openrlhf_actor(model_dir, temperature)
    worst = own_noise = 0.0
    for experience in experiences:
        expected = openrlhf_reference(actor, experience)
        served = experience.base_action_log_probs
        assert served.dtype == torch.float32 and served.shape == expected.shape == experience.action_mask.shape
        assert (expected[experience.action_mask.bool()] != 0).all()  # real values where the mask is set
        worst = max(worst, (served - expected).abs().max().item())
        own_noise = max(own_noise, (openrlhf_reference_row_by_row(actor, experience) - expected).abs().max().item())
    print(
        f"[{model_name}, temperature {temperature}] max |served - OpenRLHF| = {worst:.3g}; "
        f"OpenRLHF row by row vs batched: {own_noise:.3g}"
    )
    assert worst <= max(TOLERANCE, 2 * own_noise)


def test_kl_in_reward_and_advantages_are_openrlhfs(openrlhf_args, server, policy_group, tiny_dir):
    """KL in the reward (the default): OpenRLHF's KL, its logged mean and its returns, from the served reference."""
    from openrlhf.models.utils import compute_approx_kl, masked_mean

    temperature = 0.7
    maker, experiences, strategy = make_experiences(openrlhf_args, server, policy_group, tiny_dir, "tiny", temperature)
    actor = openrlhf_actor(tiny_dir, temperature)
    own = copy.deepcopy(experiences)  # the same experiences, with the KL of OpenRLHF's own reference
    for served, expected in zip(experiences, own):
        assert served.base_action_log_probs is None  # OpenRLHF keeps it only for --algo.kl.use_loss
        reference = openrlhf_reference(actor, expected)
        expected.kl = compute_approx_kl(expected.action_log_probs, reference, kl_estimator=strategy.args.algo.kl.estimator)
        expected.info["kl"] = masked_mean(expected.kl, expected.action_mask, dim=-1)
        assert (served.kl - expected.kl).abs().max().item() <= TOLERANCE
        assert (served.info["kl"] - expected.info["kl"]).abs().max().item() <= TOLERANCE
        assert (served.info["kl"].abs() > 1e-3).all()  # the policy is another model: KL is far from 0

    zero_kl = copy.deepcopy(experiences)
    for experience in zero_kl:
        experience.kl = torch.zeros_like(experience.kl)
    experiences = maker.compute_advantages_and_returns(experiences)
    own = maker.compute_advantages_and_returns(own)
    zero_kl = maker.compute_advantages_and_returns(zero_kl)
    for served, expected, without in zip(experiences, own, zero_kl):
        assert (served.info["return"] - expected.info["return"]).abs().max().item() <= TOLERANCE
        assert (served.advantages - expected.advantages).abs().max().item() <= TOLERANCE
        assert (served.info["return"] - without.info["return"]).abs().min().item() > 1e-4  # the KL entered the reward
    logged = torch.cat([e.info["kl"] for e in experiences])
    print(f"KL logged per sample (info['kl']): {[round(v, 4) for v in logged.tolist()]}")


def test_the_group_travels_into_a_ray_worker(ray_cluster, server, openrlhf_args, tiny_dir):
    """Pickled into another process (as into OpenRLHF's trainer actor), the group makes its own client there."""
    import ray
    from openrlhf.trainer.ppo_utils.experience import Experience
    from openrlhf.utils import get_strategy, get_tokenizer

    from klservice_client.integrations.openrlhf import KLServiceOptions, ServedReferenceGroup

    args = openrlhf_args(*_run_arguments(tiny_dir, 1.0))
    strategy = get_strategy(args)
    samples = rollout_samples(strategy, get_tokenizer(str(tiny_dir), None, "left", strategy))[:2]
    batch = Experience.concat_experiences(samples, 0)
    group = ServedReferenceGroup(KLServiceOptions(server, job_id="pytest-openrlhf"), duplicate_actors=2)

    @ray.remote(num_cpus=0)
    def forward_elsewhere(group, batch):
        import os

        refs = group.async_run_method_batch(
            "forward", sequences=[batch.sequences], action_mask=[batch.action_mask], attention_mask=[batch.attention_mask]
        )
        return os.getpid(), ray.get(refs)

    pid, answers = ray.get(forward_elsewhere.remote(group, batch))
    assert pid != os.getpid()
    assert len(answers) == 2 and answers[0][0].shape == batch.action_mask.shape  # one answer per duplicate actor
    expected = openrlhf_reference(openrlhf_actor(tiny_dir, 1.0), batch)
    assert (answers[1][0] - expected).abs().max().item() <= TOLERANCE


def test_the_tokenizer_and_the_temperature_are_checked_at_start(ray_cluster, server, openrlhf_args, tiny_dir, tmp_path):
    """Where ReferenceModelActor would load --actor.model_name_or_path, the served group checks both."""
    from openrlhf.utils import get_strategy
    from transformers import AutoTokenizer

    from klservice_client.errors import TokenizerMismatch
    from klservice_client.integrations.openrlhf import KLServiceOptions, ServedReferenceGroup

    strategy = get_strategy(openrlhf_args(*_run_arguments(tiny_dir, 0.7)))
    other = AutoTokenizer.from_pretrained(tiny_dir)
    other.add_tokens(["<not-in-the-served-vocabulary>"])
    other.save_pretrained(tmp_path / "other-tokenizer")

    group = ServedReferenceGroup(KLServiceOptions(server, model="tiny", temperature=0.7))
    assert group.async_init_model_from_pretrained(strategy, str(tiny_dir)) == []
    with pytest.raises(TokenizerMismatch):
        group.async_init_model_from_pretrained(strategy, str(tmp_path / "other-tokenizer"))
    hot = ServedReferenceGroup(KLServiceOptions(server, model="tiny", temperature=1.0))
    with pytest.raises(ValueError, match="rollout.temperature"):
        hot.async_init_model_from_pretrained(strategy, str(tiny_dir))


def test_inputs_the_reference_cannot_score_are_refused():
    from klservice_client.integrations.openrlhf import KLServiceOptions, ServedReferenceGroup

    group = ServedReferenceGroup(KLServiceOptions("127.0.0.1:9"))  # never reached: refused before sending
    sequences = torch.tensor([[5, 6, 7, 8, 9]])
    with pytest.raises(ValueError, match="attention_mask is not one contiguous run"):
        group.async_run_method_batch(
            "forward", sequences=[sequences], attention_mask=[torch.tensor([[1, 1, 0, 1, 1]])],
            action_mask=[torch.tensor([[0, 1, 1, 1]])],
        )
    with pytest.raises(ValueError, match="action_mask marks token 4"):
        group.async_run_method_batch(
            "forward", sequences=[sequences], attention_mask=[torch.tensor([[1, 1, 1, 1, 0]])],
            action_mask=[torch.tensor([[0, 1, 1, 1]])],
        )
    with pytest.raises(NotImplementedError, match="mm_train_inputs_list"):
        group.async_run_method_batch(
            "forward", sequences=[sequences], attention_mask=[torch.ones(1, 5)], action_mask=[torch.ones(1, 4)],
            mm_train_inputs_list=[[{"pixel_values": torch.zeros(1)}]],
        )
    assert group.async_run_method("empty_cache") == []
    with pytest.raises(NotImplementedError, match="'fit'"):
        group.async_run_method("fit")
