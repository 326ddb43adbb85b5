"""Fixtures of the verl suite: a real klservice server, verl's own reference worker on CPU, TransferQueue.

Runs in `.venv-verl` (`make test-verl`), which holds verl 0.9.1 and the light client; the
server runs from the main environment (tests/framework_support.py). Under CI=true a missing
verl is an error, not a skip.

verl 0.9.1 knows no CPU platform: its workers ask the platform for a device and its FSDP
engine is registered for ``cuda`` only. So that verl's *own* reference worker
(``ActorRolloutRefWorker(role="ref")``, its FSDP2 engine and its log-prob code, unchanged)
runs here as the oracle, this module adds, before verl is imported:

- a ``cpu`` entry in verl's ``PlatformRegistry`` (``VERL_PLATFORM=cpu``): device ``cpu``,
  collectives over gloo, memory statistics 0; and ``VERL_ENGINE_DEVICE=cuda`` /
  ``VERL_ENGINE_VENDOR=nvidia`` so that ``EngineRegistry`` hands out its FSDP engine class;
- ``CPUOffloadPolicy(pin_memory=False)`` where verl's engine asks for ``pin_memory=True``
  for the reference (pinned memory needs an accelerator; the values are unchanged);
- the default process group, initialised here over gloo with one rank (verl's own init
  asks for ``cpu:gloo,cpu:gloo`` on this platform, which torch refuses);
- the reference's FSDP mixed precision set to float32 and ``attn_implementation=eager`` by
  ordinary verl config overrides (its defaults are bf16 and flash-attention 2).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pathlib
import socket
import sys

import pytest

if importlib.util.find_spec("verl") is None:
    if os.environ.get("CI") == "true":
        raise RuntimeError("CI=true but verl is not installed: run the verl suite through `make test-verl`")
    pytest.skip("verl is not installed (make install-verl)", allow_module_level=True)

# pytest puts tests/ on sys.path (for tests/conftest.py), where tests/trl would pass for the `trl` package that
# verl probes (importlib.util.find_spec("trl")) and imports: this suite has no use for that folder there.
_TESTS_DIR = str(pathlib.Path(__file__).resolve().parent.parent)
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or ".") != _TESTS_DIR]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.update(
    VERL_PLATFORM="cpu", VERL_ENGINE_DEVICE="cuda", VERL_ENGINE_VENDOR="nvidia",
    RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
)

import torch  # noqa: E402
from verl.plugin.platform.platform_base import PlatformBase  # noqa: E402
from verl.plugin.platform.platform_manager import PlatformRegistry  # noqa: E402


def _load_framework_support():
    """tests/framework_support.py, by its path: verl and TransferQueue each install a top-level ``tests``
    package of their own into site-packages, which hides this repository's ``tests`` from ``import``."""
    import importlib.util
    import sys

    path = pathlib.Path(__file__).resolve().parent.parent / "framework_support.py"
    spec = importlib.util.spec_from_file_location("klservice_framework_support", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


framework_support = _load_framework_support()
served = framework_support.served
model_cache_dir = framework_support.model_cache_dir  # the fixtures both framework suites share
embedded_dir = framework_support.embedded_dir
tiny_dir = framework_support.tiny_dir


class _CPUDeviceModule:
    """What verl asks of ``torch.<device>``, on CPU: torch.cpu's functions, memory statistics 0."""

    def __getattr__(self, name):
        if hasattr(torch.cpu, name):
            return getattr(torch.cpu, name)
        if name == "get_device_name":
            return lambda *args, **kwargs: "CPU"
        if name == "mem_get_info":
            return lambda *args, **kwargs: (0, 0)
        if "memory" in name:
            return lambda *args, **kwargs: 0
        if name in ("empty_cache", "ipc_collect"):
            return lambda *args, **kwargs: None
        raise AttributeError(f"torch.cpu has no {name!r} (verl's CPU platform of the tests)")


@PlatformRegistry.register(platform="cpu")
class PlatformCPU(PlatformBase):
    """verl's platform interface on a CPU-only machine (tests only)."""

    device_name = "cpu"
    vendor_name = "cpu"

    @property
    def device_module(self):
        return _CPUDeviceModule()

    def is_available(self):
        return True

    def is_platform_available(self, use_smi_check=False):
        return True

    def current_device(self):
        return "cpu"

    def device_count(self):
        return 1

    def set_device(self, device_index):
        pass

    def synchronize(self, device_index=None):
        pass

    def manual_seed(self, seed):
        torch.manual_seed(seed)

    def manual_seed_all(self, seed):
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings):
        pass

    def empty_cache(self):
        pass

    def get_device_capability(self, device_index=0):
        return (None, None)

    def communication_backend_name(self):
        return "gloo"

    def visible_devices_envvar(self):
        return "CUDA_VISIBLE_DEVICES"

    @contextlib.contextmanager
    def nvtx_range(self, msg):
        yield

    def profiler_start(self):
        pass

    def profiler_stop(self):
        pass

    def ray_resource_name(self):
        return "CPU"

    def ray_noset_envvars(self):
        return []

    def is_ipc_supported(self):
        return False

    def cudart(self):
        return None


