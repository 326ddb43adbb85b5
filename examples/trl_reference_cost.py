"""What a TRL trainer saves by keeping its reference model in klservice: memory and reference time.

Runs the same GRPO steps twice, each in a fresh process: TRL's GRPOTrainer with its own
local reference model, then KLServiceGRPOTrainer against a klservice server serving the same
weights. It prints the trainer process's peak resident memory and the time of the reference
step inside each TRL step (TRL's local reference forward vs the service call). The GRPO
batch shares one long prompt per group, which the service computes once and TRL's forward
computes for every completion.

    python examples/trl_reference_cost.py                # embedded SmolLM2-135M-Instruct, CPU
    python examples/trl_reference_cost.py --steps 5 --group-size 16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PASSAGE = (
    "The river rises in the hills above the town, runs past the old mill and the market square, "
    "and reaches the sea after a long bend through the marshes, where herons stand in the shallows. "
)


def child(mode: str, model_dir: str, target: str | None, args) -> dict:
    """One training run in this process; returns its figures."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    timings: list[float] = []

    def timed(cls):
        class Timed(cls):
            def _get_per_token_logps_and_entropies(self, model, *a, **kw):
                if model is not self.ref_model:
                    return super()._get_per_token_logps_and_entropies(model, *a, **kw)
                started = time.perf_counter()
                out = super()._get_per_token_logps_and_entropies(model, *a, **kw)
                timings.append(time.perf_counter() - started)
                return out

        return Timed

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = PASSAGE * args.passage_repeats + "\nQuestion: where does the river reach the sea? Answer:"
    with tempfile.TemporaryDirectory() as output_dir:
        config = GRPOConfig(
            output_dir=output_dir, per_device_train_batch_size=args.group_size, num_generations=args.group_size,
            max_completion_length=args.completion_tokens, beta=0.04, bf16=False, use_cpu=True, report_to=[],
            max_steps=args.steps, logging_steps=1, save_strategy="no", disable_tqdm=True, run_name="reference-cost",
        )
        common = dict(
            model=model_dir, reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions], args=config,
            train_dataset=Dataset.from_dict({"prompt": [prompt] * 8}), processing_class=tokenizer,
        )
        if mode == "local":
            trainer = timed(GRPOTrainer)(**common)
        else:
            from klservice_client.integrations.trl import KLServiceGRPOTrainer

            trainer = timed(KLServiceGRPOTrainer)(klservice=target, **common)
        prompt_tokens = len(tokenizer(prompt).input_ids)
        trainer.train()
    return {
        "mode": mode,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "reference_seconds": timings,
        "prompt_tokens": prompt_tokens,
    }


def run_child(mode: str, model_dir, target, argv) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, __file__, "--child", mode, "--model-dir", str(model_dir), "--child-out", out.name]
        command += ["--target", target] if target else []
        subprocess.run(command + argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return json.load(open(out.name))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="GRPO steps per run (the first is warm-up)")
    parser.add_argument("--group-size", type=int, default=8, help="completions per prompt (one prompt per step)")
    parser.add_argument("--completion-tokens", type=int, default=32)
    parser.add_argument("--passage-repeats", type=int, default=6, help="prompt length: repeats of a 40-token passage")
    parser.add_argument("--child", choices=["local", "service"], help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        with open(args.child_out, "w") as f:
            json.dump(child(args.child, args.model_dir, args.target, args), f)
        return 0

    from klservice.bench import ServiceProcess
    from klservice.default_model import ensure_default_model
    from klservice_client import KLClient

    model_dir = ensure_default_model()
    passthrough = [f"--steps={args.steps}", f"--group-size={args.group_size}",
                   f"--completion-tokens={args.completion_tokens}", f"--passage-repeats={args.passage_repeats}"]
    print("TRL with a local reference model ...", flush=True)
    local = run_child("local", model_dir, None, passthrough)
    with tempfile.TemporaryDirectory() as logs:
        server = ServiceProcess(["--model", str(model_dir), "--device", "cpu"], dict(os.environ), Path(logs) / "server.log")
        try:
            with KLClient(server.target()) as client:
                client.wait_ready(timeout=300)
            print("KLServiceGRPOTrainer against klservice ...", flush=True)
            served = run_child("service", model_dir, server.target(), passthrough)
        finally:
            server.stop()

    def steady(run):  # the first step warms up caches and threads
        values = run["reference_seconds"][1:] or run["reference_seconds"]
        return sum(values) / len(values)

    print(f"\nGRPO step: 1 prompt of {local['prompt_tokens']} tokens x {args.group_size} completions of up to "
          f"{args.completion_tokens} tokens, {args.steps} steps, float32 on CPU")
    print(f"{'':34}{'local reference':>18}{'klservice':>12}{'ratio':>8}")
    print(f"{'trainer peak resident memory, MiB':34}{local['peak_rss_mib']:>18.0f}{served['peak_rss_mib']:>12.0f}"
          f"{served['peak_rss_mib'] / local['peak_rss_mib']:>8.2f}")
    print(f"{'reference step per TRL step, s':34}{steady(local):>18.3f}{steady(served):>12.3f}"
          f"{steady(served) / steady(local):>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
