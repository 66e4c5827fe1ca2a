"""Reading params.yaml into the schema (pipeline.core.config): the file read as DVC reads it (YAML 1.2,
bounded: read_yaml), pydantic's errors turned into one line that names the key and the fix, numeric
strings read as numbers (a `-S lr=5e-4` PyYAML made a string), and the rules across fields checked in
one place (`check`). The command
that checks and describes them: pipeline.tools.params.
"""

from __future__ import annotations

import difflib
import functools
import logging
import re
import string
import typing
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from pipeline.core.common import template_fields
from pipeline.core.config import TRACKERS, DataConfig, Params, TrainConfig
from pipeline.core.errors import PipelineError, read_utf8
from pipeline.core.locations import INPUTS, PROMPTS, REPO_ID, is_local, is_repo_id, is_url

log = logging.getLogger(__name__)
PARAMS_FILE = Path("params.yaml")
PROJECT_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"  # the project's own, with every key
POLYNOMIAL_LR_END = 1e-7  # the Trainer's polynomial schedule decays to this
TEMPLATE_WIDTH_MAX = 1000  # a field's width or precision in a template: {text:>1000000000} would allocate a GB


# --- rules across fields -----------------------------------------------------------------------------

def check(p: Params) -> None:
    """Rules across fields, all in one place."""
    check_inputs(p)
    check_model(p)
    check_source(p.data)
    check_data(p.data)
    check_train(p.train)
    check_task(p)
    if p.train.lr_scheduler_type == "polynomial" and p.lr <= POLYNOMIAL_LR_END:
        fail("lr", f"({p.lr:g}) is not above the polynomial schedule's end lr ({POLYNOMIAL_LR_END:g}, the Trainer's "
                   "lr_end), so it would rise instead of decay; raise lr or use train.lr_scheduler_type: linear")
    if p.evaluate.stride is not None and p.evaluate.stride > p.preprocess.block_size:
        fail("evaluate.stride", f"({p.evaluate.stride}) exceeds preprocess.block_size ({p.preprocess.block_size}); "
                                "windows would skip tokens")
    if p.generate.no_repeat_ngram_size > p.generate.max_new_tokens:
        fail("generate.no_repeat_ngram_size", f"({p.generate.no_repeat_ngram_size}) exceeds generate.max_new_tokens "
                                              f"({p.generate.max_new_tokens}), so it never applies; lower it or 0")
    if not p.generate.do_sample and p.generate.num_return_sequences > 1:
        fail("generate.num_return_sequences", "must be 1 when do_sample is false (greedy gives one answer)")


def check_task(p: Params) -> None:
    """task: classification reads one text per block and has no use for the language-model-only features."""
    c = p.classify
    check_template("classify.zero_shot_prompt", c.zero_shot_prompt)
    if set(template_fields(c.zero_shot_prompt)) != {"text"}:
        fail("classify.zero_shot_prompt", "must use the one field {text} (the text to classify)")
    if c.labels is not None and len(set(c.labels)) < len(c.labels):
        duplicate = next(label for label in c.labels if c.labels.count(label) > 1)
        fail("classify.labels", f"lists {duplicate!r} twice; give each label once")
    if p.task != "classification":
        return
    if p.preprocess.mode != "pad":
        fail("preprocess.mode", "must be pad with task: classification (one text per block, padded to block_size)")
    if p.data.prompt_template:
        fail("data.prompt_template", "is prompt/response fine-tuning of a language model, and task is "
                                     "classification; remove it, or set task: causal_lm")
    if p.train.samples.every:
        fail("train.samples.every", "samples text during training, and task is classification; set it to 0")


def check_model(p: Params) -> None:
    overrides = p.model.config_overrides
    if overrides and not p.model.from_scratch:
        fail("model.config_overrides", "is only used with model.from_scratch: true; remove it or set from_scratch")
    n_embd, n_head, n_positions = (overrides.get(k) for k in ("n_embd", "n_head", "n_positions"))
    if isinstance(n_embd, int) and isinstance(n_head, int) and n_head > 0:
        check_heads(n_embd, n_head)  # both given: at load time; download checks them with GPT2Config's defaults
    if isinstance(n_positions, int) and p.preprocess.block_size > n_positions:
        fail("preprocess.block_size", f"({p.preprocess.block_size}) exceeds model.config_overrides.n_positions "
                                      f"({n_positions}); lower block_size or raise n_positions")


