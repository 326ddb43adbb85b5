"""A GRPO training job in its own process (used by test_shared_server.py).

Trains a few steps of `KLServiceGRPOTrainer` on the tiny Llama against a klservice server and
writes, as JSON, every batch of reference log-probs it received from the service (with the
completion tokens they belong to and when they arrived).

    python tests/trl/train_job.py TARGET MODEL_DIR JOB_ID OUT.json [--steps N] [--seed S]
                                  [--barrier DIR --parties N]

With --barrier, the job writes DIR/JOB_ID once its trainer is built and starts training only when
N jobs have done so, so that jobs started together train together (TRL's import and the trainer's
construction take seconds, long enough for a first job to finish before a second begins).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target")
    parser.add_argument("model_dir")
    parser.add_argument("job_id")
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--barrier", help="directory where jobs that should train together meet")
    parser.add_argument("--parties", type=int, default=1, help="how many jobs meet at --barrier")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig

    from klservice_client.integrations.trl import KLServiceGRPOTrainer

    torch.set_num_threads(1)
    received = []

    class RecordingTrainer(KLServiceGRPOTrainer):
        def _served_reference_logps(self, input_ids, attention_mask, logits_to_keep):
            ref = super()._served_reference_logps(input_ids, attention_mask, logits_to_keep)
            mask = attention_mask[:, -logits_to_keep:].bool()
            received.append({
                "time": time.time(),
                "completion_ids": input_ids[:, -logits_to_keep:].masked_fill(~mask, -1).tolist(),
                "ref": ref[mask].tolist(),
            })
            return ref

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    prompts = [f"Job {args.job_id} prompt {i}: count to" for i in range(4)]
    with tempfile.TemporaryDirectory() as output_dir:
        config = GRPOConfig(
            output_dir=output_dir, run_name=args.job_id, per_device_train_batch_size=4, num_generations=4,
            max_completion_length=16, beta=0.1, bf16=False, use_cpu=True, report_to=[], max_steps=args.steps,
            logging_steps=1, save_strategy="no", seed=args.seed, disable_tqdm=True,
        )
        trainer = RecordingTrainer(
            model=args.model_dir, reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions],
            args=config, train_dataset=Dataset.from_dict({"prompt": prompts * 4}), processing_class=tokenizer,
            klservice=args.target,
        )
        if args.barrier:
            wait_for_parties(args.barrier, args.job_id, args.parties)
        trainer.train()
    with open(args.out, "w") as f:
        json.dump(received, f)
    return 0


def wait_for_parties(directory: str, name: str, parties: int, timeout: float = 300.0) -> None:
    """Mark this job ready in `directory`, then wait until `parties` jobs are."""
    barrier = pathlib.Path(directory)
    barrier.mkdir(parents=True, exist_ok=True)
    (barrier / name).touch()
    deadline = time.monotonic() + timeout
    while len(list(barrier.iterdir())) < parties:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(list(barrier.iterdir()))} of {parties} jobs reached {barrier}")
        time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main())
