"""The `docqa` command line."""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, date, datetime
from typing import Any

import yaml

from actors.checkpoint import ModelLoadError
from jobs import console
from jobs.devtools.tiny_models import TINY_FAMILIES
from jobs.query import QueryError
from jobs.query_commands import QUERY_COMMANDS, add_query_commands, run_query_command
from jobs.review_commands import REVIEW_COMMANDS, add_review_commands, run_review_command
from jobs.submit import SubmitError
from jobs.watchdog import RunInterrupted, RunStalled
from pipeline.commits import RunExistsError
from pipeline.config import ConfigError, JobConfig
from pipeline.config_loading import load_config
from pipeline.locations import InputError
from pipeline.storage import StorageError
from pipeline.tables import TableError

RAY_COMMANDS = ("run", "nightly", "serve")  # the commands that start or join Ray in this process
# Exit codes (README, "Exit codes"); 3 (committed but degraded) is RunSummary.exit_code.
EXIT_FAILED = 1  # could not start, failed or stalled
EXIT_INVALID = 2  # invalid config or arguments
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT
EXIT_BROKEN_PIPE = 141  # the reader of stdout went away, as shells report SIGPIPE


def _parse_assignment(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE (e.g. model.dtype=bfloat16), got {text!r}")
    field, value = text.split("=", 1)
    return field.strip(), yaml.safe_load(value) if value else value


def _add_config_arguments(parser: argparse.ArgumentParser, run_id: bool = True) -> None:
    parser.add_argument("--config", required=True, help="job config (YAML)")
    parser.add_argument("--input", help="override input: folder, file, glob, s3:// prefix or .txt list of URIs")
    parser.add_argument("--output", help="override output: folder or s3:// prefix")
    parser.add_argument("--model", help="override model.id: hub id or local checkpoint directory")
    if run_id:
        parser.add_argument("--run-id", help="override the run id (default: UTC time + random suffix)")
    parser.add_argument(
        "--reprocess",
        choices=["failed", "all"],
        help="take again documents a plain run skips: `failed` (any status but ok) or `all` (see README)",
    )
    _add_set(parser)


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="assignments",
        action="append",
        default=[],
        type=_parse_assignment,
        metavar="FIELD=VALUE",
        help="override any config field, e.g. --set actors.batch_size=8 --set questions.0.max_new_tokens=16",
    )


def _add_gcs_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        help="a running Ray cluster's GCS address, e.g. HEAD:6379 or auto (default: RAY_ADDRESS; "
        "without either, a new local Ray instance)",
    )


def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="Ray dashboard address, e.g. http://HEAD:8265 (default: RAY_ADDRESS)")