def _unpinned_offload() -> None:
    """verl's FSDP2 engine offloads the reference with pinned memory, which needs an accelerator: unpin it."""
    import verl.workers.engine.fsdp.transformer_impl as transformer_impl

    policy = transformer_impl.CPUOffloadPolicy
    if getattr(policy, "_unpinned", False):
        return

    class UnpinnedCPUOffloadPolicy(policy):
        _unpinned = True

        def __init__(self, pin_memory: bool = True, **kwargs):
            super().__init__(pin_memory=False, **kwargs)

    transformer_impl.CPUOffloadPolicy = UnpinnedCPUOffloadPolicy


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def process_group():
    """torch.distributed with one rank over gloo, as verl's workers expect it initialised."""
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ["MASTER_PORT"] = str(_free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="session")
def model_dirs(tiny_dir, embedded_dir) -> dict[str, pathlib.Path]:
    """The served models by name: the same folders verl's reference loads."""
    return {"tiny": tiny_dir, "smollm2": embedded_dir}


@pytest.fixture(scope="session")
def target(model_dirs) -> str:
    """A real `klservice serve` of both models (tiny is the default), on CPU in float32."""
    with served(model_dirs) as address:
        yield address


def _verl_config(model_dir, *overrides: str):
    """verl's own ``ppo_trainer`` config (its Hydra defaults) for `model_dir`, on this CPU, plus `overrides`."""
    from hydra import compose, initialize_config_dir

    import verl.trainer.main_ppo as main_ppo

    config_dir = os.path.join(os.path.dirname(main_ppo.__file__), "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose("ppo_trainer", overrides=[
            f"actor_rollout_ref.model.path={model_dir}",
            "trainer.device=cpu",
            "trainer.n_gpus_per_node=1",
            "trainer.experiment_name=verl-cpu-test",
            "trainer.logger=[console]",
            "actor_rollout_ref.actor.strategy=fsdp2",
            "actor_rollout_ref.actor.ppo_mini_batch_size=8",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",
            "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4",
            "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8",
            "+actor_rollout_ref.model.override_config.attn_implementation=eager",
            "+actor_rollout_ref.ref.fsdp_config.mixed_precision={param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}",
            "data.train_batch_size=4",
            "transfer_queue.backend.SimpleStorage.num_data_storage_units=2",  # one CPU each (default 8)
            *overrides,
        ])


@pytest.fixture(scope="session")
def verl_config():
    """``verl_config(model_dir, *overrides)``: verl's own composed ``ppo_trainer`` config for that model on CPU."""
    return _verl_config


@pytest.fixture(scope="session")
def reference_workers(process_group, model_dirs):
    """verl's own reference worker per model: ``ActorRolloutRefWorker(role="ref")``, its FSDP2 engine, in float32."""
    _unpinned_offload()
    from verl.workers.engine_workers import ActorRolloutRefWorker

    workers = {}

    def get(name: str):
        if name not in workers:
            worker = ActorRolloutRefWorker(_verl_config(model_dirs[name]).actor_rollout_ref, role="ref")
            worker.init_model()
            workers[name] = worker
        return workers[name]

    return get


def pytest_terminal_summary(terminalreporter):
    """The equality figures (max |served - verl| per case) of test_verl_reference.py."""
    import sys

    module = sys.modules.get("test_verl_reference") or next(
        (m for name, m in sys.modules.items() if name.endswith("test_verl_reference")), None)
    figures = getattr(module, "FIGURES", None)
    if figures:
        terminalreporter.write_sep("-", "max |served ref_log_prob - verl's own| (float32)")
        for case, diff in figures.items():
            terminalreporter.write_line(f"{case}: {diff:.3e}")
