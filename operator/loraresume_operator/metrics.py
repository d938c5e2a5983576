"""Prometheus metrics of the operator (served on --metrics-port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RESOURCES_BY_PHASE = Gauge("loraresume_resources", "LoraResume resources by phase", ["phase"])
PREEMPTIONS = Counter("loraresume_preemptions_total", "Attempts ended by preemption", ["namespace"])
FAILURES = Counter("loraresume_failures_total", "Attempts ended by failure", ["namespace"])
DISK_EVICTIONS = Counter("loraresume_disk_evictions_total", "Attempts evicted for disk", ["namespace"])
LOST_STEPS = Counter(
    "loraresume_lost_steps_total", "Steps trained but not durable when an attempt ended", ["namespace"]
)
RELAUNCH_SECONDS = Histogram(
    "loraresume_relaunch_seconds",
    "From noticing an attempt ended to creating the next pod",
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800),
)
CHECKPOINT_AGE = Gauge(
    "loraresume_checkpoint_age_seconds",
    "Seconds since the newest complete checkpoint was seen to change",
    ["namespace", "name"],
)
S3_REQUESTS = Counter(
    "loraresume_s3_requests_total",
    "HTTP requests the operator sent to S3 (each retry counted), by operation",
    ["operation"],
)
WATCH_EVENTS = Counter(
    "loraresume_watch_events_total",
    "Watch events delivered to the operator's handlers, by kind (LoraResume or trainer Pod)",
    ["kind"],
)
RECONCILES = Counter("loraresume_reconciles_total", "Reconciles run (event-driven and periodic)")
RECONCILE_CPU_SECONDS = Counter(
    "loraresume_reconcile_cpu_seconds_total",
    "CPU seconds of the threads that ran reconciles, while they ran them (storage reads made side by side "
    "on other threads not included)",
)
RECONCILE_ERRORS = Counter("loraresume_reconcile_errors_total", "Reconciles that failed and will be retried", ["kind"])
STARTUP_SECONDS = Histogram(
    "loraresume_trainer_startup_seconds",
    "A trainer attempt's start-up by phase (the trainer's own measure; phase total: process start to first step)",
    ["phase"],
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600),
)
