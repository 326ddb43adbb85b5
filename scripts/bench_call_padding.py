"""How much splitting padded calls buys on mixed lengths: the same scheduler steps packed two ways.

Each step holds sequences of random lengths (16 .. --max-len tokens) up to --budget tokens, as
when many jobs' requests share a step. "unsplit" packs a step only by the token budget
(count x longest <= budget); "split" also closes a call rather than pad it beyond
--call-padding of its real tokens (`klservice.scheduler.plan_calls`, the server's default).
Both score the same steps on the same `hf` backend, interleaved, and the script prints tokens/s,
the share of forwarded positions that were padding, and the ratio.

    python scripts/bench_call_padding.py                 # embedded SmolLM2-135M, CPU (~1 min on 2 cores)
    python scripts/bench_call_padding.py --model DIR --device cuda --budget 65536
"""

from __future__ import annotations

import argparse
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="Hugging Face folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--budget", type=int, default=8192, help="tokens per scheduler step (default: 8192)")
    parser.add_argument("--max-len", type=int, default=1024, help="longest sequence (default: 1024)")
    parser.add_argument("--steps", type=int, default=3, help="steps to score (default: 3)")
    parser.add_argument("--call-padding", type=float, default=None, help="default: the server's --call-padding")
    args = parser.parse_args()

    import numpy as np

    from klservice.backends.hf import HFBackend
    from klservice.default_model import ensure_default_model
    from klservice.scheduler import DEFAULT_CALL_PADDING, plan_calls

    padding = DEFAULT_CALL_PADDING if args.call_padding is None else args.call_padding
    backend = HFBackend(args.model or ensure_default_model(None, progress=True), device=args.device, progress=False)
    vocab = backend.info().vocab_size
    rng = np.random.default_rng(0)
    steps = []
    for _ in range(args.steps):
        sequences, used = [], 0
        while True:
            n = int(rng.integers(16, args.max_len + 1))
            if used + n > args.budget:
                break
            sequences.append(rng.integers(0, vocab, size=n))
            used += n
        steps.append(sequences)
    backend.score([steps[0][0][:64]], [1])  # warm-up
    totals = {"unsplit": [0.0, 0, 0], "split": [0.0, 0, 0]}
    for sequences in steps:
        starts = [1] * len(sequences)
        for name in ("unsplit", "split", "split", "unsplit"):  # interleaved, so drift affects both alike
            calls = plan_calls(sequences, starts, args.budget, float("inf") if name == "unsplit" else padding)
            started = time.perf_counter()
            for call in calls:
                backend.score([sequences[i] for i in call.indices], [1] * len(call.indices), 1.0, call.prompt_groups)
            total = totals[name]
            total[0] += time.perf_counter() - started
            total[1] += sum(len(s) for s in sequences)
            total[2] += sum(len(call.indices) * max(len(sequences[i]) for i in call.indices) for call in calls)
    for name, (seconds, real, padded) in totals.items():
        print(f"{name:8s} {real / seconds:8.1f} tokens/s   padding {1 - real / padded:5.1%} of forwarded positions")
    print(f"split / unsplit: {totals['unsplit'][0] / totals['split'][0]:.2f}x (call padding {padding:g})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
