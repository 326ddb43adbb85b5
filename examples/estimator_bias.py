"""Bias and variance of KL-gradient implementations on a categorical policy.

Reproduces the analysis of "Rethinking KL Regularization in RLHF" (arXiv 2510.01555) on a
policy small enough for the exact answer: pi_theta = softmax(theta) over a few dozen
tokens, a reference pi_ref far from it, and a behaviour policy pi_old for off-policy
samples. The exact gradient of KL(pi_theta || pi_ref) with respect to theta is

    g = sum_y pi(y) (log pi(y) - log pi_ref(y)) (e_y - pi).

Each implementation (k1/k2/k3 in the reward or as a loss, with or without importance
weights) is turned into per-sample gradient coefficients c by
`klservice_client.kl.compute_kl`; a sample y then contributes c * grad log pi(y) =
c * (e_y - pi). Over N samples the script reports, relative to ||g||:

- bias      ||E[g_hat] - g|| / ||g||  (Monte-Carlo, and exact by enumerating the tokens);
- variance  E||g_hat - E g_hat||^2 / ||g||^2 of one sample's gradient (divide by N for the mean's).

It writes OUTDIR/estimator_bias.md (the table it prints), OUTDIR/estimator_bias.json and
OUTDIR/coefficients.png (c as a function of delta = logp - ref for k1/k2/k3 in reward and
as loss, like the paper's coefficient figure).

Usage::

    python examples/estimator_bias.py out/ --samples 200000 --seed 0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import numpy as np

from klservice_client import kl


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One KL implementation as a trainer writes it, and the samples it sees."""

    name: str  #: the loss term, e.g. "sg(w) * k2 as loss"
    sampling: str  #: "on-policy" (y ~ pi_theta) or "off-policy" (y ~ pi_old)
    spec: kl.KLSpec
    principled: bool  #: unbiased for the reverse-KL gradient in theory
    note: str = ""


def _spec(**fields) -> kl.KLSpec:
    return kl.KLSpec(**fields)


IMPLEMENTATIONS = [
    Implementation("k1 in reward", "on-policy", _spec(estimator="k1", mode="in_reward"), True, "PPO default"),
    Implementation("k2 in reward", "on-policy", _spec(estimator="k2", mode="in_reward"), False),
    Implementation("k3 in reward", "on-policy", _spec(estimator="k3", mode="in_reward"), False),
    Implementation("k1 as loss", "on-policy", _spec(estimator="k1", mode="as_loss"), False, "zero expectation"),
    Implementation("k2 as loss", "on-policy", _spec(estimator="k2", mode="as_loss"), True, "= k1 in reward"),
    Implementation("k3 as loss", "on-policy", _spec(estimator="k3", mode="as_loss"), False, "GRPO paper / verl low_var_kl"),
    Implementation("k1 in reward", "off-policy", _spec(estimator="k1", mode="in_reward"), False, "no IS"),
    Implementation("k2 as loss", "off-policy", _spec(estimator="k2", mode="as_loss"), False, "no IS"),
    Implementation("k3 as loss", "off-policy", _spec(estimator="k3", mode="as_loss"), False, "no IS"),
    Implementation("sg(w) * k1 in reward", "off-policy",
                   _spec(estimator="k1", mode="in_reward", importance_sampling="token"), True),
    Implementation("sg(w) * k2 as loss", "off-policy",
                   _spec(estimator="k2", mode="as_loss", importance_sampling="token"), True, "principled_off_policy"),
    Implementation("sg(w) * k3 as loss", "off-policy",
                   _spec(estimator="k3", mode="as_loss", importance_sampling="token"), False),
    Implementation("w * k3 as loss (w differentiable)", "off-policy",
                   _spec(estimator="k3", mode="as_loss", importance_sampling="token", differentiable_weight=True),
                   True, "TRL bias correction, slime"),
    Implementation("w * k1 as loss (w differentiable)", "off-policy",
                   _spec(estimator="k1", mode="as_loss", importance_sampling="token", differentiable_weight=True),
                   True, "unbiased, noisier"),
    Implementation("sg(min(w, 10)) * k2 as loss", "off-policy",
                   _spec(estimator="k2", mode="as_loss", importance_sampling="token", truncation=10.0),
                   False, "OpenRLHF; truncation bias"),
    Implementation("sg(min(w, 2)) * k2 as loss", "off-policy",
                   _spec(estimator="k2", mode="as_loss", importance_sampling="token", truncation=2.0),
                   False, "truncation bias"),
]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


