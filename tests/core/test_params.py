"""pipeline/core/params.py reads params.yaml into pipeline/core/config.py's schema: the file mirrored one to one and
the only source of values; coercion, rejection by name in one line, the rules across fields, the reference."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pipeline.core.errors import PipelineError
from pipeline.core.params import from_dict, load_params, merge
from pipeline.tools.params import documented, help_lines, markdown_table
from tests.support import ALIAS_BOMB

ROOT = Path(__file__).resolve().parents[2]


def project_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def changed(override: dict):
    """The project's params with `override` merged in, validated."""
    return from_dict(merge(project_params(), override))


def flat(mapping: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in mapping.items():
        out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "config_overrides" else {prefix + k}
    return out


def test_params_yaml_mirrors_the_config_one_to_one():
    assert flat(project_params()) == {key for key, _, _ in documented()}


def test_params_yaml_is_the_real_job():
    params = load_params(ROOT / "params.yaml")
    assert (params.model.name, params.data.dataset, params.data.config) == ("gpt2", "Salesforce/wikitext",
                                                                          "wikitext-2-raw-v1")
    assert not params.model.from_scratch and not params.model.trust_remote_code


def test_every_parameter_has_help_and_shows_its_value_in_params_yaml():
    lines = help_lines()
    assert len(lines) == len(flat(project_params()))
    assert all(line.split("): ", 1)[1].strip() for line in lines)
    assert "preprocess.add_eos (params.yaml: False): " in "\n".join(lines)  # the file's value, not a code default


@pytest.mark.parametrize("key", ["train", "train.dropout", "generate.prompts", "seed"])
def test_every_key_is_required(key):
    raw = project_params()
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node[part]
    del node[leaf]
    with pytest.raises(PipelineError, match=rf"params: {key} is missing; add it"):
        from_dict(raw)


@pytest.mark.parametrize("text, expected", [("5e-4", 5e-4), ("1E-3", 1e-3), ("0.001", 1e-3), (1, 1.0)])
def test_numeric_strings_are_coerced(text, expected):
    # PyYAML reads `lr: 5e-4` (no dot) as the string "5e-4"
    assert yaml.safe_load("lr: 5e-4")["lr"] == "5e-4"
    assert changed({"lr": text}).lr == pytest.approx(expected)


def test_integer_fields_take_whole_numbers():
    assert changed({"train": {"warmup_steps": "1000"}}).train.warmup_steps == 1000
    assert changed({"model": {"from_scratch": True, "config_overrides": {"n_layer": "4"}}}).model.config_overrides == \
        {"n_layer": 4}
    with pytest.raises(PipelineError, match=r"train.warmup_steps must be a whole number; got 2.5"):
        changed({"train": {"warmup_steps": 2.5}})


@pytest.mark.parametrize("raw, message", [
    ({"lr": "fast"}, r"params: lr must be a number; got 'fast'"),
    ({"lr": -1e-4}, r"params: lr must be > 0.0; got -0.0001"),
    ({"lr": True}, r"params: lr must be a number"),
    ({"train": {"num_train_epochs": -1}}, r"params: train.num_train_epochs must be > 0.0; got -1"),
    ({"train": {"per_device_train_batch_size": 0}}, r"per_device_train_batch_size must be >= 1; got 0"),
    ({"train": {"lr_scheduler_type": "exponential"}}, r"train.lr_scheduler_type must be one of linear, cosine"),
    ({"train": {"max_stepz": 3}}, r"train.max_stepz is not a known parameter; did you mean train.max_steps\?"),
    ({"learning_rate": 1e-3}, r"learning_rate is not a known parameter"),
    ({"model": {"from_scratch": "yes"}}, r"model.from_scratch must be true or false"),
    ({"model": "gpt2"}, r"model must be a mapping"),
    ({"generate": {"prompts": "hello"}}, r"generate.prompts must be a list of strings"),
    ({"preprocess": {"val_fraction": 1.5}}, r"preprocess.val_fraction must be < 1.0"),
    ({"generate": {"top_p": 0}}, r"generate.top_p must be > 0.0"),
    ({"model": {"config_overrides": {"n_layer": 2}}}, r"model.config_overrides is only used with"),
    ({"model": {"from_scratch": True, "config_overrides": {"n_positions": 64}}, "preprocess": {"block_size": 128}},
     r"preprocess.block_size \(128\) exceeds model.config_overrides.n_positions \(64\)"),
    ({"model": {"from_scratch": True, "config_overrides": {"n_embd": 30, "n_head": 4}}}, r"divisible by n_head"),
    ({"train": {"load_best_model_at_end": True, "eval_steps": 0}}, r"load_best_model_at_end needs eval_steps > 0"),
    ({"train": {"load_best_model_at_end": True, "eval_steps": 30, "save_steps": 50}}, r"save_steps \(50\) a multiple"),
    ({"train": {"early_stopping_patience": 3}}, r"early_stopping_patience needs train.load_best_model_at_end"),
    ({"train": {"lora": {"enabled": True}, "freeze": {"layers": 2}}}, r"train.freeze does nothing with"),
    ({"train": {"lora": {"enabled": True}, "sharding": "zero2"}}, r"train.sharding zero2 with train.lora.enabled"),
    ({"train": {"torch_compile": True, "sharding": "zero3"}}, r"train.torch_compile true with train.sharding: zero3"),
    ({"train": {"sharding": "fsdp"}}, r"train.sharding must be one of none, zero2, zero3"),
    ({"train": {"lora": {"rank": 4}}}, r"train.lora.rank is not a known parameter"),
    ({"train": {"attn_implementation": "flash"}}, r"train.attn_implementation must be one of auto, sdpa, eager"),
    ({"train": {"torch_compile": 1}}, r"train.torch_compile must be one of auto, true, false; got 1"),
    ({"train": {"torch_compile": "yes"}}, r"train.torch_compile must be one of auto, true, false"),
    ({"train": {"dropout": 1.0}}, r"train.dropout must be < 1.0"),
    ({"train": {"loss_chunk_tokens": 1024}}, r"train.loss_chunk_tokens is not a known parameter"),
    ({"train": {"report_to": ["tensorbored"]}}, r"train.report_to does not know 'tensorbored'; use azure_ml"),
    ({"train": {"report_to": ["dvclive"]}}, r"train.report_to does not know 'dvclive' \(dvclive is always on\)"),
    ({"data": {"dataset": "assets/corpus.txt"}}, r"data.dataset 'assets/corpus.txt' is a local path outside data/in"),
    ({"data": {"dataset": "/srv/text/*.txt"}}, r"data.dataset '/srv/text/\*.txt' is a local path outside data/in"),
    ({"data": {"dataset": "data/input/../notes.txt"}}, r"data.dataset .* outside data/input/; move it into"),
    ({"model": {"tokenizer": "../tokenizers/mine"}}, r"model.tokenizer '../tokenizers/mine' is a local path out"),
    ({"model": {"name": "./my-model"}}, r"model.name './my-model' is a local path outside data/input/"),
    ({"generate": {"prompts_file": "prompts.txt"}}, r"generate.prompts_file 'prompts.txt' is outside data/prompts/"),
    ({"data": {"dataset": "elsewhere/" + "x" * 200 + ".txt"}}, r"data.dataset 'elsewhere/x{70}…' is a local"),
])
def test_bad_params_are_rejected_by_name(raw, message):
    with pytest.raises(PipelineError, match=message) as error:
        changed(raw)
    assert "\n" not in str(error.value) and "params.yaml" in str(error.value)


@pytest.mark.parametrize("raw", [
    {"data": {"dataset": "data/input/corpus", "config": None}}, {"data": {"dataset": "data/input", "config": None}},
    {"data": {"dataset": "./data/input/notes/*.txt", "config": None}},
    {"data": {"dataset": "https://example.org/corpus.txt", "config": None}},
    {"data": {"dataset": "Salesforce/wikitext"}}, {"model": {"name": "gpt2-medium", "tokenizer": "data/input/tok"}},
    {"model": {"name": "anything", "from_scratch": True}}, {"generate": {"prompts_file": "data/prompts/p.jsonl"}},
])
def test_inputs_where_dvc_tracks_them_are_accepted(raw):
    changed(raw)


def test_unreadable_params_file(tmp_path):
    (tmp_path / "params.yaml").write_text("lr: [1,\n")
    with pytest.raises(PipelineError, match="not valid YAML at line"):
        load_params(tmp_path / "params.yaml")
    with pytest.raises(PipelineError, match="not found"):
        load_params(tmp_path / "missing.yaml")


def test_the_parameter_reference_is_generated():
    reference = (ROOT / "docs/params.md").read_text()
    table = reference.split("--markdown -->\n")[1].split("\n<!-- params:end")[0]
    assert table == markdown_table(), "regenerate docs/params.md: python -m pipeline.tools.params --markdown"
    assert all(f"| `{key}` | `{value!r}` |" in table for key, value, _ in documented())


# --- hostile or unusual YAML: read as DVC reads it, bounded -------------------------------------------------

@pytest.mark.parametrize("text, says", [
    (ALIAS_BOMB, "expands to more than 100,000 values"),
    ("seed: " + "[" * 5000 + "]" * 5000 + "\n", "nests deeper than it can be read"),
    ("seed: " + "[" * 100 + "]" * 100 + "\n", "line 1 nests more than 64 levels deep"),
    ("seed: " + "9" * 5000 + "\n", "line 1 holds an integer of 5,000 digits"),
    ("? [1, 2]\n: x\n", "line 1 uses a list or mapping as a key"),
    ("1: x\n", "line 1 uses '1', not a name, as a key"),
    ("seed: 1\nseed: 2\n", "is not valid YAML at line 2: found duplicate key"),
])
def test_hostile_yaml_is_one_line_in_bounded_time(tmp_path, text, says):
    import time

    (tmp_path / "params.yaml").write_text(text)
    started = time.monotonic()
    with pytest.raises(PipelineError, match=re.escape(says)):
        load_params(tmp_path / "params.yaml")
    assert time.monotonic() - started < 10


def test_yaml_reads_as_dvc_reads_it_merge_keys_and_library_defaults_included(tmp_path):
    from dvc.utils.serialize._yaml import parse_yaml

    text = (ROOT / "params.yaml").read_text()
    extra = "numbers: {octal_looking: 010, hex: 0x10, clock: 1:30, small: 5e-4}\n"
    assert read_yaml_text(tmp_path, text + extra)["numbers"] == parse_yaml(text + extra, "params.yaml")["numbers"] \
        == {"octal_looking": 10, "hex": 16, "clock": "1:30", "small": 5e-4}  # YAML 1.2, not PyYAML's 8, 16, 90, "5e-4"
    raw = read_yaml_text(tmp_path, "defaults: &defaults {lr_unused: 1}\n" + text + "other: {<<: *defaults, more: 2}\n")
    assert raw["other"] == {"lr_unused": 1, "more": 2}  # merge keys are YAML people write
    scratch = yaml.safe_load(text)
    scratch["model"].update(from_scratch=True, config_overrides={"n_layer": 2, "n_inner": None})
    assert from_dict(scratch).model.config_overrides == {"n_layer": 2, "n_inner": None}  # GPT-2's own default


def read_yaml_text(tmp_path, text: str) -> dict:
    from pipeline.core.params import read_yaml

    (tmp_path / "p.yaml").write_text(text)
    return read_yaml(tmp_path / "p.yaml")


@pytest.mark.parametrize(("old", "new", "value"), [("epochs", "num_train_epochs", 2.5), ("optimizer", "optim", "sgd"),
                                                  ("lr_scheduler", "lr_scheduler_type", "cosine")])
def test_a_renamed_key_is_read_under_its_old_name_for_a_release(caplog, old, new, value):
    """train keys renamed to the Trainer's names: the old name still sets the value, with a warning that
    names both; both names at once are one line; a recipe with the old name overrides the new one."""
    raw = project_params()
    raw["train"] = {(old if key == new else key): (value if key == new else v) for key, v in raw["train"].items()}
    with caplog.at_level("WARNING"):
        params = from_dict(raw)
    assert getattr(params.train, new) == value
    assert f"train.{old} is now train.{new}" in caplog.text
    with pytest.raises(PipelineError, match=rf"train\.{old} \(the old name of train\.{new}\) and train\.{new} are "
                                            "both set"):
        from_dict({**raw, "train": {**raw["train"], new: value}})
    assert getattr(from_dict(merge(project_params(), {"train": {old: value}})).train, new) == value


def test_the_trainer_gets_the_keys_it_names_alike_as_they_are(tmp_path):
    """The pass-through: every key handed over as it is exists, by the same name, on both sides."""
    import dataclasses

    from transformers import TrainingArguments

    from pipeline.core.config import TrainConfig
    from pipeline.training.arguments import AS_THE_TRAINER_NAMES, training_arguments
    from pipeline.training.plan import Plan

    ours, theirs = set(TrainConfig.__pydantic_fields__), {f.name for f in dataclasses.fields(TrainingArguments)}
    assert set(AS_THE_TRAINER_NAMES) <= ours & theirs
    params = from_dict(merge(project_params(), {"train": {"num_train_epochs": 2.5, "optim": "adamw_torch",
                                                          "lr_scheduler_type": "cosine", "save_total_limit": 7}}))
    args = training_arguments(params, Plan("fp32", "cpu", 1, 1024, 1, 1, False), tmp_path)
    for name in AS_THE_TRAINER_NAMES:
        assert str(getattr(args, name)) == str(getattr(params.train, name)) or getattr(args, name) == getattr(
            params.train, name), name