def check_source(d: DataConfig) -> None:
    """Settings that mean something for one kind of dataset source only are refused for the others."""
    kind = "a URL" if is_url(d.dataset) else "a local path" if is_local(d.dataset) else "a Hub id"
    if d.sha256 is not None and kind != "a URL":
        fail("data.sha256", f"only checks a URL download, and data.dataset is {kind}; set it to null")
    for key, value in (("data.config", d.config), ("data.revision", d.revision)):
        if value is not None and kind != "a Hub id":
            fail(key, f"only applies to a Hub dataset, and data.dataset is {kind}; set it to null")


def check_data(d: DataConfig) -> None:
    for key, template in (("data.template", d.template), ("data.prompt_template", d.prompt_template),
                          ("data.response_template", d.response_template)):
        if template is not None:
            check_template(key, template)
    if d.dialogue_column and not d.speakers:
        fail("data.speakers", "is empty, and data.dialogue_column needs labels for its turns; list them, e.g. "
                              "[User, Assistant]")
    if d.use_chat_template and not d.dialogue_column:
        fail("data.use_chat_template", "renders dialogues only, and data.dialogue_column is null; set "
                                       "dialogue_column or set use_chat_template: false")
    if (d.prompt_template is None) != (d.response_template is None):
        fail("data.prompt_template", "and data.response_template go together (prompt/response fine-tuning); "
                                     "set both or neither")
    shapes = [name for name, on in (("data.template", d.template), ("data.dialogue_column", d.dialogue_column),
                                    ("data.prompt_template", d.prompt_template)) if on]
    if len(shapes) > 1:
        fail(shapes[1], f"conflicts with {shapes[0]}; records become text one way: set only one of them")
    if d.validation_split is not None and d.validation_split == d.train_split:
        fail("data.validation_split", f"is the training split ({d.train_split!r}): the model would be judged on the "
                                      "text it learnt; name another split, or null to split one off "
                                      "(preprocess.val_fraction)")


def check_train(t: TrainConfig) -> None:
    if t.samples.every and not t.samples.prompts:
        fail("train.samples.every", f"({t.samples.every}) samples during training, and train.samples.prompts is "
                                    "empty; list prompts ('' starts from a document boundary) or set every: 0")
    if t.warmup_steps and t.max_steps > 0 and t.warmup_steps > t.max_steps:
        fail("train.warmup_steps", f"({t.warmup_steps}) exceeds train.max_steps ({t.max_steps})")
    if t.load_best_model_at_end and (t.eval_steps == 0 or t.save_steps % t.eval_steps):
        fail("train.load_best_model_at_end", f"needs eval_steps > 0 and save_steps ({t.save_steps}) a multiple "
                                             f"of eval_steps ({t.eval_steps})")
    if t.early_stopping_patience and not t.load_best_model_at_end:
        fail("train.early_stopping_patience", "needs train.load_best_model_at_end: true")
    unknown = sorted(set(t.report_to) - set(TRACKERS))
    if unknown:
        always = " (dvclive is always on)" if unknown[0] == "dvclive" else ""
        fail("train.report_to", f"does not know {unknown[0]!r}{always}; use {', '.join(TRACKERS)}")
    if t.sharding != "none" and t.lora.enabled:
        fail("train.sharding", f"{t.sharding} with train.lora.enabled: LoRA's trained weights and their AdamW states "
                               "are a few MB, nothing to shard (and DeepSpeed would hold the frozen base in 16 "
                               "bits); set train.sharding: none")
    if t.sharding != "none" and t.torch_compile is True:
        fail("train.torch_compile", f"true with train.sharding: {t.sharding}: the DeepSpeed engine runs the model "
                                    "uncompiled here; set torch_compile: false (or auto)")
    if t.lora.enabled and (t.freeze.embeddings or t.freeze.layers):
        fail("train.freeze", "does nothing with train.lora.enabled (LoRA keeps every base weight fixed); "
                             "remove one of them")


