"""OpenRLHF's PPO trainer (``openrlhf.cli.train_ppo_ray``) with its reference model served by klservice.

Install with ``pip install 'klservice-client[openrlhf]'`` next to OpenRLHF 0.11.2 (``make
install-openrlhf`` shows the whole recipe). Run OpenRLHF as usual, through this module instead of
``openrlhf.cli.train_ppo_ray``, with the ``--klservice.*`` options added::

    python -m klservice_client.integrations.openrlhf \\
        <train_ppo_ray's own arguments, unchanged> \\
        --klservice.target klservice.internal:50051 \\
        --klservice.job_id ppo-run-7          # optional: default --logger.wandb.run_name

The launcher runs ``train_ppo_ray`` itself (its argument parser, checks and ``train()``), with
one change: where ``train()`` builds the reference model's ``RayActorGroup`` of
``ReferenceModelActor`` (when ``--algo.kl.init_coef > 0``) it gets a `ServedReferenceGroup`
instead. No reference actor is created, so no GPU is reserved for it (``--ref.num_nodes``,
``--ref.num_gpus_per_node`` and ``--ref.offload`` are unused) and no copy of the weights is
loaded. The group is handed to OpenRLHF's ``PPOTrainer`` like the one it replaces;
``RemoteExperienceMaker.make_experience`` calls its ``async_run_method_batch("forward",
sequences=..., action_mask=..., attention_mask=...)`` and gets, per micro-batch
(``Experience``), the ``[batch, A]`` float32 reference log-probs OpenRLHF's own reference
returns: ``log_probs[:, :-1][:, -A:] * action_mask`` at ``--rollout.temperature``, where
``log_probs[:, t]`` is the log-prob of token ``t + 1`` after tokens ``0..t`` and
``A = action_mask.shape[1]``. Each row is sent with its real tokens only (the positions where
``attention_mask`` is 1: OpenRLHF pads on the right), scored from its first action token on;
positions the action mask leaves out (padding, the prompt, the observations of a multi-turn
agent) are 0, as OpenRLHF's are. Everything downstream is OpenRLHF's: with KL in the reward
(the default) ``compute_approx_kl`` with ``--algo.kl.estimator`` and ``compute_reward`` with the
KL controller's coefficient; with ``--algo.kl.use_loss`` the log-probs stay in
``Experience.base_action_log_probs`` for the actor's KL loss.

The ``--klservice.*`` options (all optional except ``target``):

- ``--klservice.target``: the server, ``host:port`` or any gRPC target.
- ``--klservice.job_id``: the server's job id (fairness key, metric label); default
  ``--logger.wandb.run_name`` (OpenRLHF's run name, also when wandb is off).
- ``--klservice.model``: the served model that is the reference (default: the server's default).
- ``--klservice.token``: bearer token (default: the KLSERVICE_TOKEN environment variable).
- ``--klservice.tls``: connect over TLS with the system's CA roots.
- ``--klservice.root_certificates``: CA bundle (a path) the server's certificate must chain to.
- ``--klservice.client_cert`` and ``--klservice.client_key``: client certificate and key (mutual TLS).
- ``--klservice.tls_server_name``: the name to check the server's certificate against.
- ``--klservice.timeout``: deadline of one call in seconds (default 300).
- ``--klservice.no_check_tokenizer``: skip the tokenizer check.

At start, where the reference would load ``--actor.model_name_or_path``, the group waits for the
server and checks that this checkpoint's tokenizer is the served model's
(`klservice_client.TokenizerMismatch` otherwise). The server must serve the weights OpenRLHF
would have loaded as the reference: the policy's initial checkpoint (``--actor.model_name_or_path``;
under LoRA the base model).

The group is picklable (it holds the options, never a channel): a `KLClient` is made on first
use in each process that scores, i.e. in OpenRLHF's trainer actor. Scoring runs in that process
when ``make_experience`` dispatches the reference, after the actor, critic and reward forwards
were dispatched, so they run meanwhile; the result is put into Ray's object store, and the refs
come back as a ``RayActorGroup``'s do (one per duplicate actor of a ring-attention or tensor
parallel group, ``--ds.ring_attn_size`` x ``--ds.tensor_parallel_size``).

Limits: text only (multimodal inputs, ``mm_train_inputs_list``, are refused with an error);
each row's real tokens must be one contiguous run (as OpenRLHF's right padding leaves them) and
its action tokens must follow at least one token of context. ``--train.async_enable`` hands the
group to the async trainer the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import runpy
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from klservice_client.client import KLClient
from klservice_client.integrations._connection import ServerConnection

__all__ = [
    "KLServiceOptions", "ServedReferenceGroup", "group_for_arguments", "main", "served_reference", "served_reference_log_probs",
    "split_arguments",
]

logger = logging.getLogger(__name__)

#: The module whose command line and ``train()`` the launcher runs.
TRAIN_MODULE = "openrlhf.cli.train_ppo_ray"

#: Methods OpenRLHF's trainer calls on a model group to manage GPU memory: nothing to do here.
_NO_OP_METHODS = ("empty_cache", "offload_states", "reload_states")


@dataclasses.dataclass(frozen=True)
class KLServiceOptions(ServerConnection):
    """How to reach the server, and what to ask it: everything a `ServedReferenceGroup` carries.

    `temperature`: OpenRLHF's ``--rollout.temperature`` (its reference divides logits by it).
    """

    temperature: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if not self.temperature > 0:
            raise ValueError(f"rollout.temperature: {self.temperature} (must be > 0)")


def _rows(sequences, attention_mask, action_mask, where: str):
    """Per row of one micro-batch: (real tokens, their first position, action columns), checked.

    Column j of the ``[B, A]`` output is the log-prob of token ``T - A + j``.
    """
    import torch

    sequences, attention_mask, action_mask = (torch.as_tensor(t).cpu() for t in (sequences, attention_mask, action_mask))
    if sequences.dim() != 2:
        raise ValueError(f"{where}: sequences must be [batch, T], got shape {tuple(sequences.shape)}")
    batch, width = sequences.shape
    if attention_mask.shape != sequences.shape:
        raise ValueError(
            f"{where}: attention_mask has shape {tuple(attention_mask.shape)}, sequences {tuple(sequences.shape)}"
        )
    if action_mask.dim() != 2 or action_mask.shape[0] != batch or not 0 < action_mask.shape[1] <= width - 1:
        raise ValueError(
            f"{where}: action_mask must be [batch, A] with 0 < A <= T - 1 = {width - 1}, got shape "
            f"{tuple(action_mask.shape)}"
        )
    first_column_token = width - action_mask.shape[1]
    rows = []
    for row in range(batch):
        real = torch.nonzero(attention_mask[row]).flatten()
        actions = torch.nonzero(action_mask[row]).flatten() + first_column_token  # token positions
        if actions.numel() == 0:
            rows.append(None)  # nothing to score: the row stays 0
            continue
        if real.numel() == 0:
            raise ValueError(f"{where}: row {row}: action_mask marks tokens of a row without real tokens (attention_mask 0)")
        start, end = int(real[0]), int(real[-1]) + 1
        if real.numel() != end - start:
            raise ValueError(
                f"{where}: row {row}: attention_mask is not one contiguous run of real tokens (OpenRLHF pads on "
                "the right); the served reference scores real tokens only"
            )
        outside = actions[(actions <= start) | (actions >= end)]
        if outside.numel():
            raise ValueError(
                f"{where}: row {row}: action_mask marks token {int(outside[0])}, outside tokens {start + 1}..{end - 1} "
                "(an action follows at least one real token and comes before the padding)"
            )
        rows.append((sequences[row, start:end].numpy(), start, int(actions[0])))
    return rows, first_column_token


def served_reference_log_probs(
    client: KLClient, batches: Sequence[tuple[Any, Any, Any]], temperature: float = 1.0
) -> list:
    """OpenRLHF's reference output for each micro-batch ``(sequences, attention_mask, action_mask)``.

    Each result is ``[B, A]`` float32 on the CPU, ``log_probs[:, :-1][:, -A:] * action_mask`` as
    ``ReferenceModelActor.forward`` returns it; all rows of all micro-batches go in one `KLClient.score`.
    """
    import torch

    plans, sequences, prompt_lengths = [], [], []
    for number, (tokens, attention_mask, action_mask) in enumerate(batches):
        rows, first_column_token = _rows(tokens, attention_mask, action_mask, f"micro-batch {number}")
        plans.append((rows, first_column_token, torch.as_tensor(action_mask).cpu()))
        for row in rows:
            if row is not None:
                real, start, first_action = row
                sequences.append(real)
                prompt_lengths.append(first_action - start)
    scored = iter(())
    if sequences:
        output = client.score(sequences, prompt_lengths, temperature=temperature)
        scored = iter(output.ragged("ref_logprobs"))
    results = []
    for rows, first_column_token, action_mask in plans:
        out = torch.zeros(action_mask.shape, dtype=torch.float32)
        for row, entry in enumerate(rows):
            if entry is None:
                continue
            real, start, first_action = entry
            values = torch.as_tensor(np.asarray(next(scored)), dtype=torch.float32)  # tokens first_action..end-1
            column = first_action - first_column_token
            out[row, column : column + values.numel()] = values
        results.append(out * action_mask.float())
    return results


class ServedReferenceGroup:
    """Stands where OpenRLHF's reference ``RayActorGroup`` (of ``ReferenceModelActor``) stands.

    It offers what OpenRLHF calls on that group: ``async_init_model_from_pretrained(strategy,
    pretrain)`` (here: wait for the server, check the tokenizer and the temperature),
    ``async_run_method_batch("forward", ...)`` (the served log-probs, as Ray object refs) and
    ``async_run_method`` for the memory calls (``empty_cache``, ...; nothing to free here).
    `duplicate_actors`: the ring-attention x tensor-parallel factor OpenRLHF deduplicates by.
    """

    def __init__(self, options: KLServiceOptions, *, duplicate_actors: int = 1, check_tokenizer: bool = True):
        if duplicate_actors < 1:
            raise ValueError(f"duplicate_actors: {duplicate_actors} (must be >= 1)")
        self.options = options
        self.duplicate_actors = duplicate_actors
        self.check_tokenizer = check_tokenizer
        self._client: KLClient | None = None  # made on first use in each process (a channel does not pickle)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None}

    def client(self) -> KLClient:
        """This process's client (made on first use, then reused)."""
        if self._client is None:
            self._client = self.options.client()
        return self._client

    def __repr__(self) -> str:
        return f"ServedReferenceGroup({self.options!r})"

    def async_init_model_from_pretrained(self, strategy, pretrain: str, *args, **kwargs) -> list:
        """Where the reference loads `pretrain`: the server answers and serves `pretrain`'s tokenizer."""
        temperature = float(strategy.args.rollout.temperature)
        if temperature != self.options.temperature:
            raise ValueError(
                f"rollout.temperature: the trainer samples at {temperature}, the served reference group was made "
                f"for {self.options.temperature}: the reference log-probs must be at the generation temperature"
            )
        client = self.client()
        info = client.wait_ready(timeout=self.options.timeout)
        if self.check_tokenizer:
            from transformers import AutoTokenizer

            client.check_tokenizer(AutoTokenizer.from_pretrained(pretrain, trust_remote_code=True))
        logger.info("reference served by klservice at %s: %s (revision %s)", self.options.target, info.name,
                    info.revision[:12])
        return []

    def async_run_method_batch(self, method_name: str, **kwargs) -> list:
        """``forward`` on every micro-batch: ``kwargs`` are lists with one entry per ``Experience``."""
        import ray

        if method_name != "forward":
            raise NotImplementedError(f"method_name: {method_name!r}: the served reference runs 'forward' only")
        # One list per micro-batch, one entry per sample: None for a text-only sample (OpenRLHF sends the lists
        # whenever they are non-empty, i.e. also when every entry is None).
        if any(inputs is not None for per_batch in kwargs.get("mm_train_inputs_list") or () for inputs in per_batch or ()):
            raise NotImplementedError("mm_train_inputs_list: multimodal inputs; klservice scores token sequences only")
        missing = [name for name in ("sequences", "attention_mask", "action_mask") if kwargs.get(name) is None]
        if missing:
            raise ValueError(f"{', '.join(missing)}: the served reference needs sequences, attention_mask, action_mask")
        sequences, attention_mask, action_mask = kwargs["sequences"], kwargs["attention_mask"], kwargs["action_mask"]
        for name in ("attention_mask", "action_mask"):
            if len(kwargs[name]) != len(sequences):
                raise ValueError(f"{name} has length {len(kwargs[name])}, expected {len(sequences)}")
        results = served_reference_log_probs(
            self.client(), list(zip(sequences, attention_mask, action_mask)), self.options.temperature
        )
        # A RayActorGroup returns one ref per actor, each with the results of its chunk; the duplicates of a
        # ring / tensor-parallel group answer the same chunk. One chunk here, answered `duplicate_actors` times.
        return [ray.put(results)] * self.duplicate_actors

    def async_run_method(self, method_name: str, *args, **kwargs) -> list:
        if method_name in _NO_OP_METHODS:
            return []
        raise NotImplementedError(f"method_name: {method_name!r} is not something a served reference does")

    def async_save_model(self) -> list:
        return []  # the reference is frozen: nothing to save