def make_problem(vocab: int, seed: int) -> dict:
    """Policy, reference (about 1 nat away) and behaviour policy, with the exact KL gradient."""
    rng = np.random.default_rng(seed)
    theta = rng.normal(0.0, 1.0, vocab)
    log_pi = log_softmax(theta)
    log_ref = log_softmax(rng.normal(0.0, 1.0, vocab))
    log_old = log_softmax(theta + rng.normal(0.0, 1.0, vocab))
    pi = np.exp(log_pi)
    exact = (pi * (log_pi - log_ref)) @ (np.eye(vocab) - pi[None, :])
    return dict(rng=rng, log_pi=log_pi, log_ref=log_ref, log_old=log_old, pi=pi, exact=exact,
                kl=float(pi @ (log_pi - log_ref)))


def coefficients(problem: dict, spec: kl.KLSpec, tokens: np.ndarray, sampling: str) -> np.ndarray:
    """compute_kl's coefficient for each sampled token, each a one-token sequence."""
    logp, ref, old = problem["log_pi"][tokens], problem["log_ref"][tokens], problem["log_old"][tokens]
    behaviour = old if sampling == "off-policy" else logp
    out = kl.compute_kl(logp, ref, np.ones(len(tokens), dtype=np.int64), spec,
                        old_logprobs=behaviour if spec.needs_old_logprobs else None)
    return np.asarray(out.coef, dtype=np.float64)


def gradient_moments(c: np.ndarray, tokens: np.ndarray, pi: np.ndarray, probabilities: np.ndarray | None = None):
    """Mean per-sample gradient c * (e_y - pi) and its total variance E||g - E g||^2.

    Samples are weighted by `probabilities` (an exact expectation over all tokens) or
    equally (Monte-Carlo). No N x V matrix is built:
    g_j = c ([y = j] - pi_j), so E g_j = E[c; y = j] - pi_j E[c] and
    E||g||^2 = E[c^2 (1 - 2 pi_y + ||pi||^2)].
    """
    p = np.full(len(c), 1.0 / len(c)) if probabilities is None else probabilities
    vocab = len(pi)
    mean = np.bincount(tokens, weights=p * c, minlength=vocab) - pi * (p @ c)
    second = p @ (c * c * (1 - 2 * pi[tokens] + pi @ pi))
    return mean, max(second - mean @ mean, 0.0)


def evaluate(problem: dict, samples: dict, implementation: Implementation) -> dict:
    exact_g = problem["exact"]
    norm = np.linalg.norm(exact_g)
    tokens = samples[implementation.sampling]
    c = coefficients(problem, implementation.spec, tokens, implementation.sampling)
    mc_mean, mc_variance = gradient_moments(c, tokens, problem["pi"])

    # Exact expectation: every token once, weighted by the sampling distribution.
    vocab = np.arange(len(problem["pi"]))
    q = problem["pi"] if implementation.sampling == "on-policy" else np.exp(problem["log_old"])
    c_all = coefficients(problem, implementation.spec, vocab, implementation.sampling)
    ex_mean, ex_variance = gradient_moments(c_all, vocab, problem["pi"], probabilities=q)
    return {
        "name": implementation.name,
        "sampling": implementation.sampling,
        "spec": implementation.spec.describe(),
        "principled": implementation.principled,
        "note": implementation.note,
        "relative_bias": float(np.linalg.norm(mc_mean - exact_g) / norm),
        "relative_variance": float(mc_variance / norm**2),
        "exact_relative_bias": float(np.linalg.norm(ex_mean - exact_g) / norm),
        "exact_relative_variance": float(ex_variance / norm**2),
        # What the Monte-Carlo bias of an unbiased method looks like at this N: ~sqrt(variance / N).
        "noise_floor": float(np.sqrt(mc_variance / len(tokens)) / norm),
    }


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| sampling | implementation | coefficient spec | principled | rel. bias (MC) | rel. bias (exact) "
        "| rel. variance | note |",
        "|---|---|---|---|---:|---:|---:|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['sampling']} | {row['name']} | `{row['spec']}` | {'yes' if row['principled'] else 'no'} "
            f"| {row['relative_bias']:.3f} | {row['exact_relative_bias']:.3f} | {row['relative_variance']:.2f} "
            f"| {row['note']} |"
        )
    return "\n".join(lines)


