"""pipeline/download.py: base model (seeded from-scratch, local), raw dataset from local files,
the Hub-unreachable error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.core.errors import PipelineError
from pipeline.core.locations import is_local
from pipeline.data.sources import load_raw, local_files
from pipeline.download import save_base, save_raw
from tests.conftest import CORPUS, ROOT, run_stage
from tests.support import project_section


def data_params(**changes):
    """The project's data params with these changes, no Hub config."""
    return project_section("data", config=None, **changes)


def tiny_model_config(tokenizer_dir: Path, **overrides):
    return project_section("model", name="tiny", tokenizer=str(tokenizer_dir), from_scratch=True,
                           config_overrides={"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 32, **overrides})


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def test_from_scratch_is_seeded(tmp_path, tokenizer_dir):
    cfg = tiny_model_config(tokenizer_dir)
    save_base(cfg, 7, tmp_path / "a")
    save_base(cfg, 7, tmp_path / "b")
    save_base(cfg, 8, tmp_path / "c")
    a, b, c = weights(tmp_path / "a"), weights(tmp_path / "b"), weights(tmp_path / "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    provenance = json.loads((tmp_path / "a/provenance.json").read_text())
    assert provenance["from_scratch"] and provenance["seed"] == 7 and provenance["parameters"] > 50257 * 16


def test_from_scratch_uses_the_tokenizer_vocabulary(tmp_path, tokenizer_dir):
    from transformers import AutoConfig, AutoTokenizer

    save_base(tiny_model_config(tokenizer_dir), 0, tmp_path / "m")
    config = AutoConfig.from_pretrained(tmp_path / "m")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert config.vocab_size == len(tokenizer) == 50257
    assert config.eos_token_id == tokenizer.eos_token_id == 50256
    assert tokenizer("Hello world").input_ids == [15496, 995]  # the same ids as the Hub's gpt2 tokenizer


def test_unknown_config_override_is_rejected(tmp_path, tokenizer_dir):
    with pytest.raises(PipelineError, match="n_layers is not a GPT2Config field"):
        save_base(tiny_model_config(tokenizer_dir, n_layers=3), 0, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_config_overrides_take_whole_numbers_where_floats_go(tokenizer):
    from pipeline.download import gpt2_config

    config = gpt2_config({"n_layer": 2, "n_embd": 32, "n_head": 2, "layer_norm_epsilon": 1, "resid_pdrop": 0},
                         tokenizer)  # GPT2Config itself refuses an int for layer_norm_epsilon
    assert (config.layer_norm_epsilon, config.resid_pdrop) == (1.0, 0.0) and type(config.layer_norm_epsilon) is float
    with pytest.raises(PipelineError, match=r"config_overrides.n_layer must be a whole number; got 2.5"):
        gpt2_config({"n_layer": 2.5}, tokenizer)


def test_local_model_directory_is_copied(tmp_path, tokenizer_dir):
    save_base(tiny_model_config(tokenizer_dir), 0, tmp_path / "first")
    save_base(project_section("model", name=str(tmp_path / "first")), 0, tmp_path / "second")
    a, b = weights(tmp_path / "first"), weights(tmp_path / "second")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_model_directory_without_weights(tmp_path, tokenizer_dir):
    save_base(tiny_model_config(tokenizer_dir), 0, tmp_path / "m")
    (tmp_path / "m/model.safetensors").unlink()
    with pytest.raises(PipelineError, match="has no model weights"):
        save_base(project_section("model", name=str(tmp_path / "m")), 0, tmp_path / "out")
    (tmp_path / "m/pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(PipelineError, match="only pickle weights"):
        save_base(project_section("model", name=str(tmp_path / "m")), 0, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, local", [
    ("gpt2", False), ("Salesforce/wikitext", False), ("openai-community/gpt2", False),
    ("./corpus", True), ("/data/x", True), ("data/*.txt", True), ("corpus.jsonl", True), ("a/b/c", True),
    ("https://example.com/corpus.txt", False)])
def test_hub_ids_and_paths_are_told_apart(name, local):
    assert is_local(name) == local


def test_txt_directory_one_document_per_file(tmp_path):
    raw, provenance = load_raw(data_params(dataset=str(CORPUS)), tmp_path)
    assert raw["train"].num_rows == len(list(CORPUS.glob("*.txt")))
    assert set(provenance["files"]) == {str(p) for p in sorted(CORPUS.glob("*.txt"))}
    paragraphs, _ = load_raw(data_params(dataset=str(CORPUS), txt_sample_by="paragraph"), tmp_path)
    assert paragraphs["train"].num_rows > raw["train"].num_rows


@pytest.mark.parametrize("sample_by, expected", [
    ("document", ["Line one\nline two\n\nSecond paragraph\n"]),
    ("paragraph", ["Line one\nline two", "Second paragraph\n"]),  # preprocess.strip trims it
    ("line", ["Line one", "line two", "", "Second paragraph"]),
])
def test_txt_sample_by(tmp_path, sample_by, expected):
    (tmp_path / "doc.txt").write_text("Line one\nline two\n\nSecond paragraph\n")
    raw, _ = load_raw(data_params(dataset=str(tmp_path / "doc.txt"), txt_sample_by=sample_by),
                      tmp_path / "scratch")
    assert list(raw["train"]["text"]) == expected


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv", ".parquet"])
def test_structured_local_files(tmp_path, suffix):
    import pandas as pd

    frame = pd.DataFrame({"text": ["first document", "second document", "third"], "id": [1, 2, 3]})
    path = tmp_path / f"docs{suffix}"
    writers = {".jsonl": lambda: frame.to_json(path, orient="records", lines=True),
               ".json": lambda: frame.to_json(path, orient="records"),
               ".csv": lambda: frame.to_csv(path, index=False),
               ".tsv": lambda: frame.to_csv(path, sep="\t", index=False),
               ".parquet": lambda: frame.to_parquet(path)}
    writers[suffix]()
    raw, _ = load_raw(data_params(dataset=str(path)), tmp_path / "scratch")
    assert raw["train"]["text"] == frame["text"].tolist()


def test_missing_or_mixed_local_files(tmp_path):
    with pytest.raises(PipelineError, match="no data files at"):
        local_files(str(tmp_path / "nothing/*.txt"))
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "b.csv").write_text("text\nb\n")
    with pytest.raises(PipelineError, match="mixes or contains unsupported file types"):
        local_files(str(tmp_path))


def test_raw_dataset_is_saved_with_provenance(tmp_path):
    import datasets

    save_raw(data_params(dataset=str(CORPUS)), tmp_path / "raw")
    assert datasets.load_from_disk(str(tmp_path / "raw"))["train"].num_rows == 8
    assert json.loads((tmp_path / "raw/provenance.json").read_text())["splits"] == {"train": 8}


def test_hub_unreachable_is_one_clear_line(tmp_path):
    """The default params need the Hub; offline (the tests' HF_HUB_OFFLINE=1, an empty cache), download
    says so and names the demo, before anything is fetched."""
    result = run_stage("download", "--params", str(ROOT / "params.yaml"), cwd=tmp_path)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: data.dataset: HF_HUB_OFFLINE is set and the local cache")
    assert "dataset 'Salesforce/wikitext'" in last
    assert "make demo" in last and "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "models").exists()

