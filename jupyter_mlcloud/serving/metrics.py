"""A replica's Prometheus metrics, in a registry of its own (two replicas in one worker
process never mix their counts).

Every series is labelled with ``model`` and ``version``:

- ``mlcloud_serving_requests_total``: infer requests answered (any status);
- ``mlcloud_serving_errors_total{code}``: those answered with an error status;
- ``mlcloud_serving_latency_seconds{stage}``: successful requests' time, split into
  ``queue`` (waiting for the model), ``batch_wait`` (waiting for the batch to fill),
  ``compute`` (the batch in the model) and ``overhead`` (everything else: reading, decoding,
  encoding), as SageMaker splits model from overhead latency; ``total`` is their sum;
- ``mlcloud_serving_batch_size``: rows per computed batch (each batch once);
- ``mlcloud_serving_queue_depth`` and ``mlcloud_serving_in_flight``: requests waiting for the
  model, and requests inside the replica now.
"""

from __future__ import annotations

from collections.abc import Callable

from .batching import Timings

STAGES = ("queue", "batch_wait", "compute", "overhead", "total")
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0)


def _batch_buckets(max_batch_size: int) -> tuple[float, ...]:
    sizes = [1]
    while sizes[-1] < max_batch_size:
        sizes.append(min(sizes[-1] * 2, max_batch_size))
    return tuple(float(s) for s in sizes)


class ReplicaMetrics:
    """The counters and histograms of one replica serving ``model`` at ``version``."""

    def __init__(self, model: str, version: str, max_batch_size: int,
                 queue_depth: Callable[[], float]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        labels = ("model", "version")
        values = (model, version)
        self._requests = Counter("mlcloud_serving_requests", "Infer requests answered.",
                                 labels, registry=self.registry).labels(*values)
        self._errors = Counter("mlcloud_serving_errors", "Infer requests answered with an"
                               " error status.", (*labels, "code"), registry=self.registry)
        self._latency = Histogram("mlcloud_serving_latency_seconds", "Time of successful infer"
                                  " requests by stage.", (*labels, "stage"),
                                  buckets=LATENCY_BUCKETS, registry=self.registry)
        self._batch = Histogram("mlcloud_serving_batch_size", "Rows per computed batch.",
                                labels, buckets=_batch_buckets(max_batch_size),
                                registry=self.registry).labels(*values)
        self._in_flight = Gauge("mlcloud_serving_in_flight", "Requests inside the replica.",
                                labels, registry=self.registry).labels(*values)
        Gauge("mlcloud_serving_queue_depth", "Requests waiting for the model.", labels,
              registry=self.registry).labels(*values).set_function(queue_depth)
        self._values = values
        self._stages = {stage: self._latency.labels(*values, stage) for stage in STAGES}

    def started(self) -> None:
        """A request came in."""
        self._in_flight.inc()

    def batch(self, rows: int) -> None:
        """A batch of ``rows`` rows was computed."""
        self._batch.observe(rows)

    def answered(self, status: int, timings: Timings | None = None,
                 total_s: float = 0.0) -> None:
        """A request was answered with ``status``; a successful one with its ``timings``
        and its whole time in the replica."""
        self._in_flight.dec()
        self._requests.inc()
        if status >= 400:
            self._errors.labels(*self._values, str(status)).inc()
        if timings is None:
            return
        model_s = timings.queue_s + timings.batch_wait_s + timings.compute_s
        self._stages["queue"].observe(timings.queue_s)
        self._stages["batch_wait"].observe(timings.batch_wait_s)
        self._stages["compute"].observe(timings.compute_s)
        self._stages["overhead"].observe(max(total_s - model_s, 0.0))
        self._stages["total"].observe(total_s)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of this replica, and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
