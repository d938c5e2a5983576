"""`loraresume-train`: run one attempt of a job and end with an exit code the operator understands."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from .config import load_job
from .errors import ConfigError, StorageError, TrainerError
from .outcome import Outcome, TerminationMessage, write_termination_message
from .progress import StartupClock
from .redact import configure_logging, redact
from .stop_signal import StopRequest

if TYPE_CHECKING:
    from .pipeline import Pipeline
    from .seams import Engine, Hooks

log = logging.getLogger("loraresume_trainer")

DEFAULT_TERMINATION_LOG = Path("/dev/termination-log")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraresume-train",
        description="Run a LoraResume fine-tune job: train a LoRA with Unsloth, checkpoint to S3, resume exactly.",
    )
    parser.add_argument("--config", type=Path, help="job config file (JSON or YAML); default: $LORARESUME_JOB")
    parser.add_argument(
        "--termination-log", type=Path, help="where to write the termination message (overrides the job's)"
    )
    return parser


def _finish(message: TerminationMessage, path: Path) -> int:
    message.reason = redact(message.reason)
    write_termination_message(path, message)
    stream = sys.stderr if message.exit_code else sys.stdout
    print(f"loraresume-train: {message.outcome}: {message.reason}", file=stream, flush=True)
    return message.exit_code


def main(argv: list[str] | None = None, *, engine: Engine | None = None, hooks: Hooks | None = None) -> int:
    """`engine`: what trains (default: the trainer's UnslothEngine; the sandbox's stand-in passes its
    own); `hooks`: what watches (benchmarks). Both go to the Pipeline as they are (seams.py)."""
    clock = StartupClock()  # first: the start-up phases count from the process's start
    args = _parser().parse_args(argv)
    configure_logging()
    termination_log = args.termination_log or DEFAULT_TERMINATION_LOG
    stop = StopRequest()
    pipeline: Pipeline | None = None

    def preempted_while_loading() -> None:
        code = _finish(
            TerminationMessage(
                outcome="preempted",
                reason="SIGTERM before training started; nothing new to save",
                exit_code=Outcome.PREEMPTED.code,
                durable_step=pipeline.durable_step if pipeline is not None else None,
                trained=False,
            ),
            termination_log,
        )
        os._exit(code)

    # First thing: a pod deleted while this process starts (reading the job, building the S3
    # client: about a second) must end as a preemption with its message, not die of SIGTERM.
    stop.install(preempted_while_loading)
    try:
        job = load_job(args.config)
        termination_log = args.termination_log or job.termination_log
        from .pipeline import Pipeline  # imports boto3; the heavy stack loads inside run()

        clock.attempt = job.attempt
        pipeline = Pipeline(job, stop, engine=engine, hooks=hooks, clock=clock)
        message = pipeline.run()
    except ConfigError as exc:
        message = TerminationMessage(
            outcome="config_error", reason=str(exc), exit_code=Outcome.CONFIG_ERROR.code, field=exc.field
        )
    except (StorageError, TrainerError) as exc:
        message = TerminationMessage(outcome="failed", reason=str(exc), exit_code=Outcome.FAILED.code)
    except Exception as exc:
        log.error("unexpected error:\n%s", redact(traceback.format_exc()))
        first = str(exc).splitlines()[0] if str(exc) else ""
        message = TerminationMessage(
            outcome="failed", reason=f"{type(exc).__name__}: {first}"[:1000], exit_code=Outcome.FAILED.code
        )
    code = _finish(message, termination_log)
    if code == Outcome.PREEMPTED.code:
        # Everything is durable and said: end now. The interpreter's teardown after the ML stack
        # (~1.6 s on a CPU here, torch and CUDA included) would only delay the pod's end and so the
        # relaunch (benchmarks/goodput.py counts it in the JIT save).
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
