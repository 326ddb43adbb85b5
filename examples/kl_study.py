"""GRPO through klservice, once per KL implementation: do the claims of arXiv 2510.01555 hold?

Trains the embedded SmolLM2-135M-Instruct with TRL's GRPOTrainer (`KLServiceGRPOTrainer`)
against a real klservice server serving the same weights as the reference, on CPU, with a
programmatic reward (asked for a number between 1 and 100, the answer earns the number / 100). Every setting starts from the same
weights with the same seed and prompts; only the KL implementation changes:

    no_kl            beta = 0
    k1_as_loss       k1 as loss (c = 1)
    k1_in_reward     k1 in the reward, PPO-style (c = delta)
    k2_as_loss       k2 as loss (c = delta, the principled on-policy gradient)
    k3_as_loss       k3 as loss (c = 1 - exp(-delta): GRPO paper, verl low_var_kl without its clamp)
    trl_default      TRL 1.16's own KL: k3 times a differentiable IS ratio (use_bias_correction_kl=True)
    off_policy_no_is 4 optimisation steps per generation batch, k2 as loss without importance weights
    off_policy_is    the same with importance weights (sg(w) * k2, c = w * delta)

Per step it records the reward, KL(pi_theta || pi_ref) on held-out prompts (exact over the
whole vocabulary at every position of continuations sampled from the policy, summed over the
continuation; the reference for this evaluation is a local copy of the served weights), the
norm of the KL term's gradient, the mean |c - c*| and the distance of the weights from the
start. Output in OUT: study.json (every number), study.png (the curves) and table.md (the
claims, with what was observed).

    python examples/kl_study.py OUT            # the full study (about 16 minutes on 2 CPU cores)
    python examples/kl_study.py OUT --quick    # two steps of one group per setting (CI)

A server is started for the run (``klservice serve`` on the embedded model, free ports), or
pass ``--target HOST:PORT`` of one already serving the embedded model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import re
import sys
import time

BETA = 0.3
MAX_COMPLETION = 8  # tokens per completion
#: Training prompts, completed by the base model (no chat template); held-out ones for the KL evaluation.
TEMPLATES = [
    "My favourite number between 1 and 100 is",
    "My lucky number from 1 to 100 is",
    "The number between 1 and 100 that I like best is",
    "If I had to pick a number between 1 and 100, it would be",
]
HELD_OUT = [
    "The best number between 1 and 100 is",
    "My chosen number from 1 to 100 is",
    "Asked for a number between 1 and 100, I say",
    "A number between 1 and 100 I would pick is",
]
NUMBER = re.compile(r"\d+")


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    beta: float = BETA
    kl_spec: object = None  # None: reference mode (TRL's own KL formula)
    num_iterations: int = 1
    label: str = ""


def settings() -> list[Setting]:
    from klservice_client import kl

    k1_as_loss = kl.KLSpec(estimator="k1", mode="as_loss")
    return [
        Setting("no_kl", beta=0.0, label="no KL (beta = 0)"),
        Setting("k1_as_loss", kl_spec=k1_as_loss, label="k1 as loss"),
        Setting("k1_in_reward", kl_spec="ppo_k1_in_reward", label="k1 in reward"),
        Setting("k2_as_loss", kl_spec="principled", label="k2 as loss"),
        Setting("k3_as_loss", kl_spec="grpo_k3_as_loss", label="k3 as loss"),
        Setting("trl_default", kl_spec=None, label="TRL default (w * k3)"),
        Setting("off_policy_no_is", kl_spec="principled", num_iterations=4, label="off-policy, k2 as loss, no IS"),
        Setting("off_policy_is", kl_spec="principled_off_policy", num_iterations=4, label="off-policy, sg(w) * k2"),
    ]


def number_reward(completions, **kwargs):
    """The first number of the answer divided by 100 (bigger is better), 0 without one in 1..100."""
    rewards = []
    for completion in completions:
        match = NUMBER.search(completion)
        value = int(match.group()) if match else 0
        rewards.append(value / 100.0 if 1 <= value <= 100 else 0.0)
    return rewards


class HeldOutKL:
    """Exact KL(pi_theta || pi_ref) along continuations sampled from the policy on held-out prompts."""

    def __init__(self, model_dir, tokenizer, new_tokens: int, seed: int = 1234):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.tokenizer = tokenizer
        self.new_tokens = new_tokens
        self.seed = seed
        self.prompts = HELD_OUT

    def __call__(self, policy) -> float:
        torch = self.torch
        state = torch.get_rng_state()  # the evaluation must not move the training's random stream
        try:
            torch.manual_seed(self.seed)
            total = 0.0
            was_training = policy.training
            policy.eval()
            with torch.no_grad():
                for prompt in self.prompts:
                    ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
                    out = policy.generate(ids, do_sample=True, max_new_tokens=self.new_tokens, temperature=1.0,
                                          top_k=0, top_p=1.0, pad_token_id=self.tokenizer.pad_token_id)
                    start = ids.shape[1] - 1
                    logp = torch.log_softmax(policy(out).logits[0, start:-1].double(), -1)
                    logq = torch.log_softmax(self.reference(out).logits[0, start:-1].double(), -1)
                    total += float((logp.exp() * (logp - logq)).sum())
            if was_training:
                policy.train()
            return total / len(self.prompts)
        finally:
            torch.set_rng_state(state)


def run_setting(setting: Setting, args, model_dir, target, dataset, tokenizer, evaluate) -> list[dict]:
    from transformers import PrinterCallback, TrainerCallback, set_seed
    from trl import GRPOConfig

    from klservice_client.integrations.trl import KLServiceGRPOTrainer

    set_seed(args.seed)
    records: list[dict] = []

    class Record(TrainerCallback):
        def __init__(self):
            self.start = None

        def on_train_begin(self, args_, state, control, model=None, **kwargs):
            self.start = [p.detach().clone() for p in model.parameters()]

        def on_log(self, args_, state, control, logs=None, model=None, **kwargs):
            if "loss" not in (logs or {}):  # the end-of-training summary, not a step
                return
            distance = math.sqrt(sum(float(((p.detach() - p0) ** 2).sum()) for p, p0 in zip(model.parameters(), self.start)))
            record = {
                "step": state.global_step,
                "reward": logs.get("reward"),
                "kl_grad_norm": logs.get("kl/grad_norm", 0.0),
                "coef_bias_abs_mean": logs.get("kl/coef_bias_abs_mean"),
                "k3_mean": logs.get("kl/k3_mean"),
                "is_weight_mean": logs.get("kl/is_weight_mean"),
                "param_distance": distance,
            }
            if state.global_step % args.eval_every == 0 or state.global_step == state.max_steps:
                record["heldout_kl"] = evaluate(model)
            records.append(record)
            print(f"  [{setting.name}] step {state.global_step}: " + ", ".join(
                f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float)), flush=True)

    config = GRPOConfig(
        output_dir=str(args.out / "runs" / setting.name),
        run_name=f"kl-study-{setting.name}",
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.prompts_per_step * args.group_size,
        num_generations=args.group_size,
        max_completion_length=MAX_COMPLETION,
        max_steps=args.steps,
        num_iterations=setting.num_iterations,
        beta=setting.beta,
        temperature=1.0,
        bf16=False,
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        seed=args.seed,
        data_seed=args.seed,
        disable_tqdm=True,
    )
    trainer = KLServiceGRPOTrainer(
        model=str(model_dir),
        reward_funcs=number_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        klservice=target,
        kl_spec=setting.kl_spec,
        log_kl_grad_norm=setting.beta != 0.0,
        callbacks=[Record()],
    )
    trainer.remove_callback(PrinterCallback)  # the Record callback prints one line per step instead
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    trainer.kl_client.close()
    print(f"  [{setting.name}] {seconds:.0f} s", flush=True)
    for record in records:
        record["seconds_total"] = seconds
    return records


def series(records, key):
    return [(r["step"], r[key]) for r in records if r.get(key) is not None]


def final(records, key) -> float:
    values = series(records, key)
    return values[-1][1] if values else float("nan")


def max_abs_diff(a, b, key) -> float:
    left, right = dict(series(a, key)), dict(series(b, key))
    common = sorted(set(left) & set(right))
    return max((abs(left[s] - right[s]) for s in common), default=float("nan"))


def mean_of(records, key) -> float:
    values = [v for _, v in series(records, key)]
    return sum(values) / len(values) if values else float("nan")


def claims_table(results: dict[str, list[dict]]) -> str:
    r = results
    # Cells say "\\|x\\|" for |x|: a bare "|" would start a new Markdown cell.
    lines = ["| claim (arXiv 2510.01555) | measured | holds here? |", "|---|---|---|"]

    def verdict(ok: bool) -> str:
        return "yes" if ok else "no"

    # 1. k1 as loss does not regularise: it moves like no KL, not like a real KL penalty.
    gap_no_kl = abs(final(r["k1_as_loss"], "heldout_kl") - final(r["no_kl"], "heldout_kl"))
    gap_k2 = abs(final(r["k1_as_loss"], "heldout_kl") - final(r["k2_as_loss"], "heldout_kl"))
    lines.append(
        f"| k1 as loss does not regularise (tracks no KL) | final held-out KL: k1-as-loss {final(r['k1_as_loss'], 'heldout_kl'):.4f}, "
        f"no KL {final(r['no_kl'], 'heldout_kl'):.4f}, k2-as-loss {final(r['k2_as_loss'], 'heldout_kl'):.4f}; "
        f"weight distance from start {final(r['k1_as_loss'], 'param_distance'):.4f} vs no KL {final(r['no_kl'], 'param_distance'):.4f} "
        f"| {verdict(gap_no_kl < gap_k2)} |"
    )
    # 2. k2 as loss == k1 in reward on-policy: the same trajectory up to float noise.
    d_reward = max_abs_diff(r["k2_as_loss"], r["k1_in_reward"], "reward")
    d_kl = max_abs_diff(r["k2_as_loss"], r["k1_in_reward"], "heldout_kl")
    d_param = max_abs_diff(r["k2_as_loss"], r["k1_in_reward"], "param_distance")
    lines.append(
        f"| k2 as loss and k1 in reward give the same gradient on-policy | max \\|difference\\| over the run: reward {d_reward:.2g}, "
        f"held-out KL {d_kl:.2g}, weight distance {d_param:.2g} | {verdict(max(d_reward, d_kl) < 1e-3)} |"
    )
    # 3. k3 as loss differs from them.
    bias_k3 = mean_of(r["k3_as_loss"], "coef_bias_abs_mean")
    lines.append(
        f"| k3 as loss differs from k2 as loss | mean \\|c - c*\\| {bias_k3:.3g} (k2: {mean_of(r['k2_as_loss'], 'coef_bias_abs_mean'):.2g}); "
        f"final held-out KL {final(r['k3_as_loss'], 'heldout_kl'):.4f} vs {final(r['k2_as_loss'], 'heldout_kl'):.4f}; "
        f"max \\|reward difference\\| {max_abs_diff(r['k3_as_loss'], r['k2_as_loss'], 'reward'):.2g} | "
        f"{verdict(bias_k3 > 1e-4 and max_abs_diff(r['k3_as_loss'], r['k2_as_loss'], 'param_distance') > 1e-4)} |"
    )
    # 4. Off-policy without IS is biased.
    bias_no_is = mean_of(r["off_policy_no_is"], "coef_bias_abs_mean")
    bias_is = mean_of(r["off_policy_is"], "coef_bias_abs_mean")
    kl_no_is, kl_is = final(r["off_policy_no_is"], "heldout_kl"), final(r["off_policy_is"], "heldout_kl")
    lines.append(
        f"| off-policy without IS is biased | mean \\|c - c*\\| without IS {bias_no_is:.3g}, with IS {bias_is:.2g}; "
        f"final held-out KL {kl_no_is:.4f} without IS vs {kl_is:.4f} with | "
        f"{verdict(bias_no_is > 10 * max(bias_is, 1e-12))} for the coefficient; its effect on the held-out KL "
        f"here: {kl_no_is / kl_is - 1:+.0%} |"
    )
    # TRL's default is the principled gradient: same coefficient as k2 as loss on-policy (w = 1).
    lines.append(
        f"| (TRL's default w * k3 has the principled gradient) | mean \\|c - c*\\| {mean_of(r['trl_default'], 'coef_bias_abs_mean'):.2g}; "
        f"max \\|held-out KL difference\\| to k2 as loss {max_abs_diff(r['trl_default'], r['k2_as_loss'], 'heldout_kl'):.2g} "
        f"| {verdict(mean_of(r['trl_default'], 'coef_bias_abs_mean') < 1e-4)} |"
    )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, list[dict]], labels: dict[str, str], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("reward", "reward (the number / 100)"),
        ("heldout_kl", "KL(pi_theta || pi_ref), held-out"),
        ("kl_grad_norm", "norm of the KL term's gradient"),
        ("coef_bias_abs_mean", "mean |c - c*|"),
    ]
    colours = dict(zip(labels, plt.get_cmap("tab10").colors))  # one colour per setting in every panel
    figure, axes = plt.subplots(2, 2, figsize=(12, 8))
    for axis, (key, title) in zip(axes.flat, panels):
        for name, records in results.items():
            points = series(records, key)
            if points:
                style = "--" if name in ("k1_in_reward", "trl_default", "off_policy_is") else "-"
                axis.plot([s for s, _ in points], [v for _, v in points], style, label=labels[name], marker=".",
                          color=colours[name])
        axis.set_title(title)
        axis.set_xlabel("optimisation step")
        if key == "coef_bias_abs_mean":
            axis.set_yscale("symlog", linthresh=1e-4)
    axes[0, 0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("out", type=pathlib.Path, help="output directory (study.json, study.png, table.md)")
    parser.add_argument("--quick", action="store_true", help="two steps of one prompt's group per setting (a smoke run)")
    parser.add_argument("--steps", type=int, default=20, help="optimisation steps per setting (default 20)")
    parser.add_argument("--target", help="a running server on the embedded model (default: start one)")
    parser.add_argument("--only", help="comma-separated setting names to run (default: all)")
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--prompts-per-step", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--eval-every", type=int, default=2, help="held-out KL every N steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=pathlib.Path, default=None, help="where the embedded model is converted")
    args = parser.parse_args(argv)
    if args.quick:  # two steps of one GRPO group per setting: every claim's quantity is computed, none settled
        args.steps, args.eval_every, args.prompts_per_step = 2, 1, 1
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from datasets import Dataset
    from transformers import AutoTokenizer

    from klservice.bench import ServiceProcess
    from klservice.default_model import default_cache_dir, ensure_default_model

    model_dir = ensure_default_model(args.cache_dir or default_cache_dir(), progress=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = TEMPLATES * 16
    dataset = Dataset.from_dict({"prompt": prompts})
    evaluate = HeldOutKL(model_dir, tokenizer, new_tokens=MAX_COMPLETION)

    server = None
    target = args.target
    if target is None:  # a `klservice serve` subprocess on the embedded model, free loopback ports
        server = ServiceProcess(["--model", str(model_dir), "--device", "cpu"], dict(os.environ), args.out / "server.log")
        target = server.target()
    try:
        from klservice_client import KLClient

        with KLClient(target) as client:
            client.wait_ready(timeout=300)
        chosen = [s for s in settings() if not args.only or s.name in args.only.split(",")]
        results, labels = {}, {s.name: s.label for s in settings()}
        started = time.perf_counter()
        for index, setting in enumerate(chosen, 1):
            print(f"[{index}/{len(chosen)}] {setting.label}", flush=True)
            results[setting.name] = run_setting(setting, args, model_dir, target, dataset, tokenizer, evaluate)
        total = time.perf_counter() - started
    finally:
        if server is not None:
            server.stop()

    summary = {"steps": args.steps, "beta": BETA, "learning_rate": args.learning_rate, "seconds": total,
               "batch": {"prompts": args.prompts_per_step, "group_size": args.group_size}}
    (args.out / "study.json").write_text(json.dumps({"config": summary, "runs": results}, indent=1))
    plot(results, labels, args.out / "study.png")
    if set(results) >= {s.name for s in settings()}:
        table = claims_table(results)
        (args.out / "table.md").write_text(table)
        print(table)
    print(f"study: {len(results)} settings x {args.steps} steps in {total / 60:.1f} min; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
