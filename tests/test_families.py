"""#8: every supported family through `docqa run`, each answer equal to its family's reference generate:
Idefics2 base (raw prompt, newline stop rule), a PEFT LoRA adapter on Idefics2, Idefics1. The instruct
checkpoint is covered by test_pipeline; long answers (chatty) by the 96-token question here."""

import ast
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from peft import PeftModel
from transformers import AutoModelForImageTextToText, AutoProcessor, GPT2Config, IdeficsForVisionText2Text

from actors.catalog import FAMILIES
from actors.checkpoint import read_checkpoint
from actors.families import ADAPTERS, inspect_checkpoint
from bench.naive import chat_prompt, idefics1_reference_answer, raw_prompt, reference_answer
from jobs.cli import main
from jobs.devtools.samples import write_job, write_samples
from pipeline.config import ModelConfig, RenderConfig
from pipeline.pdf import open_pdf
from pipeline.records import Status
from pipeline.tables import committed_runs, read_answers

QUESTIONS = [
    {"id": "number", "text": "What is the invoice number of {file_name}?", "max_new_tokens": 40},
    {"id": "text", "text": "Transcribe page {page_number}.", "pages": "first", "max_new_tokens": 96},
]


@pytest.fixture(scope="module")
def documents(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("family-pdfs")
    write_samples(directory, count=3, with_bad_files=False)
    return directory


@pytest.fixture(scope="module")
def models(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """The `model` config section of each case, built with the CLI as a user would."""
    root = tmp_path_factory.mktemp("families")
    assert main(["model", "tiny", str(root / "base"), "--family", "idefics2-base"]) == 0
    assert main(["model", "tiny", str(root / "idefics1"), "--family", "idefics"]) == 0
    assert main(["model", "tiny-lora", str(tiny_model), str(root / "lora")]) == 0
    return {
        "idefics2-base": {"id": str(root / "base")},
        "idefics": {"id": str(root / "idefics1")},
        "lora": {"id": str(tiny_model), "adapter": str(root / "lora")},
    }


def _reference(case: str, model_section: dict[str, str], stop_at_newline: bool = True):
    """(answer, generated tokens) of the family's reference generate, for a page and a question."""
    processor = AutoProcessor.from_pretrained(model_section["id"])
    if case == "idefics":
        model = IdeficsForVisionText2Text.from_pretrained(model_section["id"]).eval()
        return lambda page, question, tokens: idefics1_reference_answer(processor, model, page, question, tokens)
    model = AutoModelForImageTextToText.from_pretrained(model_section["id"]).eval()
    if "adapter" in model_section:
        model = PeftModel.from_pretrained(model, model_section["adapter"]).eval()  # not merged: PEFT's own forward
    if case == "idefics2-base":
        return lambda page, question, tokens: reference_answer(
            processor, model, page, raw_prompt(question), tokens, stop_at_newline=stop_at_newline
        )
    return lambda page, question, tokens: reference_answer(
        processor, model, page, chat_prompt(processor, question), tokens
    )


@pytest.mark.parametrize("case", ["idefics2-base", "lora", "idefics"])
def test_each_family_runs_end_to_end_and_equals_its_reference(
    ray_session, case: str, models: dict, documents: Path, tiny_model: Path, tmp_path: Path
) -> None:
    model_section = models[case]
    job = write_job(tmp_path, documents, Path(model_section["id"]), QUESTIONS, actors={"batch_size": 2})
    extra = ["--set", f"model.adapter={model_section['adapter']}"] if "adapter" in model_section else []
    assert main(["run", "--config", str(job), "--run-id", case, *extra]) == 0

    rows = read_answers(str(tmp_path / "out")).to_pylist()
    assert len(rows) == 6 + 3  # "number" on each of 6 pages, "text" on the 3 first pages
    geometry = inspect_checkpoint(ModelConfig(id=model_section["id"]), RenderConfig()).geometry
    tokens = {question["id"]: question["max_new_tokens"] for question in QUESTIONS}
    pages = {
        (row["document"], row["page_number"]): open_pdf(Path(row["document"]).read_bytes(), "pymupdf").render(
            row["page_number"], geometry.render_longest_edge
        )
        for row in rows
    }
    reference = _reference(case, model_section)
    for row in rows:
        assert row["status"] == Status.OK, row
        expected = reference(pages[row["document"], row["page_number"]], row["question"], tokens[row["question_id"]])
        assert (row["answer"], row["generated_tokens"]) == expected, row
    assert len({row["answer"] for row in rows}) > 2  # answers depend on the page and the question
    [record] = committed_runs(str(tmp_path / "out"))
    assert record["model"]["family"] == ("idefics" if case == "idefics" else "idefics2")

    # Without the stop rule (base) or without the adapter (LoRA), some answer would be different: the
    # rule and the adapter act, not just pass through.
    if case != "idefics":
        other = (
            _reference(case, model_section, stop_at_newline=False)
            if case == "idefics2-base"
            else _reference("lora", {"id": str(tiny_model)})
        )
        assert any(
            other(pages[row["document"], row["page_number"]], row["question"], tokens[row["question_id"]])
            != (row["answer"], row["generated_tokens"])
            for row in rows
        )


def test_idefics1_pixels_are_bit_identical_to_its_image_processor(models: dict) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from actors.adapters import PixelNormalizer
    from pipeline.images import split_page

    processor = AutoProcessor.from_pretrained(models["idefics"]["id"]).image_processor
    geometry = inspect_checkpoint(ModelConfig(id=models["idefics"]["id"]), RenderConfig()).geometry
    rng = np.random.default_rng(3)
    for height, width in [(112, 112), (150, 87), (60, 200), (1000, 707)]:
        page = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        [image] = split_page(page, geometry)
        ours = PixelNormalizer(geometry, torch.device("cpu")).batch([[image]])[0][0, 0].numpy()
        expected = processor([Image.fromarray(page)], return_tensors="pt")[0].numpy()
        np.testing.assert_array_equal(ours, expected)


def test_prompt_format_follows_the_checkpoint_unless_set(models: dict, tiny_model: Path) -> None:
    from actors.idefics1 import IdeficsAdapter
    from actors.idefics2 import Idefics2Adapter

    with_template = AutoProcessor.from_pretrained(tiny_model)
    without = AutoProcessor.from_pretrained(models["idefics2-base"]["id"])
    resolve = Idefics2Adapter.resolve_prompt_format
    assert resolve(ModelConfig(id=str(tiny_model)), with_template) == "chat"
    assert resolve(ModelConfig(id=models["idefics2-base"]["id"]), without) == "raw"
    assert resolve(ModelConfig(id="HuggingFaceM4/idefics2-8b-base"), with_template) == "raw"
    assert resolve(ModelConfig(id="/models/idefics2-8b-base/"), with_template) == "raw"  # a local download
    assert resolve(ModelConfig(id="HuggingFaceM4/idefics2-8b-chatty"), without) == "chat"
    assert resolve(ModelConfig(id=str(tiny_model), prompt_format="raw"), with_template) == "raw"
    assert IdeficsAdapter.resolve_prompt_format(ModelConfig(id="/m/idefics-9b-instruct"), without) == "chat"
    assert IdeficsAdapter.resolve_prompt_format(ModelConfig(id="HuggingFaceM4/idefics-9b"), without) == "raw"


def test_docqa_models_lists_families_formats_and_support(capsys) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for text in [
        "idefics2  (model_type idefics2",
        "idefics  (model_type idefics:",
        "HuggingFaceM4/idefics2-8b-base       raw",
        "HuggingFaceM4/idefics2-8b-chatty     chat",
        "HuggingFaceM4/idefics-9b-instruct    chat",
        "image splitting: no, one square image",
        "bnb-4bit, awq",
        "model.adapter",
    ]:
        assert text in out, text


def test_configs_a_family_cannot_run_are_rejected_before_any_work(
    ray_session, models: dict, documents: Path, tiny_model: Path, tmp_path: Path, capsys
) -> None:
    output = tmp_path / "out"

    def run(model: str, *assignments: str) -> tuple[int, str]:
        job = write_job(tmp_path, documents, Path(model), QUESTIONS)
        code = main(["run", "--config", str(job), *[part for a in assignments for part in ("--set", a)]])
        return code, capsys.readouterr().err

    code, err = run(str(tiny_model), "model.quantization=bnb-4bit")
    assert code == 2 and "model.quantization=bnb-4bit runs on CUDA GPUs only" in err
    code, err = run(str(tiny_model), "model.quantization=bnb-4bit", "actors.num_gpus_per_actor=1")
    assert code == 2 and "the Ray cluster has 0 GPUs (this machine has none)" in err
    assert "model.quantization=none (bnb-4bit needs a GPU)" in err
    code, err = run(str(tiny_model), "model.quantization=awq", "actors.num_gpus_per_actor=1")
    assert code == 2 and "needs an AWQ checkpoint (HuggingFaceM4/idefics2-8b-AWQ)" in err
    code, err = run(models["idefics"]["id"], "model.quantization=awq", "actors.num_gpus_per_actor=1")
    assert code == 2 and "model.quantization=awq is not available for idefics checkpoints" in err
    code, err = run(models["idefics"]["id"], "render.image_splitting=true")
    assert code == 2 and "Idefics1 checkpoint, which has no image splitting" in err
    other = tmp_path / "gpt2"
    GPT2Config().save_pretrained(other)
    code, err = run(str(other))
    assert code == 2 and "is a 'gpt2' checkpoint; supported families: idefics2 (idefics2), idefics (idefics)" in err
    code, err = run(str(tiny_model), f"model.adapter={tmp_path / 'no-adapter'}")
    assert code == 1 and "cannot load model.adapter" in err and "adapter_config.json" in err
    assert not output.exists()


def tiny_copy(tiny_model: Path, directory: Path, processor: dict | None, preprocessor: dict | None = None) -> Path:
    """A copy of the tiny checkpoint in ``directory`` whose processor_config.json and preprocessor_config.json
    are these (None: no such file)."""
    shutil.copytree(tiny_model, directory)
    (directory / "processor_config.json").unlink()
    for filename, written in [("processor_config.json", processor), ("preprocessor_config.json", preprocessor)]:
        if written is not None:
            (directory / filename).write_text(json.dumps(written))
    return directory


def test_the_driver_reads_a_local_checkpoint_as_transformers_inspects_it_or_leaves_it_to_transformers(
    models: dict, tiny_model: Path, tmp_path: Path
) -> None:
    """``read_checkpoint`` (no transformers, no torch) learns what ``inspect_checkpoint`` learns through
    transformers, wherever the settings are written and inside huggingface_hub's cache; where the files leave
    a setting to the processor class's defaults, or the family's processor is another, it says nothing."""
    settings = json.loads((tiny_model / "processor_config.json").read_text())["image_processor"]

    def checkpoint(name: str, processor: dict | None = None, preprocessor: dict | None = None) -> Path:
        return tiny_copy(tiny_model, tmp_path / name, processor, preprocessor)

    snapshot = tmp_path / "hub" / "models--docqa--tiny" / "snapshots" / ("0123456789abcdef" * 3)[:40]
    shutil.copytree(tiny_model, snapshot)
    read_alike = {
        "as saved": tiny_model,
        "legacy file": checkpoint("legacy", preprocessor=settings),
        # processor_config.json's settings come first, as in transformers
        "nested first": checkpoint("nested", {"image_processor": settings}, settings | {"do_image_splitting": False}),
        "larger": checkpoint(
            "larger", {"image_processor": settings | {"size": {"longest_edge": 980, "shortest_edge": 378}}}
        ),
        "hub cache": snapshot,
    }
    for name, directory in read_alike.items():
        for splitting in (None, True, False):
            read = read_checkpoint(ModelConfig(id=str(directory)), RenderConfig(image_splitting=splitting))
            assert read == inspect_checkpoint(
                ModelConfig(id=str(directory)), RenderConfig(image_splitting=splitting)
            ), name
    defaults = {k: v for k, v in settings.items() if k != "do_image_splitting"}  # the class default: off
    left_to_transformers = {
        "a default": checkpoint("default", {"image_processor": defaults}),
        "no processor file": checkpoint("none"),
        "another processor": checkpoint(
            "other", {"image_processor": settings | {"image_processor_type": "CLIPImageProcessor"}}
        ),
        "idefics1": Path(models["idefics"]["id"]),
        # an empty nested entry is used as it is (the class's defaults): the legacy file is not read
        "empty nested": checkpoint("empty", {"image_processor": {}}, settings),
        "a null": checkpoint("null", {"image_processor": settings | {"do_image_splitting": None}}),
        "other size keys": checkpoint("size", {"image_processor": settings | {"size": {"height": 9, "width": 9}}}),
    }
    for name, directory in left_to_transformers.items():
        assert read_checkpoint(ModelConfig(id=str(directory)), RenderConfig()) is None, name
    for name in ("a default", "empty nested", "a null"):
        assert not inspect_checkpoint(
            ModelConfig(id=str(left_to_transformers[name])), RenderConfig()
        ).geometry.splitting
    assert read_checkpoint(ModelConfig(id=str(tiny_model), adapter=models["lora"]["adapter"]), RenderConfig()) is None
    assert read_checkpoint(ModelConfig(), RenderConfig()) is None  # a Hub id: no request from the driver
    assert set(ADAPTERS) == set(FAMILIES)  # every family of the catalog has its adapter


def test_a_hub_checkpoint_is_recorded_with_the_commit_its_revision_resolved_to(
    tiny_model: Path, tmp_path: Path
) -> None:
    """A Hub id's commit comes from the snapshot huggingface_hub resolved (here its cache, offline); a local
    directory has none, even one inside that cache."""
    commit = "0123456789abcdef" * 2 + "01234567"
    repository = tmp_path / "hub" / "models--docqa--tiny"
    shutil.copytree(tiny_model, repository / "snapshots" / commit)
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text(commit)
    script = (
        "import sys\n"
        "from actors.families import inspect_checkpoint\n"
        "from pipeline.config import ModelConfig, RenderConfig\n"
        "print(repr([inspect_checkpoint(ModelConfig(id=m), RenderConfig()).commit for m in sys.argv[1:]]))\n"
    )
    environment = os.environ | {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    models = ["docqa/tiny", str(repository / "snapshots" / commit)]
    done = subprocess.run(
        [sys.executable, "-c", script, *models],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env=environment,
    )
    assert ast.literal_eval(done.stdout.strip().splitlines()[-1]) == [commit, None]


@pytest.mark.slow  # a command line run in a subprocess: make test-slow
def test_the_driver_inspects_the_checkpoint_in_a_child_and_never_loads_torch(tiny_model: Path, tmp_path: Path) -> None:
    """A driver process (no transformers loaded yet) learns what an in-process inspection would, errors
    included, and never imports torch itself (jobs/checkpoint_aside.py): a checkpoint whose files say it all
    is read without a child, the others are inspected in one."""
    other = tmp_path / "gpt2"
    GPT2Config().save_pretrained(other)
    nested = json.loads((tiny_model / "processor_config.json").read_text())
    del nested["image_processor"]["do_image_splitting"]  # left to the class's default
    defaulted = tiny_copy(tiny_model, tmp_path / "defaulted", nested)
    script = (
        "import sys\n"
        "from jobs.checkpoint_aside import CheckpointInspection\n"
        "from pipeline.config import JobConfig\n"
        "def inspected(model):\n"
        "    try:\n"
        "        config = JobConfig(questions=[{'id': 'q', 'text': 'q?'}], model={'id': model})\n"
        "        inspection = CheckpointInspection(config)\n"
        "        info = inspection.result()\n"
        "        return [info.family, info.commit, info.geometry.__dict__, inspection.process is not None]\n"
        "    except Exception as error:\n"
        "        return [type(error).__name__, str(error)]\n"
        "started = CheckpointInspection(JobConfig(questions=[{'id': 'q', 'text': 'q?'}]))\n"
        "started.cancel()  # a run that fails before it needs the checkpoint leaves no child behind\n"
        "cancelled = started.process.exitcode\n"
        "cases = [inspected(model) for model in sys.argv[1:]]\n"
        "print(repr([*cases, 'torch' in sys.modules, cancelled]))\n"
    )
    models = [str(tiny_model), str(defaulted), str(other)]
    done = subprocess.run(
        [sys.executable, "-c", script, *models], capture_output=True, text=True, timeout=120, check=True
    )
    tiny, child, gpt2, torch_loaded, cancelled = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    for found, model, in_child in [(tiny, tiny_model, False), (child, defaulted, True)]:
        expected = inspect_checkpoint(ModelConfig(id=str(model)), RenderConfig())
        assert found == [expected.family, expected.commit, expected.geometry.__dict__, in_child]
    assert tiny[2]["splitting"] and not child[2]["splitting"]  # the class's default, as transformers knows it
    assert gpt2[0] == "ConfigError" and "is a 'gpt2' checkpoint; supported families" in gpt2[1]
    assert not torch_loaded and cancelled == -signal.SIGKILL
