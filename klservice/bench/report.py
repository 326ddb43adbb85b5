"""What a run reports: the targets it checks, the stdout table, bench.png and the JSON encoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from klservice.bench.config import BenchConfig
from klservice.bench.measure import FOREIGN_CPU_WARNING

PATH_LABELS = {
    "naive": "naive HF (full logits, batches of 8)",
    "inprocess": "in-process, same algorithm",
    "service": "service over gRPC",
    "one_job": "service, 1 job",
    "jobs": "service, 4 jobs aggregate",
    "cache_fill": "service, cache filling",
    "cache_hit": "service, cache hit",
    "vllm_raw": "raw vLLM prompt_logprobs",
    "service_vllm": "service over gRPC, vllm backend",
    "teacher_plain": "service, plain Score",
    "teacher_top1": "service, top_k=1",
    "teacher_top20": "service, top_k=20",
    "teacher_top100": "service, top_k=100",
    "teacher_candidates": "service, 20 candidate ids",
}
"""Row label of each path (the keys of a workload's ``paths`` in bench.json)."""


def _ratio(results: dict, workload: str, numerator: str, denominator: str) -> float | None:
    paths = results["workloads"].get(workload, {}).get("paths", {})
    if numerator in paths and denominator in paths:
        return paths[numerator]["tokens_per_s"] / paths[denominator]["tokens_per_s"]
    return None


GPU_UTILISATION = {"smollm2-1.7b": 0.60, "llama-7b": 0.70}
"""(b)'s FLOP-utilisation target on a GPU, by --model-shape (0.55 for any other model, as on a CPU)."""


def evaluate_targets(results: dict, config: BenchConfig, gpu: bool = False) -> list[dict]:
    """The docs/design.md targets this run can check, each with its measured value. On a GPU, (b)'s speed-up over
    the naive path is held to 1.6x (its FLOP ratio is 1.37x at the GPU preset's sizes: the rest must come from
    running at a higher utilisation than the naive forward's) and its utilisation to `GPU_UTILISATION`."""
    targets = []

    def add(name: str, workload: str, value: float | None, op: str, threshold: float, unit: str = "x"):
        if value is None:
            return
        met = value >= threshold if op == ">=" else value <= threshold
        targets.append({"name": name, "workload": workload, "value": value, "op": op, "threshold": threshold,
                        "unit": unit, "met": bool(met)})

    add("service / naive", "a", _ratio(results, "a", "service", "naive"), ">=", 1.2)
    add("service / in-process", "a", _ratio(results, "a", "service", "inprocess"), ">=", 0.95)
    add("service / naive", "b", _ratio(results, "b", "service", "naive"), ">=", 1.6 if gpu else 2.2)
    add("service / in-process", "b", _ratio(results, "b", "service", "inprocess"), ">=", 0.95)
    service_b = results["workloads"].get("b", {}).get("paths", {}).get("service", {})
    utilisation = GPU_UTILISATION.get(config.model_shape, 0.55) if gpu else 0.55
    add("service FLOP utilisation", "b", service_b.get("flop_utilisation"), ">=", utilisation, "%")
    add("service / naive", "f", _ratio(results, "f", "service", "naive"), ">=", 4.0)
    add("service / in-process", "f", _ratio(results, "f", "service", "inprocess"), ">=", 0.95)
    c = results["workloads"].get("c")
    if c:
        add(f"{config.jobs} jobs / 1 job aggregate", "c", _ratio(results, "c", "jobs", "one_job"), ">=", 0.9)
        equal = 1.0 / len(c["jobs"])
        worst = max(abs(job["share"] / equal - 1.0) for job in c["jobs"])
        add("largest job-share deviation from equal", "c", worst, "<=", 0.2, "%")
    d = results["workloads"].get("d")
    if d:
        add("service / in-process", "d", _ratio(results, "d", "service", "inprocess"), ">=", 0.95)
        add("extra memory / full-vocab fp32 logits", "d", d.get("extra_memory_fraction_of_logits"), "<=", 0.25, "%")
    e = results["workloads"].get("e", {}).get("paths", {})
    if "bounded" in e and "unbounded" in e:
        if e["unbounded"]["tokens_per_s"] > 0 and e["bounded"]["tokens_per_s"] > 0:  # a window may see no call end
            add("flood throughput, bounded / unbounded step", "e",
                e["bounded"]["tokens_per_s"] / e["unbounded"]["tokens_per_s"], ">=", 0.9)
        add("small request's wait, bounded / unbounded step", "e",
            e["bounded"]["seconds"] / e["unbounded"]["seconds"], "<=", 1.0)
    add("service (vllm backend) / raw vLLM", "vllm", _ratio(results, "vllm", "service_vllm", "vllm_raw"), ">=", 2.0)
    return targets


def _fmt_value(value: float, unit: str) -> str:
    return f"{value * 100:.1f}%" if unit == "%" else f"{value:.2f}x"


def _fmt_bytes(value: int | None) -> str:
    return "" if value is None else f"{value / 2**20:.0f}"



def format_report(results: dict) -> str:
    """The stdout table: per workload, one row per path, then its ratios against their targets."""
    headers = ["workload / path", "tokens/s", "seconds", "peak MiB", "MFU", "ratio", "target", "met?"]
    rows: list[list[str] | str] = []
    targets_by_workload: dict[str, list[dict]] = {}
    for target in results["targets"]:
        targets_by_workload.setdefault(target["workload"], []).append(target)
    for key, entry in results["workloads"].items():
        rows.append(entry["title"])
        rows += _workload_rows(results, key, entry, targets_by_workload.get(key, []))
    cells = [r for r in rows if isinstance(r, list)]
    widths = [max([len(headers[i])] + [len(r[i]) for r in cells]) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)).rstrip()

    out = [line(headers), "-" * len(line(headers))]
    out += [r if isinstance(r, str) else line(r) for r in rows]
    return "\n".join(out + [""] + _notes(results))


