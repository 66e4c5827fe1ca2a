"""`dvc plots show` and `dvc plots diff` pages that render offline.

DVC's own page loads Vega, Vega-Lite and Vega-Embed from a CDN, so without a network it is blank. This
writes an HTML template for DVC (`plots.html_template` in .dvc/config) with the three libraries inlined
from the vl-convert-python package (the Vega project's bundle) and no `{scripts}` placeholder, so DVC's
CDN script tags are never added. `make setup` writes it; run `python -m pipeline.tools.plots` after changing
the vl-convert-python version.
"""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.core.cli import stage_command
from pipeline.core.errors import PipelineError
from pipeline.core.outputs import write_text

TEMPLATE = Path(".dvc/plots/offline.html")  # plots.html_template in .dvc/config is relative to .dvc/
VEGA_LITE = "5.21"  # the major version DVC's templates are written for ($schema .../vega-lite/v5.json)


def page(bundle: str) -> str:
    """The HTML template: the bundle inline, then DVC's plot divs."""
    for marker in ("</script", "{scripts}", "{plot_divs}", "{refresh_tag}"):
        if marker in bundle:  # it would end the script early or be replaced by DVC
            raise PipelineError(f"the Vega bundle contains {marker!r}; pin another vl-convert-python version")
    return ("<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n{refresh_tag}\n<title>DVC plots</title>\n"
            f"<script>\n{bundle}\n</script>\n"
            "<style>body { font-family: sans-serif; } table { border-spacing: 15px; }</style>\n"
            "</head>\n<body>\n{plot_divs}\n</body>\n</html>\n")


def write_template(path: Path = TEMPLATE) -> Path:
    import vl_convert

    write_text(path, page(vl_convert.javascript_bundle(vl_version=VEGA_LITE)))
    return path


@stage_command
@click.option("--out", default=str(TEMPLATE), show_default=True, type=click.Path(path_type=Path),
              help="Where DVC looks for it (.dvc/config: plots.html_template, relative to .dvc/).")
def main(out: Path) -> None:
    """Write the offline HTML template for dvc plots show / dvc plots diff."""
    click.echo(f"wrote {write_template(out)}", err=True)


if __name__ == "__main__":
    main()