def check_template(key: str, template: str) -> None:
    """A format string over a record's fields: it must parse, name at least one field, and each field
    be a plain {name} (a string format such as {name:>10} allowed, widths bounded): no attribute or index
    access, which would render every record as a class name or one character, and no width that would
    allocate gigabytes when filled."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        fail(key, f"is not a valid format string ({e}); write fields as {{name}} and a literal brace as {{{{ or }}}}")
    fields = [name for _, name, _, _ in parts if name is not None]
    if not fields:
        fail(key, f"{shorten(template)} names no field, so every record would become the same text; put the "
                  "record's fields in braces, e.g. {text}")
    for _, name, spec, _ in parts:
        if name is None:
            continue
        if name == "" or name.isdigit():
            fail(key, f"{shorten(template, 40)} uses a positional field {{{name}}}; write each field as {{name}}")
        if not name.isidentifier() and any(c in name for c in ".[]"):
            fail(key, f"{{{shorten(name, 40)[1:-1]}}} reads an attribute or an item of a field; write each field as "
                      "{name}: the record's value as text")
        if "{" in (spec or ""):
            fail(key, f"{{{name}:{shorten(spec, 30)[1:-1]}}} nests a field in a format spec; give the spec literally")
        width = max((int(w) for w in re.findall(r"\d+", spec or "")), default=0)
        if width > TEMPLATE_WIDTH_MAX:
            fail(key, f"{{{name}:{shorten(spec, 30)[1:-1]}}} asks for a width or precision of {width:,}; at most "
                      f"{TEMPLATE_WIDTH_MAX:,}")
    try:  # every field arrives as a string (pipeline.data.records.fill)
        template.format(**dict.fromkeys(fields, "text"))
    except (ValueError, IndexError, KeyError, AttributeError, TypeError) as e:
        fail(key, f"{shorten(template, 40)} cannot be filled ({e}); write each field as {{name}} with an optional "
                  "string format such as {name:>10}")


def check_inputs(p: Params) -> None:
    """Local files that change a result must be where dvc.yaml tracks them (INPUTS, PROMPTS); the other
    sources are Hub ids that huggingface_hub takes (or, for data.dataset, URLs)."""

    local = [("data.dataset", p.data.dataset), ("model.tokenizer", p.model.tokenizer)]
    if not p.model.from_scratch:
        local.append(("model.name", p.model.name))
    for key, value in [*local, ("generate.prompts_file", p.generate.prompts_file)]:
        long = next((part for part in Path(value or "").parts if len(part.encode()) > 255), None)
        if long:
            fail(key, f"has a path component of {len(long.encode())} bytes ({shorten(long, 40)}), over the file "
                      "system's 255; shorten it")
    for key, value in local:
        if value and is_local(value) and not inside(value, INPUTS):
            fail(key, f"{shorten(value)} is a local path outside {INPUTS}/; move it into {INPUTS}/ (the download "
                      "stage's dependency, so DVC re-runs what it changes and versions it with every experiment)")
        hub_id = value and not is_local(value) and not (key == "data.dataset" and is_url(value))
        if hub_id and not is_repo_id(value):  # else huggingface_hub refuses it, in a traceback, once download runs
            fail(key, f"{shorten(value)} is neither a Hub id nor a local path: a Hub id is {REPO_ID} (e.g. gpt2, "
                      f"Salesforce/wikitext); a local path lies in {INPUTS}/"
                      + (", a URL starts with https://" if key == "data.dataset" else ""))
    prompts = p.generate.prompts_file
    if prompts and not inside(prompts, PROMPTS):
        fail("generate.prompts_file", f"{shorten(prompts)} is outside {PROMPTS}/; move it there (the generate "
                                      "stage's dependency, so editing it re-runs generate)")


def inside(path: str, folder: Path) -> bool:
    """Whether the relative `path` is `folder` or lies in it (no absolute paths, no way out with ..)."""
    parts = Path(path).parts
    return not Path(path).is_absolute() and ".." not in parts and Path(*parts[:len(folder.parts)]) == folder


def shorten(value: Any, most: int = 80) -> str:
    """A value quoted for an error line, cut with an ellipsis."""
    if isinstance(value, str):
        return repr(value if len(value) <= most else value[:most] + "…")
    text = repr(value)
    return text if len(text) <= most else text[:most] + "…"


def check_heads(n_embd: int, n_head: int) -> None:
    """GPT-2's attention splits n_embd among its heads."""
    if n_embd % n_head:
        fail("model.config_overrides.n_embd", f"({n_embd}) must be divisible by n_head ({n_head})")


def fail(key: str, problem: str) -> typing.NoReturn:
    """A params error: names the key and what to change."""
    raise PipelineError(f"params: {key} {problem} (fix it in params.yaml or your -S override)")


# --- loading -----------------------------------------------------------------------------------------