def _workload_rows(results: dict, key: str, entry: dict, targets: list[dict]) -> list[list[str]]:
    """The table rows of one workload: its paths, (c)'s jobs, its targets, time outside the model, speed-ups."""
    rows = []
    for row in entry["paths"].values():
        mfu = row.get("flop_utilisation")
        rows.append([
            f"  {row['label']}",
            f"{row['tokens_per_s']:.1f}",
            f"{row['seconds']:.2f}",
            _fmt_bytes(row.get("peak_memory_rise_bytes")),
            "" if mfu is None else f"{mfu * 100:.0f}%",
            "", "", "",
        ])
    if key == "e":
        for row in entry["paths"].values():
            rows.append([f"  -> {row['label']}: small request alone (idle)", "", f"{row['idle_seconds']:.2f}", "", "",
                         "", "", ""])
    if key == "c":
        equal = 1.0 / max(1, len(entry.get("jobs", [])))
        for job in entry.get("jobs", []):
            ok = abs(job["share"] / equal - 1.0) <= 0.2
            rows.append([f"  {job['job_id']} (share of throughput)", f"{job['tokens_per_s']:.1f}",
                         f"{job['finished_s']:.2f}", "", "", f"{job['share'] * 100:.1f}%",
                         f"{equal * 80:.0f}-{equal * 120:.0f}%", "yes" if ok else "NO"])
    for target in targets:
        if target["name"].startswith("largest job-share"):
            continue  # shown per job above
        rows.append([f"  -> {target['name']}", "", "", "", "", _fmt_value(target["value"], target["unit"]),
                     f"{target['op']} {_fmt_value(target['threshold'], target['unit'])}",
                     "yes" if target["met"] else "NO"])
    for name, row in entry["paths"].items():
        if row.get("server_forward_s") is not None and name in ("service", "jobs", "one_job", "service_vllm"):
            outside = row["outside_model_s"]
            rows.append([f"  -> {row['label']}: time outside the model", "", f"{outside:.2f}", "", "",
                         f"{outside / row['seconds'] * 100:.1f}%", "", ""])
    b_service = results["workloads"].get("b", {}).get("paths", {}).get("service")
    if key == "vllm" and b_service and "vllm_raw" in entry["paths"]:
        speedup = b_service["tokens_per_s"] / entry["paths"]["vllm_raw"]["tokens_per_s"]
        rows.append(["  -> service (hf backend, from (b)) / raw vLLM", "", "", "", "", f"{speedup:.2f}x", "", ""])
    if key == "teacher" and "teacher_plain" in entry["paths"]:
        plain = entry["paths"]["teacher_plain"]["tokens_per_s"]
        for row in entry["paths"].values():
            rows.append([f"  -> {row['label']}: bytes per scored token; throughput / plain", "",
                         f"{row['response_bytes_per_scored_token']:.0f}", "", "",
                         f"{row['tokens_per_s'] / plain:.2f}x", "", ""])
    if key == "b" and "cache_hit" in entry["paths"] and "service" in entry["paths"]:
        speedup = entry["paths"]["cache_hit"]["tokens_per_s"] / entry["paths"]["service"]["tokens_per_s"]
        rows.append(["  -> cache hit / service", "", "", "", "", f"{speedup:.1f}x", "", ""])
    return rows


