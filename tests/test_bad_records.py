"""Real files a user has, through download and preprocess as dvc.yaml runs them: records whose text field
is not text (a number, a list, a mapping, bytes, null, absent) counted per reason and dropped, or refused
in one line; empty files, dialogues that are text or whose turns are not turns, in one line; CSV cells
reading NA or null kept as text; file names with glob characters taken literally, upper-case extensions
read, links out of data/input refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.core.params import merge
from tests.conftest import in_process, run_stage, write_params


def run(stage: str, root: Path):
    from importlib import import_module

    return in_process(import_module(f"pipeline.{stage}").main, [], root)


def one_line(result) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and len(errors[0]) <= 420, result.stderr[-3000:]
    return errors[0]


def corpus(root: Path, name: str, rows: list) -> str:
    """data/input/<name> holding `rows` as JSON lines; the dataset param naming it."""
    path = root / "data/input" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"data/input/{name}"


GOOD = [{"text": f"A document about rivers and roads, number {i}, long enough to keep. " * 3} for i in range(12)]
BAD = [{"text": 42}, {"text": ["a", "list"]}, {"text": {"a": "mapping"}}, {"text": None}, {"title": "no text"}]


def test_records_whose_text_is_not_text_are_counted_and_dropped(project):
    write_params(project, {"data": {"dataset": corpus(project, "mixed.jsonl", GOOD + BAD), "config": None}})
    assert run("download", project).returncode == 0
    result = run("preprocess", project)
    assert result.returncode == 0, result.stderr[-3000:]
    stats = json.loads((project / "metrics/data.json").read_text())
    dropped = {k: sum(stats[s].get(k, 0) for s in ("train", "validation")) for k in ("not_text_dropped",
                                                                                   "missing_text_dropped")}
    assert dropped == {"not_text_dropped": 3, "missing_text_dropped": 2}
    assert stats["train"]["documents"] + stats["validation"]["documents"] == len(GOOD)


def test_records_whose_text_is_not_text_are_refused_when_the_params_say_so(project):
    write_params(project, {"data": {"dataset": corpus(project, "mixed.jsonl", GOOD + BAD), "config": None},
                           "preprocess": {"bad_records": "refuse"}})
    assert run("download", project).returncode == 0
    line = one_line(run("preprocess", project))
    assert line.startswith("error: preprocess.bad_records: record ") and "set preprocess.bad_records: drop" in line
    assert not (project / "data/processed").exists()


def test_binary_text_in_parquet_is_not_text(project):
    import datasets

    (project / "data/input/bin").mkdir(parents=True)
    rows = datasets.Dataset.from_dict({"text": [r["text"].encode() for r in GOOD]},
                                      features=datasets.Features({"text": datasets.Value("binary")}))
    rows.to_parquet(project / "data/input/bin/part.parquet")
    write_params(project, {"data": {"dataset": "data/input/bin/part.parquet", "config": None}})
    assert run("download", project).returncode == 0
    line = one_line(run("preprocess", project))  # every record is bytes: nothing is left, and it says why
    assert "no train documents left" in line and "'not_text_dropped': 9" in line, line


@pytest.mark.parametrize("files, says", [
    ({"empty.jsonl": ""}, "data/input/empty.jsonl is empty; put text in it"),
    ({"deep.jsonl": '{"text": "x", "meta": ' + '{"a": ' * 5000 + "1" + "}" * 5001 + "\n"}, "nests deeper than it can"),
    ({"talk.jsonl": '{"dialogue": "just one string"}\n' * 8}, "holds text, not a list of turns"),
    ({"talk.jsonl": '{"dialogue": [1, 2]}\n' * 8}, "a turn is int"),
])
def test_files_that_cannot_be_read_as_meant_are_one_line(project, files, says):
    for name, text in files.items():
        (project / "data/input" / name).write_text(text)
    overrides = {"data": {"dataset": f"data/input/{next(iter(files))}", "config": None}}
    if "talk.jsonl" in files:
        overrides["data"]["dialogue_column"] = "dialogue"
    write_params(project, overrides)
    result = run("download", project)
    if result.returncode == 0:
        result = run("preprocess", project)
    assert says in one_line(result)


def test_a_record_nested_100000_deep_is_one_line_not_a_crash(project):
    """pyarrow's JSON reader overflows its stack on it (SIGSEGV, no message): a subprocess sees that."""
    deep = '{"text": "x", "meta": ' + '{"a": ' * 100_000 + "1" + "}" * 100_001 + "\n"
    (project / "data/input/deep.jsonl").write_text(json.dumps(GOOD[0]) + "\n" + deep)
    write_params(project, {"data": {"dataset": "data/input/deep.jsonl", "config": None}})
    line = one_line(run_stage("download", cwd=project))
    assert "data/input/deep.jsonl line 2" in line and "nests deeper than it can" in line, line
    assert not (project / "data/raw").exists() and not (project / "models/base").exists()


