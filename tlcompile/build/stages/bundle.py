"""``bundle``: the deployable folder (tlcompile.export.bundle) from the report; recorded as report["bundle"].

A bundle that cannot be made (no artifact meets the endpoints within the budget ...) is recorded and kept on the
context, not raised here: the loop writes the report first, so nothing measured is lost, and raises it after."""

from __future__ import annotations

from tlcompile.build.context import Artifact, BuildContext, Stage
from tlcompile.errors import BundleError


def run(ctx: BuildContext, artifacts: list[Artifact]) -> list[Artifact]:
    from tlcompile.export.bundle import write_bundle

    with ctx.console.status("[bold]bundle[/]: selecting the artifact, writing golden samples, verifying"):
        try:
            record = write_bundle(ctx.report, out_dir=ctx.out_dir, data=ctx.data, recipe=ctx.recipe)
        except BundleError as err:
            record, ctx.bundle_error = {"error": str(err)}, err
    if record is None:
        record = {"skipped": "no openvino or onnxruntime row in the bench to ship; add one to bench.runtimes"}
        ctx.console.print(f"[yellow]bundle[/]: skipped: {record['skipped']}")
    elif ctx.bundle_error is None:
        _say(ctx, record)
    ctx.report["bundle"] = record
    return artifacts


def _say(ctx: BuildContext, record: dict) -> None:
    sel = record.get("selection", {})
    passed_over = [
        f"{c['id']} ({c['why_not']})"
        for c in sel.get("candidates", [])
        if c.get("why_not") and sel.get("rule") != "name"
    ]
    why = f": {sel['why']}" if sel.get("why") else f" ({sel.get('ranked_by')})"
    ctx.console.print(
        f"[bold]bundle[/]: {ctx.out_dir / record['path']}: {len(record['candidates'])} candidate(s) for the box to "
        f"choose from ({', '.join(record['candidates'])}); build's choice {record['default_candidate']} "
        f"({record['precision']}), by select: {sel.get('rule')}{why}"
        + (f"; passed over: {', '.join(passed_over)}" if passed_over else "")
        + "; "
        f"{record['golden_samples']} golden samples verified (max |Δlogit| "
        f"{record['verify']['max_abs_logit_diff']:.1e}); manifest sha256 {record['manifest_sha256'][:16]}; on the "
        "clinic's box, tlcompile verify pins the fastest there"
    )
    if sel.get("noise"):
        ctx.console.print(f"[yellow]bundle[/]: {sel['noise']}")


STAGE = Stage(name="bundle", folder=None, sections=None, run=run, wanted=lambda recipe: bool(recipe.bundle.enabled))
