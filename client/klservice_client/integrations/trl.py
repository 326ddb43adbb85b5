"""TRL's `GRPOTrainer` with its reference model in klservice.

Install with ``pip install 'klservice-client[trl]'`` (TRL >= 1.16). The trainer process loads
no reference model: TRL's reference log-probs come from a klservice server, which many
training jobs can share. Example::

    from trl import GRPOConfig
    from klservice_client.integrations.trl import KLServiceGRPOTrainer

    trainer = KLServiceGRPOTrainer(
        model="/models/SmolLM2-135M-Instruct",
        reward_funcs=my_reward,
        args=GRPOConfig(output_dir="out", beta=0.04, run_name="grpo-run-7"),
        train_dataset=dataset,
        klservice="klservice.internal:50051",   # or a KLClient
        kl_spec="principled",                    # optional: see "Coefficient mode"
    )
    trainer.train()

**Reference mode** (``kl_spec=None``, the default). ``GRPOConfig.beta`` and
``use_bias_correction_kl`` keep their TRL meaning and TRL's KL formula applies unchanged;
only ``ref_per_token_logps`` comes from the service instead of a local copy of the model.
Each sequence is sent with its real tokens only (left padding of the prompt and right
padding of the completion stripped), at TRL's generation temperature (TRL scales its own
reference by it too). Completions masked by ``mask_truncated_completions`` are not sent;
their reference log-probs stay 0, as TRL's are. The server must serve the weights TRL would
have loaded as the reference (the policy's initial checkpoint, or the base model under
PEFT).

**Coefficient mode** (``kl_spec=`` a preset name of `klservice_client.kl.PRESETS` or a
`klservice_client.kl.KLSpec`). TRL's own KL term is replaced by the surrogate
``beta * normalise(stopgrad(c) * logp)``, whose gradient is exactly ``beta * c * grad(logp)``
for the service's coefficient ``c`` of that spec, normalised as TRL normalises its loss for
the configured ``loss_type`` (``grpo``/``sapo``: mean over each sequence, then over
sequences; ``bnpo``: mean over tokens; ``dr_grpo``: over batch size x max completion length;
``dapo``/``cispo``/``vespo``: over the tokens of the generation batch; ``luspo``: sum per
sequence, mean over sequences; each also divided by the gradient-accumulation steps as TRL
does). ``c`` is computed from the policy log-probs of the *current* optimisation step (with
``num_iterations > 1`` they drift from those at generation time) by one ComputeKL call per
step; the reference log-probs were fetched once per generation batch and are served from
the server's reference cache. Off-policy specs (``principled_off_policy``, ...) weigh by the
behaviour policy TRL already knows: the rollout engine's sampling log-probs when TRL
generated with vLLM, else ``old_per_token_logps`` (the policy at generation time); when
TRL has neither, the samples are on-policy and the weight is exactly 1.

What PPO clipping and TRL's vLLM importance-sampling ratio do to the KL term: nothing, in
both modes. TRL adds ``beta * per_token_kl`` to the per-token loss *after* the clipped policy
term has been multiplied by the off-policy mask, the entropy mask and the vLLM IS ratio, so
none of them touches the KL gradient; coefficient mode adds its surrogate at the same place.
The KL term's own off-policy correction is therefore the spec's (its importance weights).
An "in reward" spec (``ppo_k1_in_reward``) enters as the detached coefficient of a loss, not
through the advantages, so it is not clipped where PPO's ratio leaves [1 - eps, 1 + eps]:
it equals "k_n in the reward" wherever the ratio is unclipped (on-policy, always). TRL's
``use_bias_correction_kl`` (its default) multiplies k3 by the differentiable ratio
``exp(logp - old)``: the coefficient ``w * delta`` of the ``trl_bias_corrected_k3`` preset.
With ``importance_sampling_level="sequence"`` TRL's ratio is the geometric mean of the
sequence's token ratios, which no preset reproduces (the diagnostics then use token
weights).

Per step the KL diagnostics go into TRL's logged metrics (``kl/k1_mean``, ``kl/k3_mean``,
``kl/coef_bias_abs_mean`` = mean |c - c*|, ``kl/is_weight_mean``,
``kl/is_truncated_fraction``, and ``kl/reference_seconds``, the time of each reference
fetch). In reference mode they describe TRL's own KL term (computed locally with
`klservice_client.kl` for ``trl_bias_corrected_k3`` or ``grpo_k3_as_loss``); in coefficient
mode they are the server's for the requested spec. ``log_kl_grad_norm=True`` adds
``kl/grad_norm``, the norm of the KL term's gradient over the trainable parameters (one
extra backward pass per step).

**Reference reset** (``GRPOConfig.sync_ref_model=True``, TRL's TR-DPO-style reference
update). The run gets a reference model of its own on the server, ``reference_model``
(default ``"<job id>-reference"``), so no model other jobs use is ever replaced. At the start
of ``train()`` the trainer saves the policy (safetensors, written by the main process only)
into a fresh folder of ``reference_sync_dir`` and loads it under that name: the reference
starts as the policy, as TRL's does. Every ``ref_model_sync_steps`` optimisation steps, at the
end of the step as TRL's ``SyncRefModelCallback``, it saves the policy again and loads it with
``mixup_alpha=ref_model_mixup_alpha``: the server then serves ``(1 - alpha) * reference +
alpha * policy``, computed as TRL computes it in place. That is one LoadModel per sync; the
trainer's calls are then pinned to the revision it returned (`klservice_client.RevisionMismatch`
if anything else moves the name), ``kl/reference_generation`` logs which load answered, and
the folders the server no longer reads are deleted. When training ends the run's reference is
unloaded from the server (its memory and its ``--max-models`` slot go back). Two runs with the
same job id share one reference name and would reset each other's: give each run its own
``run_name`` (or ``reference_model``). It needs the right to call LoadModel (an
admin token, or a server without ``--auth-file`` started with ``--allow-admin-from-loopback``
on the trainer's host), a ``reference_sync_dir`` the server reads at the same path (a shared
file system, or the same host), and room on the server for one more model (two during a
swap). Not under PEFT (TRL refuses it too). ``train(resume_from_checkpoint=...)`` restarts the
reference from the resumed policy. In coefficient mode, optimisation steps after a sync that
reuse an earlier generation batch get coefficients against the new reference (the old
revision is no longer served); TRL's own KL term (reference mode) keeps the log-probs
fetched at generation time, as TRL does.

At start the trainer checks that its tokenizer is the served model's
(`klservice_client.TokenizerMismatch` otherwise; with ``sync_ref_model``, once the reference
is loaded). Its requests carry ``job_id``, by default ``GRPOConfig.run_name`` (else the output
directory's name): the server's fairness key and per-job metric label.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import broadcast_object_list, is_peft_model
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from klservice_client import kl
from klservice_client.client import KLClient, ModelInfo
from klservice_client.errors import KLServiceError
from klservice_client.wire import MODEL_NAME_PATTERN, MODEL_NAME_RULE

__all__ = ["KLServiceGRPOTrainer", "ServedReference"]

#: Keyword arguments of TRL's log-prob helper that carry multimodal inputs the service cannot score.
_MULTIMODAL_INPUTS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


class ServedReference:
    """Stands where TRL keeps its ``ref_model``: the reference model is the one a klservice server serves.

    `model`: the name the trainer's calls give (None: the client's model); `info`: the served revision
    (None until a ``sync_ref_model`` run has loaded its reference).
    """

    def __init__(self, client: KLClient, info: ModelInfo | None, model: str | None = None):
        self.client = client
        self.info = info
        self.model = model

    def __repr__(self) -> str:
        if self.info is None:
            return f"ServedReference({self.model!r}, not loaded yet)"
        return f"ServedReference({self.info.name!r}, revision={self.info.revision[:12]})"


@dataclasses.dataclass(frozen=True)
class _Stripped:
    """A TRL batch as the service takes it: real tokens only, one prompt length per sequence."""

    sequences: list[np.ndarray]
    prompt_lengths: list[int]
    #: [batch, completion] bool: positions of the real completion tokens of the sequences sent.
    scored: torch.Tensor

    def scatter(self, values, like: torch.Tensor) -> torch.Tensor:
        """Flat per-token values of the sent sequences -> [batch, completion], 0 elsewhere (as TRL's padding)."""
        out = torch.zeros(self.scored.shape, dtype=torch.float32, device=like.device)
        out[self.scored.to(like.device)] = torch.as_tensor(values, dtype=torch.float32, device=like.device)
        return out

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """[batch, completion] -> flat values at the scored positions (the order the service uses)."""
        return values.detach()[self.scored.to(values.device)].float()

    @property
    def scored_lengths(self) -> list[int]:
        return [len(s) - p for s, p in zip(self.sequences, self.prompt_lengths)]


def _strip(input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int) -> _Stripped:
    """Drop TRL's left padding of prompts and right padding of completions (attention mask 0)."""
    ids = input_ids.detach().cpu()
    mask = attention_mask.detach().cpu().bool()
    prompt_width = ids.shape[1] - logits_to_keep
    scored = mask[:, prompt_width:].clone()
    sequences, prompt_lengths = [], []
    for row in range(ids.shape[0]):
        if not scored[row].any():
            continue  # no completion token to score (e.g. a masked truncated completion)
        prompt = ids[row, :prompt_width][mask[row, :prompt_width]]
        if prompt.numel() == 0:
            raise ValueError(
                f"sequence {row} of the batch has an empty prompt: the reference cannot score a first "
                "completion token without context"
            )
        sequences.append(torch.cat([prompt, ids[row, prompt_width:][scored[row]]]).numpy())
        prompt_lengths.append(int(prompt.numel()))
    return _Stripped(sequences, prompt_lengths, scored)


def _default_job_id(args: GRPOConfig) -> str:
    return args.run_name or os.path.basename(os.path.normpath(args.output_dir or "")) or "trl-grpo"


_REFERENCE_SUFFIX = "-reference"


def _reference_name(job_id: str) -> str:
    """A run's own reference model name: its job id (characters a model name cannot hold as '-') + '-reference'."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "-", job_id)[: 64 - len(_REFERENCE_SUFFIX)] or "trl-grpo"
    return stem + _REFERENCE_SUFFIX


class _ReferenceSync(TrainerCallback):
    """TRL's SyncRefModelCallback through the service: reset at the start of training, then mixed in
    every ``ref_model_sync_steps`` steps (at the same moment as TRL's, the end of the step)."""

    def __init__(self, trainer: "KLServiceGRPOTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._load_reference(mix=False)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % args.ref_model_sync_steps == 0:
            self.trainer._load_reference(mix=True)

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer._unload_reference()


class KLServiceGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` whose reference model lives in a klservice server (see the module docstring).

    Args (besides GRPOTrainer's own):
        klservice: a `KLClient`, or the server's target (``host:port``) to build one with ``job_id``.
        kl_spec: ``None`` for reference mode (TRL's KL formula on the served reference), or a
            preset name / `kl.KLSpec` for coefficient mode (the KL gradient of that spec).
        job_id: the server's job id for this run (default: ``args.run_name``, else the output
            directory's name). Only with a target: a `KLClient` carries its own.
        reference_model: the served model that is the reference. Without ``sync_ref_model``, a model
            the server serves (default: the client's model, else the server's default). With
            ``sync_ref_model``, the name this run loads its own reference under and replaces at each
            sync (default: ``"<job id>-reference"``); never the name of a model other jobs use.
        reference_sync_dir: with ``sync_ref_model`` (required then): a folder the trainer writes the
            policy into for the server to load, at a path the server reads.
        reference_load_timeout: with ``sync_ref_model``: the deadline of one LoadModel, in seconds (the server
            reads, mixes, loads and probes the checkpoint within it; give large models more).
        check_tokenizer: refuse to start unless the tokenizer is the served model's.
        log_kl_grad_norm: log ``kl/grad_norm`` (costs one extra backward pass per step).
    """

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: GRPOConfig | None = None,
        *positional: Any,
        klservice: KLClient | str,
        kl_spec: kl.KLSpec | str | None = None,
        job_id: str | None = None,
        reference_model: str | None = None,
        reference_sync_dir: str | os.PathLike | None = None,
        reference_load_timeout: float = 1800.0,
        check_tokenizer: bool = True,
        log_kl_grad_norm: bool = False,
        **kwargs: Any,
    ):
        if args is None:  # as GRPOTrainer does, so that beta can be read before it builds anything
            name = model if isinstance(model, str) else model.config._name_or_path
            args = GRPOConfig(f"{os.path.basename(str(name).rstrip('/'))}-GRPO")
        if kl_spec is not None:
            kl.resolve_spec(kl_spec)  # a bad spec fails here, not at the first step
            if args.beta == 0.0:
                warnings.warn("kl_spec is ignored: GRPOConfig.beta is 0, so the loss has no KL term", stacklevel=2)
        sync = args.beta != 0.0 and args.sync_ref_model  # beta = 0 with sync_ref_model: TRL's own error below
        if sync and reference_sync_dir is None:
            raise ValueError(
                "sync_ref_model=True needs reference_sync_dir=: a folder the trainer saves the policy into and the "
                "klservice server loads it from (the same path on both sides)"
            )
        if not sync and reference_sync_dir is not None:
            warnings.warn(
                "reference_sync_dir is ignored: it is used with sync_ref_model=True (and beta != 0)", stacklevel=2
            )
        if isinstance(klservice, str):
            job_id = job_id or _default_job_id(args)
            client = KLClient(klservice, job_id=job_id)
        elif job_id is not None:
            raise ValueError("job_id: pass it to the KLClient you give as klservice (KLClient(..., job_id=...))")
        else:
            client = klservice
            job_id = client.job_id or _default_job_id(args)
        info = None
        if sync:
            reference_model = reference_model or _reference_name(job_id)
            if not MODEL_NAME_PATTERN.fullmatch(reference_model):
                raise ValueError(f"reference_model: {reference_model!r}: {MODEL_NAME_RULE}")
            served = {served.name: served for served in client.list_models()}  # also: the server answers
            if reference_model in served and served[reference_model].is_default:
                raise ValueError(
                    f"reference_model: {reference_model!r} is the server's default model, which other jobs use; "
                    "sync_ref_model loads the run's reference under a name of its own"
                )
        elif args.beta != 0.0:
            info = client.model_info(model=reference_model)

        beta = args.beta
        args.beta = 0.0  # with beta = 0 GRPOTrainer builds no local reference model
        if sync:
            args.sync_ref_model = False  # nor TRL's SyncRefModelCallback: _ReferenceSync does it through the service
        try:
            super().__init__(model, reward_funcs, args, *positional, **kwargs)
        finally:
            args.beta = beta
            if sync:
                args.sync_ref_model = True
        if sync and is_peft_model(self.model):
            raise NotImplementedError(
                "sync_ref_model with a PEFT model: as in TRL, the reference of an adapter is its base model and is not "
                "synchronised; use sync_ref_model=False, or full fine-tuning"
            )
        self.beta = beta
        self.kl_client = client
        self.kl_spec = kl_spec
        self.log_kl_grad_norm = log_kl_grad_norm
        self.reference_model = reference_model
        self.ref_model = ServedReference(client, info, reference_model) if beta != 0.0 else None
        self._reference_sync_dir = Path(reference_sync_dir) if sync else None
        self._check_reference_tokenizer = check_tokenizer
        self._reference_folders: list[Path] = []  # written by this trainer and not yet deleted
        self._reference_loads = 0
        self._reference_load_timeout = reference_load_timeout
        self._capture_policy_logps = False
        self._policy_logps: torch.Tensor | None = None
        if sync:
            self.add_callback(_ReferenceSync(self))
        elif check_tokenizer:
            client.check_tokenizer(self._vocabulary(), model=reference_model)

    def _vocabulary(self):
        """The tokenizer whose token ids the trainer sends (a processor's own)."""
        return getattr(self.processing_class, "tokenizer", self.processing_class)

    # -- the reference of a sync_ref_model run ------------------------------------------------

    def _load_reference(self, mix: bool) -> ModelInfo:
        """Save the policy into a fresh folder of the sync dir and load it as the run's reference: one LoadModel,
        from the main process. `mix`: with ``ref_model_mixup_alpha`` (a sync), else as it is (the reset at the
        start of training). Every process then pins its calls to the new revision."""
        name = self.reference_model
        self._reference_loads += 1
        folder = self._reference_sync_dir / f"{name}-{self._reference_loads:05d}-step{self.state.global_step}"
        main = self.accelerator.is_main_process
        if self.args.should_save:
            folder.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(folder, ignore_errors=True)  # a leftover of an earlier run under this name
        self.save_model(str(folder), _internal_call=True)  # on every process: it gathers sharded weights
        if self.args.should_save:
            self._reference_folders.append(folder)
        outcome: ModelInfo | str | None = None
        error: BaseException | None = None
        if main:
            try:
                if not any(folder.glob("*.safetensors")):
                    raise RuntimeError(f"sync_ref_model: saving the policy wrote no safetensors weights into {folder}")
                outcome = self.kl_client.load_model(
                    name, str(folder.absolute()), mixup_alpha=self.args.ref_model_mixup_alpha if mix else None,
                    timeout=self._reference_load_timeout,
                )
            except Exception as failure:  # noqa: BLE001 - the other processes must hear of it, not wait forever
                error, outcome = failure, f"{type(failure).__name__}: {failure}"
        outcome = broadcast_object_list([outcome])[0]
        if not isinstance(outcome, ModelInfo):  # the name serves what it served, from the folders kept
            self._delete_reference_folders([folder])
            if error is not None:
                raise error
            raise RuntimeError(f"sync_ref_model: loading the reference {name!r} failed on the main process: {outcome}")
        self.kl_client.pin(outcome.revision, model=name)
        self.ref_model.info = outcome
        # The server has read the new folder. A mixed revision lives in the server's own folder; one loaded as it
        # is (the reset) is read again from its folder by the next, mixing load, so that folder stays until then.
        kept = folder if outcome.mixup_alpha is None else None
        self._delete_reference_folders([old for old in self._reference_folders if old != kept])
        if not mix and self._check_reference_tokenizer:
            self.kl_client.check_tokenizer(self._vocabulary(), model=name)
        return outcome

    def _unload_reference(self) -> None:
        """At the end of training: the run's own reference leaves the server (its memory and its --max-models slot
        go back), and its folders here with it. A later evaluate() loads the policy as the reference again."""
        name = self.reference_model
        if self.accelerator.is_main_process and self.ref_model.info is not None:
            try:
                self.kl_client.unload_model(name)
            except KLServiceError as error:  # the run is over: say so, do not fail it
                warnings.warn(f"sync_ref_model: unloading the reference {name!r} failed: {error}", stacklevel=2)
        self.ref_model.info = None
        self.kl_client.unpin(model=name)
        self._delete_reference_folders(list(self._reference_folders))

    def _delete_reference_folders(self, folders: list[Path]) -> None:
        for folder in list(folders):
            if folder in self._reference_folders:  # only where this process wrote it
                shutil.rmtree(folder, ignore_errors=True)
                self._reference_folders.remove(folder)

    # -- reference log-probs ------------------------------------------------------------

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        if isinstance(model, ServedReference):
            given = [name for name in _MULTIMODAL_INPUTS if kwargs.get(name) is not None]
            if given:
                raise NotImplementedError(
                    f"multimodal inputs ({', '.join(given)}): klservice scores token sequences only"
                )
            return self._served_reference_logps(input_ids, attention_mask, logits_to_keep), None, None
        outputs = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        if self._capture_policy_logps:
            self._policy_logps = outputs[0]
        return outputs

    def _served_reference_logps(self, input_ids, attention_mask, logits_to_keep) -> torch.Tensor:
        if self._reference_sync_dir is not None and self.ref_model.info is None:
            self._load_reference(mix=False)  # used before train() (e.g. evaluate()): start from the policy now
        started = time.perf_counter()
        batch = _strip(input_ids, attention_mask, logits_to_keep)
        values = np.zeros(0, dtype=np.float32)  # nothing to send: every position stays 0
        if batch.sequences:
            out = self.kl_client.score(
                batch.sequences, batch.prompt_lengths, temperature=self.temperature, model=self.reference_model
            )
            values = out.ref_logprobs
            self._log_kl_metric("reference_generation", out.generation)
        ref = batch.scatter(values, like=input_ids)
        self._log_kl_metric("reference_seconds", time.perf_counter() - started)
        return ref

    # -- the KL term ----------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        if self.ref_model is None:  # beta = 0: no KL term
            return super()._compute_loss(model, inputs)
        beta = self.beta
        self._capture_policy_logps = True
        try:
            if self.kl_spec is not None:
                self.beta = 0.0  # TRL's own KL term off: the coefficient's surrogate replaces it below
            loss = super()._compute_loss(model, inputs)
        finally:
            self.beta = beta
            self._capture_policy_logps = False
        logp, self._policy_logps = self._policy_logps, None

        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        batch = _strip(
            torch.cat([prompt_ids, completion_ids], dim=1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
            completion_ids.size(1),
        )
        if not batch.sequences:
            return loss
        if self.kl_spec is not None:
            coef, diagnostics = self._served_coefficients(batch, inputs, logp)
        else:
            coef, diagnostics = self._trl_coefficients(batch, inputs, logp)
        mask = inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]
        kl_term = beta * self._normalise(coef.detach().to(logp.dtype) * logp, mask, inputs)
        if self.kl_spec is not None:
            loss = loss + kl_term
        self._log_diagnostics(diagnostics)
        if self.log_kl_grad_norm and kl_term.requires_grad:  # not under evaluation's no_grad
            params = [p for p in model.parameters() if p.requires_grad]
            grads = torch.autograd.grad(kl_term, params, retain_graph=True, allow_unused=True)
            norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None))
            self._log_kl_metric("grad_norm", float(norm))
        return loss

    def _behaviour_logps(self, inputs) -> torch.Tensor | None:
        """Log-probs of the policy that sampled the batch, where TRL has them (None: on-policy)."""
        old = inputs.get("old_per_token_logps")
        sampling = inputs.get("sampling_per_token_logps")
        if sampling is None:
            return old
        if old is not None:  # tokens vLLM could not score: fall back to the policy at generation time
            return torch.where(torch.isnan(sampling), old, sampling)
        return sampling

    def _served_coefficients(self, batch: _Stripped, inputs, logp: torch.Tensor):
        behaviour = self._behaviour_logps(inputs)
        out = self.kl_client.compute_kl(
            batch.sequences,
            batch.prompt_lengths,
            logprobs=batch.gather(logp),
            old_logprobs=None if behaviour is None else batch.gather(behaviour),
            spec=self.kl_spec,
            temperature=self.temperature,
            model=self.reference_model,
        )
        return batch.scatter(out.coef, like=logp), out.diagnostics

    def _trl_coefficients(self, batch: _Stripped, inputs, logp: torch.Tensor):
        """The coefficient of TRL's own KL term (reference mode), for the diagnostics."""
        spec = "trl_bias_corrected_k3" if self.args.use_bias_correction_kl else "grpo_k3_as_loss"
        old = inputs.get("old_per_token_logps")
        flat_logp = batch.gather(logp)
        result = kl.compute_kl(
            flat_logp,
            batch.gather(inputs["ref_per_token_logps"]),
            batch.scored_lengths,
            spec=spec,
            old_logprobs=flat_logp if old is None else batch.gather(old),
        )
        return batch.scatter(result.coef, like=logp), result.diagnostics

    def _normalise(self, per_token: torch.Tensor, mask: torch.Tensor, inputs) -> torch.Tensor:
        """Reduce a per-token loss [batch, completion] as TRL reduces its loss for `self.loss_type`."""
        training = self.model.training
        accumulation = self.current_gradient_accumulation_steps if training else 1.0
        masked = per_token * mask
        loss_type = self.loss_type
        if loss_type in ("grpo", "sapo"):
            return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
        if loss_type == "bnpo":
            return masked.sum() / mask.sum().clamp(min=1.0) / accumulation
        if loss_type == "dr_grpo":
            return masked.sum() / (per_token.size(0) * self.max_completion_length) / accumulation
        if loss_type in ("cispo", "dapo", "vespo"):
            normaliser = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if training:
                normaliser = normaliser * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            return masked.sum() / normaliser
        if loss_type == "luspo":
            return masked.sum(-1).mean() / accumulation
        raise ValueError(f"loss_type: {loss_type!r} has no KL normalisation in KLServiceGRPOTrainer")

    # -- metrics ----------------------------------------------------------------------------

    def _log_kl_metric(self, name: str, value: float) -> None:
        self._metrics["train" if self.model.training else "eval"][f"kl/{name}"].append(value)

    def _log_diagnostics(self, diagnostics: kl.KLDiagnostics) -> None:
        self._log_kl_metric("k1_mean", diagnostics.k1_mean_per_token)
        self._log_kl_metric("k3_mean", diagnostics.k3_mean_per_token)
        self._log_kl_metric("coef_bias_abs_mean", diagnostics.coef_bias_abs_mean)
        self._log_kl_metric("is_weight_mean", diagnostics.is_weight_mean)
        self._log_kl_metric("is_truncated_fraction", diagnostics.is_truncated_fraction)
