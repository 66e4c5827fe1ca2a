"""pipeline/tasks/classification/preprocess.py: labels read from the data or given, bad records counted and dropped
or refused, a stratified validation split, one padded text per block with a pad token that is not EOS,
and the classifier reading the last real token whatever the padding."""

from __future__ import annotations

import datasets
import pytest
import torch

from pipeline.core.errors import PipelineError
from pipeline.tasks.classification.preprocess import build_examples, pad_token_id
from tests.support import project_section

EOS = 50256


def classify_params(**changes):
    return project_section("classify", **changes)


def raw(texts: list[str], labels: list, features: datasets.Features | None = None) -> datasets.DatasetDict:
    return datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts, "label": labels},
                                                                     features=features)})


def build(tokenizer, data: datasets.DatasetDict, block_size: int = 8, add_eos: bool = False, **changes):
    prep = project_section("preprocess", mode="pad", block_size=block_size, add_eos=add_eos, val_fraction=0.25)
    return build_examples(data, tokenizer, project_section("data", dataset="x", config=None), prep,
                          classify_params(**changes), seed=0)


def corpus(n: int = 8) -> tuple[list[str], list[str]]:
    texts = [f"A {kind} text number {i}" for kind in ("red", "blue") for i in range(n)]
    return texts, ["red"] * n + ["blue"] * n


def test_labels_are_the_sorted_distinct_values_and_the_split_is_stratified(tokenizer):
    processed, stats, names, _ = build(tokenizer, raw(*corpus()))
    assert names == ["blue", "red"] and stats["labels"] == names
    assert stats["validation"]["label_counts"] == {"blue": 2, "red": 2}  # a quarter of each class
    assert stats["train"]["label_counts"] == {"blue": 6, "red": 6}
    assert sorted(set(processed["train"]["labels"])) == [0, 1]


def test_classlabel_names_and_explicit_labels_give_the_ids(tokenizer):
    texts, labels = corpus()
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["red", "blue"])})
    processed, _, names, _ = build(tokenizer, raw(texts, [0] * 8 + [1] * 8, features))
    assert names == ["red", "blue"]
    explicit, _, names, _ = build(tokenizer, raw(texts, labels), labels=["red", "blue", "green"])
    assert names == ["red", "blue", "green"] and set(explicit["train"]["labels"]) <= {0, 1}


def test_bad_records_are_counted_and_dropped_or_refused(tokenizer):
    texts, labels = corpus()
    texts, labels = [*texts, "", "A lost text", "An odd one", "   "], [*labels, "red", None, "green", "blue"]
    _, stats, _, _ = build(tokenizer, raw(texts, labels), labels=["red", "blue"])
    dropped = {k: v for k, v in stats["train"].items() if k.endswith("_dropped") and v}
    assert dropped == {"missing_label_dropped": 1, "unknown_label_dropped": 1, "empty_text_dropped": 2}
    with pytest.raises(PipelineError, match=r"classify.bad_rows: record 16 of the train split has no text \(4 such"):
        build(tokenizer, raw(texts, labels), labels=["red", "blue"], bad_rows="refuse")


def test_one_label_or_a_class_too_small_to_split_is_one_line(tokenizer):
    with pytest.raises(PipelineError, match="has 1 distinct label"):
        build(tokenizer, raw(["a text", "another"], ["red", "red"]))
    texts, labels = corpus()
    with pytest.raises(PipelineError, match="label 'green' has 1 training record"):
        build(tokenizer, raw([*texts, "A green text"], [*labels, "green"]))
    with pytest.raises(PipelineError, match="classify.label_column: 'topic' is not in the records"):
        build(tokenizer, raw(*corpus()), label_column="topic")


@pytest.mark.parametrize("side", ["right", "left"])
def test_texts_are_padded_with_a_token_of_their_own_and_keep_a_final_eos(tokenizer, side):
    texts, labels = corpus(4)
    texts[0] = "Ends in EOS<|endoftext|>"
    processed, stats, _, lengths = build(tokenizer, raw(texts, labels), block_size=12, padding_side=side,
                                         labels=["red", "blue"])
    pad = pad_token_id(tokenizer)
    assert pad == len(tokenizer) != EOS  # the tokenizer's pad is EOS: the classifier gets a pad of its own
    rows = processed["train"].to_list() + processed["validation"].to_list()
    eos_row = next(r for r in rows if EOS in r["input_ids"])
    real = [t for t, m in zip(eos_row["input_ids"], eos_row["attention_mask"], strict=True) if m]
    assert real[-1] == EOS and pad not in real  # the text's own EOS is its last real token
    for r in rows:
        assert len(r["input_ids"]) == 12 and all((t == pad) != bool(m) for t, m in
                                                 zip(r["input_ids"], r["attention_mask"], strict=True))
        assert ("position_ids" in r) == (side == "left")
        if side == "left":  # positions count from the first real token
            first = r["attention_mask"].index(1)
            assert r["position_ids"][first:] == list(range(12 - first))
    assert stats["train"]["truncated"] == 0 and max(lengths["train"]) <= 12


def test_the_classifier_reads_the_last_real_token_whatever_the_padding(tokenizer):
    """GPT2ForSequenceClassification pools the last token that is not pad_token_id: with the pad token
    of its own, a padded batch gives each text the logits it has alone, right or left padded."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    pad = pad_token_id(tokenizer)
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=32,
                                                     vocab_size=pad + 1, num_labels=3, pad_token_id=pad)).eval()
    texts, labels = ["Short<|endoftext|>", "A somewhat longer text"], ["red", "blue"]
    alone = [model(input_ids=torch.tensor([tokenizer(t, add_special_tokens=False)["input_ids"]])).logits[0]
             for t in texts]
    for side in ("right", "left"):
        processed, _, _, _ = build(tokenizer, raw(texts * 4, labels * 4), block_size=10, padding_side=side)
        batch = processed["train"].with_format("torch")[:]
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        logits = model(**inputs).logits
        for row, ids in zip(logits, batch["input_ids"], strict=True):
            index = 0 if EOS in ids.tolist() else 1
            assert torch.allclose(row, alone[index], atol=1e-5), side


@pytest.mark.parametrize(("block_size", "add_eos", "padding_side"), [(32, False, "right"), (16, True, "left")])
def test_the_saved_tokenizer_reads_texts_as_the_blocks_were_made(tokenizer_dir, tmp_path, block_size, add_eos,
                                                                   padding_side):
    """train keeps how texts were cut and padded in the tokenizer's own saved settings; generate reads them
    back from the saved folder, and the tokenizer alone (as transformers' pipeline calls it) ends a text in
    EOS exactly where preprocess did."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer, GPT2Config

    from pipeline.tasks.classification.generate import text_shape
    from pipeline.tasks.classification.train import read_as_blocks

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    read_as_blocks(tokenizer, block_size, add_eos, padding_side)
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    model = SimpleNamespace(config=GPT2Config(n_positions=64))
    assert text_shape(model, again) == {"block_size": block_size, "add_eos": add_eos, "padding_side": padding_side}
    ids = again("a text")["input_ids"]
    assert (ids[-1] == EOS) == add_eos
    assert text_shape(SimpleNamespace(config=GPT2Config(n_positions=8)), again)["block_size"] == 8  # the context
