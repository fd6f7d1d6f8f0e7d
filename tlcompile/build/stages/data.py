"""``01_data``: load (or generate) the images, check them, split by patient; writes splits.csv and summary.json."""

from __future__ import annotations

from tlcompile.build.context import Artifact, BuildContext, Stage
from tlcompile.data.datamodule import load_data
from tlcompile.errors import DataError
from tlcompile.io import atomic_write_json

SECTIONS = ("seed", "data")


def run(ctx: BuildContext, artifacts: list[Artifact]) -> list[Artifact]:
    d = ctx.recipe.data
    folder = ctx.stage.folder
    with ctx.console.status(f"[bold]data[/]: loading {d.source} images ({d.image_size} px)") as status:

        def progress(what: str, done: int, total: int) -> None:
            if done == total or done % 64 == 0:
                status.update(f"[bold]data[/]: {what}: {done}/{total} images ({d.image_size} px)")

        # The data check report (data_check.json, problems.csv) lands beside splits.csv, also when problems stop the
        # build.
        ctx.data = load_data(d, seed=ctx.recipe.seed, report_dir=folder, progress=progress)
    if (gap := ctx.data.split_class_gap()) is not None:  # now, not after training and compression
        raise DataError(f"data: {gap}")
    ctx.data.write_splits_csv(folder / "splits.csv")
    report = ctx.data.report
    summary = {
        "counts": ctx.data.counts(),
        "preprocessing": ctx.data.spec.to_dict(),
        "task": d.task,
        "class_names": list(ctx.data.class_names),
        "fov_not_found": int((~ctx.data.fov_found).sum()),
        "balance": d.balance,
        "problems_skipped": len(report.problems) if report else 0,
        "patients_in_two_splits": report.splits.get("patients_in_two_splits") if report else None,
        "store": _store_folder(ctx.data.split_images),
    }
    atomic_write_json(folder / "summary.json", summary)
    ctx.stage.record = {"images": len(ctx.data.ids)}
    counts = ", ".join(f"{k} {sum(v.values())}" for k, v in summary["counts"].items())
    skipped = (
        f"; {summary['problems_skipped']} problem images left out (01_data/problems.csv)"
        if summary["problems_skipped"]
        else ""
    )
    ctx.console.print(f"[bold]data[/]: {len(ctx.data.ids)} images ({counts}); task {d.task}{skipped}")
    return artifacts


def _store_folder(split_images: dict | None) -> str | None:
    """The disk store's folder the build reads (data.store: disk), None for data held in memory."""
    from pathlib import Path

    from tlcompile.data.store import store_path

    path = store_path(split_images["train"]) if split_images else None
    return str(Path(path).parent) if path else None


STAGE = Stage(name="data", folder="01_data", sections=SECTIONS, run=run, all_ranks=True)  # every rank loads its data