def _add_job_id(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("submission_id", metavar="ID", help="the submission id `docqa submit` printed")
    _add_address(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="docqa", description="Document OCR and question answering on Ray.")
    parser.add_argument("--version", action="version", version=f"docqa {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a job: documents (PDFs, images) → answers in Delta tables")
    _add_config_arguments(run)
    _add_gcs_address(run)

    nightly = commands.add_parser("nightly", help="the incremental run a scheduler calls: new or changed documents")
    _add_config_arguments(nightly, run_id=False)
    _add_gcs_address(nightly)
    nightly.add_argument("--date", type=_parse_date, default=None, help="run date YYYY-MM-DD (default: today, UTC)")

    submit = commands.add_parser("submit", help="submit a run (or a nightly run) to a Ray cluster as a Ray Job")
    _add_config_arguments(submit)
    _add_address(submit)
    submit.add_argument("--nightly", action="store_true", help="submit the nightly run (id fixed by the date)")
    submit.add_argument("--date", type=_parse_date, default=None, help="with --nightly: run date (default today)")
    submit.add_argument("--wait", action="store_true", help="wait for the job to finish; exit 1 unless it succeeds")

    for name, text in [("status", "print a job's status"), ("logs", "print a job's logs"), ("stop", "stop a job")]:
        command = commands.add_parser(name, help=text)
        _add_job_id(command)
        if name == "logs":
            command.add_argument("--follow", action="store_true", help="stream the logs until the job ends")

    add_query_commands(commands)

    serve = commands.add_parser(
        "serve", help="answer questions about uploaded documents (PDF or image) over HTTP (Ray Serve)"
    )
    serve.add_argument("--config", required=True, help="job config: model, render, limits, actors and serve")
    serve.add_argument("--model", help="override model.id: hub id or local checkpoint directory")
    serve.add_argument("--host", help="override serve.host")
    serve.add_argument("--port", type=int, help="override serve.port")
    _add_set(serve)

    prompts = commands.add_parser(
        "prompts", help="each question as the model is asked it, and the grammar or JSON Schema its answer takes"
    )
    prompts.add_argument("--config", required=True, help="job config (its questions)")
    _add_set(prompts)
    add_review_commands(commands)
    commands.add_parser("models", help="supported model families, their prompt formats and what each supports")
    model = commands.add_parser("model", help="model utilities")
    model_commands = model.add_subparsers(dest="model_command", required=True)
    tiny = model_commands.add_parser("tiny", help="build a tiny offline model (random weights) for demos and tests")
    tiny.add_argument("path", help="directory to save the checkpoint to")
    tiny.add_argument("--family", default="idefics2", choices=list(TINY_FAMILIES), help="default: %(default)s")
    lora = model_commands.add_parser("tiny-lora", help="build a tiny PEFT LoRA adapter for a (tiny) checkpoint")
    lora.add_argument("base", help="the checkpoint directory the adapter applies to")
    lora.add_argument("path", help="directory to save the adapter to")
    return parser


def describe_prompts(config) -> str:
    """Each question: its id, type and pages, the question as the model is asked it (its variables shown as
    they are filled in for page 1 of a 1-page example.pdf), and the grammar or JSON Schema it is decoded
    under. The model's own prompt format (chat or raw, `docqa models`) wraps the question."""
    import json

    blocks = []
    for question in config.questions:
        lines = [f"{question.id} ({question.type}, pages {question.pages}, at most {question.answer_tokens} tokens)"]
        lines += [f"  {line}" for line in question.question("example.pdf", 1, 1).splitlines()]
        constraint = question.constraint
        if constraint is not None:
            kind, text = constraint
            shown = json.dumps(json.loads(text), indent=2, ensure_ascii=False) if kind == "json_schema" else text
            lines.append(f"  decoded under this {kind.replace('_', ' ')}:")
            lines += [f"    {line}" for line in shown.splitlines()]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _parse_date(text: str) -> str:
    try:
        return date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, got {text!r}") from None


def _config(args: argparse.Namespace) -> JobConfig:
    overrides = dict(args.assignments)
    for field, value in [("input", args.input), ("output", args.output), ("model.id", args.model)]:
        if value is not None:
            overrides[field] = value
    if getattr(args, "run_id", None) is not None:
        overrides["run_id"] = args.run_id
    if args.reprocess is not None:
        overrides["reprocess"] = args.reprocess
    return load_config(args.config, overrides)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("docqa")
    except metadata.PackageNotFoundError:
        return "(not installed)"


def _today() -> str:
    return datetime.now(UTC).date().isoformat()


def _serve(args: argparse.Namespace) -> int:
    import time

    from ray import serve

    from jobs.serve import start_server

    overrides = {"model.id": args.model, "serve.host": args.host, "serve.port": args.port}
    given = {field: value for field, value in overrides.items() if value is not None}
    config = load_config(args.config, {**dict(args.assignments), **given}, require=())
    try:
        url = start_server(config)
        print(
            f"docqa serving {config.model.id} at {url}/v1/answers (schema: {url}/openapi.json); Ctrl-C stops",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM, while starting or serving
        serve.shutdown()
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    if args.command in QUERY_COMMANDS:
        return run_query_command(args)
    if args.command == "run":
        from jobs.run import run_job

        summary = run_job(_config(args), ray_address=args.address)
        print(summary.text())
        return summary.exit_code
    if args.command == "nightly":
        from jobs.run import nightly_run_id, run_nightly

        run_date = args.date or _today()
        summary = run_nightly(_config(args), run_date, ray_address=args.address)
        print(summary.text() if summary else f"run {nightly_run_id(run_date)} is already committed; nothing to do")
        return summary.exit_code if summary else 0
    if args.command == "serve":
        return _serve(args)
    if args.command in REVIEW_COMMANDS:
        return run_review_command(args)
    if args.command == "prompts":
        print(describe_prompts(load_config(args.config, dict(args.assignments), require=())))
        return 0
    if args.command == "models":
        from actors.families import describe_families

        print(describe_families())
        return 0
    if args.command == "model" and args.model_command == "tiny-lora":
        from jobs.devtools.tiny_models import build_tiny_lora

        print(f"tiny LoRA adapter saved to {build_tiny_lora(args.base, args.path)}")
        return 0
    if args.command == "model":
        print(f"tiny {args.family} model saved to {TINY_FAMILIES[args.family](args.path)}")
        return 0
    from jobs import submit

    if args.command == "submit":
        if args.date and not args.nightly:
            raise ConfigError("--date applies to --nightly submissions only; add --nightly, or drop --date")
        if args.run_id and args.nightly:
            raise ConfigError("--run-id does not apply with --nightly (its run id is fixed by the date); drop one")
        nightly_date = (args.date or _today()) if args.nightly else None
        submission_id = submit.submit(_config(args), args.address, nightly_date)
        print(submission_id, flush=True)
        if args.wait:
            submit.logs(args.address, submission_id, follow=True)  # progress lines, then the summary
            final = submit.wait(args.address, submission_id)
            print(final)
            if final == "SUCCEEDED":
                return 0
            return 3 if submit.driver_exit_code(args.address, submission_id) == 3 else 1
        return 0
    if args.command == "status":
        print(submit.status(args.address, args.submission_id))
    elif args.command == "logs":
        submit.logs(args.address, args.submission_id, args.follow)
    elif args.command == "stop":
        print("stopped" if submit.stop(args.address, args.submission_id) else "already finished")
    return 0


def main(argv: list[str] | None = None) -> int:
    console.configure_logging()
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except (ConfigError, QueryError) as error:
        print(f"docqa: {error}", file=sys.stderr)
        return EXIT_INVALID
    except (InputError, ModelLoadError, RunExistsError, RunStalled, StorageError, SubmitError, TableError) as error:
        print(f"docqa: {error}", file=sys.stderr)
        return EXIT_FAILED
    except RunInterrupted as error:
        print(f"docqa: {error}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("docqa: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`docqa answers ... | head`): nothing more to say, and nowhere to say it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    finally:
        # Whatever the exit code: Ray is shut down here, where a Ctrl-C is caught, never by Ray's atexit
        # handler, where it printed a traceback.
        if args.command in RAY_COMMANDS:
            console.shutdown_ray()


if __name__ == "__main__":
    sys.exit(main())
