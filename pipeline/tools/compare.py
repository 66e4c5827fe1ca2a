"""A Markdown report of a run against a git revision, for a reviewer who runs nothing (a pull-request comment).

    python -m pipeline.tools.compare                      # the workspace against HEAD, into compare/
    python -m pipeline.tools.compare --rev main           # the workspace against a branch, tag or commit
    python -m pipeline.tools.compare --exp lower-lr       # an experiment (dvc exp show) against its baseline commit

compare/report.md holds the params that differ (DVC's params diff), the headline metrics (the metrics dvc.yaml
declares: metrics/summary.json; DVC's metrics diff) old, new and change, and a PNG per plot beside it: DVC
fills its Vega-Lite templates for both revisions as `dvc plots diff` does, and vl-convert renders them offline.
The folder is written whole, then renamed into place over the earlier report (never over a folder holding
anything else).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from pipeline.core.cli import stage_command
from pipeline.core.errors import PipelineError
from pipeline.core.outputs import MANIFEST, file_sizes, outputs
from pipeline.tools.plots import VEGA_LITE

if TYPE_CHECKING:
    from dvc.repo import Repo

REPORT = "report.md"
WORKSPACE = "workspace"  # DVC's name for the files as they are on disk


@contextmanager
def open_repo() -> Iterator[Repo]:
    """The DVC repo this folder is in (or a folder above), with at least one commit to compare with."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo
    from dvc.scm import NoSCMError

    try:
        repo = Repo()
    except NotDvcRepoError:
        raise PipelineError(f"{Path.cwd()} is not in a DVC repository; run this in the pipeline's workspace "
                            "(the folder with dvc.yaml and .dvc/)") from None
    with repo:
        try:
            empty = repo.scm.no_commits
        except NoSCMError:
            raise PipelineError(f"the DVC repository at {repo.root_dir} has no git (core.no_scm), so no revision to "
                                "compare with; run `git init` there and `dvc config core.no_scm false`") from None
        if empty:
            raise PipelineError("the repository has no commits to compare with; commit a run first "
                                "(git add -A && git commit)")
        yield repo


def commit_of(repo: Repo, rev: str) -> str:
    """The commit a branch, tag, commit or experiment name stands for."""
    from dvc.scm import RevError, resolve_rev

    try:
        return resolve_rev(repo.scm, rev)
    except RevError:
        raise PipelineError(f"--rev {rev!r} is not a branch, tag or commit of this repository; name one that "
                            "`git log --oneline --all` lists") from None


def experiment_baseline(repo: Repo, name: str) -> str:
    """The commit experiment `name` was run from (as `dvc plots diff --experiment` compares it)."""
    from dvc.repo.experiments.exceptions import AmbiguousExpRefInfo
    from dvc.repo.experiments.utils import resolve_name

    try:
        ref = resolve_name(repo.scm, name).get(name)
    except AmbiguousExpRefInfo:
        raise PipelineError(f"--exp {name!r} names experiments of several baselines; check out the commit it "
                            "was run from, or give its full ref (refs/exps/...) from `dvc exp list --all`") from None
    if ref is None:
        raise PipelineError(f"--exp {name!r} is not an experiment of this repository; name one that "
                            "`dvc exp list --all` lists")
    return ref.baseline_sha


def revisions(repo: Repo, rev: str | None, exp: str | None) -> tuple[str, str]:
    """(old, new) as DVC names them: the baseline given or implied, and the workspace or the experiment."""
    if exp is None:
        rev = rev or "HEAD"
        commit_of(repo, rev)
        return rev, WORKSPACE
    baseline = experiment_baseline(repo, exp)
    if rev is None:
        return baseline[:7], exp  # as dvc plots diff --experiment labels it
    commit_of(repo, rev)
    return rev, exp


def heading(repo: Repo, old: str, new: str) -> str:
    """The report's title, with the baseline's commit when it is named otherwise (HEAD, a branch, a tag)."""
    commit = commit_of(repo, old)[:7]
    named = not (commit.startswith(old) or old.startswith(commit))
    return f"# {new} against {old}" + (f" ({commit})" if named else "")


def shown(value: Any) -> str:
    """A value as the report prints it, in one table cell: a float's shortest exact form, a missing one as a dash."""
    return "—" if value is None else str(value).replace("|", "\\|").replace("\n", "\\n")


def change(old: Any, new: Any) -> str:
    """new - old of the numbers as printed, exactly (0.0005 - 0.005 is -0.0045, not -0.0045000000000000005)."""
    if not all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in (old, new)):
        return "—"
    difference = Decimal(str(new)) - Decimal(str(old))
    return "0" if difference == 0 else f"{difference:+f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}", *(f"| {' | '.join(row)} |" for row in rows)]


