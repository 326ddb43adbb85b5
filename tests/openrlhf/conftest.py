"""Fixtures for the OpenRLHF integration: OpenRLHF 0.11.2's own code on CPU, a real klservice server.

These tests run in `.venv-openrlhf` (`make test-openrlhf`), which holds OpenRLHF and the light
client; the server runs from the main environment (`tests/framework_support.py`).

Two modules OpenRLHF imports at module top cannot be installed on a CPU machine, and the code
these tests run never calls them; they are replaced by stubs whose every use raises:

- ``vllm`` (``openrlhf.trainer.ray.vllm_engine`` imports ``vllm``, ``vllm.inputs.TokensPrompt`` and
  ``vllm.utils.random_uuid``; ``openrlhf.trainer.ppo_utils.samples_generator`` imports
  ``vllm.SamplingParams``): vLLM's CUDA build needs a GPU. Only its rollout engines use it,
  and the tests give the experience maker rollouts of their own.
- ``flash_attn_2_cuda`` (``flash_attn``'s compiled CUDA kernels, imported by
  ``flash_attn.flash_attn_interface`` when ``openrlhf.models.ring_attn_utils`` imports
  ``flash_attn.bert_padding``): flash-attn is installed without its CUDA build. Only packed
  samples (``--ds.packing_samples``) and flash attention call it; the tests use neither.

The stubs are files in a temporary folder put first on ``sys.path`` here and on ``PYTHONPATH``
of Ray's worker processes (`ray_cluster`), so every process imports the same ones.
"""

from __future__ import annotations

import os
import pathlib
import runpy
import sys
import tempfile

import pytest

if os.environ.get("CI") == "true":
    import openrlhf  # noqa: F401  (CI must run these tests: a missing OpenRLHF is an error, not a skip)
else:
    pytest.importorskip("openrlhf", reason="OpenRLHF is not installed (make install-openrlhf)")

from tests.framework_support import (  # noqa: E402,F401 - the fixtures both framework suites share
    build_tiny_llama,
    embedded_dir,
    model_cache_dir,
    served,
    tiny_dir,
)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

def _stub(module: str, names: list[str]) -> str:
    """A stub module: each of `names` raises when called, any other attribute does not exist."""
    message = (
        f"{module}.{{name}}: a stub of the klservice OpenRLHF tests (not installable on a CPU machine); "
        "the code under test must not use it"
    )
    lines = ["def __getattr__(name):", f"    raise AttributeError(f{message!r})", ""]
    for name in names:
        lines += [f"def {name}(*args, **kwargs):", f"    raise RuntimeError({message.format(name=name)!r})", ""]
    return "\n".join(lines)


STUBS = {
    "vllm/__init__.py": "from vllm import inputs, utils  # noqa: F401\n" + _stub("vllm", ["SamplingParams"]),
    "vllm/inputs.py": _stub("vllm.inputs", ["TokensPrompt"]),
    "vllm/utils.py": _stub("vllm.utils", ["random_uuid"]),
    "flash_attn_2_cuda.py": _stub("flash_attn_2_cuda", []),
}


def _write_stubs() -> str:
    folder = pathlib.Path(tempfile.mkdtemp(prefix="openrlhf-cpu-stubs-"))
    for name, source in STUBS.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return str(folder)


STUB_DIR = _write_stubs()
sys.path.insert(0, STUB_DIR)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the session: 2 CPUs and 1 GPU *as a logical resource only* (no device).

    The GPU lets OpenRLHF's own launcher schedule its policy actor, which then stops at its first
    CUDA call (tests/openrlhf/test_launcher.py); nothing here runs on a GPU.
    """
    import ray

    python_path = os.pathsep.join([STUB_DIR, str(REPO_ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    ray.init(
        num_cpus=2,
        num_gpus=1,
        include_dashboard=False,
        logging_level="WARNING",
        runtime_env={"env_vars": {"PYTHONPATH": python_path, "TOKENIZERS_PARALLELISM": "false"}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def policy_dir(tmp_path_factory, embedded_dir) -> pathlib.Path:
    """The policy of the experience maker: the same architecture, other weights (seed 1), so KL is not 0."""
    return build_tiny_llama(tmp_path_factory.mktemp("policy-llama"), embedded_dir, seed=1)


@pytest.fixture(scope="session")
def server(tiny_dir, embedded_dir) -> str:
    """One real klservice server (float32, CPU) serving "tiny" (the default) and "smol" (the embedded model)."""
    with served({"tiny": tiny_dir, "smol": embedded_dir}) as target:
        yield target


class _Parsed(Exception):
    """Carries train_ppo_ray's parsed arguments out of its __main__ block."""


def train_ppo_ray_args(*argv: str):
    """OpenRLHF's own arguments for `argv`: train_ppo_ray's parser, checks and defaults, as its __main__ ends.

    Its __main__ block parses, checks, fills defaults and calls ``train(args)``, whose first step
    with the arguments is ``get_strategy(args)``: the arguments are taken there, before anything is
    built. Needs Ray initialised (``train()`` would otherwise start it first).
    """
    import openrlhf.utils as utils
    import ray

    assert ray.is_initialized(), "train_ppo_ray_args: start Ray first (the ray_cluster fixture)"

    def capture(args):
        raise _Parsed(args)

    saved_argv, saved_get_strategy = sys.argv, utils.get_strategy
    sys.argv, utils.get_strategy = ["train_ppo_ray", *argv], capture
    try:
        runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__")
    except _Parsed as parsed:
        return parsed.args[0]
    finally:
        sys.argv, utils.get_strategy = saved_argv, saved_get_strategy
    raise AssertionError("train_ppo_ray's __main__ ended without calling get_strategy(args)")


@pytest.fixture(scope="session")
def openrlhf_args(ray_cluster):
    """`train_ppo_ray_args` (needs the session's Ray cluster)."""
    return train_ppo_ray_args
