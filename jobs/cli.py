"""The `docqa` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import yaml

from pipeline.config import ConfigError, load_config
from pipeline.images import ModelLoadError
from pipeline.sink import RunExistsError
from pipeline.storage import InputError, StorageError


def _parse_assignment(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE (e.g. model.dtype=bfloat16), got {text!r}")
    field, value = text.split("=", 1)
    return field.strip(), yaml.safe_load(value) if value else value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="docqa", description="Document OCR and question answering on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a job: PDFs → answers in Parquet")
    run.add_argument("--config", required=True, help="job config (YAML)")
    run.add_argument("--input", help="override input: folder, file or glob of PDFs")
    run.add_argument("--output", help="override output folder")
    run.add_argument("--model", help="override model.id: hub id or local checkpoint directory")
    run.add_argument("--run-id", help="override the run id (default: UTC time + random suffix)")
    run.add_argument(
        "--set",
        dest="assignments",
        action="append",
        default=[],
        type=_parse_assignment,
        metavar="FIELD=VALUE",
        help="override any config field, e.g. --set actors.batch_size=8 --set questions.0.max_new_tokens=16",
    )

    model = commands.add_parser("model", help="model utilities")
    model_commands = model.add_subparsers(dest="model_command", required=True)
    tiny = model_commands.add_parser("tiny", help="build the tiny offline Idefics2 used by the demo and the tests")
    tiny.add_argument("path", help="directory to save the checkpoint to")
    return parser


def _run(args: argparse.Namespace) -> int:
    from jobs.run import run_job

    overrides = dict(args.assignments)
    for field, value in [("input", args.input), ("output", args.output), ("model.id", args.model)]:
        if value is not None:
            overrides[field] = value
    if args.run_id is not None:
        overrides["run_id"] = args.run_id
    config = load_config(args.config, overrides)
    summary = run_job(config)
    print(summary.text())
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s docqa %(message)s", datefmt="%H:%M:%S", force=True)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        from actors.tiny import build_tiny_idefics2

        print(f"tiny Idefics2 saved to {build_tiny_idefics2(args.path)}")
        return 0
    except ConfigError as error:
        print(f"docqa: {error}", file=sys.stderr)
        return 2
    except (InputError, ModelLoadError, RunExistsError, StorageError) as error:
        print(f"docqa: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
