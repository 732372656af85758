"""The commands that read an output back (``docqa query``, ``answers``, ``table``, ``failures``, ``runs``) and
``docqa optimize``: their arguments and what each does."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Any

from jobs.formats import FORMATS, TableLayout, write_result
from jobs.query import parse_as_of
from pipeline.config import ConfigError
from pipeline.config_loading import load_config

QUERY_COMMANDS = ("query", "answers", "table", "failures", "runs", "optimize")


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


def _parse_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def add_query_commands(commands: Any) -> None:
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


def run_query_command(args: argparse.Namespace) -> int:
    return _optimize(args) if args.command == "optimize" else _query(args)


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
        lost = store.lost_runs()
        reader = store.runs(args.all, show_lost=True)
    write_result(reader, args.format, sys.stdout, sys.stdout.buffer, layout)
    if args.command == "runs":
        for run_id, heartbeat, lease_end in lost:
            print(
                f"docqa: run {run_id} is lost: its driver stopped renewing its lease (last heartbeat "
                f"{heartbeat:%Y-%m-%d %H:%M:%S} UTC, lease ran out {lease_end:%H:%M:%S} UTC), killed or its machine "
                "gone. What it committed is kept; the next run on this output marks it `abandoned` and repairs "
                f"`current` and `items`; the same command with --run-id {run_id} finishes it",
                file=sys.stderr,
            )
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
    from pipeline.maintenance import optimize_output

    storage = load_config(args.config, {"output": args.output}, require=()).storage if args.config else None
    for name, report in optimize_output(args.output, storage, args.retain_hours, args.force).items():
        print(
            f"{name}: {report['files_before']} → {report['files_after']} files"
            f" ({report['files_removed']} compacted), {report['vacuumed']} unreferenced files deleted"
        )
    return 0