def _notes(results: dict) -> list[str]:
    """The lines under the table: model and machine, definitions, (c) progress, warnings, missed targets."""
    peak = results.get("matmul_peak_flops_per_s") or 0.0
    machine = results.get("machine", {})
    model = results.get("model", {})
    out = [
        f"model {model.get('name')} ({model.get('dtype')} on {model.get('device')}); {machine.get('cpu_count')} CPUs "
        f"({machine.get('cpu_model')}), torch {machine.get('torch')} with {machine.get('torch_threads')} threads; "
        f"matmul peak {peak / 1e9:.1f} GFLOP/s",
        "tokens/s: all tokens of the sequences (prompt + response), the same for every path; ratios are of "
        "tokens/s; peak MiB: rise of the resident high-water mark (the server's for service rows); "
        "MFU: model FLOPs actually computed / matmul peak",
    ]
    if "e" in results["workloads"]:
        out.append("(e) tokens/s: what the server forwarded from the first small request on (the flood's); seconds: "
                   "the small request's median latency under the flood")
    c = results["workloads"].get("c")
    if c and c.get("jobs"):
        done = ", ".join(f"{job['progress_share_at_first_finish'] * 100:.0f}%" for job in c["jobs"])
        out.append(f"(c) share of tokens done when the first job finished: {done}")
    disturbed = [
        f"{key} {row['label']} ({row['foreign_cpu_fraction'] * 100:.0f}%)"
        for key, entry in results["workloads"].items()
        for row in entry["paths"].values()
        if (row.get("foreign_cpu_fraction") or 0.0) > FOREIGN_CPU_WARNING
    ]
    if disturbed:
        out.append("WARNING: other processes used the CPU during " + "; ".join(disturbed) +
                   " (share of the machine): those numbers are low; rerun on an idle machine")
    missed = [t for t in results["targets"] if not t["met"]]
    for t in missed:
        if t["op"] == ">=":
            by = f"{(1 - t['value'] / t['threshold']) * 100:.1f}% short"
        else:
            by = f"{(t['value'] / t['threshold'] - 1) * 100:.1f}% over" if t["threshold"] else "over"
        out.append(f"MISSED ({t['workload']}) {t['name']}: {_fmt_value(t['value'], t['unit'])}, needs {t['op']} "
                   f"{_fmt_value(t['threshold'], t['unit'])} ({by})")
    if results["targets"] and not missed:
        out.append(f"all {len(results['targets'])} targets met")
    return out


def write_plot(results: dict, path: Path) -> str | None:
    """Bars of tokens/s per workload and path (+ the (c) shares). Returns a note if it could not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "note: matplotlib is not installed; no bench.png (pip install matplotlib)"
    entries = results["workloads"]
    c = entries.get("c")
    fig, axes = plt.subplots(1, 2 if c else 1, figsize=(13 if c else 9, 5), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 1]} if c else None)
    ax = axes[0][0]
    colours = {"naive": "#999999", "inprocess": "#4c72b0", "service": "#dd8452", "one_job": "#c44e52",
               "jobs": "#dd8452", "cache_fill": "#55a868", "cache_hit": "#8172b3", "vllm_raw": "#937860",
               "service_vllm": "#da8bc3"}
    # A cache hit is thousands of times faster than any forward: drawn clipped (hatched), its value written on it.
    scale = 1.15 * max([row["tokens_per_s"] for entry in entries.values() for name, row in entry["paths"].items()
                        if name != "cache_hit"] or [1.0])
    x = 0.0
    ticks, tick_labels = [], []
    legend_done = set()
    for key, entry in entries.items():
        start = x
        for name, row in entry["paths"].items():
            label = row["label"] if name not in legend_done else None
            legend_done.add(name)
            value = row["tokens_per_s"]
            clipped = value > scale
            ax.bar(x, min(value, scale), width=0.8, color=colours.get(name, "#333333"), label=label,
                   hatch="//" if clipped else None)
            ax.text(x, min(value, scale), f"{value:.0f}", ha="center", va="bottom", fontsize=7)
            x += 1.0
        ticks.append((start + x - 1.0) / 2)
        tick_labels.append(f"({key})")
        x += 0.8
    ax.set_xticks(ticks, tick_labels)
    ax.set_ylim(0, scale * 1.08)
    ax.set_ylabel("tokens/s (prompt + response tokens)")
    model = results.get("model", {})
    ax.set_title(f"klservice bench: {model.get('name')} {model.get('dtype')} on {model.get('device')}", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    if c:
        ax2 = axes[0][1]
        shares = [job["share"] * 100 for job in c["jobs"]]
        equal = 100.0 / len(shares)
        ax2.bar(range(len(shares)), shares, color="#dd8452")
        ax2.axhspan(equal * 0.8, equal * 1.2, color="#55a868", alpha=0.2, label="equal ±20%")
        ax2.axhline(equal, color="#55a868")
        ax2.set_xticks(range(len(shares)), [f"job {j}" for j in range(len(shares))])
        ax2.set_ylabel("throughput share (%)")
        ax2.set_title("(c) per-job shares", fontsize=10)
        ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def json_default(value):
    """`json.dumps` ``default`` for bench.json: numpy scalars and paths."""
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")
