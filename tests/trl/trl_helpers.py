"""Constants and helpers shared by the TRL integration tests."""

from __future__ import annotations

BETA = 0.1
TEMPERATURE = 0.7
PROMPTS = ["Hello there", "The capital of France is", "a", "One two three four five six seven"]


def length_reward(completions, **kwargs):
    """A programmatic reward: the completion's length in characters."""
    return [float(len(c)) for c in completions]


def perturb(model, seed: int = 0, scale: float = 0.02) -> None:
    """Move the policy away from the reference (same seeded noise for every trainer)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
