"""The FLOP model of a run and the matmul peak that turns it into a utilisation.

Model FLOPs of a run: 2 x non-embedding parameters per token the algorithm actually computed
(a shared prompt once per group, the last token of a sequence never fed to the service's
algorithm, padding not counted), plus attention 4 x layers x (heads x head_dim) x context
per computed token (QK^T and AV, causal context = position + 1), plus the LM head
2 x hidden x vocab per row it is applied to (scored tokens for the service, every position
for the naive path).
"""

from __future__ import annotations

import dataclasses
import time

from klservice.backends.base import split_shared
from klservice.bench.measure import sync
from klservice.bench.workload import Workload
from klservice.scheduler import PlannedCall


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the FLOP model needs to know about the network."""

    layers: int
    hidden: int
    attention_dim: int  # heads x head_dim (the query width)
    vocab: int
    non_embedding_params: int

    @classmethod
    def of(cls, model) -> "ModelShape":
        """The shape of a transformers causal LM (its config and parameters)."""
        config = model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        unique = {id(p): p.numel() for p in model.parameters()}
        embedding_ids = {id(model.get_input_embeddings().weight)}
        head = model.get_output_embeddings()
        if head is not None:
            embedding_ids.add(id(head.weight))
        non_embedding = sum(n for key, n in unique.items() if key not in embedding_ids)
        return cls(config.num_hidden_layers, config.hidden_size, heads * head_dim, config.vocab_size, non_embedding)

    def body_flops(self, first: int, stop: int) -> float:
        """Positions first .. stop-1 of one sequence through the body (matmuls + causal attention)."""
        if stop <= first:
            return 0.0
        context = (stop * (stop + 1) - first * (first + 1)) / 2  # sum of (p + 1)
        return 2.0 * self.non_embedding_params * (stop - first) + 4.0 * self.layers * self.attention_dim * context

    def head_flops(self, rows: int) -> float:
        return 2.0 * self.hidden * self.vocab * rows


def algorithm_flops(
    shape: ModelShape, workload: Workload, calls: list[PlannedCall], share_prompts: bool, min_shared_prompt: int
) -> float:
    """Model FLOPs of the service's algorithm on `workload` as planned into `calls` (see the module docstring)."""
    total = 0.0
    for call in calls:
        starts = [workload.starts[i] for i in call.indices]
        shared, alone = split_shared(call.prompt_groups, starts, min_shared_prompt if share_prompts else None)
        for group in shared:
            members = [call.indices[p] for p in group]
            start = workload.starts[members[0]]
            total += shape.body_flops(0, start)
            for i in members:
                total += shape.body_flops(start, len(workload.sequences[i]) - 1)
        for p in alone:
            total += shape.body_flops(0, len(workload.sequences[call.indices[p]]) - 1)
    return total + shape.head_flops(workload.scored)


def naive_flops(shape: ModelShape, workload: Workload) -> float:
    """Model FLOPs of the naive path: every real token through the body and the LM head."""
    return sum(shape.body_flops(0, len(s)) + shape.head_flops(len(s)) for s in workload.sequences)


def measure_matmul_peak(torch, device, dtype, size: int, repeats: int = 8) -> float:
    """Best FLOP/s of a size^3 matmul (the utilisation denominator)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    c = torch.empty(size, size, device=device, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b, out=c)
    best = float("inf")
    for _ in range(repeats):
        sync(torch, device)
        started = time.perf_counter()
        torch.mm(a, b, out=c)
        sync(torch, device)
        best = min(best, time.perf_counter() - started)
    return 2.0 * size**3 / best
