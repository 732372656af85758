"""`make bench`: run the CPU benchmarks one after another and write their output into BENCHMARKS.md
(between the generated-section markers; the hand-written sections around them are kept)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
BEGIN, END = "<!-- make bench: begin -->", "<!-- make bench: end -->"
CPU_BENCHMARKS = [
    ("CPU stages vs a plain PyMuPDF loop", "bench.cpu_stages"),
    ("Model stage vs the naive per-question generate (tiny Idefics2)", "bench.model_stage"),
    ("End to end: `docqa run` with Ray Data's per-stage times", "bench.end_to_end"),
    ("Online endpoint: one request, 8 concurrent vs 8 sequential", "bench.serve"),
    ("Many small documents: `docqa run` vs a plain PyMuPDF loop per core", "bench.small_documents"),
]


def run_benchmark(module: str) -> tuple[str, float]:
    """The benchmark's report (its stdout from the '# bench.' header on) and its wall time."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", module], capture_output=True, text=True, errors="replace", check=False)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{module} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    lines = done.stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("# bench.")), 0)
    return "\n".join(lines[start:]), elapsed


def main() -> None:
    sections = []
    total = 0.0
    for title, module in CPU_BENCHMARKS:
        print(f"running {module} ...", flush=True)
        report, elapsed = run_benchmark(module)
        total += elapsed
        print(report, flush=True)
        command = f"Command: `.venv/bin/python -m {module}` ({elapsed:.0f} s)"
        sections.append(f"### {title}\n\n{command}\n\n```\n{report}\n```\n")
    generated = "\n".join([BEGIN, f"_`make bench` wrote this section; all four took {total:.0f} s._\n", *sections, END])
    text = BENCHMARKS_MD.read_text()
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + generated + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip() + "\n\n## CPU benchmarks (`make bench`)\n\n" + generated + "\n"
    BENCHMARKS_MD.write_text(text)
    print(f"wrote {BENCHMARKS_MD} ({total:.0f} s of benchmarks)")


if __name__ == "__main__":
    main()
