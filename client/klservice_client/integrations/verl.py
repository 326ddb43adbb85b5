"""verl's PPO/GRPO trainer with its reference model served by klservice.

Install with ``pip install 'klservice-client[verl]'`` (verl 0.9.1, its V1 trainer). Run verl
as usual, through this module instead of ``verl.trainer.main_ppo``, with one config group
more::

    python -m klservice_client.integrations.verl \\
        <verl's own Hydra arguments, unchanged> \\
        +klservice.target=klservice.internal:50051 \\
        +klservice.job_id=grpo-run-7            # optional: default trainer.experiment_name

The trainer then builds no reference worker: the actor worker group is created as
``actor_rollout`` instead of ``actor_rollout_ref`` (no ``Role.RefPolicy`` either), so no copy
of the reference weights is loaded, sharded or offloaded on the training GPUs. Where verl's
trainer computed ``ref_log_prob`` (``PPOTrainer._compute_ref_log_prob``, step 5 of each
training step) it is filled from `KLClient.score` instead: every sample's real tokens
(``input_ids`` = prompt + response, unpadded, as verl keeps them in TransferQueue) are sent
with its prompt length, at ``actor_rollout_ref.rollout.temperature`` (verl divides the
reference's logits by it too), and the answer is written back to TransferQueue as
``ref_log_prob``, one value per response token. Tokens masked out of the loss
(``response_mask`` 0, e.g. tool outputs of a multi-turn rollout) are scored too, as verl's
own reference scores them. Everything downstream is verl's: ``algorithm.use_kl_in_reward``
(``apply_kl_penalty`` with ``algorithm.kl_penalty``) and ``actor.use_kl_loss`` with
``kl_loss_type`` read ``ref_log_prob`` as they always do.

The ``klservice`` group (all keys optional except ``target``):

- ``target``: the server, ``host:port`` or any gRPC target.
- ``job_id``: the server's job id (fairness key, metric label); default ``trainer.experiment_name``.
- ``model``: the served model that is the reference (default: the server's default model).
- ``token``: bearer token (default: the KLSERVICE_TOKEN environment variable of the trainer process).
- ``tls``: connect over TLS with the system's CA roots.
- ``root_certificates``: CA bundle (a path) the server's certificate must chain to; implies TLS.
- ``client_cert`` and ``client_key``: paths of a client certificate and its key (mutual TLS).
- ``tls_server_name``: the name to check the server's certificate against.
- ``timeout``: deadline of one call in seconds (default 300).
- ``check_tokenizer``: refuse to start unless the trainer's tokenizer is the served model's
  (default true; `klservice_client.TokenizerMismatch`).

The server must serve the weights verl would have loaded as the reference: the policy's
initial checkpoint (``actor_rollout_ref.model.path``). With LoRA verl's reference is the base
model without the adapter; serve the base model.

**Coefficient mode** (``kl_spec=``, the exact KL gradient of a preset, as
`klservice_client.integrations.trl` offers) is not available for verl: verl 0.9.1 has no
registered hook for its KL loss. Its policy losses have a registry
(``core_algos.register_policy_loss``), but the KL term is added inside
``verl.workers.utils.losses.ppo_loss`` by a direct call to ``core_algos.kl_penalty``, and the
only way to change it is to replace the whole loss function of the actor worker
(``set_loss_fn``). This integration serves the reference only.

Limits: the V1 trainer only (``trainer.use_v1=true``, verl's default); multimodal batches
(``multi_modal_inputs`` with images, videos or audio) are refused with an error, since
klservice scores token sequences only; a sample needs at least one prompt token.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from klservice_client.client import KLClient
from klservice_client.integrations._connection import ServerConnection

__all__ = [
    "KLServiceSettings",
    "MultimodalInputsRefused",
    "served_reference_log_probs",
    "served_trainer_class",
    "main",
]

logger = logging.getLogger(__name__)

#: The config group this integration reads (``+klservice.<key>=...`` on verl's command line).
CONFIG_GROUP = "klservice"


class MultimodalInputsRefused(ValueError):
    """A batch holds images, videos or audio: klservice scores token sequences only."""


@dataclasses.dataclass(frozen=True)
class KLServiceSettings(ServerConnection):
    """The ``klservice`` config group: where the reference is served, how to reach it, and whether the
    tokenizer is checked against the served model at start."""

    check_tokenizer: bool = True

    @classmethod
    def from_config(cls, config: Any) -> "KLServiceSettings":
        """Read the ``klservice`` group of a verl config (an OmegaConf DictConfig or a mapping).

        Raises ValueError naming the key when the group is missing, holds an unknown key, or a
        value does not fit.
        """
        group = config.get(CONFIG_GROUP) if hasattr(config, "get") else None
        if group is None:
            raise ValueError(
                f"{CONFIG_GROUP}.target: required: add +{CONFIG_GROUP}.target=HOST:PORT to verl's arguments"
            )
        values = dict(group.items()) if hasattr(group, "items") else None
        if values is None:
            raise ValueError(f"{CONFIG_GROUP}: expected a group of keys, got {group!r}")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{CONFIG_GROUP}.{unknown[0]}: unknown key; the keys are {', '.join(sorted(known))}")
        for key in ("job_id", "model", "token", "root_certificates", "client_cert", "client_key", "tls_server_name"):
            value = values.get(key)
            if value is not None and not isinstance(value, str):
                values[key] = str(value)  # e.g. a job id Hydra parsed as a number
        for key in ("tls", "check_tokenizer"):
            if key in values and not isinstance(values[key], bool):
                raise ValueError(f"{CONFIG_GROUP}.{key}: expected true or false, got {values[key]!r}")
        values["target"] = values.get("target")
        values["model"] = values.get("model") or ""
        return cls(**values)


def _has_media(value: Any) -> bool:
    """Whether one sample's ``multi_modal_inputs`` holds anything (verl stores {} for a text sample)."""
    if value is None:
        return False
    if isinstance(value, Mapping):
        return any(item is not None for item in value.values())
    data = getattr(value, "data", value)  # tensordict's NonTensorData wraps the dict
    if isinstance(data, Mapping):
        return any(item is not None for item in data.values())
    return bool(data)


