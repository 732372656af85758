"""Full-size model stage on a GPU: the Idefics2-8B architecture with random weights, built on the GPU in
bf16 (no checkpoint can be downloaded), answer lengths fixed (min_new_tokens = max_new_tokens).

    .venv/bin/python -m bench.gpu [--json results.json]

For image splitting on and off: short answers (3 questions x 16 tokens per page; ours against the naive
loop, and ours without against with the shared-prefix KV cache, same run) and transcription (1 question x
512 tokens per page). Reports page-questions/s, pages/s, output tokens/s and peak GPU memory.
``--architecture tiny --device cpu`` runs the same code on a CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import UTC, datetime
from typing import Any

import torch

from actors.adapters import ModelAdapter, Prompt, resolve_attention
from actors.idefics2 import Idefics2Adapter
from actors.tiny import build_random_idefics2
from bench.model_stage import compare_prefix_cache, measure, sample_pages
from bench.naive import chat_prompt
from pipeline.config import ModelConfig
from pipeline.images import image_geometry, split_page


def _peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def transcription(engine: ModelAdapter, pages, geometry, max_new_tokens: int, batch_pages: int) -> dict[str, Any]:
    prompt = chat_prompt(engine.processor, "Transcribe the text of this page.")
    split = [split_page(page, geometry) for page in pages]
    started = time.perf_counter()
    tokens = 0
    for first in range(0, len(split), batch_pages):
        chunk = split[first : first + batch_pages]
        answers = engine.answer(chunk, [Prompt(i, prompt, max_new_tokens) for i in range(len(chunk))], True)
        tokens += sum(answer.generated_tokens for answer in answers)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    return {
        "pages": len(split),
        "seconds": elapsed,
        "pages_per_s": len(split) / elapsed,
        "tokens_per_s": tokens / elapsed,
    }


def run(
    architecture: str = "idefics2-8b",
    device_name: str = "cuda",
    pages: int = 32,
    short_tokens: int = 16,
    transcribe_tokens: int = 512,
    transcribe_pages: int = 16,
    batch_pages: int = 16,
    naive_limit: int = 12,
    attn_implementation: str = "auto",
) -> dict[str, Any]:
    """Build the model, measure both splitting settings, return the figures (and print them)."""
    device = torch.device(device_name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    started = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model, processor = build_random_idefics2(architecture)
    finally:
        torch.set_default_dtype(previous)
    attention = resolve_attention(attn_implementation, device, dtype)
    model.set_attn_implementation(attention)
    build_s = time.perf_counter() - started
    parameters = sum(parameter.numel() for parameter in model.parameters())
    results: dict[str, Any] = {
        "architecture": architecture,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype),
        "attention": attention,
        "parameters": parameters,
        "build_s": build_s,
        "date": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "runs": [],
    }
    size = f"{architecture} ({parameters / 1e9:.2f} B)"
    print(f"# bench.gpu  {results['date']}  {results['device']}  {size}, {dtype}, {attention}")
    for splitting in (True, False):
        geometry = image_geometry(processor.image_processor, splitting)
        engine = Idefics2Adapter(model, processor, geometry, ModelConfig(prompt_format="chat"))
        rendered = sample_pages(pages, geometry.render_longest_edge)
        measure(engine, rendered[:2], geometry, 1, 2, 2, naive_limit=1, fixed_length=True)  # warm-up
        _reset_peak(device)
        short = measure(engine, rendered, geometry, 3, short_tokens, batch_pages, naive_limit, fixed_length=True)
        short_peak = _peak_memory_gib(device)
        prefix = compare_prefix_cache(model, processor, rendered, geometry, 3, short_tokens, batch_pages, True)
        _reset_peak(device)
        transcribe = transcription(engine, rendered[:transcribe_pages], geometry, transcribe_tokens, batch_pages)
        transcribe_peak = _peak_memory_gib(device)
        run_result = {
            "splitting": splitting,
            "short": {**short.as_dict(), "pages_per_s": short.ours_rate / 3, "peak_gib": short_peak},
            "short_tokens_per_s": short.ours_rate * short_tokens,
            "prefix_cache": prefix.as_dict(),
            "transcription": {**transcribe, "max_new_tokens": transcribe_tokens, "peak_gib": transcribe_peak},
        }
        results["runs"].append(run_result)
        memory = f", peak {short_peak:.1f} GiB" if short_peak is not None else ""
        print(f"splitting {'on ' if splitting else 'off'}: {short.line()}{memory}")
        print(f"splitting {'on ' if splitting else 'off'}: shared-prefix KV cache, {prefix.line()}")
        memory = f", peak {transcribe_peak:.1f} GiB" if transcribe_peak is not None else ""
        print(
            f"splitting {'on ' if splitting else 'off'}: transcription {transcribe_tokens} tokens: "
            f"{transcribe['pages_per_s']:.2f} pages/s, {transcribe['tokens_per_s']:.0f} tokens/s{memory}"
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--architecture", default="idefics2-8b", choices=["idefics2-8b", "small", "tiny"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--pages", type=int, default=32)
    parser.add_argument("--batch-pages", type=int, default=16)
    parser.add_argument("--transcribe-tokens", type=int, default=512)
    parser.add_argument("--transcribe-pages", type=int, default=16)
    parser.add_argument("--naive-limit", type=int, default=12, help="page-questions the naive loop answers")
    parser.add_argument("--attn-implementation", default="auto", choices=["auto", "sdpa", "eager", "flash_attention_2"])
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    results = run(
        args.architecture,
        args.device,
        args.pages,
        16,
        args.transcribe_tokens,
        args.transcribe_pages,
        args.batch_pages,
        args.naive_limit,
        args.attn_implementation,
    )
    if args.json:
        with open(args.json, "w") as stream:
            json.dump(results, stream, indent=2)


if __name__ == "__main__":
    main()
