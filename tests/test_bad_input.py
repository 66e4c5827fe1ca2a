"""Bad values for every param leaf each stage declares in dvc.yaml (sections expanded to their leaves),
through the stage's CLI as dvc.yaml runs it: out of type, out of range, oversized, and values inside the
params' bounds that a library below would reject; and every file each stage reads, deleted, cut and
garbled. Each must end within seconds in one short error line, exit 2, no traceback, and leave every
declared output of the pipeline as it was.

The stages run in process (CliRunner) in one finished tiny pipeline, so the ~600 cases take about a
minute and a half on 2 CPU cores."""

from __future__ import annotations

import errno
import os
import shlex
import shutil
import signal
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.core.config import Params
from pipeline.core.params import merge
from pipeline.tools.params import documented
from tests.conftest import ROOT, in_process, write_params
from tests.support import ALIAS_BOMB

PIPELINE = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
LEAVES = [key for key, _, _ in documented()]
SECONDS = 60  # "within seconds": a case that hangs (a thousand processes, a huge allocation) fails here


def declared_leaves(stage: str) -> list[str]:
    """The param leaves a stage lists in dvc.yaml, sections expanded."""
    entries = PIPELINE[stage].get("params", [])
    return [leaf for leaf in LEAVES if any(leaf == entry or leaf.startswith(entry + ".") for entry in entries)]


def declared_outputs() -> list[str]:
    return [next(iter(out)) if isinstance(out, dict) else out for stage in PIPELINE.values()
            for kind in ("outs", "metrics", "plots") for out in stage.get(kind, [])]


def stage_main(stage: str) -> tuple[Any, list[str]]:
    """The stage's Click command and the arguments dvc.yaml gives it."""
    import importlib

    words = shlex.split(PIPELINE[stage]["cmd"])
    assert words[:3] == ["python", "-m", f"pipeline.{stage}"]
    return importlib.import_module(f"pipeline.{stage}").main, words[3:]


# --- values -------------------------------------------------------------------------------------------

def field(key: str) -> Any:
    cls: Any = Params
    *parents, leaf = key.split(".")
    for part in parents:
        annotation = cls.__pydantic_fields__[part].annotation
        cls = next((a for a in typing.get_args(annotation) if hasattr(a, "__pydantic_fields__")), annotation)
    return cls.__pydantic_fields__[leaf]


def kind_and_bounds(key: str) -> tuple[str, dict]:
    """("int" | "float" | "str" | "bool" | "list" | "dict" | "choice", {ge, gt, le, lt, min_length, pattern})."""
    info = field(key)
    bounds: dict = {}

    def collect(items: Any) -> None:
        for item in items:
            for name in ("ge", "gt", "le", "lt", "min_length", "pattern"):
                if getattr(item, name, None) is not None:
                    bounds[name] = getattr(item, name)

    collect(info.metadata)
    annotation = info.annotation
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation, *metadata = typing.get_args(annotation)
            collect(metadata)
        elif origin in (typing.Union, types.UnionType):
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        else:
            break
    if origin is typing.Literal:
        return "choice", bounds
    if origin in (list, dict):
        return origin.__name__, bounds
    return annotation.__name__, bounds


WRONG_TYPE = {"int": "many", "float": "fast", "str": 12, "bool": "yes", "list": "c_attn", "dict": ["n_layer"],
              "choice": 3}
OVERSIZED = {"int": 10**12, "float": 1e12, "str": "x" * 100_001, "list": ["x"] * 10_001, "bool": "x" * 100_001,
             "choice": "x" * 100_001, "dict": {"n_layer": 10**6, "n_embd": 2**16, "n_head": 1}}


def out_of_range(key: str) -> list[Any]:
    kind, bounds = kind_and_bounds(key)
    step = 1 if kind == "int" else 0.5
    values = [bounds["ge"] - step] if "ge" in bounds else [bounds["gt"]] if "gt" in bounds else []
    values += [bounds["le"] + step] if "le" in bounds else [bounds["lt"]] if "lt" in bounds else []
    if kind == "str":
        values += ["" if bounds.get("min_length") else "abc" if bounds.get("pattern") else []]
    if kind == "list" and "min_length=1" in str(field(key).annotation):
        values.append([""])  # an empty item (prompts may be empty: they start from the document boundary)
    return values + {"choice": ["bogus"], "dict": [{"n_layer": 0}]}.get(kind, [])