def refuse_multimodal(multi_modal_inputs: Sequence[Any] | None) -> None:
    """Raise `MultimodalInputsRefused` when any sample carries multimodal inputs."""
    if multi_modal_inputs is None:
        return
    for index, value in enumerate(multi_modal_inputs):
        if _has_media(value):
            keys = sorted(getattr(value, "data", value).keys()) if isinstance(getattr(value, "data", value), Mapping) else []
            raise MultimodalInputsRefused(
                f"multi_modal_inputs of sample {index} ({', '.join(keys) or 'non-empty'}): klservice scores token "
                "sequences only; images, videos and audio cannot be scored by the served reference"
            )


def served_reference_log_probs(
    client: KLClient,
    input_ids: Sequence[Any],
    response_lengths: Sequence[int],
    *,
    temperature: float,
    model: str | None = None,
) -> list[np.ndarray]:
    """Reference log-probs of each sample's response tokens, as verl's ``ref_log_prob`` holds them.

    `input_ids`: one unpadded token sequence per sample (prompt + response); `response_lengths`:
    the response's length in each (its ``response_mask`` length). Returns one float32 array of
    that length per sample: ``log softmax(logits / temperature)`` of each response token given
    everything before it, for every response token (also those ``response_mask`` leaves out).
    """
    sequences = [np.asarray(ids, dtype=np.int64).reshape(-1) for ids in input_ids]
    lengths = [int(length) for length in response_lengths]
    if len(sequences) != len(lengths):
        raise ValueError(f"response_lengths: {len(lengths)} lengths for {len(sequences)} sequences")
    prompt_lengths = []
    for index, (sequence, length) in enumerate(zip(sequences, lengths)):
        if not 0 <= length < len(sequence):
            raise ValueError(
                f"sample {index}: a response of {length} tokens in a sequence of {len(sequence)} leaves no prompt "
                "token; the reference cannot score a first token without context"
            )
        prompt_lengths.append(len(sequence) - length)
    if not sequences:
        return []
    out = client.score(sequences, prompt_lengths, temperature=temperature, model=model)
    values = np.asarray(out.ref_logprobs, dtype=np.float32)
    return np.split(values, np.cumsum(lengths)[:-1])


