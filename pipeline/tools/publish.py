"""Publish the fine-tuned model to the Hugging Face Hub. Not a DVC stage: a plain `dvc repro` never
uploads anything; you run this when a model is worth sharing.

    python -m pipeline.tools.publish                             # publish.repo_id / publish.private of params.yaml
    python -m pipeline.tools.publish --repo-id me/gpt2-wikitext  # or the repo on the command line (--public)

models/finetuned goes up as it is, in one commit: the safetensors weights, config, generation config,
tokenizer, LoRA's adapter/ when there is one, and the model card the train stage wrote (README.md: the
validation loss and perplexity of base and fine-tuned model, the base model's and the dataset's Hub
commits, the git commit and the dvc.lock hashes of the inputs). huggingface_hub's create_repo and
upload_folder do the work; the token is theirs (HF_TOKEN, or `hf auth login`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import click

from pipeline.core.cli import params_option, stage_command
from pipeline.core.errors import PipelineError
from pipeline.core.loading import check_folder, check_weights
from pipeline.core.locations import REPO_ID, is_repo_id
from pipeline.core.outputs import MANIFEST
from pipeline.core.params import load_params
from pipeline.data.hub import fail, hub_call

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

log = logging.getLogger(__spec__.name)  # under python -m, __name__ is "__main__"
KEY = "publish.repo_id"


def checked_repo_id(repo_id: str | None) -> str:
    """A Hub repo id ("namespace/name" or "name"), or one line saying what is wrong with it."""
    if repo_id is None:
        fail(KEY, "is null: set it in params.yaml (namespace/name), or pass --repo-id")
    if not is_repo_id(repo_id):
        fail(KEY, f"{repo_id!r} is not a Hub repo id: {REPO_ID}")
    return repo_id


def checked_model(folder: Path) -> None:
    """The folder the train stage wrote, whole, with its weights and model card."""
    check_weights(folder)
    check_folder(folder, "train")
    if not (folder / "README.md").is_file():
        raise PipelineError(f"{folder} has no model card (README.md); re-run the train stage (dvc repro -f train)")


def publish(folder: Path, repo_id: str, private: bool) -> CommitInfo:
    """Create the repo if needed (private unless told otherwise) and upload `folder` in one commit."""
    from huggingface_hub import HfApi, get_token

    if get_token() is None:
        raise PipelineError("publishing needs a Hub token that can write: set HF_TOKEN, or run `hf auth login`")
    api = HfApi()
    what = f"repo {repo_id!r}"
    url = hub_call(lambda: api.create_repo(repo_id, private=private, exist_ok=True), what, KEY, "write")
    repo_id = url.repo_id  # a name alone is created under the token's user
    info = hub_call(lambda: api.repo_info(repo_id), what, KEY, "write")
    if private and not info.private:
        fail(KEY, f"{repo_id!r} exists and is public, and publish.private is true; make the repo private on the "
                  "Hub, or publish with --public (publish.private: false)")
    log.info("uploading %s to %s (%s)", folder, url, "private" if info.private else "public")
    return hub_call(lambda: api.upload_folder(repo_id=repo_id, folder_path=folder, ignore_patterns=[MANIFEST],
                                              commit_message=f"Fine-tuned model from {folder}"), what, KEY, "write")


@stage_command
@params_option
@click.option("--model", "model_dir", default="models/finetuned", show_default=True, type=click.Path(path_type=Path),
              help="The model folder to publish (the train stage's output).")
@click.option("--repo-id", default=None, help="Hub repo (namespace/name); default: publish.repo_id.")
@click.option("--private/--public", "private", default=None,
              help="Visibility of a repo this creates; default: publish.private.")
def main(params_path: str, model_dir: Path, repo_id: str | None, private: bool | None) -> None:
    """Push the fine-tuned model, its tokenizer and model card to a Hugging Face Hub repo."""
    settings = load_params(params_path).publish
    repo_id = checked_repo_id(repo_id or settings.repo_id)
    checked_model(model_dir)
    commit = publish(model_dir, repo_id, settings.private if private is None else private)
    click.echo(f"published {model_dir} as commit {commit.oid}: {commit.commit_url}")


if __name__ == "__main__":
    main()
