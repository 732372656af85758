"""Print a few rows of the latest committed run under an output location (used by `make demo`)."""

from __future__ import annotations

import argparse

from pipeline.tables import committed_runs, read_answers

COLUMNS = ["document", "page_number", "question_id", "answer", "confidence", "status", "error"]


def preview(output: str, limit: int = 12, width: int = 36) -> str:
    runs = committed_runs(output)
    if not runs:
        return f"no committed run under {output}"
    latest = runs[-1]
    table = read_answers(output, latest["run_id"], columns=COLUMNS)
    rows = [[_cell(value, width) for value in row.values()] for row in table.slice(0, limit).to_pylist()]
    widths = [max(len(column), *(len(row[i]) for row in rows)) for i, column in enumerate(COLUMNS)]
    lines = [f"run {latest['run_id']}: {table.num_rows} rows, first {len(rows)}:"]
    lines.append("  ".join(column.ljust(w) for column, w in zip(COLUMNS, widths, strict=True)))
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def _cell(value: object, width: int) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}"
    text = str(value).replace("\n", " ")
    if "/" in text:
        text = text.rsplit("/", 1)[-1]
    return text if len(text) <= width else text[: width - 1] + "…"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output")
    parser.add_argument("--limit", type=int, default=12)
    args = parser.parse_args()
    print(preview(args.output, args.limit))


if __name__ == "__main__":
    main()
