"""Extra memory of scoring one long sequence at a real model's shape, on a CPU, as a GPU would count it.

What grows with a sequence does not depend on how many layers a model has (layers run one after the
other), so a model of a real shape cut to a few layers, in bfloat16, shows the extra memory of the full
model. The figure is the most bytes of tensors live at once during `HFBackend.score` (PyTorch's
allocation events: what ``torch.cuda.max_memory_allocated`` reports on a GPU), over the sequence's
full-vocab float32 logits: the (d) figure of ``klservice bench``. The CPU's attention kernel (SDPA per
segment) is not the GPU's, so this is an estimate of the GPU figure, not a measurement of it.

    python scripts/long_memory.py                                  # both shapes, 8,192 and 32,768 tokens
    python scripts/long_memory.py --shape llama-7b --tokens 8192 --chunk-rows 1000000   # layers unchunked
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", action="append", choices=("smollm2-1.7b", "llama-7b"),
                        help="model shape (repeatable; default: both)")
    parser.add_argument("--tokens", type=int, action="append", help="sequence length (repeatable; default: 8192, 32768)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers kept (default: 2)")
    parser.add_argument("--chunk-rows", type=int, default=None, help="rows per layer chunk (default: the backend's)")
    parser.add_argument("--cache-dir", default=None, help="where the cut models are written (default: a temp dir)")
    args = parser.parse_args()

    import numpy as np

    from klservice.backends.hf import HFBackend
    from klservice.bench.measure import peak_tensor_bytes
    from klservice.bench.shapes import shaped_model

    root = Path(args.cache_dir or tempfile.mkdtemp(prefix="klservice-long-memory-"))
    for shape in args.shape or ["smollm2-1.7b", "llama-7b"]:
        lengths = args.tokens or [8192, 32768]
        folder = shaped_model(shape, root, "bfloat16", progress=True, num_hidden_layers=args.layers,
                              max_position_embeddings=max(lengths) + 1)
        backend = HFBackend(folder, dtype="bfloat16", device="cpu", progress=False, chunk_tokens=args.chunk_rows)
        vocab = backend.info().vocab_size
        for tokens in lengths:
            sequence = np.random.default_rng(0).integers(0, vocab, size=tokens)
            started = time.perf_counter()
            _, peak = peak_tensor_bytes(lambda: backend.score([sequence], [1]))
            logits = (tokens - 1) * vocab * 4
            rows = args.chunk_rows or backend._chunker.chunk_rows(tokens - 1)
            print(f"{shape} ({args.layers} layers, bfloat16), {tokens} tokens, layer chunks of {rows} rows: "
                  f"extra {peak / 2**20:.0f} MiB = {peak / logits:.1%} of full-vocab float32 logits "
                  f"({logits / 2**20:.0f} MiB); {time.perf_counter() - started:.0f} s", flush=True)
        backend.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
