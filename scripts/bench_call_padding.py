"""Mixed lengths in one step: padded calls (unsplit, split) against packed calls, on the same scheduler steps.

Each step holds sequences of random lengths (16 .. --max-len tokens) up to --budget tokens, as
when many jobs' requests share a step. "unsplit" packs a step into padded calls only by the token
budget (count x longest <= budget); "split" also closes a call rather than pad it beyond
--call-padding of its real tokens (`klservice.scheduler.plan_calls`); both on an `hf` backend that
pads (``kernel="none"``). "packed" runs the step's calls on a backend that packs (no padding: each
call is one row of real tokens, `plan_calls(packed=True)`), the default. All three score the
same steps, interleaved; the script prints tokens/s, the share of the positions the model computed
that were padding (from the backend's own count), the ratios, and the largest difference between
the packed and padded values.

    python scripts/bench_call_padding.py                 # embedded SmolLM2-135M, CPU (~2 min on 2 cores)
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
    folder = args.model or ensure_default_model(None, progress=True)
    padded = HFBackend(folder, device=args.device, progress=False, kernel="none")
    packed = HFBackend(folder, device=args.device, progress=False)
    if not packed.packs:
        raise SystemExit("this model cannot be packed (see the backend's log): nothing to compare")
    vocab = padded.info().vocab_size
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
    for backend in (padded, packed):
        backend.score([steps[0][0][:64]], [1])  # warm-up
    ways = {"unsplit": (padded, float("inf"), False), "split": (padded, padding, False), "packed": (packed, padding, True)}
    totals = {name: [0.0, 0, 0] for name in ways}
    largest_difference = 0.0
    for sequences in steps:
        starts = [1] * len(sequences)
        values: dict[str, dict[int, np.ndarray]] = {name: {} for name in ways}
        for name in ("unsplit", "split", "packed", "packed", "split", "unsplit"):  # interleaved: drift hits all alike
            backend, max_padding, packs = ways[name]
            calls = plan_calls(sequences, starts, args.budget, max_padding, packs)
            started = time.perf_counter()
            total = totals[name]
            for call in calls:
                scored = backend.score([sequences[i] for i in call.indices], [1] * len(call.indices), 1.0,
                                       call.prompt_groups)
                total[2] += scored.positions
                values[name].update(zip(call.indices, scored.values))
            total[0] += time.perf_counter() - started
            total[1] += sum(len(s) - 1 for s in sequences)  # the inputs: a sequence's last token is only a target
        for i in range(len(sequences)):
            largest_difference = max(largest_difference, float(np.abs(values["packed"][i] - values["split"][i]).max()))
    for name, (seconds, real, positions) in totals.items():
        print(f"{name:8s} {real / seconds:8.1f} tokens/s   padding {1 - real / positions:5.1%} of computed positions")
    print(f"split / unsplit: {totals['unsplit'][0] / totals['split'][0]:.2f}x (call padding {padding:g})")
    print(f"packed / split: {totals['split'][0] / totals['packed'][0]:.2f}x; "
          f"largest |packed - padded| log-prob {largest_difference:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