class _ServedReferenceTrainer:
    """Mixed into a verl V1 ``PPOTrainer`` class: no reference worker, ``ref_log_prob`` from klservice.

    Reads the ``klservice`` config group (see the module docstring). Built by `served_trainer_class`.
    """

    kl_client: KLClient | None = None
    klservice: KLServiceSettings

    def _setup(self):
        # verl's _setup builds a reference worker group (Role.RefPolicy, for trainers whose actor is Role.Actor)
        # while use_reference_policy is set: it is not set meanwhile. Reference log-probs are still computed, here.
        served = self.use_reference_policy
        self.use_reference_policy = False
        try:
            super()._setup()
        finally:
            self.use_reference_policy = served
        self.ref_policy_wg = self.actor_rollout_wg  # as verl aliases it when the actor holds the reference (profiling)

    def _needs_reference(self) -> bool:
        from verl.trainer.ppo.utils import need_reference_policy

        return need_reference_policy(self.config)

    def _init_tokenizer(self):
        super()._init_tokenizer()
        # Before any worker is built: a wrong server, token or tokenizer fails the start within seconds.
        self.klservice = KLServiceSettings.from_config(self.config)
        if self._needs_reference():
            self.kl_client = self.klservice.client(default_job_id=self.config.trainer.get("experiment_name"))
            info = self.kl_client.wait_ready(timeout=self.klservice.timeout)
            if self.klservice.check_tokenizer:
                self.kl_client.check_tokenizer(self.tokenizer)
            logger.info("klservice: reference %s (revision %s) at %s", info.name, info.revision[:12],
                        self.klservice.target)

    def _init_resource_pool_mgr(self):
        super()._init_resource_pool_mgr()
        from verl.trainer.ppo.utils import Role

        # verl maps the actor to ActorRolloutRef (or adds a RefPolicy) whenever KL is on: the worker then loads a
        # reference model. Here the reference is served, so the actor is built as plain ActorRollout / Actor.
        mapping = self.role_worker_mapping
        if Role.ActorRolloutRef in mapping:
            mapping[Role.ActorRollout] = mapping.pop(Role.ActorRolloutRef)
            self.mapping[Role.ActorRollout] = self.mapping.pop(Role.ActorRolloutRef)
        if Role.RefPolicy in mapping:
            del mapping[Role.RefPolicy]
            self.mapping.pop(Role.RefPolicy, None)
        self.resource_pool_manager.mapping = self.mapping

    def _compute_ref_log_prob(self, batch, metrics: dict):
        """verl's step 5: ``ref_log_prob`` of every sample of `batch` (a ``KVBatchMeta``), from the service."""
        import torch
        import transfer_queue as tq
        from tensordict import TensorDict

        started = time.perf_counter()
        fields = ["input_ids", "response_mask"]
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        multi_modal = _optional_field(tq, batch, "multi_modal_inputs")
        refuse_multimodal(multi_modal)
        input_ids = data["input_ids"].unbind(0)
        response_lengths = data["response_mask"].offsets().diff().tolist()
        values = served_reference_log_probs(
            self.kl_client, [ids.numpy() for ids in input_ids], response_lengths,
            temperature=self.config.actor_rollout_ref.rollout.temperature,
        )
        ref = torch.nested.as_nested_tensor([torch.from_numpy(v) for v in values], layout=torch.jagged)
        tq.kv_batch_put(
            keys=batch.keys, partition_id=batch.partition_id,
            fields=TensorDict({"ref_log_prob": ref}, batch_size=[len(values)]),
        )
        metrics["klservice/reference_seconds"] = time.perf_counter() - started
        return batch


