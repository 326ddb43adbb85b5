"""`KLServiceDistillationTrainer`: TRL's server distillation with a klservice teacher.

Its teacher values (top-k, and the sampled token's log-prob) equal an independent forward of the served teacher
within 1e-5 in float32, where a vLLM teacher gives -inf outside its top-k; and a real training run on the CPU, a
perturbed copy of the embedded model distilled towards the embedded model served as the teacher, lowers both the
loss TRL logs and the student's reverse KL to the teacher (measured here with full-vocabulary forwards of both).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from klservice_client import KLClient

TEMPERATURE = 0.9


def teacher_log_probs(model_dir, sequences, starts):
    """Each scored position's full log-softmax (float64) from the model's own logits, sequence by sequence."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        return [torch.log_softmax(model(input_ids=torch.tensor(s)[None]).logits[0].double() / TEMPERATURE, -1)
                [t - 1 : len(s) - 1] for s, t in zip(sequences, starts)]


def test_the_teachers_values_equal_a_forward_of_the_served_teacher(start_server, tiny_model_dir):
    from klservice_client.integrations.trl_distillation import KLServiceTeacher

    server = start_server(cache_mb=0)
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, 49152, n).tolist() for n in (9, 15, 6)]
    starts = [3, 10, 5]
    with KLClient(server.target) as client:
        got = KLServiceTeacher(client).get_sequence_logprobs(sequences, starts, top_logprobs=7,
                                                              temperature=TEMPERATURE)
    expected = teacher_log_probs(tiny_model_dir, sequences, starts)
    assert sorted(got) == ["actual_logprobs", "actual_token_ids", "logprob_token_ids", "logprobs"]
    for i, (sequence, start, full) in enumerate(zip(sequences, starts, expected)):
        top = full.topk(7, -1)
        assert np.array(got["logprob_token_ids"][i]).shape == (len(sequence) - start, 7)
        np.testing.assert_array_equal(got["logprob_token_ids"][i], top.indices.numpy())
        np.testing.assert_allclose(got["logprobs"][i], top.values.numpy(), atol=1e-5, rtol=0)
        actual = full.gather(1, torch.tensor(sequence[start:])[:, None]).numpy()
        np.testing.assert_allclose(got["actual_logprobs"][i], actual, atol=1e-5, rtol=0)  # never -inf
        assert got["actual_token_ids"][i] == [[token] for token in sequence[start:]]


@pytest.mark.slow
def test_a_few_steps_distil_a_perturbed_student_towards_the_served_teacher(start_server, default_model_dir, tmp_path,
                                                                           capsys):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from klservice_client.integrations.trl_distillation import (
        KLServiceDistillationConfig, KLServiceDistillationTrainer,
    )

    server = start_server(model=f"teacher={default_model_dir}", cache_mb=0)
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    student = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in student.named_parameters():
            if "mlp" in name:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator) * parameter.std())
    prompts = ["The capital of France is", "Water boils at", "The largest planet is", "A week has"]
    probe = [tokenizer(p + " a city with old streets and many people").input_ids for p in prompts]
    starts = [len(tokenizer(p).input_ids) for p in prompts]
    teacher = teacher_log_probs(default_model_dir, probe, starts)

    def reverse_kl() -> float:
        """Mean over the probe's completion positions of KL(student || teacher), full vocabulary."""
        total, count = 0.0, 0
        with torch.inference_mode():
            for sequence, start, t in zip(probe, starts, teacher):
                logits = student(input_ids=torch.tensor(sequence)[None]).logits[0].double() / TEMPERATURE
                s = torch.log_softmax(logits, -1)[start - 1 : len(sequence) - 1]
                total += (s.exp() * (s - t)).sum().item()
                count += len(sequence) - start
        return total / count

    before = reverse_kl()
    args = KLServiceDistillationConfig(
        output_dir=str(tmp_path / "out"), beta=0.0, loss_top_k=20, temperature=TEMPERATURE, max_completion_length=12,
        per_device_train_batch_size=4, learning_rate=5e-5, max_steps=6, logging_steps=1, bf16=False, use_cpu=True,
        report_to=[], seed=0, gradient_checkpointing=False,
    )
    trainer = KLServiceDistillationTrainer(
        model=student, args=args, train_dataset=Dataset.from_dict({"prompt": prompts * 8}), processing_class=tokenizer,
        klservice=server.target, teacher_model="teacher",
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    after = reverse_kl()
    with capsys.disabled():
        print(f"\nKLServiceDistillationTrainer, 6 steps: loss {', '.join(f'{x:.4f}' for x in losses)}; "
              f"reverse KL to the teacher {before:.4f} -> {after:.4f}")
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < np.mean(losses[:2])
    assert after < before
