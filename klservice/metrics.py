"""Prometheus metrics of the service, all registered on a registry passed in (tests build a fresh one).

Names are prefixed ``klservice_``. Job labels come from the ``x-job-id`` request metadata
and are bounded by `JobLabels`: the first ``max_jobs`` distinct ids keep their name, later
ones share the label ``other`` so a misbehaving client cannot blow up the series count.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)


class JobLabels:
    """Maps raw job ids to a bounded set of label values (thread-safe)."""

    ANONYMOUS = "anonymous"
    OTHER = "other"

    def __init__(self, max_jobs: int):
        self._max_jobs = max_jobs
        self._known: set[str] = set()
        self._lock = threading.Lock()

    def label(self, job_id: str | None) -> str:
        if not job_id:
            return self.ANONYMOUS
        job_id = job_id[:64]
        with self._lock:
            if job_id in self._known:
                return job_id
            if len(self._known) < self._max_jobs:
                self._known.add(job_id)
                return job_id
        return self.OTHER


class Metrics:
    """Every metric the server exports."""

    def __init__(self, registry: CollectorRegistry, max_jobs: int = 64):
        self.registry = registry
        self.jobs = JobLabels(max_jobs)
        self.requests = Counter(
            "klservice_requests", "Finished RPCs by method and status code.", ["method", "code"], registry=registry
        )
        self.latency = Histogram(
            "klservice_request_seconds", "RPC latency by method.", ["method"], buckets=LATENCY_BUCKETS, registry=registry
        )
        self.tokens_scored = Counter(
            "klservice_tokens_scored", "Scored tokens returned, by job.", ["job"], registry=registry
        )
        self.tokens_forwarded = Counter(
            "klservice_tokens_forwarded", "Tokens run through the model (prompts included, padding excluded).", registry=registry
        )
        self.batch_sequences = Histogram(
            "klservice_batch_sequences", "Sequences per forward batch.", buckets=SIZE_BUCKETS, registry=registry
        )
        self.batch_tokens = Histogram(
            "klservice_batch_tokens", "Padded tokens per forward batch.", buckets=TOKEN_BUCKETS, registry=registry
        )
        self.forward_seconds = Histogram(
            "klservice_forward_seconds", "Time of one backend forward batch.", buckets=LATENCY_BUCKETS, registry=registry
        )
        self.queue_depth = Gauge("klservice_queue_depth", "Requests waiting for the model.", registry=registry)
        self.queue_tokens = Gauge("klservice_queue_tokens", "Tokens waiting for the model.", registry=registry)
        self.tokens_saved = Counter(
            "klservice_tokens_saved",
            "Prompt tokens not recomputed because sequences sharing a prompt shared its KV cache.",
            registry=registry,
        )
        self.dropped = Counter(
            "klservice_dropped", "Requests dropped before their forward, by reason.", ["reason"], registry=registry
        )
        self.cache_lookups = Counter(
            "klservice_cache_lookups", "Reference-cache lookups per sequence, by result.", ["result"], registry=registry
        )
        self.cache_bytes = Gauge("klservice_cache_bytes", "Bytes of reference log-probs held in the cache.", registry=registry)
        self.model_info = Info("klservice_model", "The served model.", registry=registry)
        self.ready = Gauge("klservice_ready", "1 once the model is loaded and serving.", registry=registry)
        kl_labels = ["job"]
        self.kl_k1 = Gauge("klservice_kl_k1_mean", "Mean k1 per token of the job's last ComputeKL batch.", kl_labels, registry=registry)
        self.kl_k3 = Gauge("klservice_kl_k3_mean", "Mean k3 per token of the job's last ComputeKL batch.", kl_labels, registry=registry)
        self.kl_bias = Gauge(
            "klservice_kl_coef_bias_abs_mean",
            "Mean |c - c*| (requested vs principled coefficient) of the job's last ComputeKL batch.",
            kl_labels,
            registry=registry,
        )
        self.kl_weight = Gauge(
            "klservice_kl_is_weight_mean", "Mean importance weight of the job's last ComputeKL batch.", kl_labels, registry=registry
        )
        self.kl_truncated = Gauge(
            "klservice_kl_is_truncated_fraction",
            "Fraction of importance weights truncated in the job's last ComputeKL batch.",
            kl_labels,
            registry=registry,
        )
        self.kl_batches = Counter("klservice_kl_batches", "ComputeKL batches by job and spec.", ["job", "spec"], registry=registry)

    def record_kl(self, job: str, spec: str, diagnostics) -> None:
        """Export the diagnostics of one ComputeKL batch (klservice_client.kl.KLDiagnostics)."""
        self.kl_k1.labels(job).set(diagnostics.k1_mean_per_token)
        self.kl_k3.labels(job).set(diagnostics.k3_mean_per_token)
        self.kl_bias.labels(job).set(diagnostics.coef_bias_abs_mean)
        self.kl_weight.labels(job).set(diagnostics.is_weight_mean)
        self.kl_truncated.labels(job).set(diagnostics.is_truncated_fraction)
        self.kl_batches.labels(job, spec).inc()
