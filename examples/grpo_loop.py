"""A hand-written GRPO loop whose KL term comes from klservice: no trainer framework, ~100 lines.

The recipe for any PyTorch trainer: sample, score, then

    out = client.compute_kl(sequences, prompt_lengths, logprobs=logp.detach(), spec="principled")
    loss = policy_loss + kl.surrogate_loss(out.coef, logp, out.scored_lengths, beta=beta)

``logp`` is the policy's differentiable log-prob of each response token (flat over the
batch); the service returns the reference log-probs, k1/k2/k3 and the gradient coefficient
``c`` of the requested KL implementation, and `kl.surrogate_loss` turns ``c`` into a loss
whose gradient is exactly ``beta * c * grad(logp)`` (normalised over tokens).

Run a server on the embedded model first (``klservice serve``), then::

    python examples/grpo_loop.py --target localhost:50051 --steps 10

The task: complete "My favourite number between 1 and 100 is"; the reward is the number / 100.
"""

from __future__ import annotations

import argparse
import re
import sys

PROMPTS = ["My favourite number between 1 and 100 is", "My lucky number from 1 to 100 is"]
NUMBER = re.compile(r"\d+")


def reward(text: str) -> float:
    match = NUMBER.search(text)
    value = int(match.group()) if match else 0
    return value / 100.0 if 1 <= value <= 100 else 0.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="localhost:50051", help="the klservice server (serving the embedded model)")
    parser.add_argument("--model", help="policy weights (default: the embedded SmolLM2-135M-Instruct, as served)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--group-size", type=int, default=4, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--spec", default="principled", help="a preset of klservice_client.kl.PRESETS")
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from klservice.default_model import ensure_default_model
    from klservice_client import KLClient, kl

    model_dir = args.model or ensure_default_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate)
    torch.manual_seed(0)

    with KLClient(args.target, job_id="grpo-loop") as client:
        client.check_tokenizer(tokenizer)  # token ids mean the same to both models
        for step in range(1, args.steps + 1):
            # 1. Sample a group of completions per prompt (no padding: one prompt at a time).
            sequences, prompt_lengths, rewards = [], [], []
            policy.eval()
            with torch.no_grad():
                for prompt in PROMPTS:
                    ids = tokenizer(prompt, return_tensors="pt").input_ids
                    out = policy.generate(
                        ids.repeat(args.group_size, 1), do_sample=True, top_k=0, max_new_tokens=args.max_new_tokens,
                        pad_token_id=tokenizer.pad_token_id,
                    )
                    for row in out:
                        completion = row[ids.shape[1]:]
                        if tokenizer.eos_token_id in completion.tolist():  # keep the EOS, drop what follows
                            completion = completion[: completion.tolist().index(tokenizer.eos_token_id) + 1]
                        sequences.append(torch.cat([ids[0], completion]))
                        prompt_lengths.append(ids.shape[1])
                        rewards.append(reward(tokenizer.decode(completion, skip_special_tokens=True)))

            # 2. Group-normalised advantages (GRPO).
            r = torch.tensor(rewards).view(len(PROMPTS), args.group_size)
            advantages = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1)

            # 3. The policy's log-probs of the completion tokens, flat over the batch, with grad.
            policy.train()
            logp = []
            for sequence, start in zip(sequences, prompt_lengths):
                logits = policy(sequence[None]).logits[0, start - 1 : -1]
                logp.append(torch.log_softmax(logits, -1).gather(-1, sequence[start:, None])[:, 0])
            lengths = [len(x) for x in logp]
            logp = torch.cat(logp)

            # 4. The KL term from the service: reference log-probs and the gradient coefficient c.
            kl_out = client.compute_kl(sequences, prompt_lengths, logprobs=logp.detach(), spec=args.spec)
            kl_loss = kl.surrogate_loss(kl_out.coef, logp, kl_out.scored_lengths, beta=args.beta)
            token_advantages = advantages.repeat_interleave(torch.tensor(lengths))
            policy_loss = -(token_advantages * logp).mean()  # on-policy: the ratio is 1, PPO's clip is inactive

            optimizer.zero_grad()
            (policy_loss + kl_loss).backward()
            optimizer.step()
            d = kl_out.diagnostics
            print(
                f"step {step}: reward {r.mean():.3f}  k3 {d.k3_mean_per_token:.4f}  "
                f"|c - c*| {d.coef_bias_abs_mean:.2g}  revision {kl_out.revision[:12]}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
