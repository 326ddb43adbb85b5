"""TRL's server distillation with klservice as the teacher: `KLServiceDistillationTrainer`.

TRL's ``ServerDistillationTrainer`` (``trl.experimental.server_distillation``, TRL 1.16) takes its teacher's
log-probs from a vLLM server (``VLLMClient.get_sequence_logprobs``), which returns only the teacher's top-k:
the teacher's log-prob of the token actually sampled is ``-inf`` whenever it falls outside them, which is why
TRL restricts ``beta > 0`` to a top-1 support. klservice computes every log-prob over the whole vocabulary, so
here the teacher's top-k and the sampled token's exact log-prob (never ``-inf``) come from a klservice server,
at the trainer's temperature, in one Score request per batch; everything else (the student's forward and
generation, TRL's loss on the truncated support with its tail bucket, the metrics) is TRL's own.

Use it instead of ``ServerDistillationTrainer``, with the same arguments plus where the teacher is served::

    from klservice_client.integrations.trl_distillation import (
        KLServiceDistillationConfig, KLServiceDistillationTrainer,
    )

    args = KLServiceDistillationConfig(output_dir="out", beta=0.0, loss_top_k=20, temperature=0.9)
    trainer = KLServiceDistillationTrainer(
        model="path/to/student", args=args, train_dataset=dataset,
        klservice="teacher-host:50051", teacher_model="teacher",   # a served model's name (default: the default)
    )
    trainer.train()

`KLServiceDistillationConfig` is TRL's config without the requirement of a vLLM URL
(``teacher_model_server_url``); a ``ServerDistillationConfig`` works as well (its URL is not used).
"""

from __future__ import annotations

from typing import Any

from trl.experimental.server_distillation import ServerDistillationConfig, ServerDistillationTrainer
from trl.trainer.distillation_trainer import DistillationTrainer

from klservice_client.client import KLClient

__all__ = ["KLServiceDistillationConfig", "KLServiceDistillationTrainer", "KLServiceTeacher"]

NOT_A_VLLM_URL = "klservice://"
"""What `KLServiceDistillationConfig` puts in TRL's ``teacher_model_server_url``, which it requires and no one reads."""


class KLServiceTeacher:
    """A klservice teacher with the method TRL's server distillation calls on its vLLM client:
    ``get_sequence_logprobs(sequences, prompt_lengths, top_logprobs, temperature)``, answered from one Score request
    (`KLClient.score` with ``top_k``). The result has TRL's shapes: per sequence and completion token, the teacher's
    top-k log-probs and ids, most likely first, and the sampled token's log-prob, exact over the whole vocabulary."""

    def __init__(self, client: KLClient, model: str | None = None):
        self.client = client
        self.model = model

    def get_sequence_logprobs(self, sequences: list[list[int]], prompt_lengths: list[int], top_logprobs: int = 100,
                              temperature: float = 1.0, **_: Any) -> dict[str, list]:
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        out = self.client.score(sequences, prompt_lengths, temperature=temperature, model=self.model,
                                top_k=top_logprobs)
        return {
            "logprobs": [part.tolist() for part in out.ragged("top_logprobs")],
            "logprob_token_ids": [part.tolist() for part in out.ragged("top_ids")],
            "actual_logprobs": [part[:, None].tolist() for part in out.ragged("ref_logprobs")],
            "actual_token_ids": [[[token] for token in sequence[start:]] for sequence, start in zip(sequences,
                                                                                                     prompt_lengths)],
        }


class KLServiceDistillationConfig(ServerDistillationConfig):
    """TRL's ``ServerDistillationConfig`` for a klservice teacher: ``teacher_model_server_url`` is not needed."""

    def __post_init__(self):
        if not (self.teacher_model_server_url or "").strip():
            self.teacher_model_server_url = NOT_A_VLLM_URL
        super().__post_init__()


class KLServiceDistillationTrainer(ServerDistillationTrainer):
    """``ServerDistillationTrainer`` whose teacher is a klservice server (see the module docstring).

    `klservice`: the server's target ("host:port", "dns:...") or a `KLClient`; `teacher_model`: the served model to
    distil from (default: the client's, else the server's default). The teacher's tokenizer must be the student's:
    checked at start against the processing class (`TokenizerMismatch` otherwise)."""

    def __init__(self, model, args=None, train_dataset=None, eval_dataset=None, processing_class=None,
                 callbacks=None, optimizers=(None, None), quantization_config=None, peft_config=None, *,
                 klservice: str | KLClient, teacher_model: str | None = None):
        if args is None:
            args = KLServiceDistillationConfig(output_dir="tmp_klservice_distillation")
        # ServerDistillationTrainer.__init__ would connect to a vLLM server: its base's, then its own settings.
        DistillationTrainer.__init__(
            self, model=model, teacher_model=None, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
            processing_class=processing_class, callbacks=callbacks, optimizers=optimizers,
            quantization_config=quantization_config, peft_config=peft_config,
        )
        self.reverse_kl_top_1_mode = args.reverse_kl_top_1_mode
        self.loss_top_k = args.loss_top_k
        self.loss_add_tail = args.loss_add_tail
        client = klservice if isinstance(klservice, KLClient) else KLClient(klservice, timeout=600)
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        client.check_tokenizer(tokenizer, model=teacher_model)
        self.teacher_client = KLServiceTeacher(client, teacher_model)
