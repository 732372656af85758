"""What docqa says matches what it does: table widths, README examples, `docqa models`, missing model
directories, read-only queries, `docqa model tiny` on an existing directory (issue 22, item 10)."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from types import SimpleNamespace

import duckdb
import pyarrow as pa
import pytest

from actors.checkpoint import ModelLoadError
from actors.families import ADAPTERS, inspect_checkpoint
from jobs.cli import main
from jobs.devtools.samples import write_job, write_samples
from jobs.formats import MAX_CELL_CHARS, write_table_text
from jobs.query import AnswerStore, QueryError
from pipeline.config import ModelConfig, RenderConfig, StorageConfig
from pipeline.tables import OutputTables

ROOT = Path(__file__).resolve().parents[1]
# What a user reads: the README and the docs' pages.
README = "\n".join(path.read_text() for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
QUESTIONS = [{"id": "total", "text": "What is the total?"}]


def test_table_columns_fit_every_batch_and_cut_at_the_readme_width():
    assert int(re.search(r"cells cut at (\d+) characters", README).group(1)) == MAX_CELL_CHARS
    schema = pa.schema([("id", pa.int64()), ("text", pa.string()), ("score", pa.float64())])
    first = pa.record_batch([[1], ["short"], [None]], schema=schema)
    later = [40 * "b", (MAX_CELL_CHARS + 20) * "c"]
    second = pa.record_batch([[2, 3], later, [0.5, 12345.678]], schema=schema)
    text = io.StringIO()
    assert write_table_text(pa.RecordBatchReader.from_batches(schema, [first, second]), text) == 3
    lines = text.getvalue().splitlines()
    assert lines[-1] == "(3 rows)"
    table = lines[:-1]
    assert len({len(line) for line in table}) == 1, table  # header, rule and rows: one width
    assert later[0] in table[3]  # a later batch's longer value is whole
    assert (MAX_CELL_CHARS - 1) * "c" + "…" in table[4] and MAX_CELL_CHARS * "c" not in table[4]


def test_readme_examples_name_the_sample_documents(tmp_path: Path):
    names = [path.name for path in write_samples(tmp_path)]
    named = re.findall(r"\binv[a-z]*-\d+", README)
    assert named
    for document in named:
        assert any(document in name for name in names), (document, names)


def test_models_shows_the_prompts_the_adapters_build(capsys):
    assert main(["models"]) == 0
    sections = {section.split()[0]: section for section in capsys.readouterr().out.split("\n\n")}
    for adapter_class in ADAPTERS.values():
        section = sections[adapter_class.info.name]
        for prompt_format in adapter_class.info.prompt_formats:
            adapter = adapter_class.__new__(adapter_class)  # prompt() needs only the format and the BOS token
            adapter.tokenizer, adapter.prompt_format = SimpleNamespace(bos_token="<s>"), prompt_format
            built = adapter.prompt("{question}").removeprefix("<s>")
            assert f"{prompt_format:<5} {built!r}" in section, (built, section)
    assert "<fake_token_around_image><image><fake_token_around_image>" in sections["idefics"]


@pytest.mark.parametrize("model", ["/nonexistent/dir", "./no-such-model", "../no-such-model", "~/no-such-model"])
def test_a_missing_model_directory_is_named_as_such(model: str, tmp_path: Path, capsys):
    job = write_job(tmp_path, tmp_path, tmp_path / "model", QUESTIONS)
    assert main(["run", "--config", str(job), "--model", model]) == 1
    err = capsys.readouterr().err
    named = os.path.expanduser(model)  # ~ is expanded where the config is loaded
    assert f"no such directory: {named}" in err and "Repo id" not in err, err
    with pytest.raises(ModelLoadError, match=f"no such directory: {re.escape(named)}"):
        inspect_checkpoint(ModelConfig(id=model), RenderConfig())


def test_query_runs_one_select_and_sql_touches_no_file(tmp_path: Path, capsys):
    output = str(tmp_path / "out")
    OutputTables(output, StorageConfig()).create()
    written = tmp_path / "copied.csv"
    copy = f"COPY (SELECT * FROM answers) TO '{written}'"
    assert main(["query", "--output", output, copy]) == 2
    assert "this is a COPY statement" in capsys.readouterr().err
    assert main(["query", "--output", output, f"SELECT 1; {copy}"]) == 2
    assert "2 statements ['SELECT', 'COPY']" in capsys.readouterr().err
    assert not written.exists()
    store = AnswerStore(output)
    assert store.reader("WITH a AS (SELECT * FROM answers) SELECT count(*) FROM a").read_all().column(0)[0].as_py() == 0
    readable = tmp_path / "secret.csv"
    readable.write_text("a,b\n1,2\n")
    with pytest.raises(QueryError, match="disabled by configuration"):
        store.reader(f"SELECT * FROM read_csv('{readable}')")
    with pytest.raises(duckdb.Error, match="disabled by configuration"):  # even past reader(), on the connection
        store.connection.execute(copy)
    with pytest.raises(duckdb.Error, match="configuration has been locked"):
        store.connection.execute("SET enable_external_access = true")
    assert not written.exists()


def test_model_tiny_refuses_a_directory_that_is_not_empty(tmp_path: Path, capsys):
    existing = tmp_path / "checkpoint"
    existing.mkdir()
    (existing / "mine.txt").write_text("keep me")
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me too")
    for command in (["tiny", str(existing)], ["tiny", str(a_file), "--family", "idefics"]):
        assert main(["model", *command]) == 2
        assert "already exists and is not an empty directory" in capsys.readouterr().err
    assert main(["model", "tiny-lora", str(tmp_path / "any-base"), str(existing)]) == 2
    assert "already exists and is not an empty directory" in capsys.readouterr().err
    assert [path.name for path in existing.iterdir()] == ["mine.txt"]
    assert a_file.read_text() == "keep me too"
