"""The model stage at full size on a GPU: the Idefics2-8B architecture with random weights built on the GPU
in bf16 (no checkpoint can be downloaded), answers fixed in length (min_new_tokens = max_new_tokens, since
random weights never stop). No Ray, no PDF library: pages come as PNG files (``pages`` writes them).

    .venv/bin/python -m bench.gpu pages .bench-pages            # here: render sample pages (PyMuPDF)
    python -m bench.gpu run --pages .bench-pages --out DIR      # on the GPU machine: every section
    bash bench/gpu_session.sh                                   # the device call: all of it, JSON to $OUT

Every section writes DIR/<section>.json as soon as it is done and prints a summary line per figure. Each
comparison runs both sides in the same process on the same pages. ``--architecture tiny --device cpu``
runs the same code on a CPU (tests/test_bench.py).

Sections:
- short: ours vs the naive per-question processor + generate, splitting on and off, 3 questions x 16 tokens;
- prefix: the shared-prefix KV cache on vs off, 3 and 8 questions per page;
- transcription: 512 tokens per page, splitting on and off, at several pages per call;
- sweep: pages per call (actors.batch_size) for 3 x 16 tokens: throughput and peak memory;
- engines: the decoders against each other: transformers' generate (static batches), continuous batching
  eager, continuous batching with CUDA graphs; uniform short answers, transcription, and answers whose
  lengths vary from 8 to 512 tokens at the same number of rows in flight;
- encoder: vision-encoder throughput by sub-images per call, and the pixel preparation (CPU numpy as
  before vs the device lookup);
- quantization: bnb-4bit next to bf16 (saved checkpoint, loaded through docqa's own loader).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import actors.adapters
from actors.adapters import ModelAdapter, Prompt, resolve_attention
from actors.checkpoint import image_geometry
from actors.idefics2 import Idefics2Adapter
from bench.model_stage import QUESTIONS, compare_prefix_cache, measure
from bench.naive import chat_prompt
from jobs.devtools.tiny_models import build_random_idefics2
from pipeline.config import ModelConfig
from pipeline.images import ImageGeometry, split_page

SECTIONS = ("short", "transcription", "engines", "prefix", "sweep", "encoder", "quantization")
PRICE_PER_GPU_HOUR = 2.69  # $ per H100-hour, for the cost per million pages


@dataclass
class Bench:
    """The model under test and the pages, shared by every section."""

    model: Any
    processor: Any
    device: torch.device
    pages: list[np.ndarray]  # rendered for splitting (1960 px longest edge at full size)
    meta: dict[str, Any]
    short_tokens: int
    transcribe_tokens: int

    def engine(self, splitting: bool, **settings: Any) -> Idefics2Adapter:
        """A fresh engine (its own decoder and slot cache); it sets the shared processor's splitting, so
        build it right before use."""
        free_memory()
        geometry = self.geometry(splitting)
        return Idefics2Adapter(self.model, self.processor, geometry, ModelConfig(prompt_format="chat", **settings))

    def geometry(self, splitting: bool) -> ImageGeometry:
        return image_geometry(self.processor.image_processor, splitting)

    def rendered(self, splitting: bool, count: int) -> list[np.ndarray]:
        """``count`` pages (cycling through the sample) at the render size the splitting setting asks for."""
        edge = self.geometry(splitting).render_longest_edge
        out = []
        for index in range(count):
            page = self.pages[index % len(self.pages)]
            if max(page.shape[:2]) != edge:
                height, width = page.shape[:2]
                factor = edge / max(height, width)
                size = (round(width * factor), round(height * factor))
                page = np.asarray(Image.fromarray(page).resize(size, Image.BILINEAR))
            out.append(page)
        return out


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def timed(work: Callable[[], Any]) -> tuple[Any, float]:
    synchronize()
    started = time.perf_counter()
    result = work()
    synchronize()
    return result, time.perf_counter() - started


def cost_per_million_pages(pages_per_s: float) -> float:
    return PRICE_PER_GPU_HOUR * 1e6 / (pages_per_s * 3600)


def answer_pages(
    engine: ModelAdapter, pages: list[np.ndarray], questions: list[str], max_new_tokens: int, batch_pages: int
) -> tuple[list[str], int, float]:
    """Our engine over pages, ``batch_pages`` per call, every question on every page, fixed length: the
    answers, the generated tokens and the seconds."""
    prompts_text = [chat_prompt(engine.processor, question) for question in questions]
    split = [split_page(page, engine.geometry) for page in pages]

    def work() -> tuple[list[str], int]:
        texts, tokens = [], 0
        for first in range(0, len(split), batch_pages):
            chunk = split[first : first + batch_pages]
            prompts = [Prompt(i, text, max_new_tokens) for i in range(len(chunk)) for text in prompts_text]
            answers = engine.answer(chunk, prompts, fixed_length=True)
            texts += [answer.text for answer in answers]
            tokens += sum(answer.generated_tokens for answer in answers)
        return texts, tokens

    (texts, tokens), seconds = timed(work)
    return texts, tokens, seconds


def rates(pages: int, questions: int, tokens: int, seconds: float) -> dict[str, float]:
    pages_per_s = pages / seconds
    return {
        "seconds": seconds,
        "pages_per_s": pages_per_s,
        "page_questions_per_s": pages * questions / seconds,
        "tokens_per_s": tokens / seconds,
        "cost_per_million_pages": cost_per_million_pages(pages_per_s),
    }


def section_short(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    runs = []
    for splitting in (True, False):
        engine = bench.engine(splitting)
        pages = bench.rendered(splitting, args.pages)
        geometry = engine.geometry
        measure(engine, pages[: args.batch_pages], geometry, 3, bench.short_tokens, args.batch_pages, 1, True)
        reset_peak(bench.device)
        result = measure(
            engine, pages, geometry, 3, bench.short_tokens, args.batch_pages, args.naive_limit, fixed_length=True
        )
        entry = {
            "splitting": splitting,
            **result.as_dict(),
            "pages_per_s": result.ours_rate / 3,
            "tokens_per_s": result.ours_rate * bench.short_tokens,
            "cost_per_million_pages": cost_per_million_pages(result.ours_rate / 3),
            "peak_gib": peak_gib(bench.device),
            "decoder": dict(engine.decoder.stats) if engine.decoder else None,
            "graph_error": engine.decoder.graph_error if engine.decoder else None,
        }
        runs.append(entry)
        print(f"short, splitting {'on ' if splitting else 'off'}: {result.line()}, peak {entry['peak_gib']}")
    return {"batch_pages": args.batch_pages, "runs": runs}


def section_prefix(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    runs = []
    pages = bench.rendered(True, args.pages)
    geometry = bench.geometry(True)
    for questions in (3, 8):
        free_memory()
        result = compare_prefix_cache(
            bench.model, bench.processor, pages, geometry, questions, bench.short_tokens, args.batch_pages, True
        )
        runs.append(result.as_dict())
        print(f"prefix cache, splitting on: {result.line()}")
    return {"batch_pages": args.batch_pages, "runs": runs}


def section_transcription(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    runs = []
    for splitting in (True, False):
        for batch_pages in args.transcribe_batches:
            engine = bench.engine(splitting)
            pages = bench.rendered(splitting, max(2 * batch_pages, args.transcribe_pages))
            reset_peak(bench.device)
            _, tokens, seconds = answer_pages(
                engine, pages, ["Transcribe the text of this page."], bench.transcribe_tokens, batch_pages
            )
            entry = {
                "splitting": splitting,
                "batch_pages": batch_pages,
                "pages": len(pages),
                **rates(len(pages), 1, tokens, seconds),
                "peak_gib": peak_gib(bench.device),
                "decoder": dict(engine.decoder.stats) if engine.decoder else None,
            }
            runs.append(entry)
            print(
                f"transcription {bench.transcribe_tokens} tokens, splitting {'on ' if splitting else 'off'}, "
                f"{batch_pages:3d} pages/call: {entry['pages_per_s']:7.2f} pages/s, "
                f"{entry['tokens_per_s']:8.0f} tokens/s, peak {entry['peak_gib']}"
            )
    return {"max_new_tokens": bench.transcribe_tokens, "runs": runs}


def section_sweep(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    runs = []
    questions = QUESTIONS[:3]
    for batch_pages in args.sweep_batches:
        engine = bench.engine(True)
        pages = bench.rendered(True, max(2 * batch_pages, args.pages // 2))
        answer_pages(engine, pages[:batch_pages], questions, bench.short_tokens, batch_pages)  # same shapes, warm
        reset_peak(bench.device)
        _, tokens, seconds = answer_pages(engine, pages, questions, bench.short_tokens, batch_pages)
        entry = {
            "batch_pages": batch_pages,
            **rates(len(pages), 3, tokens, seconds),
            "peak_gib": peak_gib(bench.device),
        }
        runs.append(entry)
        print(
            f"sweep, 3 x {bench.short_tokens} tokens, splitting on, {batch_pages:3d} pages/call: "
            f"{entry['page_questions_per_s']:7.2f} page-questions/s, peak {entry['peak_gib']}"
        )
    return {"runs": runs}


ENGINES = {
    "generate": {"continuous_batching": False},
    "slots": {"cuda_graphs": False},
    "slots+graphs": {},
}


def section_engines(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    """The decoders on the same pages: uniform short answers, transcription, and varied answer lengths."""
    results: dict[str, Any] = {}
    workloads = [
        ("short", QUESTIONS[:3], bench.short_tokens, args.pages),
        ("transcription", ["Transcribe the text of this page."], bench.transcribe_tokens, args.batch_pages),
    ]
    batch_pages = args.batch_pages
    for name, questions, max_new_tokens, count in workloads:
        pages = bench.rendered(True, count)
        runs, answers = {}, {}
        for engine_name, settings in ENGINES.items():
            engine = bench.engine(True, **settings)
            answer_pages(engine, pages[:1], questions, 2, 1)  # warm-up
            reset_peak(bench.device)
            answers[engine_name], tokens, seconds = answer_pages(engine, pages, questions, max_new_tokens, batch_pages)
            runs[engine_name] = {
                **rates(len(pages), len(questions), tokens, seconds),
                "peak_gib": peak_gib(bench.device),
                "graph_error": engine.decoder.graph_error if engine.decoder else None,
            }
        for engine_name in ENGINES:
            runs[engine_name]["ratio_to_generate"] = runs["generate"]["seconds"] / runs[engine_name]["seconds"]
            runs[engine_name]["same_answers_as_generate"] = sum(
                a == b for a, b in zip(answers[engine_name], answers["generate"], strict=True)
            )
        results[name] = {"batch_pages": batch_pages, "max_new_tokens": max_new_tokens, "runs": runs}
        for engine_name, run in runs.items():
            print(
                f"engines, {name}: {engine_name:13s} {run['page_questions_per_s']:8.2f} page-questions/s, "
                f"{run['tokens_per_s']:8.0f} tokens/s, x{run['ratio_to_generate']:.2f} of generate, "
                f"same answers {run['same_answers_as_generate']}/{len(answers[engine_name])}"
            )
    results["varied"] = varied_lengths(bench, args)
    return results


def varied_lengths(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    """Answers of 8 to 512 tokens (drawn per prompt, as real weights stop where they stop) with the same rows
    in flight: transformers' generate in static batches of ``rows`` (a batch runs until its longest answer;
    rows that finished wait) against continuous batching with ``rows`` slots, eager and with CUDA graphs.
    All decode the same prompts from the same image features; useful tokens are the drawn lengths."""
    rows, questions = args.varied_rows, 8
    pages = bench.rendered(True, max(1, 2 * rows // questions))
    lengths_rng = random.Random(0)
    low, high = min(8, bench.transcribe_tokens), bench.transcribe_tokens
    engines = {name: bench.engine(True, decode_slots=rows, cuda_graphs=name == "slots+graphs") for name in ENGINES}
    engine = engines["generate"]
    split = [split_page(page, engine.geometry) for page in pages]
    prompts = [
        Prompt(page, chat_prompt(bench.processor, question), lengths_rng.randint(low, high))
        for page in range(len(pages))
        for question in QUESTIONS[:questions]
    ]
    features = engine.encode_pages(split)
    token_lists = engine.tokenize([prompt.text for prompt in prompts])
    useful = sum(prompt.max_new_tokens for prompt in prompts)

    def static_batches() -> None:
        for first in range(0, len(prompts), rows):
            chunk = prompts[first : first + rows]
            longest = max(prompt.max_new_tokens for prompt in chunk)
            pages_of = [prompt.page for prompt in chunk]
            engine.generate(token_lists[first : first + rows], pages_of, features, longest, fixed_length=True)

    seconds = {"generate": timed(static_batches)[1]}
    stats = {}
    for name in ("slots", "slots+graphs"):
        slots = engines[name]
        slots.decode_in_slots(token_lists[:rows], prompts[:rows], features, True)  # warm-up: captures the graphs
        slots.decoder.stats.clear()
        seconds[name] = timed(lambda slots=slots: slots.decode_in_slots(token_lists, prompts, features, True))[1]
        stats[name] = dict(slots.decoder.stats)
    result = {
        "prompts": len(prompts),
        "rows_in_flight": rows,
        "lengths": [low, high],
        "useful_tokens": useful,
        "seconds": seconds,
        "useful_tokens_per_s": {name: useful / value for name, value in seconds.items()},
        "ratio_to_generate": {name: seconds["generate"] / value for name, value in seconds.items()},
        "decoder": stats,
    }
    rates_text = ", ".join(f"{name} {useful / value:.0f}" for name, value in seconds.items())
    print(
        f"engines, varied lengths {low}..{high}, {rows} rows in flight, {len(prompts)} prompts, useful tokens/s: "
        f"{rates_text}; continuous x{result['ratio_to_generate']['slots']:.2f}, with graphs "
        f"x{result['ratio_to_generate']['slots+graphs']:.2f} of static generate"
    )
    return result


def cpu_normalize(pages: list[list[np.ndarray]], geometry: ImageGeometry) -> tuple[np.ndarray, np.ndarray]:
    """The previous pixel preparation, as the baseline: the lookup table applied on the CPU in float32
    (pages, images, 3, H, W), to be copied to the device."""
    levels = (np.arange(256, dtype=np.float64) * geometry.rescale_factor).astype(np.float32)
    mean = np.array(geometry.mean, dtype=np.float32)[:, None]
    std = np.array(geometry.std, dtype=np.float32)[:, None]
    table = ((levels[None, :] - mean) / std).astype(np.float32)
    count = max(len(images) for images in pages)
    height = max(image.shape[0] for images in pages for image in images)
    width = max(image.shape[1] for images in pages for image in images)
    values = np.zeros((len(pages), count, 3, height, width), dtype=np.float32)
    mask = np.zeros((len(pages), count, height, width), dtype=np.int64)
    for i, images in enumerate(pages):
        for j, image in enumerate(images):
            h, w = image.shape[:2]
            values[i, j, :, :h, :w] = table[np.arange(3)[:, None, None], image.transpose(2, 0, 1)]
            mask[i, j, :h, :w] = 1
    return values, mask


def section_encoder(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    engine = bench.engine(True)
    pages = bench.rendered(True, args.pages)
    split = [split_page(page, engine.geometry) for page in pages]
    chunk = split[:8]
    baseline = []
    for _ in range(3):
        _, cpu_s = timed(lambda: [torch.from_numpy(a).to(bench.device) for a in cpu_normalize(chunk, engine.geometry)])
        _, device_s = timed(lambda: engine.normalizer.batch(chunk))
        baseline.append((cpu_s, device_s))
    cpu_s, device_s = min(baseline)
    preparation = {
        "pages": len(chunk),
        "cpu_numpy_ms_per_page": cpu_s * 1000 / len(chunk),
        "device_lookup_ms_per_page": device_s * 1000 / len(chunk),
        "ratio": cpu_s / device_s,
    }
    print(
        f"encoder, pixel preparation of {len(chunk)} split pages: CPU numpy "
        f"{preparation['cpu_numpy_ms_per_page']:.1f} ms/page, device lookup "
        f"{preparation['device_lookup_ms_per_page']:.1f} ms/page, ratio {preparation['ratio']:.1f}"
    )
    runs = []
    default = actors.adapters.ENCODER_IMAGES
    try:
        for images in args.encoder_images:
            actors.adapters.ENCODER_IMAGES = images
            engine.encode_pages(split[: max(1, images // 5)])
            reset_peak(bench.device)
            _, seconds = timed(lambda: engine.encode_pages(split))
            entry = {"images_per_call": images, "pages_per_s": len(split) / seconds, "peak_gib": peak_gib(bench.device)}
            runs.append(entry)
            print(
                f"encoder, {images:3d} sub-images per call: {entry['pages_per_s']:7.2f} pages/s, "
                f"peak {entry['peak_gib']}"
            )
    finally:
        actors.adapters.ENCODER_IMAGES = default
    return {"preparation": preparation, "runs": runs, "pages": len(split)}


def section_quantization(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    """bf16 (in memory) next to bnb-4bit loaded from a saved checkpoint through docqa's loader: weights
    memory, peak memory and throughput at 3 x 16 tokens. Replaces ``bench.model`` by the quantized one."""
    from actors.families import load_adapter

    pages = bench.rendered(True, args.pages)
    runs = {}

    def measure_engine(engine: ModelAdapter, name: str, weights_gib: float | None) -> None:
        answer_pages(engine, pages[:2], QUESTIONS[:3], 2, 2)
        reset_peak(bench.device)
        _, tokens, seconds = answer_pages(engine, pages, QUESTIONS[:3], bench.short_tokens, args.batch_pages)
        runs[name] = {
            **rates(len(pages), 3, tokens, seconds),
            "weights_gib": weights_gib,
            "peak_gib": peak_gib(bench.device),
            "graph_error": engine.decoder.graph_error if engine.decoder else None,
        }
        print(
            f"quantization {name}: weights {weights_gib} GiB, peak {runs[name]['peak_gib']} GiB, "
            f"{runs[name]['page_questions_per_s']:.2f} page-questions/s"
        )

    free_memory()
    weights = torch.cuda.memory_allocated(bench.device) / 2**30 if bench.device.type == "cuda" else None
    measure_engine(bench.engine(True), "bf16", weights)
    checkpoint = Path(args.checkpoint_dir)
    _, save_s = timed(lambda: (bench.model.save_pretrained(checkpoint), bench.processor.save_pretrained(checkpoint)))
    bench.model = None
    free_memory()
    config = ModelConfig(id=str(checkpoint), quantization="bnb-4bit", prompt_format="chat")
    engine, load_s = timed(lambda: load_adapter(config, "idefics2", bench.geometry(True), bench.device))
    free_memory()
    weights = torch.cuda.memory_allocated(bench.device) / 2**30
    measure_engine(engine, "bnb-4bit", weights)
    runs["bnb-4bit"]["ratio_to_bf16"] = runs["bnb-4bit"]["page_questions_per_s"] / runs["bf16"]["page_questions_per_s"]
    return {"batch_pages": args.batch_pages, "save_s": save_s, "load_s": load_s, "runs": runs}


SECTION_FUNCTIONS: dict[str, Callable[[Bench, argparse.Namespace], dict[str, Any]]] = {
    "short": section_short,
    "prefix": section_prefix,
    "transcription": section_transcription,
    "sweep": section_sweep,
    "engines": section_engines,
    "encoder": section_encoder,
    "quantization": section_quantization,
}


def load_pages(directory: Path) -> list[np.ndarray]:
    files = sorted(directory.glob("page-*.png"))
    if not files:
        raise SystemExit(f"no page-*.png in {directory}: write them with `python -m bench.gpu pages {directory}`")
    return [np.asarray(Image.open(file).convert("RGB")) for file in files]


def write_pages(directory: Path, count: int, longest_edge: int) -> None:
    """Sample invoice pages of mixed sizes (letter, A4, A4 landscape), rendered as the pipeline does."""
    from bench.model_stage import sample_pages

    directory.mkdir(parents=True, exist_ok=True)
    for index, page in enumerate(sample_pages(count, longest_edge)):
        Image.fromarray(page).save(directory / f"page-{index:03d}.png")


def build(architecture: str, device: torch.device, attn_implementation: str) -> tuple[Any, Any, dict[str, Any]]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        (model, processor), build_s = timed(lambda: _build_on(device, architecture))
    finally:
        torch.set_default_dtype(previous)
    attention = resolve_attention(attn_implementation, device, dtype)
    model.set_attn_implementation(attention)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    meta = {
        "architecture": architecture,
        "parameters": parameters,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype),
        "attention": attention,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "build_s": build_s,
        "weights_gib": torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "date": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "command": " ".join(["python -m bench.gpu", *sys.argv[1:]]),
    }
    return model, processor, meta


def _build_on(device: torch.device, architecture: str) -> tuple[Any, Any]:
    with device:
        return build_random_idefics2(architecture)


def run(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Build the model, run the sections in order while time is left, write each one's JSON."""
    started = time.perf_counter()
    device = torch.device(args.device)
    model, processor, meta = build(args.architecture, device, args.attn_implementation)
    pages = load_pages(Path(args.pages_dir))
    bench = Bench(model, processor, device, pages, meta, args.short_tokens, args.transcribe_tokens)
    size = f"{args.architecture} ({meta['parameters'] / 1e9:.2f} B)"
    print(f"# bench.gpu  {meta['date']}  {meta['device']}  {size}, {meta['dtype']}, {meta['attention']}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.sections:
        if time.perf_counter() - started > args.deadline_s:
            print(f"{name}: skipped, past the {args.deadline_s} s deadline")
            continue
        section_started = time.perf_counter()
        try:
            result = SECTION_FUNCTIONS[name](bench, args)
        except Exception as error:  # noqa: BLE001 - one failing section must not lose the others' figures
            result = {"error": f"{type(error).__name__}: {error}"}
            print(f"{name}: FAILED {result['error']}", flush=True)
        results[name] = {**meta, "section": name, "section_s": time.perf_counter() - section_started, **result}
        (out / f"{name}.json").write_text(json.dumps(results[name], indent=2))
        print(f"({name}: {results[name]['section_s']:.0f} s)", flush=True)
    return results


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    pages = commands.add_parser("pages", help="write sample pages as PNG (needs PyMuPDF)")
    pages.add_argument("directory")
    pages.add_argument("--count", type=int, default=64)
    pages.add_argument("--longest-edge", type=int, default=1960)
    measure_parser = commands.add_parser("run", help="measure")
    measure_parser.add_argument("--pages-dir", default=".bench-pages")
    measure_parser.add_argument("--out", default="bench-gpu")
    measure_parser.add_argument("--sections", type=lambda text: text.split(","), default=list(SECTIONS[:-1]))
    measure_parser.add_argument("--architecture", default="idefics2-8b", choices=["idefics2-8b", "small", "tiny"])
    measure_parser.add_argument("--device", default="cuda")
    measure_parser.add_argument("--attn-implementation", default="auto")
    measure_parser.add_argument("--pages", type=int, default=32)
    measure_parser.add_argument("--batch-pages", type=int, default=16)
    measure_parser.add_argument("--naive-limit", type=int, default=12, help="page-questions the naive loop answers")
    measure_parser.add_argument("--short-tokens", type=int, default=16)
    measure_parser.add_argument("--transcribe-tokens", type=int, default=512)
    measure_parser.add_argument("--transcribe-pages", type=int, default=32)
    measure_parser.add_argument("--transcribe-batches", type=_integers, default=[32, 64, 128])
    measure_parser.add_argument("--sweep-batches", type=_integers, default=[1, 4, 16, 64])
    measure_parser.add_argument("--encoder-images", type=_integers, default=[5, 10, 20, 40, 80])
    measure_parser.add_argument("--varied-rows", type=int, default=64, help="rows in flight, varied lengths")
    measure_parser.add_argument("--checkpoint-dir", default="/tmp/docqa-bench-checkpoint")
    measure_parser.add_argument("--deadline-s", type=float, default=400, help="start no section after this")
    return parser.parse_args(argv)


def _integers(text: str) -> list[int]:
    return [int(value) for value in text.split(",")]


def main(argv: list[str] | None = None) -> None:
    args = arguments(argv)
    if args.command == "pages":
        write_pages(Path(args.directory), args.count, args.longest_edge)
    else:
        run(args)


if __name__ == "__main__":
    main()
