"""The `docqa` command line."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from datetime import UTC, date, datetime
from typing import Any

import yaml

from actors.checkpoint import ModelLoadError
from jobs import console
from jobs.devtools.tiny_models import TINY_FAMILIES
from jobs.formats import FORMATS, TableLayout, write_result
from jobs.query import QueryError, parse_as_of
from jobs.review_commands import REVIEW_COMMANDS, add_review_commands, run_review_command
from jobs.submit import SubmitError
from jobs.watchdog import RunInterrupted, RunStalled
from pipeline.commits import RunExistsError
from pipeline.config import ConfigError, JobConfig
from pipeline.config_loading import load_config
from pipeline.locations import InputError
from pipeline.storage import StorageError
from pipeline.tables import TableError

QUERY_COMMANDS = ("query", "answers", "table", "failures", "runs")
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


def _add_query_arguments(parser: argparse.ArgumentParser, run: bool = True) -> None:
    parser.add_argument("--output", help="a job's output: folder or s3:// prefix (default: the --config's output)")
    parser.add_argument("--config", help="job config to take the output and the storage settings from")
    if run:
        parser.add_argument(
            "--run", help="one run's rows (default: the `current` table: each document's rows of its latest run)"
        )
    snapshot = parser.add_mutually_exclusive_group()
    snapshot.add_argument(
        "--version", type=int, help="time travel: read `current` as of this Delta version (the rest as of its commit)"
    )
    snapshot.add_argument(
        "--as-of", metavar="TIMESTAMP", help="time travel: read the tables as of an ISO 8601 time (UTC if no zone)"
    )
    parser.add_argument("--format", choices=FORMATS, default="table", help="table (default), csv, json lines, parquet")
    parser.add_argument(
        "--wide",
        action="store_true",
        help="table format: every cell whole and documents as full URIs (default: fit the terminal's width)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="docqa", description="Document OCR and question answering on Ray.")
    parser.add_argument("--version", action="version", version=f"docqa {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a job: PDFs → answers in Parquet")
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

    query = commands.add_parser(
        "query", help="SQL over the output's tables (answers = current, all_rows = every run's rows, runs)"
    )
    query.add_argument("sql", help='a SELECT statement, e.g. "SELECT document, answer FROM answers LIMIT 5"')
    _add_query_arguments(query)
    answers = commands.add_parser("answers", help="all answers of one document, by page and question")
    answers.add_argument("--document", required=True, help="the document's URI, or a substring naming one document")
    _add_query_arguments(answers)
    table = commands.add_parser("table", help="one row per document, one column per question")
    table.add_argument("--questions", type=_parse_list, help="question ids, comma separated (default: all)")
    table.add_argument(
        "--items", metavar="QUESTION_ID", help="a list or object question: one row per record, its fields as columns"
    )
    table.add_argument(
        "--all-pages", action="store_true", help="every page's answer joined (default: the first page that answered)"
    )
    _add_query_arguments(table)
    failures = commands.add_parser("failures", help="documents and pages without answers, and why")
    _add_query_arguments(failures)
    runs = commands.add_parser("runs", help="runs: id, state, date, documents, pages, failures, duration")
    _add_query_arguments(runs, run=False)
    runs.add_argument("--all", action="store_true", help="every column of the runs table but the record")
    optimize = commands.add_parser("optimize", help="compact the output tables' small files, then vacuum old ones")
    optimize.add_argument("--output", required=True, help="a job's output: folder or s3:// prefix")
    optimize.add_argument("--config", help="job config to take the storage settings from")
    optimize.add_argument(
        "--retain-hours",
        type=int,
        default=168,
        help="keep files that versions of the last H hours need (time travel that far back); default 168 (a week);"
        " under 1 needs --force",
    )
    optimize.add_argument(
        "--force",
        action="store_true",
        help="allow --retain-hours under 1: only when no run can be writing to this output",
    )

    serve = commands.add_parser("serve", help="answer questions about uploaded PDFs over HTTP (Ray Serve)")
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


def _parse_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


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


def _query(args: argparse.Namespace) -> int:
    from jobs.query import AnswerStore

    if args.output is None and args.config is None:
        raise ConfigError("name the output to read: --output URI, or --config JOB.yaml")
    overrides = {"output": args.output} if args.output else None
    config = load_config(args.config, overrides, require=("output",)) if args.config else None
    output = args.output or config.output
    if args.format == "parquet" and sys.stdout.isatty():
        raise ConfigError("--format parquet writes binary to stdout; redirect it to a file")
    as_of = parse_as_of(args.as_of) if args.as_of else None
    store = AnswerStore(output, getattr(args, "run", None), config.storage if config else None, args.version, as_of)
    layout = _layout(args, store)  # before the result: the store's connection serves one statement at a time
    if args.command == "query":
        reader = store.reader(args.sql)
    elif args.command == "answers":
        reader = store.answers_of(args.document)
    elif args.command == "table":
        reader = store.items_of(args.items) if args.items else store.table(args.questions, args.all_pages)
    elif args.command == "failures":
        reader = store.failures()
    else:
        reader = store.runs(args.all)
    write_result(reader, args.format, sys.stdout, sys.stdout.buffer, layout)
    return 0


def _layout(args: argparse.Namespace, store) -> TableLayout:
    """The text table's layout: the terminal's width (stdout's, or COLUMNS) unless --wide; documents shown
    relative to the input their run read, where that is shorter."""
    if args.wide or args.format != "table":
        return TableLayout(wide=True)
    width = shutil.get_terminal_size().columns if sys.stdout.isatty() or "COLUMNS" in os.environ else None
    roots = store.input_roots()

    def relative(document: str) -> str:
        if document in roots:  # the input was this one file
            return document.rsplit("/", 1)[-1]
        root = next((root for root in roots if document.startswith(root + "/")), None)
        return document[len(root) + 1 :] if root else document

    return TableLayout(width=width, shorten={"document": relative})


def _optimize(args: argparse.Namespace) -> int:
    from pipeline.tables import optimize_output

    storage = load_config(args.config, {"output": args.output}, require=()).storage if args.config else None
    for name, report in optimize_output(args.output, storage, args.retain_hours, args.force).items():
        print(
            f"{name}: {report['files_before']} → {report['files_after']} files"
            f" ({report['files_removed']} compacted), {report['vacuumed']} unreferenced files deleted"
        )
    return 0


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
        return _query(args)
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
    if args.command == "optimize":
        return _optimize(args)
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
        code = _dispatch(args)
        if args.command in RAY_COMMANDS:
            console.shutdown_ray()
        return code
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


if __name__ == "__main__":
    sys.exit(main())
