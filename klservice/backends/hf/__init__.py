"""The Hugging Face transformers backend: reference log-probs with torch, on CPU or CUDA.

One concern per module, in the order of the data path:

- `loading`: a model folder to a frozen model on its device, with no code from a hub;
- `layout`: one call's sequences as one packed row (`CallLayout`), a group's prompt once;
- `attention`: attention over that row (`tree_attention` and its kernels: SDPA per segment, FlashAttention
  varlen passes, FlexAttention);
- `chunking`: long rows layer by layer in chunks of rows, so memory stays a small share of the call;
- `head`: the LM head at the scored rows, block by block, to float32 log-probs;
- `checks`: the load-time checks of each path against the model's own forward, at the dtype's noise;
- `backend`: `HFBackend`, which ties them together.
"""

from klservice.backends.hf.backend import HFBackend
from klservice.backends.hf.loading import TORCH_DTYPES, resolve_device, transformers_progress

__all__ = ["HFBackend", "TORCH_DTYPES", "resolve_device", "transformers_progress"]
