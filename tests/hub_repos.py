"""The repos the tests serve from a loopback Hub (tests/hub.py), and the environment of a command that
talks to it: online, an HF_HOME of its own, short timeouts."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tests.hub import Hub, folder_files

ROOT = Path(__file__).resolve().parents[1]

TOKEN = "hf_alice_write_token"
MODEL, SECRET, DATASET = "alice/tiny-gpt2", "alice/secret-gpt2", "alice/tiny-text"
LABELLED, LABEL_NAMES = "alice/labelled-text", ["sea", "land", "air"]  # a ClassLabel's order, not sorted


def tiny_gpt2(seed: int, out: Path, tokenizer_dir: Path) -> dict[str, bytes]:
    """The files of a repo holding a 2-layer, 32-wide GPT-2 (seeded weights) and GPT-2's tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=50257)).save_pretrained(out)
    return {**folder_files(tokenizer_dir), **folder_files(out)}


def jsonl(texts: list[str]) -> bytes:
    return "".join(json.dumps({"text": text}) + "\n" for text in texts).encode()


DATASET_CARD = b"""---
configs:
- config_name: small
  data_files:
  - {split: train, path: small/train.jsonl}
  - {split: validation, path: small/validation.jsonl}
- config_name: large
  data_files:
  - {split: train, path: large/train.jsonl}
---
Two configs of short made-up sentences, for the pipeline's tests.
"""


def sentences(count: int, topic: str) -> list[str]:
    return [f"The {topic} number {i} crossed the river at dawn, and the town watched it go by." for i in range(count)]


def labelled_parquet(work: Path, split: str, count: int) -> bytes:
    """A parquet file as datasets writes it (the features, a ClassLabel among them, in its schema)."""
    import datasets

    features = datasets.Features({"sentence": datasets.Value("string"), "topic": datasets.ClassLabel(
        names=LABEL_NAMES)})
    rows = {"sentence": [f"{sentences(count, name)[i]}" for i in range(count) for name in LABEL_NAMES],
            "topic": [label for _ in range(count) for label in range(len(LABEL_NAMES))]}
    path = work / f"{split}.parquet"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(path)
    return path.read_bytes()


def build_repos(work: Path, tokenizer_dir: Path) -> dict:
    """What every test Hub serves: a model at tag v1 with main moved on after it (new weights), a private
    model, a model with pickle weights only, a model without tokenizer files, a dataset with two
    configs at tag v1, main moved on after it (more rows), and a labelled dataset (parquet, ClassLabel)."""
    v1, v2 = tiny_gpt2(0, work / "v1", tokenizer_dir), tiny_gpt2(1, work / "v2", tokenizer_dir)
    data_v1 = {"README.md": DATASET_CARD, "small/train.jsonl": jsonl(sentences(60, "boat")),
               "small/validation.jsonl": jsonl(sentences(12, "bridge")),
               "large/train.jsonl": jsonl(sentences(90, "cart"))}
    data_v2 = {"small/train.jsonl": jsonl(sentences(80, "barge"))}
    pickle_only = {name: data for name, data in v1.items() if name != "model.safetensors"}
    pickle_only["pytorch_model.bin"] = b"not loaded: pickle weights can run code"
    no_tokenizer = {name: v1[name] for name in ("config.json", "generation_config.json", "model.safetensors")}
    labelled = {"data/train.parquet": labelled_parquet(work, "train", 8),
                "data/validation.parquet": labelled_parquet(work, "validation", 2)}
    return {"model": [v1, v2], "dataset": [data_v1, data_v2], "pickle": pickle_only, "no_tokenizer": no_tokenizer,
            "labelled": labelled}


def serve(repos: dict) -> Hub:
    hub = Hub(tokens={TOKEN: "alice"})
    for kind, (first, second) in (("model", repos["model"]), ("dataset", repos["dataset"])):
        name = MODEL if kind == "model" else DATASET
        hub.commit(kind, name, first, tag="v1")
        hub.commit(kind, name, second)  # main moves on after v1
    hub.commit("model", SECRET, repos["model"][0], private=True)
    hub.commit("model", "alice/pickle-only", repos["pickle"])
    hub.commit("model", "alice/no-tokenizer", repos["no_tokenizer"])
    hub.commit("dataset", LABELLED, repos["labelled"])
    hub.start()
    return hub


def hub_env(hub: Hub, home: Path, token: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of a command that talks to `hub`: online, its own HF_HOME, short timeouts."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_HUB_DOWNLOAD_TIMEOUT="2", HF_HUB_ETAG_TIMEOUT="2",
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(ROOT),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.update(extra)
    if token:
        env["HF_TOKEN"] = token
    return env


HUB_PARAMS = {"model": {"name": MODEL, "revision": "v1", "tokenizer": None, "from_scratch": False,
                        "config_overrides": {}},
              "data": {"dataset": DATASET, "config": "small", "revision": "v1"}}


def commit_of(hub: Hub, kind: str, repo_id: str, revision: str) -> str:
    return hub.repos[(kind, repo_id)].resolve(revision)
