"""The ``docqa review`` and ``docqa evaluate`` commands: their arguments and what each does."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, StorageConfig
from pipeline.config_loading import load_config

REVIEW_COMMANDS = ("review", "evaluate")


def _add_output(parser: argparse.ArgumentParser, nested: bool = False) -> None:
    """``nested``: on a subcommand of ``review``, whose own options may also come before it (the
    subcommand's unset ones must not overwrite them)."""
    unset = argparse.SUPPRESS if nested else None
    parser.add_argument("--output", default=unset, help="the output to review (a folder or s3:// prefix)")
    parser.add_argument("--config", default=unset, help="job config: its output and storage settings")


def _add_queue(parser: argparse.ArgumentParser, nested: bool = False) -> None:
    unset = argparse.SUPPRESS if nested else None
    parser.add_argument(
        "--below", type=float, default=unset, help="confidence under which an answer is checked (default 0.5)"
    )
    parser.add_argument(
        "--thresholds",
        type=Path,
        default=unset,
        help="per-question thresholds: the JSON `docqa evaluate --write-thresholds` writes",
    )


def add_review_commands(commands: Any) -> None:
    review = commands.add_parser(
        "review", help="a web page to check doubtful answers on the page image (token: DOCQA_REVIEW_TOKEN)"
    )
    _add_output(review)
    _add_queue(review)
    review.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    review.add_argument("--port", type=int, default=8500, help="port (default 8500)")
    actions = review.add_subparsers(dest="review_command")
    export = actions.add_parser("export", help="the review queue as Label Studio tasks (JSON)")
    export.add_argument("file", type=Path, help="the tasks file to write (the labeling config goes beside it)")
    export.add_argument("--format", choices=["label-studio"], default="label-studio")
    export.add_argument("--limit", type=int, help="at most this many tasks")
    _add_output(export, nested=True)
    _add_queue(export, nested=True)
    imported = actions.add_parser("import", help="a Label Studio JSON export into the reviews table")
    imported.add_argument("file", type=Path, help="the export file (JSON)")
    _add_output(imported, nested=True)

    evaluate = commands.add_parser(
        "evaluate", help="accuracy per question against the reviews or a truth file, and the confidence to trust"
    )
    _add_output(evaluate)
    evaluate.add_argument("--truth", type=Path, help="CSV or JSON lines: document, [page_number], question_id, answer")
    evaluate.add_argument("--target", type=float, default=0.98, help="accuracy to reach above the threshold")
    evaluate.add_argument("--format", choices=["table", "json"], default="table")
    evaluate.add_argument("--plot", type=Path, help="write accuracy and volume against confidence as a PNG")
    evaluate.add_argument(
        "--write-thresholds", type=Path, help="write each question's threshold as JSON (for docqa review --thresholds)"
    )
    evaluate.add_argument("--save", action="store_true", help="append the figures to the output's `evaluations` table")


def _output(args: argparse.Namespace) -> tuple[str, StorageConfig]:
    if args.output is None and args.config is None:
        raise ConfigError("name the output: --output URI, or --config JOB.yaml")
    if args.config:
        config = load_config(args.config, {"output": args.output} if args.output else None, require=("output",))
        return config.output, config.storage
    return args.output, StorageConfig()


def _book(args: argparse.Namespace):
    from jobs.reviews import DEFAULT_BELOW, ReviewBook

    output, storage = _output(args)
    thresholds = {}
    if getattr(args, "thresholds", None):
        try:
            thresholds = {str(key): float(value) for key, value in json.loads(args.thresholds.read_text()).items()}
        except (OSError, ValueError, AttributeError) as error:
            raise ConfigError(f"--thresholds {args.thresholds}: not a JSON object of thresholds ({error})") from None
    below = args.below if getattr(args, "below", None) is not None else DEFAULT_BELOW
    return ReviewBook(output, storage, below, thresholds)


def run_review_command(args: argparse.Namespace) -> int:
    if args.command == "evaluate":
        return _evaluate(args)
    if args.review_command == "export":
        from jobs.label_studio import export_tasks

        count = export_tasks(_book(args), args.file, args.limit)
        print(
            f"{count} Label Studio tasks in {args.file}; labeling config: {args.file.with_suffix('.label-config.xml')}"
        )
        return 0
    if args.review_command == "import":
        from jobs.label_studio import LabelStudioError, import_reviews

        try:
            recorded, skipped = import_reviews(_book(args), args.file)
        except LabelStudioError as error:
            raise ConfigError(str(error)) from None
        print(f"{recorded} reviews recorded from {args.file}" + (f"; {skipped} tasks skipped" if skipped else ""))
        return 0
    from jobs.review_server import serve_reviews

    output, storage = _output(args)
    book = _book(args)
    serve_reviews(output, storage, args.host, args.port, book.below, book.thresholds)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from jobs.evaluate import Evaluation, TruthError, as_rows, plot, summarize
    from jobs.formats import TableLayout, write_result

    output, storage = _output(args)
    if not 0 < args.target <= 1:
        raise ConfigError(f"--target is an accuracy between 0 and 1, not {args.target}")
    evaluation = Evaluation(output, storage)
    try:
        scored = evaluation.from_file(args.truth) if args.truth else evaluation.from_reviews()
    except TruthError as error:
        raise ConfigError(str(error)) from None
    if not scored:
        raise ConfigError("nothing to evaluate: no reviews yet (docqa review), and no --truth file")
    figures = summarize(evaluation, scored, args.target)
    rows = as_rows(figures)
    if args.format == "json":
        print(json.dumps({"target": args.target, "questions": [vars(figure) for figure in figures]}, default=str))
    else:
        import pyarrow as pa

        shown = [{key: value for key, value in row.items() if key != "buckets"} for row in rows]
        write_result(pa.Table.from_pylist(shown).to_reader(), "table", sys.stdout, sys.stdout.buffer, TableLayout())
    if args.plot:
        plot(figures, args.target, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    if args.write_thresholds:
        chosen = {figure.question_id: figure.threshold for figure in figures if figure.threshold is not None}
        args.write_thresholds.write_text(json.dumps(chosen, indent=1))
    if args.save:
        _save(output, storage, rows, args.target)
    return 0


def _save(output: str, storage: StorageConfig, rows: list[dict[str, Any]], target: float) -> None:
    """Append the figures to OUTPUT/evaluations (a Delta table: one row per question and evaluation)."""
    from datetime import UTC, datetime

    import pyarrow as pa
    from deltalake import write_deltalake

    from pipeline.tables import OutputTables

    now = datetime.now(UTC)
    table = pa.Table.from_pylist([{**row, "target": target, "evaluated_at": now} for row in rows])
    tables = OutputTables(output, storage)
    write_deltalake(tables.uri("evaluations"), table, mode="append", storage_options=tables.options)