def plot_coefficients(path: pathlib.Path) -> None:
    """c(delta) for k1/k2/k3 in reward and as loss (on-policy), with the principled c = delta."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    delta = np.linspace(-3.0, 3.0, 601)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, mode in zip(axes, ("in_reward", "as_loss")):
        for estimator, style in (("k1", "-"), ("k2", "--"), ("k3", "-.")):
            out = kl.compute_kl(delta, np.zeros_like(delta), [len(delta)], _spec(estimator=estimator, mode=mode))
            ax.plot(delta, out.coef, style, label=f"{estimator} {mode.replace('_', ' ')}")
        ax.plot(delta, delta, ":", color="black", label="principled c* = delta")
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
        ax.set_title(f"KL {mode.replace('_', ' ')}")
        ax.set_xlabel("delta = log pi_theta - log pi_ref")
        ax.set_ylim(-6, 6)
        ax.legend(loc="upper left", fontsize=8)
    axes[0].set_ylabel("gradient coefficient c")
    fig.suptitle("Equivalent gradient coefficients (c * grad log pi); on-policy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring for details.")
    parser.add_argument("outdir", type=pathlib.Path, help="folder for estimator_bias.md/.json and coefficients.png")
    parser.add_argument("--samples", type=int, default=200_000, help="Monte-Carlo samples per setting (default 200000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the policies and the samples (default 0)")
    parser.add_argument("--vocab", type=int, default=32, help="number of tokens of the categorical policy (default 32)")
    args = parser.parse_args(argv)
    if args.samples < 2 or args.vocab < 2:
        parser.error("--samples and --vocab must be at least 2")

    started = time.perf_counter()
    args.outdir.mkdir(parents=True, exist_ok=True)
    problem = make_problem(args.vocab, args.seed)
    rng = problem["rng"]
    samples = {
        "on-policy": rng.choice(args.vocab, size=args.samples, p=problem["pi"] / problem["pi"].sum()),
        "off-policy": rng.choice(args.vocab, size=args.samples,
                                 p=np.exp(problem["log_old"]) / np.exp(problem["log_old"]).sum()),
    }
    try:
        from tqdm import tqdm
    except ImportError:
        def tqdm(iterable, **_):
            return iterable
    rows = [evaluate(problem, samples, implementation)
            for implementation in tqdm(IMPLEMENTATIONS, desc="implementations", file=sys.stderr)]

    weights = np.exp(problem["log_pi"] - problem["log_old"])
    header = (
        f"Categorical policy, {args.vocab} tokens, KL(pi_theta || pi_ref) = {problem['kl']:.3f} nats, "
        f"||grad KL|| = {np.linalg.norm(problem['exact']):.4f}; off-policy weights pi/pi_old in "
        f"[{weights.min():.2f}, {weights.max():.2f}]; {args.samples} samples per setting, seed {args.seed}.\n"
        f"Bias: ||E[g_hat] - g|| / ||g|| (MC noise floor for unbiased methods ~ "
        f"{min(r['noise_floor'] for r in rows):.3f}-{max(r['noise_floor'] for r in rows):.3f}); "
        f"variance: E||g_hat - E g_hat||^2 / ||g||^2 per sample."
    )
    table = markdown_table(rows)
    print(header + "\n\n" + table)
    (args.outdir / "estimator_bias.md").write_text(f"# KL gradient estimators: bias and variance\n\n{header}\n\n{table}\n")
    plot_coefficients(args.outdir / "coefficients.png")
    payload = {
        "config": {"samples": args.samples, "seed": args.seed, "vocab": args.vocab},
        "kl": problem["kl"],
        "exact_gradient": problem["exact"].tolist(),
        "exact_gradient_norm": float(np.linalg.norm(problem["exact"])),
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }
    (args.outdir / "estimator_bias.json").write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