WHOLE, NUMBER, BOOLEAN = "must be a whole number", "must be a number", "must be true or false"
MESSAGES = {  # pydantic error type -> what the user reads after the key
    "greater_than_equal": "must be >= {ge}", "greater_than": "must be > {gt}", "less_than_equal": "must be <= {le}",
    "less_than": "must be < {lt}", "literal_error": "must be one of {expected}", "bool_type": BOOLEAN,
    "bool_parsing": BOOLEAN, "int_type": WHOLE, "int_parsing": WHOLE, "int_from_float": WHOLE, "float_type": NUMBER,
    "float_parsing": NUMBER, "finite_number": "must be a finite number", "string_type": "must be a string",
    "string_too_short": "must be a non-empty string", "list_type": "must be a list of strings",
    "dict_type": "must be a mapping", "dataclass_type": "must be a mapping of {class_name} keys",
    "string_too_long": "must be at most {max_length} characters", "too_long": "must have at most {max_length} items",
    "string_pattern_mismatch": "must be 64 hexadecimal digits (a SHA-256)",
    "tiny_number": "must be 0 or at least 1.2e-38 in size (float32, which torch computes in, holds nothing smaller)",
}


def error_line(error: dict) -> str:
    """A pydantic error as `params: <dotted key> <problem>; got <value> (fix ...)`."""
    loc = [str(part) for part in error["loc"] if not str(part).startswith(("literal[", "function-"))]
    key = ".".join(loc)
    kind = error["type"]
    if kind in ("unexpected_keyword_argument", "extra_forbidden", "invalid_key"):
        known = list(section(loc[:-1]).__pydantic_fields__)
        close = difflib.get_close_matches(loc[-1], known, n=1)
        hint = f"did you mean {'.'.join([*loc[:-1], close[0]])}?" if close else f"known keys here: {', '.join(known)}"
        return f"params: {key} is not a known parameter; {hint} (fix it in params.yaml or your -S override)"
    if kind in ("missing", "missing_argument"):
        return f"params: {key} is missing; add it (the project's params.yaml lists every key with its value)"
    ctx = {k: str(v).replace("'", "").replace(" or ", ", ").replace("True", "true").replace("False", "false")
           for k, v in (error.get("ctx") or {}).items()}
    problem = MESSAGES[kind].format(**ctx) if kind in MESSAGES else error["msg"]
    return f"params: {key} {problem}; got {shorten(error.get('input'))} (fix it in params.yaml or your -S override)"


def section(loc: list[str]) -> type:
    """The dataclass at a dotted location of Params (for the keys it knows)."""
    cls: Any = Params
    for part in loc:
        annotation = cls.__pydantic_fields__[part].annotation
        cls = next((a for a in typing.get_args(annotation) if hasattr(a, "__pydantic_fields__")), annotation)
    return cls


# Keys renamed to the Trainer's own names (TrainingArguments), read under their old names until the next
# release: old section.key -> new key
RENAMED = {("train", "epochs"): "num_train_epochs", ("train", "optimizer"): "optim",
           ("train", "lr_scheduler"): "lr_scheduler_type"}


def renamed(raw: Any) -> Any:
    """`raw` with the keys RENAMED under their new names, each old one named in a warning; both names of
    one key in one line."""
    if not isinstance(raw, dict):
        return raw
    raw = dict(raw)
    for (section_name, old), new in RENAMED.items():
        part = raw.get(section_name)
        if not (isinstance(part, dict) and old in part):
            continue
        if new in part:
            raise PipelineError(f"params: {section_name}.{old} (the old name of {section_name}.{new}) and "
                                f"{section_name}.{new} are both set; keep {section_name}.{new} alone "
                                f"(dvc exp run -S {section_name}.{new}=...)")
        log.warning("params: %s.%s is now %s.%s, as the Trainer names it; the old name is read until the next "
                    "release", section_name, old, section_name, new)
        raw[section_name] = {(new if key == old else key): value for key, value in part.items()}
    return raw


def from_dict(raw: Any) -> Params:
    """Validate a params mapping (as read from YAML) into Params."""
    if not isinstance(raw, dict):
        raise PipelineError("params: the file must be a YAML mapping of sections (seed, lr, model, data, ...)")
    try:
        params = TypeAdapter(Params).validate_python(renamed(raw))
    except ValidationError as e:
        raise PipelineError(error_line(e.errors()[0])) from None
    check(params)
    return params


