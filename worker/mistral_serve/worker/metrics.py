"""The worker's Prometheus metrics: the `gen_ai.server.*` histograms of the OpenTelemetry semantic
conventions (time to first token, time per output token, request duration), tokens in and out, time
in queue, jobs by outcome and code, in-flight jobs, engine requests waiting and running, resumes
and aborts.

Each worker has its own registry (so in-process test stacks never share series); `/metrics` serves
it together with the process-wide default registry (process stats, and vLLM's own metrics when its
stats are on).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mistral_serve.common.contract import code_name
from mistral_serve.v1 import chat_pb2

PROVIDER = "mistral_ai"
OPERATION = "chat"

# Seconds; the OpenTelemetry advice for each gen_ai.server.* histogram.
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
# Label names of the gen_ai attributes the semantic conventions put on these metrics.
GEN_AI_LABELS = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model")


class WorkerMetrics:
    def __init__(self, model: str, *, deep_health: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._gen_ai = (OPERATION, PROVIDER, model)
        r = self.registry
        self.jobs = Counter(
            "mistral_serve_worker_jobs",
            "Jobs ended, by outcome (finished, error) and code (finish reason, or google.rpc code).",
            ["outcome", "code"],
            registry=r,
        )
        self.queue_time = Histogram(
            "mistral_serve_queue_time_seconds",
            "Time from admission to a worker starting the job (first runs only).",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "mistral_serve_gen_ai_server_time_to_first_token_seconds",
            "gen_ai.server.time_to_first_token: from admission to the first generated token (first runs).",
            GEN_AI_LABELS,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "mistral_serve_gen_ai_server_time_per_output_token_seconds",
            "gen_ai.server.time_per_output_token: decode time per token after the first, per run.",
            GEN_AI_LABELS,
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.request_duration = Histogram(
            "mistral_serve_gen_ai_server_request_duration_seconds",
            "gen_ai.server.request.duration: from admission to the end of generation.",
            [*GEN_AI_LABELS, "error_type"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "mistral_serve_gen_ai_tokens",
            "Tokens processed, by gen_ai.token.type: input (prompt) and output (generated).",
            [*GEN_AI_LABELS, "gen_ai_token_type"],
            registry=r,
        )
        self.inflight = Gauge("mistral_serve_worker_inflight_jobs", "Jobs this worker holds.", registry=r)
        self.engine_requests = Gauge(
            "mistral_serve_engine_requests",
            "Requests in the engine: waiting (no token yet) and running (generating).",
            ["state"],
            registry=r,
        )
        self.resumes = Counter(
            "mistral_serve_worker_resumes", "Jobs taken over from a lost worker and resumed.", registry=r
        )
        self.aborts = Counter(
            "mistral_serve_worker_aborts",
            "Requests aborted in the engine (cancel, deadline, detach, lease lost).",
            registry=r,
        )
        # Only with deep health on: exported as 0 without it, it would read as a failing check.
        self.deep_health = (
            Gauge(
                "mistral_serve_worker_deep_health_ok",
                "1 when the last deep health check (a one-token generation) passed, 0 when it failed.",
                registry=r,
            )
            if deep_health
            else None
        )
        self.waiting = self.engine_requests.labels("waiting")
        self.running = self.engine_requests.labels("running")

    def deep_check_done(self, passed: bool) -> None:
        if self.deep_health is not None:
            self.deep_health.set(1 if passed else 0)

    def gen_ai(self, histogram: Histogram) -> Histogram:
        return histogram.labels(*self._gen_ai)

    def duration(self, error_type: str) -> Histogram:
        return self.request_duration.labels(*self._gen_ai, error_type)

    def count_tokens(self, input_tokens: int, output_tokens: int) -> None:
        self.tokens.labels(*self._gen_ai, "input").inc(input_tokens)
        self.tokens.labels(*self._gen_ai, "output").inc(output_tokens)

    def job_ended(self, terminal: chat_pb2.ChatEvent) -> None:
        if terminal.WhichOneof("event") == "error":
            self.jobs.labels("error", code_name(terminal.error.code)).inc()
        else:
            reason = chat_pb2.FinishReason.Name(terminal.finished.finish_reason)
            self.jobs.labels("finished", reason.removeprefix("FINISH_REASON_")).inc()