def test_a_dialogue_without_speakers_is_one_line(project):
    import yaml

    from pipeline.core.errors import PipelineError
    from pipeline.core.params import from_dict

    params = yaml.safe_load((project / "params.yaml").read_text())
    with pytest.raises(PipelineError, match="data.speakers is empty, and data.dialogue_column needs labels"):
        from_dict(merge(params, {"data": {"dialogue_column": "dialogue", "speakers": []}}))


def test_csv_cells_that_read_na_or_null_are_text(project):
    lines = ["text"] + [f"{word}" for word in ("NA", "null", "None", "n/a", "NaN")] + [g["text"] for g in GOOD]
    (project / "data/input/notes.csv").write_text("\n".join(f'"{line}"' for line in lines) + "\n")
    write_params(project, {"data": {"dataset": "data/input/notes.csv", "config": None},
                           "preprocess": {"min_chars": 1, "bad_records": "refuse"}})
    assert run("download", project).returncode == 0
    result = run("preprocess", project)
    assert result.returncode == 0, result.stderr[-3000:]  # refuse: none of them was read as missing
    stats = json.loads((project / "metrics/data.json").read_text())
    assert sum(stats[s]["documents"] for s in ("train", "validation")) == len(lines) - 1


def test_a_file_named_with_glob_characters_is_that_file_and_extensions_match_in_any_case(project):
    (project / "data/input/corpus").rename(project / "data/input/old")
    folder = project / "data/input/corpus"
    folder.mkdir()
    (folder / "notes[1].txt").write_text("The first file, named with brackets.\n" * 20)
    (folder / "notes1.txt").write_text("A file the pattern notes[1].txt would match instead.\n" * 20)
    (folder / "LOUD.TXT").write_text("An upper-case extension is still a text file.\n" * 20)
    write_params(project, {"data": {"dataset": "data/input/corpus/notes[1].txt", "config": None}})
    assert run("download", project).returncode == 0
    files = json.loads((project / "data/raw/provenance.json").read_text())["files"]
    assert list(files) == ["data/input/corpus/notes[1].txt"]
    from datasets import load_from_disk

    text = "".join(load_from_disk(str(project / "data/raw"))["train"]["text"])
    assert "named with brackets" in text and "would match instead" not in text  # what was read, not only named
    write_params(project, {"data": {"dataset": "data/input/corpus", "config": None}})
    assert run("download", project).returncode == 0
    assert "data/input/corpus/LOUD.TXT" in json.loads((project / "data/raw/provenance.json").read_text())["files"]


def test_a_link_out_of_data_input_is_refused(project, tmp_path_factory):
    outside = tmp_path_factory.mktemp("elsewhere") / "secret.txt"
    outside.write_text("Text from outside the tracked folder.\n" * 20)
    os.symlink(outside, project / "data/input/corpus/linked.txt")
    write_params(project, {"data": {"dataset": "data/input/corpus", "config": None}})
    line = one_line(run("download", project))
    assert "linked.txt resolves to" in line and "outside data/input/" in line
    assert not (project / "data/raw").exists()


def test_prompts_whose_responses_are_all_empty_are_one_line(project):
    rows = [{"q": f"Question {i} about rivers?", "a": ""} for i in range(12)]
    write_params(project, {"data": {"dataset": corpus(project, "qa.jsonl", rows), "config": None,
                                    "prompt_template": "Q: {q}\nA:", "response_template": "{a}"},
                           "preprocess": {"mode": "pad"}})
    assert run("download", project).returncode == 0
    line = one_line(run("preprocess", project))
    assert "every response of the train split is empty" in line and "data.response_template" in line


def test_a_csv_without_a_header_row_names_a_few_of_its_words(project):
    words = " ".join(f"word{i}" for i in range(200))
    (project / "data/input/plain.csv").write_text(",".join(words.split()) + "\n" + ",".join(words.split()) + "\n")
    write_params(project, {"data": {"dataset": "data/input/plain.csv", "config": None}})
    assert run("download", project).returncode == 0
    line = one_line(run("preprocess", project))
    assert "field 'text' is not in the records" in line and "(200 in all)" in line and "add one naming" in line
