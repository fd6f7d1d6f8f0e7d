"""The ``tlcompile`` command: parse, call the library, print. No logic lives here.

User mistakes (:class:`TlcompileError`) print one line on stderr and exit non-zero; no traceback.
Heavy modules (torch) are imported inside the commands that need them, so the runtime commands start fast
and work on a torch-free install.
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from tlcompile.errors import TlcompileError

app = typer.Typer(
    name="tlcompile",
    help="Edge-deployment model compiler for diabetic-retinopathy screening: recipe in, measured artifacts out.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
recipe_app = typer.Typer(help="Recipe utilities.", no_args_is_help=True)
data_app = typer.Typer(help="Datasets: the synthetic fundus generator.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")
app.add_typer(data_app, name="data")

SetOption = Annotated[
    Optional[list[str]],  # noqa: UP045 - typer needs Optional here
    typer.Option("--set", "-s", help="Override a recipe value: --set train.epochs=3 (repeatable)."),
]


def _console() -> Console:
    return Console(highlight=False)


@app.command()
def build(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    set_: SetOption = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (default: runs/<name>-<time>).")] = None,  # noqa: UP045
    resume: Annotated[bool, typer.Option("--resume", help="Continue the build in --out, reusing finished stages.")] = False,
) -> None:
    """Build a recipe: data -> train -> export -> bench -> report."""
    from tlcompile.recipe import load_recipe

    r = load_recipe(recipe, set_ or [])
    if resume and out is None:
        raise TlcompileError("--resume needs --out naming the build folder to continue")
    out = out or Path("runs") / f"{r.name}-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    from tlcompile.pipeline import build as run_build
    from tlcompile.report.render import artifact_table

    console = _console()
    result = run_build(r, out, resume=resume, console=console)
    console.print(artifact_table(result.report))
    console.print(f"report: {out / 'report.json'}, {out / 'report.md'}")


@app.command()
def validate(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    set_: SetOption = None,
) -> None:
    """Check a recipe without running it; prints the resolved recipe's fingerprint."""
    from tlcompile.recipe import load_recipe

    r = load_recipe(recipe, set_ or [])
    typer.echo(f"{recipe}: valid (name {r.name}, model {r.model.arch}, data {r.data.source}; sha256 {r.fingerprint()[:16]})")


@app.command()
def models(
    size: Annotated[int, typer.Option(help="Input size for the MACs column.", min=32, max=1024)] = 224,
    blocks: Annotated[Optional[str], typer.Option("--blocks", help="Show the transfer blocks of this model.")] = None,  # noqa: UP045
    num_classes: Annotated[int, typer.Option(help="Classes of the head.", min=1)] = 2,
) -> None:
    """List the registered models with parameters and MACs."""
    from rich.table import Table

    from tlcompile.models import count_macs, count_params, get_model, list_models, model_info

    console = _console()
    if blocks:
        model = get_model(blocks, num_classes=num_classes)
        table = Table(title=f"{blocks}: blocks (input -> output); unfreeze_last / partial:K count these")
        for col in ("#", "block", "params"):
            table.add_column(col)
        for i, (name, module) in enumerate(model.blocks(), start=1):
            table.add_row(str(i), name, f"{sum(p.numel() for p in module.parameters()):,}")
        table.add_row("head", "classifier", f"{sum(p.numel() for p in model.get_classifier().parameters()):,}")
        console.print(table)
        return
    table = Table(title=f"registered models ({num_classes} classes, MACs at {size} px)")
    for col in ("model", "family", "params", "MMACs", "blocks", "description"):
        table.add_column(col)
    for name in list_models():
        model = get_model(name, num_classes=num_classes)
        info = model_info(name)
        table.add_row(name, info.family, f"{count_params(model):,}", f"{count_macs(model, size) / 1e6:,.1f}", str(len(model.blocks())), info.description)
    console.print(table)


@recipe_app.command("schema")
def recipe_schema() -> None:
    """Print the recipe's JSON Schema (for editors: yaml-language-server)."""
    from tlcompile.recipe import recipe_json_schema

    typer.echo(json.dumps(recipe_json_schema(), indent=2))


@data_app.command("synth")
def data_synth(
    out: Annotated[Optional[Path], typer.Option("--out", help="Write an APTOS-style folder here (train.csv + train_images/).")] = None,  # noqa: UP045
    n: Annotated[int, typer.Option("--n", help="Number of images.", min=1)] = 100,
    size: Annotated[int, typer.Option(help="Image side in pixels.", min=32, max=4096)] = 256,
    seed: Annotated[int, typer.Option(help="Seed.", min=0)] = 0,
    difficulty: Annotated[Optional[float], typer.Option(help="0 (obvious) .. 1 (subtle); default: the generator's.", min=0, max=1)] = None,  # noqa: UP045
    style: Annotated[str, typer.Option(help="Camera look.")] = "default",
    preview: Annotated[Optional[Path], typer.Option("--preview", help="Write a PNG grid, one row per grade, beside a real retina photo.")] = None,  # noqa: UP045
) -> None:
    """Generate synthetic fundus images with DR grades 0-4."""
    from tlcompile.data import synthetic

    if out is None and preview is None:
        raise TlcompileError("data synth: give --out DIR (an APTOS-style dataset) and/or --preview FILE.png")
    kwargs = {"seed": seed, "style": style}
    if difficulty is not None:
        kwargs["difficulty"] = difficulty
    if out is not None:
        csv_path = synthetic.write_aptos(out, n, size=size, **kwargs)
        typer.echo(f"wrote {n} images and {csv_path}")
    if preview is not None:
        real = None
        try:
            from skimage import data as skdata

            real = skdata.retina()
        except ImportError:
            pass
        typer.echo(f"wrote {synthetic.preview_grid(preview, real_image=real, **kwargs)}")


def main() -> None:
    """Console-script entry point. Typer (click) handles usage errors and Ctrl-C itself; a user mistake raised by
    the library prints one line on stderr and exits with its code (2); anything else is a bug and keeps its traceback."""
    try:
        app()
    except TlcompileError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)

if __name__ == "__main__":
    main()