# --- the launcher ---------------------------------------------------------------------------------


def _options_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m klservice_client.integrations.openrlhf",
        description="openrlhf.cli.train_ppo_ray with its reference model served by klservice; every other "
        "argument is train_ppo_ray's own.",
        allow_abbrev=False,
        add_help=False,
    )
    group = parser.add_argument_group("klservice")
    group.add_argument("--klservice.target", dest="target", required=True)
    group.add_argument("--klservice.job_id", dest="job_id", default=None)
    group.add_argument("--klservice.model", dest="model", default="")
    group.add_argument("--klservice.token", dest="token", default=None)
    group.add_argument("--klservice.tls", dest="tls", action="store_true")
    group.add_argument("--klservice.root_certificates", dest="root_certificates", default=None)
    group.add_argument("--klservice.client_cert", dest="client_cert", default=None)
    group.add_argument("--klservice.client_key", dest="client_key", default=None)
    group.add_argument("--klservice.tls_server_name", dest="tls_server_name", default=None)
    group.add_argument("--klservice.timeout", dest="timeout", type=float, default=300.0)
    group.add_argument("--klservice.no_check_tokenizer", dest="check_tokenizer", action="store_false")
    return parser


def split_arguments(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """(the ``--klservice.*`` options, train_ppo_ray's own arguments)."""
    if any(arg in ("-h", "--help") for arg in argv):
        _options_parser().print_help()
        print("\ntrain_ppo_ray's own arguments follow.\n")
        return argparse.Namespace(help=True), list(argv)
    ours, rest = _options_parser().parse_known_args(list(argv))
    unknown = [arg for arg in rest if arg.startswith("--klservice.")]
    if unknown:
        raise SystemExit(f"unknown klservice option(s): {', '.join(unknown)}")
    return ours, rest


def group_for_arguments(parsed: argparse.Namespace, args) -> ServedReferenceGroup:
    """The served group for train_ppo_ray's parsed arguments `args`."""
    options = KLServiceOptions(
        target=parsed.target,
        job_id=parsed.job_id or args.logger.wandb.run_name,
        model=parsed.model,
        temperature=float(args.rollout.temperature),
        token=parsed.token,
        tls=parsed.tls,
        root_certificates=parsed.root_certificates,
        client_cert=parsed.client_cert,
        client_key=parsed.client_key,
        tls_server_name=parsed.tls_server_name,
        timeout=parsed.timeout,
    )
    return ServedReferenceGroup(
        options,
        duplicate_actors=args.ds.ring_attn_size * args.ds.tensor_parallel_size,
        check_tokenizer=parsed.check_tokenizer,
    )


@contextlib.contextmanager
def served_reference(parsed: argparse.Namespace) -> Iterator[list[ServedReferenceGroup]]:
    """While active, a fresh run of train_ppo_ray builds a `ServedReferenceGroup` instead of its reference group.

    train_ppo_ray imports ``get_strategy`` and ``RayActorGroup`` by name when it runs: ``train()``
    calls ``get_strategy(args)`` first (where this reads the parsed arguments), then
    ``RayActorGroup(..., ReferenceModelActor, ...)`` (where this returns the served group). The
    modules that import ``RayActorGroup`` for their annotations are imported before, unchanged.
    Yields the list the groups built go into.
    """
    import openrlhf.trainer.ppo_trainer  # noqa: F401 - imported before the patch, with the real names
    import openrlhf.trainer.ppo_trainer_async  # noqa: F401
    import openrlhf.trainer.ray.ppo_actor  # noqa: F401
    import openrlhf.trainer.ray.ppo_critic  # noqa: F401
    import openrlhf.utils as utils
    from openrlhf.trainer.ray import launcher

    real_group, real_get_strategy = launcher.RayActorGroup, utils.get_strategy
    seen: dict[str, Any] = {}
    built: list[ServedReferenceGroup] = []

    def get_strategy(args):
        seen["args"] = args
        return real_get_strategy(args)

    def actor_group(num_nodes, num_gpus_per_node, ray_actor_type, *rest, **kwargs):
        if ray_actor_type is launcher.ReferenceModelActor:
            if "args" not in seen:
                raise RuntimeError("train_ppo_ray built its reference group before calling get_strategy(args)")
            group = group_for_arguments(parsed, seen["args"])
            built.append(group)
            logger.info("no ReferenceModelActor group: the reference is served by klservice at %s", parsed.target)
            return group
        return real_group(num_nodes, num_gpus_per_node, ray_actor_type, *rest, **kwargs)

    launcher.RayActorGroup, utils.get_strategy = actor_group, get_strategy
    try:
        yield built
    finally:
        launcher.RayActorGroup, utils.get_strategy = real_group, real_get_strategy


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m klservice_client.integrations.openrlhf <train_ppo_ray arguments> --klservice.target ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parsed, rest = split_arguments(argv)
    saved = sys.argv
    sys.argv = [TRAIN_MODULE] + rest
    try:
        if getattr(parsed, "help", False):
            runpy.run_module(TRAIN_MODULE, run_name="__main__", alter_sys=True)
            return
        with served_reference(parsed):
            runpy.run_module(TRAIN_MODULE, run_name="__main__", alter_sys=True)
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