# A params file is shared (a teammate's branch, `dvc exp run` on it), so reading one is bounded: aliases
# may not expand past YAML_VALUES_MAX values, nesting past YAML_DEPTH_MAX levels, integers past
# YAML_INT_DIGITS_MAX digits, and keys are strings.
YAML_VALUES_MAX, YAML_DEPTH_MAX, YAML_INT_DIGITS_MAX = 100_000, 64, 30
STR_TAG, MERGE_TAG = "tag:yaml.org,2002:str", "tag:yaml.org,2002:merge"


def yaml_reader() -> Any:
    """ruamel.yaml's safe loader, as DVC reads params.yaml: YAML 1.2 (010 is 10, 0x10 is 16, 1:30 a string,
    5e-4 a number), merge keys (<<) honoured, a key given twice an error. What DVC records and compares is
    then what the run used."""
    from ruamel.yaml import YAML

    return YAML(typ="safe")


def check_yaml_tree(root: Any, path: Path) -> None:
    """Walk the composed nodes as construction would, aliases expanded, within the bounds above."""
    from ruamel.yaml.nodes import MappingNode, ScalarNode, SequenceNode

    seen, todo = 0, [(root, 1)]
    while todo:
        node, depth = todo.pop()
        seen += 1
        line = f"{path} line {node.start_mark.line + 1}"
        if seen > YAML_VALUES_MAX:
            raise PipelineError(f"params: {path} expands to more than {YAML_VALUES_MAX:,} values (aliases that "
                                "repeat aliases); write the values out instead")
        if depth > YAML_DEPTH_MAX:
            raise PipelineError(f"params: {line} nests more than {YAML_DEPTH_MAX} levels deep; params.yaml has a "
                                "few sections of a few levels")
        if isinstance(node, ScalarNode):
            digits = node.value.lstrip("+-").replace("_", "")
            if node.style is None and digits.isdigit() and len(digits) > YAML_INT_DIGITS_MAX:
                raise PipelineError(f"params: {line} holds an integer of {len(digits):,} digits; no param takes "
                                    f"more than {YAML_INT_DIGITS_MAX}")
        elif isinstance(node, MappingNode):
            for key, value in node.value:
                if not isinstance(key, ScalarNode) or key.tag not in (STR_TAG, MERGE_TAG):
                    kind = "a list or mapping" if not isinstance(key, ScalarNode) else f"{key.value!r}, not a name,"
                    raise PipelineError(f"params: {path} line {key.start_mark.line + 1} uses {kind} as a key; keys "
                                        "are names (quote it if it is one)")
                todo += [(key, depth + 1), (value, depth + 1)]
        elif isinstance(node, SequenceNode):
            todo += [(item, depth + 1) for item in node.value]


def read_yaml(path: Path | str) -> dict:
    """A YAML mapping from a file (read as DVC reads it, within bounds), or a one-line error."""
    from ruamel.yaml import YAMLError

    path = Path(path)
    try:
        text = read_utf8(path, "params")
        reader = yaml_reader()
        tree = reader.compose(text)  # parsed once: checked within the bounds, then built
        if tree is not None:
            check_yaml_tree(tree, path)
        raw = reader.constructor.construct_document(tree) if tree is not None else None
    except FileNotFoundError:
        raise PipelineError(f"params: {path} not found; run from the project root or pass --params") from None
    except IsADirectoryError:
        raise PipelineError(f"params: {path} is a directory; pass the params file") from None
    except RecursionError:
        raise PipelineError(f"params: {path} nests deeper than it can be read; params.yaml has a few sections of a "
                            "few levels") from None
    except YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = f": {' '.join(str(e.problem).split())[:120]}" if getattr(e, "problem", None) else ""
        raise PipelineError(f"params: {path} is not valid YAML{where}{problem}; fix it") from None
    if raw is None:
        raise PipelineError(f"params: {path} is empty; it needs every section (the project's params.yaml lists them)")
    return raw


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    """Read and validate params.yaml."""
    return from_dict(read_yaml(path))


@functools.cache
def project_params() -> Params:
    """The project's own params.yaml: the values everything else is a change of (ad hoc sampling, tests, bench)."""
    return load_params(PROJECT_PARAMS)


def merge(base: dict, override: dict) -> dict:
    """Deep-merge an override mapping (a recipe, the demo's overrides) onto a params mapping, as
    `dvc exp run -S` would; an empty mapping replaces (`config_overrides: {}` clears it). A key either
    gives under its old name (RENAMED) is merged under its new one."""
    return deep_merge(renamed(base), renamed(override))


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and v and isinstance(out.get(k), dict) else v
    return out