def params_section(repo: Repo, old: str, new: str) -> list[str]:
    """The params that differ (dvc params diff)."""
    diff = repo.params.diff(a_rev=old, b_rev=new).get("diff", {})
    rows = [[path, key, shown(values.get("old")), shown(values.get("new"))]
            for path, keys in sorted(diff.items()) for key, values in sorted(keys.items())]
    if not rows:
        return ["## Params", "", "No param differs."]
    return ["## Params", "", *table(["File", "Param", old, new], rows)]


def metrics_section(repo: Repo, old: str, new: str) -> list[str]:
    """Every headline metric at both revisions and its change (dvc metrics diff --all)."""
    diff = repo.metrics.diff(a_rev=old, b_rev=new, all=True).get("diff", {})
    rows = [[path, key, shown(values.get("old")), shown(values.get("new")), change(values.get("old"),
                                                                                   values.get("new"))]
            for path, keys in sorted(diff.items()) for key, values in sorted(keys.items())]
    if not rows:
        return ["## Metrics", "", f"No metrics at {old} or {new}: run the pipeline (dvc repro) and commit it."]
    return ["## Metrics", "", *table(["File", "Metric", old, new, "Change"], rows)]


def filled_plots(repo: Repo, old: str, new: str) -> list[Any]:
    """DVC's renderer of every plot, holding both revisions' data, as `dvc plots diff` makes them."""
    from dvc.render.match import match_defs_renderers

    data = repo.plots.show(revs=[old, new])
    return [found.renderer for found in match_defs_renderers(data, templates_dir=repo.plots.templates_dir)]


def image_name(plot: str) -> str:
    return re.sub(r"[^\w.-]+", "_", plot) + ".png"


def render(spec: dict, path: Path) -> None:
    import vl_convert

    # no base URL allowed: DVC inlines the data, so nothing is fetched; white, so it reads in a dark theme too
    path.write_bytes(vl_convert.vegalite_to_png(spec, vl_version=VEGA_LITE, allowed_base_urls=[],
                                                config={"background": "white"}))


def plots_section(renderers: list[Any], revs: tuple[str, str], folder: Path) -> list[str]:
    """A PNG per plot with data in `folder`, linked relative to the report; one line for the plots without."""
    lines, empty = ["## Plots"], []
    for renderer in renderers:
        spec = renderer.get_filled_template() if renderer.TYPE == "vega" else {}
        if not spec:
            empty.append(renderer.name)
            continue
        title = renderer.properties.get("title") or renderer.name
        render(spec, folder / image_name(renderer.name))
        lines += ["", f"### {title}", "", f"![{re.sub(r'[][]', '', title)}]({image_name(renderer.name)})"]
        missing = [rev for rev in revs if rev not in renderer.properties.get("revs_with_datapoints", [])]
        if missing:
            lines += ["", f"No data at {' or '.join(missing)}."]
    if empty:
        lines += ["", f"Left out, no data at {revs[0]} or {revs[1]}: {', '.join(empty)}."]
    return lines


def checked_out(out: Path) -> Path:
    """A folder for the report: not a file, nor inside one; and, as it is replaced whole, new, empty, or an
    earlier report (report.md and the files its manifest lists), so that neither `--out .` nor a stage's
    output folder (which has a manifest too) is ever replaced."""
    blocked = next((path for path in (out, *out.parents) if path.exists() and not path.is_dir()), None)
    if blocked:
        raise PipelineError(f"--out {out}: {blocked} is a file, not a folder; name a folder for the report "
                            "(default compare/)")
    if out.is_dir():
        try:
            earlier = set(json.loads((out / MANIFEST).read_text())["files"])
            earlier = earlier if REPORT in earlier else set()
        except (OSError, ValueError, KeyError, TypeError):
            earlier = set()
        foreign = sorted(set(file_sizes(out, MANIFEST)) - earlier)
        if foreign:
            raise PipelineError(f"--out {out} holds files that are not an earlier report ({foreign[0]}, ...), and "
                                "the report replaces the folder whole; name a new folder (default compare/)")
    return out


@stage_command
@click.option("--rev", default=None, help="Baseline: a branch, tag or commit. Default: HEAD, or the experiment's "
                                          "baseline commit with --exp.")
@click.option("--exp", default=None, help="Compare this experiment (`dvc exp show` names it), not the workspace.")
@click.option("--out", default="compare", show_default=True, type=click.Path(path_type=Path),
              help="Folder for report.md and its PNGs (replaced whole).")
def main(rev: str | None, exp: str | None, out: Path) -> None:
    """Write a Markdown report (params, metrics, plots) of the workspace or an experiment against a revision."""
    checked_out(out)
    with open_repo() as repo:
        old, new = revisions(repo, rev, exp)
        head = [heading(repo, old, new), "", *params_section(repo, old, new), "", *metrics_section(repo, old, new)]
        renderers = filled_plots(repo, old, new)
        with outputs(out) as (folder,):
            folder.mkdir()
            lines = [*head, "", *plots_section(renderers, (old, new), folder)]
            (folder / REPORT).write_text("\n".join(lines) + "\n")
    click.echo(out / REPORT)


if __name__ == "__main__":
    main()
