"""`loraresume-operator`: run the kopf operator (namespaced or cluster-wide) with metrics and liveness."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import sys

import kopf
from prometheus_client import start_http_server

from loraresume_trainer.redact import install_log_redaction

from .defaults import OperatorDefaults, OperatorSettingsError

DEFAULT_RECONCILE_INTERVAL = 10.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraresume-operator", description="Reconcile LoraResume resources.")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[], help="watch this namespace (repeatable)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (cluster-wide)")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get("LORARESUME_METRICS_PORT", "8080")),
        help="Prometheus metrics port (0 to disable)",
    )
    parser.add_argument(
        "--liveness",
        default=os.environ.get("LORARESUME_LIVENESS", "http://0.0.0.0:8081/healthz"),
        help="kopf liveness endpoint URL ('' to disable)",
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=float(os.environ.get("LORARESUME_RECONCILE_INTERVAL") or DEFAULT_RECONCILE_INTERVAL),
        help="seconds between periodic reconciles (default: LORARESUME_RECONCILE_INTERVAL, else 10)",
    )
    parser.add_argument("--peering", help="kopf peering name for several replicas (default: standalone)")
    parser.add_argument("--log-level", default=os.environ.get("LORARESUME_LOG_LEVEL", "INFO"))
    return parser


# Clients that log request/response bodies at DEBUG (Secret data, signed headers): never below INFO.
QUIET_LIBRARIES = ("kubernetes", "urllib3", "botocore", "boto3", "s3transfer", "aiohttp")
# kopf's per-object logger says "Handler ... succeeded." at INFO for every event the operator handles
# (6 % of its CPU at 200 resources): its warnings and errors show, its INFO lines only at DEBUG.
KOPF_OBJECTS = "kopf.objects"


def configure_logging(level: str) -> None:
    """`level` applies to the operator and kopf (kopf's per-object INFO lines only at DEBUG); chatty
    clients stay at INFO or above, and every record is scrubbed of the credential values the operator
    has read (loraresume_trainer.redact)."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    effective = logging.getLogger().getEffectiveLevel()
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(logging.INFO, effective))
    logging.getLogger(KOPF_OBJECTS).setLevel(
        effective if effective <= logging.DEBUG else max(logging.WARNING, effective)
    )
    install_log_redaction()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        OperatorDefaults.from_env()  # refuse to start on a malformed setting, naming it
    except OperatorSettingsError as exc:
        print(f"loraresume-operator: {exc}", file=sys.stderr)
        return 2
    if args.interval <= 0:
        print(f"loraresume-operator: --interval must be positive, got {args.interval}", file=sys.stderr)
        return 2
    from .handlers import Runtime  # registers the handlers with kopf

    if not args.namespace and not args.all_namespaces:
        args.namespace = [os.environ.get("POD_NAMESPACE", "default")]
    memo = kopf.Memo(
        runtime=Runtime(cluster_wide=args.all_namespaces, interval=args.interval, namespaces=tuple(args.namespace))
    )
    if args.metrics_port:
        start_http_server(args.metrics_port)
    # What is loaded by now (modules, classes, the models of the API and S3 clients) lives as long as the
    # process: out of the cyclic collector's reach, its full collections walk only what the run makes
    # (the collector was 7 % of the operator's CPU at 200 resources, half of that in full collections).
    gc.freeze()
    asyncio.run(
        kopf.operator(
            clusterwide=args.all_namespaces,
            namespaces=[] if args.all_namespaces else args.namespace,
            liveness_endpoint=args.liveness or None,
            standalone=args.peering is None,
            peering_name=args.peering,
            memo=memo,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
