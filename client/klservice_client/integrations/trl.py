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

At start the trainer checks that its tokenizer is the served model's
(`klservice_client.TokenizerMismatch` otherwise). Its requests carry ``job_id``, by default
``GRPOConfig.run_name`` (else the output directory's name): the server's fairness key and
per-job metric label.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from typing import Any

import numpy as np
import torch
from trl import GRPOConfig, GRPOTrainer

from klservice_client import kl
from klservice_client.client import KLClient, ModelInfo

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
    """Stands where TRL keeps its ``ref_model``: the reference model is the one a klservice server serves."""

    def __init__(self, client: KLClient, info: ModelInfo):
        self.client = client
        self.info = info

    def __repr__(self) -> str:
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


class KLServiceGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` whose reference model lives in a klservice server (see the module docstring).

    Args (besides GRPOTrainer's own):
        klservice: a `KLClient`, or the server's target (``host:port``) to build one with ``job_id``.
        kl_spec: ``None`` for reference mode (TRL's KL formula on the served reference), or a
            preset name / `kl.KLSpec` for coefficient mode (the KL gradient of that spec).
        job_id: the server's job id for this run (default: ``args.run_name``, else the output
            directory's name). Only with a target: a `KLClient` carries its own.
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
        if args.beta != 0.0 and args.sync_ref_model:
            raise ValueError(
                "sync_ref_model: the reference model lives in klservice and is not synchronised from the "
                "policy; set sync_ref_model=False"
            )
        if isinstance(klservice, str):
            client = KLClient(klservice, job_id=job_id or _default_job_id(args))
        elif job_id is not None:
            raise ValueError("job_id: pass it to the KLClient you give as klservice (KLClient(..., job_id=...))")
        else:
            client = klservice
        info = client.model_info()

        beta = args.beta
        args.beta = 0.0  # with beta = 0 GRPOTrainer builds no local reference model
        try:
            super().__init__(model, reward_funcs, args, *positional, **kwargs)
        finally:
            args.beta = beta
        self.beta = beta
        self.kl_client = client
        self.kl_spec = kl_spec
        self.log_kl_grad_norm = log_kl_grad_norm
        self.ref_model = ServedReference(client, info) if beta != 0.0 else None
        self._capture_policy_logps = False
        self._policy_logps: torch.Tensor | None = None
        if check_tokenizer:
            client.check_tokenizer(getattr(self.processing_class, "tokenizer", self.processing_class))

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
        started = time.perf_counter()
        batch = _strip(input_ids, attention_mask, logits_to_keep)
        values = np.zeros(0, dtype=np.float32)  # nothing to send: every position stays 0
        if batch.sequences:
            values = self.kl_client.score(batch.sequences, batch.prompt_lengths, temperature=self.temperature).ref_logprobs
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