def _optional_field(tq, batch, name: str):
    """A per-sample field of `batch` from TransferQueue, or None when the samples do not have it."""
    try:
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=[name])
    except (KeyError, ValueError, RuntimeError):  # the field was never put
        return None
    if name not in data.keys():
        return None
    value = data[name]
    return value.tolist() if hasattr(value, "tolist") else list(value)


_SERVED_CLASSES: dict[type, type] = {}


def served_trainer_class(base: type) -> type:
    """`base` (a verl V1 ``PPOTrainer`` subclass, e.g. ``PPOTrainerSync``) with its reference served by klservice.

    Not registered under a trainer mode of its own: verl compares the mode name (``trainer_mode != "sync"``),
    so the subclass keeps the mode of the class it extends.
    """
    if base not in _SERVED_CLASSES:
        _SERVED_CLASSES[base] = type(f"KLService{base.__name__}", (_ServedReferenceTrainer, base), {
            "__doc__": f"verl's {base.__name__} with its reference model served by klservice.",
            "__module__": __name__,
        })
    return _SERVED_CLASSES[base]


class KLServiceTaskRunner:
    """verl's ``TaskRunnerV1`` (run in a Ray actor) with the trainer class of `served_trainer_class`."""

    def __init__(self):
        self.config = None
        self.trainer = None
        self.agent_loop_manager = None

    def init_agent_loop_manager(self):
        from verl.trainer.main_ppo import TaskRunnerV1

        runner_cls = TaskRunnerV1.__ray_metadata__.modified_class
        runner_cls.init_agent_loop_manager(self)

    def run(self, config):
        """What ``TaskRunnerV1.run`` does, with the served-reference trainer."""
        from pprint import pprint

        import transfer_queue as tq
        from omegaconf import OmegaConf

        from verl.trainer.ppo.v1 import get_trainer_cls
        from verl.utils.logging_utils import configure_verl_logging

        configure_verl_logging()
        trainer_cls = served_trainer_class(get_trainer_cls(config.trainer.v1.trainer_mode))
        config.transfer_queue.enable = True
        pprint(OmegaConf.to_container(config, resolve=True))
        OmegaConf.resolve(config)
        self.config = config
        tq.init(config.transfer_queue)
        succeeded = False
        try:
            self.trainer = trainer_cls(config=config)
            self.trainer.init()
            self.init_agent_loop_manager()
            self.trainer.fit(self.agent_loop_manager)
            succeeded = True
        finally:
            try:
                tracking = getattr(self.trainer, "logger", None)
                if tracking is not None:
                    tracking.finish(exit_code=0 if succeeded else 1)
            finally:
                tq.close()


def check_config(config) -> KLServiceSettings:
    """Refuse, naming the key, a verl config this integration cannot run; returns the ``klservice`` settings."""
    settings = KLServiceSettings.from_config(config)
    if not config.trainer.get("use_v1", True):
        raise ValueError(
            "trainer.use_v1: false selects verl's legacy trainer; klservice serves the reference of the V1 "
            "trainer (verl's default): drop trainer.use_v1=false"
        )
    return settings


def run(config) -> None:
    """Run verl's PPO/GRPO training on `config` (verl's composed Hydra config) with the served reference."""
    import ray

    from verl.trainer.main_ppo import run_ppo
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    check_config(config)
    auto_set_device(config)
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    if not need_reference_policy(config):
        logger.warning("klservice: neither algorithm.use_kl_in_reward nor actor.use_kl_loss is on: no reference "
                       "log-probs are needed, the server is not called")
    run_ppo(config, task_runner_class=ray.remote(num_cpus=1)(KLServiceTaskRunner))


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m klservice_client.integrations.verl <verl's Hydra arguments> +klservice.target=HOST:PORT``."""
    import os
    import sys

    import hydra

    import verl.trainer.main_ppo as main_ppo

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    config_dir = os.path.join(os.path.dirname(main_ppo.__file__), "config")
    hydra.main(config_path=config_dir, config_name="ppo_trainer", version_base=None)(run)()


if __name__ == "__main__":
    main()