# Values inside the params' bounds that a library below would reject, or that could not do what they
# say here (subnormal numbers, NaN or a dtype torch lacks inside config_overrides, templates reading
# attributes or asking for a gigabyte of width, a feature on with no items, splits that leak):
# (value, other changes that make the value matter). The tiny params: a 2-layer, 32-wide
# GPT-2 from scratch with 64 positions, 32-token blocks, max_steps 8, the local corpus in data/input.
NOT_IDS = ["   ", "\t", "gpt\x002"]  # neither a Hub id nor a path: huggingface_hub refuses them (validate_repo_id)
LIBRARY: dict[str, list[tuple[Any, dict]]] = {
    "model.from_scratch": [(False, {})],  # tiny-gpt2 is not on the (offline) Hub
    "model.name": [(value, {"model": {"from_scratch": False, "config_overrides": {}}}) for value in NOT_IDS],
    "model.tokenizer": [("data/input/no-such-tokenizer", {}), *((value, {}) for value in NOT_IDS)],
    "model.config_overrides": [
        ({"n_layer": 2, "n_embd": 32, "n_head": 3, "n_positions": 64}, {}),
        ({"n_layer": 0, "n_embd": 32, "n_head": 2, "n_positions": 64}, {}),
        ({"n_layer": 2, "n_embd": "wide", "n_head": 2, "n_positions": 64}, {}),
        ({"n_layer": 2.5, "n_embd": 32, "n_head": 2, "n_positions": 64}, {}),
        ({"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64, "activation_function": "nope"}, {}),
        ({"n_layers": 2, "n_embd": 32, "n_head": 2, "n_positions": 64}, {}),
        ({"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64, "layer_norm_epsilon": -1}, {}),
        ({"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64, "vocab_size": 100}, {}),
        ({"n_layer": 4096, "n_embd": 8192, "n_head": 64, "n_positions": 64}, {}),  # 3.3T parameters
        ({"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64, "initializer_range": float("nan")}, {}),
        ({"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64, "layer_norm_epsilon": 1e-40}, {}),
        ({"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64, "initializer_range": 1e30}, {}),  # inf logits
        ({"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64, "dtype": "float99"}, {}),
    ],
    "data.dataset": [("data/input/no-such-corpus.txt", {}), ("Salesforce/wikitext", {"data": {"config": None}}),
                     *((value, {}) for value in NOT_IDS)],
    "data.config": [("wikitext-2-raw-v1", {})],
    "data.revision": [("main", {})],
    "data.sha256": [("0" * 64, {})],
    "data.train_split": [("nope", {})],
    "data.text_column": [("nope", {})],
    "data.template": [("{nope}", {}), ("{0}", {}), ("{text!z}", {}), ("{text:>>>}", {}), ("no fields", {}),
                      ("{text.__class__}", {}), ("{text[0]}", {}), ("{text:>1000000000}", {}), ("{text:{text}}", {})],
    "data.validation_split": [("train", {})],
    "lr": [(1e-8, {"train": {"lr_scheduler_type": "polynomial"}})],
    "train.adam_epsilon": [(1e-40, {})],
    "train.adam_beta1": [(1e-40, {})],
    "train.samples.every": [(2, {"train": {"samples": {"prompts": []}}})],
    "generate.temperature": [(1e-30, {})],
    "preprocess.val_fraction": [(0.95, {})],  # of the 8 tiny documents: 8 held out, none left to train on
    "generate.stop": [(["x" * 200], {"generate": {"max_new_tokens": 1}}),  # longer than a 1-token sample can be
                      (["x" * 1000] * 1000, {})],  # a stop list that would cost more than the samples
    "generate.repetition_penalty": [(1e-40, {})],
    "data.dialogue_column": [("nope", {})],
    "data.use_chat_template": [(True, {})],
    "data.prompt_template": [("{nope}", {"data": {"response_template": "{text}"}})],
    "data.response_template": [("{nope}", {"data": {"prompt_template": "{text}"}})],
    "preprocess.block_size": [(65, {})],
    "preprocess.num_proc": [(os.cpu_count() + 1, {})],
    "train.per_device_train_batch_size": [(65536, {})],
    "train.per_device_eval_batch_size": [(65536, {})],
    "train.gradient_accumulation_steps": [(65536, {})],
    "train.warmup_steps": [(9, {})],
    "train.attn_implementation": [("flash_attention_2", {})],
    "train.freeze.layers": [(3, {})],
    "train.lora.r": [(64, {"train": {"lora": {"enabled": True}}})],
    "train.lora.target_modules": [(["nope"], {"train": {"lora": {"enabled": True}}})],
    "train.dataloader_num_workers": [(os.cpu_count() + 1, {})],
    "train.early_stopping_patience": [(2, {"train": {"load_best_model_at_end": False}})],
    "train.samples.max_new_tokens": [(64, {"train": {"samples": {"every": 4, "prompts": ["The river"]}}})],
    "train.samples.prompts": [(["word " * 80], {"train": {"samples": {"every": 4, "max_new_tokens": 4}}})],
    "evaluate.stride": [(33, {})],
    "generate.prompts": [(["word " * 80], {}), (["p"] * 10_000, {"generate": {"num_return_sequences": 1000}})],
    "generate.prompts_file": [("data/prompts/missing.txt", {})],
    "generate.max_new_tokens": [(64, {})],
    "generate.top_k": [(2**24, {})],
    "generate.no_repeat_ngram_size": [(9, {"generate": {"max_new_tokens": 8}})],
    "generate.num_return_sequences": [(2, {"generate": {"do_sample": False}})],
}


def nested(key: str, value: Any) -> dict:
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def cases() -> Iterator[Any]:
    for stage in PIPELINE:
        for key in declared_leaves(stage):
            kind, _ = kind_and_bounds(key)
            values = [("type", WRONG_TYPE[kind], {}), *(("range", v, {}) for v in out_of_range(key)),
                      ("oversized", OVERSIZED[kind], {}), *(("library", v, more) for v, more in LIBRARY.get(key, []))]
            for number, (what, value, more) in enumerate(values):
                yield pytest.param(stage, key, value, more, id=f"{stage}-{key}-{what}{number}")


# --- the finished pipeline the cases run in ------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(pipeline_outputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny pipeline with every stage's outputs in place."""
    root = tmp_path_factory.mktemp("bad_input") / "project"
    shutil.copytree(pipeline_outputs, root)
    for stage in ("evaluate", "generate", "report"):
        result = in_process(*stage_main(stage), root)
        assert result.returncode == 0, result.stderr[-2000:]
    shutil.copytree(root, root.with_name("pristine"), symlinks=True)
    return root


@contextmanager
def kept(root: Path) -> Iterator[None]:
    """Put the project back as it was if a case changed it (a stage that wrongly succeeded), so that one
    failure does not spoil the cases after it."""
    good = signatures(root, inodes=False)  # a file a case put back, bytes and times, is as good as the old one
    try:
        yield
    finally:
        if signatures(root, inodes=False) != good or (root / "params.yaml").read_text() != (root.with_name("pristine") /
                                                                              "params.yaml").read_text():
            shutil.rmtree(root)
            shutil.copytree(root.with_name("pristine"), root, symlinks=True)


class Hung(BaseException):
    """Not an Exception: the stage's handlers must not turn it into an error line."""


def signatures(root: Path, inodes: bool = True) -> dict[str, tuple]:
    """Every file and folder under the declared outputs, with what a rewrite would change."""
    seen = {}
    for out in declared_outputs():
        for path in [root / out, *sorted((root / out).rglob("*"))] if (root / out).exists() else []:
            stat = path.stat()
            seen[str(path.relative_to(root))] = (stat.st_ino if inodes else 0, stat.st_size, stat.st_mtime_ns)
    return seen


def run_clean_failure(root: Path, stage: str) -> str:
    """Run the stage as dvc.yaml does; assert it fails cleanly and changes nothing; return its error line."""
    main, args = stage_main(stage)
    before = signatures(root)

    def hung(*_: Any) -> None:
        raise Hung(f"{stage} ran past {SECONDS} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(SECONDS)
    try:
        result = in_process(main, args, root)  # any exception but SystemExit is raised here: a traceback
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and len(errors[0]) <= 420, result.stderr[-3000:]
    assert signatures(root) == before, "a declared output changed"
    assert not [p for p in root.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name or ".landing-" in p.name]
    return errors[0]


@pytest.mark.parametrize("stage, key, value, more", list(cases()))
def test_a_bad_value_for_every_declared_param_is_one_line_and_changes_nothing(finished, stage, key, value, more):
    with kept(finished):
        write_params(finished, merge(more, nested(key, value)))
        line = run_clean_failure(finished, stage)
    assert key.rsplit(".", 1)[-1] in line, line  # the line names the key


def test_a_lora_target_peft_cannot_adapt_names_the_layers_it_can(finished):
    with kept(finished):
        write_params(finished, {"train": {"lora": {"enabled": True, "target_modules": ["c_attn", "ln_f"]}}})
        line = run_clean_failure(finished, "train")
    assert "'ln_f' is a LayerNorm" in line and "c_attn, c_proj, c_fc" in line and len(line) < 400, line
    assert "supported" not in line, line  # peft's sentence, which lists every kind of layer it knows


# --- broken files ----------------------------------------------------------------------------------------

def read_files(root: Path, stage: str) -> list[str]:
    """The files a stage reads: its params file (if it has params) and every file under its data
    dependencies (not code)."""
    deps = [dep for dep in PIPELINE[stage]["deps"] if not dep.startswith("pipeline/")]
    files = [dep for dep in deps if (root / dep).is_file()]
    files += [str(p.relative_to(root)) for dep in deps if (root / dep).is_dir() for p in sorted((root / dep).rglob("*"))
              if p.is_file()]
    return ["params.yaml", *files] if PIPELINE[stage].get("params") else files


def deleted(path: Path) -> None:
    path.unlink()


def cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garbled(path: Path) -> None:
    """The same size, the first bytes overwritten: only a reader that parses the file can tell."""
    data = path.read_bytes()
    path.write_bytes(b"\xff" * min(len(data), 16) + data[16:])


def corruptions(path: str) -> list[Any]:
    if path.startswith("data/input/corpus/"):
        return [garbled]  # the user's own text: shorter or fewer files are new data, not damage; bad bytes are not
    if path.endswith("README.md"):
        return [deleted, cut]  # the model card: read by people, checked only against the manifest
    return [deleted, cut, garbled]


@pytest.mark.parametrize("stage", list(PIPELINE))
def test_every_file_a_stage_reads_broken_is_one_line_and_changes_nothing(finished, stage):
    cases = [(path, corrupt) for path in read_files(finished, stage) for corrupt in corruptions(path)]
    assert len(cases) >= 3, cases
    failures = []
    for path, corrupt in cases:
        with kept(finished):
            file = finished / path
            original, times = file.read_bytes(), (file.stat().st_atime_ns, file.stat().st_mtime_ns)
            corrupt(file)
            try:
                line = run_clean_failure(finished, stage)
                if path != "params.yaml" and Path(path).name not in line and Path(path).parent.name not in line:
                    failures.append(f"{corrupt.__name__} {path}: the line does not name it: {line}")
            except AssertionError as e:
                failures.append(f"{corrupt.__name__} {path}: {str(e)[:600]}")
            finally:
                file.write_bytes(original)
                os.utime(file, ns=times)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("number, words", [(errno.EROFS, "Read-only file system"), (errno.ENOSPC, "No space left"),
                                           (errno.EACCES, "Permission denied")])
def test_an_unwritable_or_full_disk_is_one_line_and_changes_nothing(finished, monkeypatch, number, words):
    """As root (the tests' user here) no folder is read-only: the file system's answer is put in its place."""
    real = os.replace

    def refused(source: Any, target: Any) -> None:
        if ".tmp-" in str(source):  # the stage writing its output, not pytest or the libraries
            raise OSError(number, os.strerror(number), str(source))
        real(source, target)

    monkeypatch.setattr(os, "replace", refused)
    line = run_clean_failure(finished, "report")
    assert words in line and "no output was changed" in line, line


# --- hostile YAML, through a stage ---------------------------------------------------------------------

HOSTILE_YAML = {
    "alias bomb": ALIAS_BOMB,
    "deep nesting": "deep: " + "[" * 3000 + "]" * 3000 + "\n",
    "huge integer": "huge: " + "7" * 5000 + "\n",
    "mapping as a key": "? {a: 1}\n: 2\n",
}


@pytest.mark.parametrize("case", HOSTILE_YAML)
def test_a_hostile_params_file_is_one_line_and_changes_nothing(finished, case):
    with kept(finished):
        params = finished / "params.yaml"
        params.write_text(params.read_text() + HOSTILE_YAML[case])
        line = run_clean_failure(finished, "train")
    assert "params.yaml" in line, line
