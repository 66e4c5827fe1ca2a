"""pipeline/data/records.py and its use in preprocess: templates, dialogues, prompt/response label masks,
cleaning."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest

from pipeline.core.common import IGNORE_INDEX, template_fields
from pipeline.core.errors import PipelineError
from pipeline.core.loading import load_tokenizer
from pipeline.data.records import check_columns, clean, dialogue_turns
from pipeline.tasks.causal_lm.preprocess import build_blocks, render, tokenize
from tests.conftest import data_params, prep_params

RECIPES = [
    {"title": "Toast", "ingredients": ["bread", "butter"], "directions": "Toast the bread. Butter it."},
    {"title": "Tea", "ingredients": ["tea leaves", "water"], "directions": "Boil water. Steep the leaves."},
]


def rendered(rows: list[dict], data, tokenizer, cfg=None) -> datasets.Dataset:
    return render(datasets.Dataset.from_list(rows), data, cfg or prep_params(), tokenizer)


def test_template_over_record_fields_joins_lists(tokenizer):
    data = data_params(dataset="x", template="{title}\nIngredients: {ingredients}\nDirections: {directions}")
    assert rendered(RECIPES, data, tokenizer)["text"][0] == (
        "Toast\nIngredients: bread, butter\nDirections: Toast the bread. Butter it.")
    assert template_fields(data.template) == ["title", "ingredients", "directions"]


def test_missing_field_names_the_field_and_the_fields_there():
    data = data_params(dataset="x", template="{title}: {steps}")
    with pytest.raises(PipelineError, match="data.template: field 'steps' is not in the records; they have title, "
                                            "ingredients, directions"):
        check_columns(["title", "ingredients", "directions"], data)
    with pytest.raises(PipelineError, match="if the CSV file has no header row, add one"):
        check_columns(["Toast", "bread"], data_params(dataset="x"), csv=True)


def test_dialogue_layouts():
    speakers = ["User", "Assistant"]
    assert dialogue_turns(["hi", "hello", "bye"], speakers) == [("User", "hi"), ("Assistant", "hello"), ("User", "bye")]
    assert dialogue_turns([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], speakers) == [
        ("user", "hi"), ("assistant", "yo")]
    sgd = {"speaker": [0, 1], "utterance": ["Find me a flight", "Where to?"]}  # schema-guided dialogue
    assert dialogue_turns(sgd, ["USER", "SYSTEM"]) == [("USER", "Find me a flight"), ("SYSTEM", "Where to?")]
    with pytest.raises(PipelineError, match="a turn has no text field"):
        dialogue_turns([{"role": "user"}], speakers)


def test_dialogue_rendered_with_speaker_labels(tokenizer):
    rows = [{"turns": ["I need a table for two", "For what time?"]}]
    text = rendered(rows, data_params(dataset="x", dialogue_column="turns"), tokenizer)["text"][0]
    assert text == "User: I need a table for two\nAssistant: For what time?"
    with pytest.raises(PipelineError, match="the tokenizer has no chat template"):
        rendered(rows, data_params(dataset="x", dialogue_column="turns", use_chat_template=True), tokenizer)


def test_prompt_response_masks_the_prompt_from_the_loss(tokenizer):
    data = data_params(dataset="x", prompt_template="Question: {q}\nAnswer:", response_template=" {a}")
    docs = rendered([{"q": "What is two plus two?", "a": "Four."}], data, tokenizer)
    tokens = tokenize(docs, tokenizer, add_eos=True, num_proc=1, batch_size=8)
    ids, labels = tokens["input_ids"][0], tokens["labels"][0]
    prompt = tokenizer("Question: What is two plus two?\nAnswer:", add_special_tokens=False).input_ids
    response = tokenizer(" Four.", add_special_tokens=False).input_ids
    assert ids == prompt + response + [50256]
    assert labels == [IGNORE_INDEX] * len(prompt) + response + [50256]


def test_prompt_response_blocks_keep_the_mask_in_both_modes(tokenizer):
    rows = [{"q": f"Question {i}?", "a": f"Answer number {i}."} for i in range(40)]
    data = data_params(dataset="x", prompt_template="Q: {q}\nA:", response_template=" {a}")
    for mode in ("pack", "pad"):
        cfg = prep_params(block_size=16, mode=mode, val_fraction=0.1)
        processed, stats, _ = build_blocks(datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}),
                                           tokenizer, 64, data, cfg, 0)
        block = processed["train"][0]
        masked = [i for i, label in enumerate(block["labels"]) if label == IGNORE_INDEX]
        assert masked and len(masked) < 16  # prompt tokens (and padding) out of the loss, responses in it
        assert all(block["labels"][i] == block["input_ids"][i] for i in range(16) if i not in masked)
        assert ("attention_mask" in processed["train"].column_names) == (mode == "pad")


def test_cleaning_strip_short_and_duplicates(tokenizer):
    cfg = prep_params(strip=True, min_chars=3, dedup=True)
    rows = [{"text": t} for t in ["  alpha  ", "alpha", "", "ab", "beta\n", "gamma"]]
    docs, counts, hashes = clean(rendered(rows, data_params(dataset="x"), tokenizer, cfg), cfg)
    assert docs["text"] == ["alpha", "beta", "gamma"]
    assert counts == {"short_or_empty_dropped": 2, "duplicates_dropped": 1, "seen_in_train_dropped": 0}
    held_out = rendered([{"text": "gamma"}, {"text": "delta"}], data_params(dataset="x"), tokenizer, cfg)
    kept, counts, _ = clean(held_out, cfg, seen=hashes)
    assert kept["text"] == ["delta"] and counts["seen_in_train_dropped"] == 1


def test_cleaning_counts_reach_the_stats(tokenizer):
    texts = ["the same document"] * 5 + [f"document {i} is different" for i in range(12)] + ["", " "]
    held_out = ["the same document", "a new one, long enough"]
    raw = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts}),
                                "validation": datasets.Dataset.from_dict({"text": held_out})})
    cfg = prep_params(block_size=4, strip=True, min_chars=1, dedup=True)
    _, stats, _ = build_blocks(raw, tokenizer, 64, data_params(dataset="x"), cfg, 0)
    assert stats["train"]["duplicates_dropped"] == 4 and stats["train"]["short_or_empty_dropped"] == 2
    assert stats["train"]["documents"] == 13 and stats["validation"]["seen_in_train_dropped"] == 1


# Records shaped as each examples/data/*.yaml says in its comments, written where its `data.dataset` points.
EXAMPLE_RECORDS = {
    "plain-corpus.yaml": {**{f"corpus/{i}.txt": f"Post {i}: a joke about a river that ran out of banks. " * 3
                             for i in range(8)},
                          "corpus/copy.txt": "Post 0: a joke about a river that ran out of banks. " * 3,
                          "corpus/short.txt": "Too short"},
    "recipes.yaml": {"recipes.jsonl": [{"title": f"Dish {i}", "ingredients": ["bread", "butter"],
                                        "directions": "Toast the bread. Butter it."} for i in range(10)]},
    "dialogue.yaml": {"dialogues.jsonl": [{"turns": [f"I need a table for {i}", "For what time?", "Eight."]}
                                          for i in range(8)]},
    "prompt-response.yaml": {"pairs.jsonl": [{"instruction": f"Add {i} and {i}.", "output": f"{2 * i}"}
                                             for i in range(8)]},
    "classification.yaml": {"stdlib-docstrings.jsonl": [{"text": f"Return the {kind} of x, number {i}.",
                                                         "label": label, "module": "math"}
                                                        for kind, label in (("sine", "numbers"), ("path", "files"))
                                                        for i in range(8)]},
}


@pytest.mark.parametrize("example", sorted(EXAMPLE_RECORDS))
def test_data_examples_run_through_download_and_preprocess(example, tmp_path, tokenizer_dir):
    """Each README data shape, as published in examples/data, turns its records into blocks."""
    import json

    import yaml

    from tests.conftest import ROOT, prepare

    override = yaml.safe_load((ROOT / "examples/data" / example).read_text())
    data_dir = tmp_path / Path(override["data"]["dataset"]).parent
    for name, content in EXAMPLE_RECORDS[example].items():
        path = data_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content if isinstance(content, str) else "".join(json.dumps(r) + "\n" for r in content))
    override["preprocess"].update(block_size=32, val_fraction=0.25)  # the tiny model's 64 positions
    override.get("train", {}).pop("warmup_steps", None)  # TINY trains 8 steps
    prepare(tmp_path, tokenizer_dir, override)

    stats = json.loads((tmp_path / "metrics/data.json").read_text())
    train = datasets.load_from_disk(str(tmp_path / "data/processed"))["train"]
    if example == "classification.yaml":  # one text per block, and its label
        assert stats["labels"] == ["files", "numbers"] and stats["train"]["examples"] == len(train) == 12
        return
    assert len(train) > 0 and stats["train"]["blocks"] == len(train)
    tokenizer = load_tokenizer(tmp_path / "data/input/gpt2-tokenizer")
    text = tokenizer.decode([t for t in train[0]["input_ids"] if t != tokenizer.eos_token_id])
    if example == "plain-corpus.yaml":
        cleaning = [s for s in stats.values() if isinstance(s, dict)]  # one per split
        assert sum(c["duplicates_dropped"] + c["seen_in_train_dropped"] for c in cleaning) == 1
        assert sum(c["short_or_empty_dropped"] for c in cleaning) == 1
    if example == "recipes.yaml":
        assert text.startswith("Title: Dish") and "Ingredients: bread, butter" in text
    if example == "dialogue.yaml":
        assert text.startswith("USER: I need a table") and "\nSYSTEM: For what time?" in text
    if example == "prompt-response.yaml":
        labels = train[0]["labels"]
        prompt_len = labels.index(next(label for label in labels if label != IGNORE_INDEX))
        assert text.startswith("### Instruction:") and prompt_len > 5
        assert tokenizer.decode(train[0]["input_ids"][:prompt_len]).endswith("### Response:\n")
