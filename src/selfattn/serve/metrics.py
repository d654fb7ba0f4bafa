"""The server's Prometheus metrics (prometheus-client), in a registry of the app's own."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# seconds; TTFT spans a 135M model's short prompt to an 8B model's long one
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2)


class Metrics:
    def __init__(self, engine):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("selfattn_requests", "HTTP requests answered, by endpoint and "
                                "status", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("selfattn_prompt_tokens", "prompt tokens of finished "
                                     "requests", registry=r)
        self.cached_tokens = Counter("selfattn_prompt_tokens_cached", "prompt tokens served "
                                     "from cached K/V instead of prefilled", registry=r)
        self.completion_tokens = Counter("selfattn_completion_tokens", "tokens generated",
                                         registry=r)
        self.ttft = Histogram("selfattn_ttft_seconds", "time from a request's arrival to its "
                              "first token", buckets=TTFT_BUCKETS, registry=r)
        self.token = Histogram("selfattn_token_seconds", "mean time per generated token after "
                               "the first, one sample per request", buckets=TOKEN_BUCKETS,
                               registry=r)
        Gauge("selfattn_slots_busy", "slots running a request", registry=r).set_function(
            lambda: engine.busy)
        Gauge("selfattn_slots", "slots", registry=r).set(len(engine.slots))
        Gauge("selfattn_queue_length", "requests waiting for a slot", registry=r).set_function(
            lambda: engine.waiting)
        Gauge("selfattn_kv_cache_bytes", "bytes of the slots' KV caches (reserved)",
              registry=r).set_function(lambda: engine.kv_bytes)
        Gauge("selfattn_prefix_cache_bytes", "bytes of K/V kept for prompt reuse",
              registry=r).set_function(lambda: engine.store.nbytes)

    def request(self, endpoint: str, status: int):
        self.requests.labels(endpoint, str(status)).inc()

    def finished(self, result):
        """Called on the engine's thread as each request finishes (prometheus-client locks)."""
        self.prompt_tokens.inc(result.prompt_tokens)
        self.cached_tokens.inc(result.cached_tokens)
        self.completion_tokens.inc(result.completion_tokens)
        self.ttft.observe(result.ttft_ms / 1e3)
        if result.completion_tokens > 1:
            self.token.observe(result.predicted_ms / 1e3 / (result.completion_tokens - 1))

    def render(self):
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
