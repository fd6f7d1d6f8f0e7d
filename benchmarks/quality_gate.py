"""The image-quality gate's figures: calibrated on a recipe's val photos, measured on its test photos and on
scikit-image's real retina photograph with degraded copies; prints tables (never a timed test).

    python benchmarks/quality_gate.py [recipes/quickstart.yaml] [--copies 2] [--real-seeds 3]

What it runs is what the build's quality stage runs (tlcompile/build/stages/quality.py), without training a model:
the referral metrics with and without the gate need a model and come from a build's report (07_quality).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from PIL import Image

from tlcompile.build.stages.quality import Measured, _verdicts, gate_metrics, measure_splits
from tlcompile.data.datamodule import load_data
from tlcompile.data.degrade import LEVELS, degrade
from tlcompile.evaluate.clinical import proportion
from tlcompile.recipe import load_recipe
from tlcompile.runtime.cpuinfo import cpu_info
from tlcompile.runtime.preprocess import find_field
from tlcompile.runtime.quality import MEASURES, QualityGate, calibrate, measure


def _p(d: dict) -> str:
    ci = d["ci"]
    return f"{d['value']:.1%} ({d['k']}/{d['n']}; 95% CI {ci[0]:.1%}-{ci[1]:.1%})" if ci else "-"


def _table(title: str, m: dict) -> None:
    print(f"\n{title}: {m['copies']} photos, {m['ungradable']} ungradable by the degradation rule")
    print(f"  gate sensitivity (ungradable caught): {_p(m['sensitivity'])}")
    print(f"  gate specificity (gradable passed):   {_p(m['specificity'])}")
    print(f"  {'kind':<12} {'level':>6} {'label':<11} passed")
    for kind, levels in m["by_kind"].items():
        for level, v in levels.items():
            label = "gradable" if v["gradable"] else "ungradable"
            print(f"  {kind:<12} {level:>6} {label:<11} {v['passed']['k']}/{v['passed']['n']}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe", nargs="?", default="recipes/quickstart.yaml")
    ap.add_argument("--copies", type=int, default=None, help="degraded copies per photo (default: the recipe's)")
    ap.add_argument("--real-seeds", type=int, default=3, help="copies of the real photo per kind and level")
    args = ap.parse_args()
    recipe = load_recipe(args.recipe)
    q = recipe.quality
    copies = args.copies or q.copies_per_image
    print(f"CPU: {cpu_info().get('model', '?')}; recipe {args.recipe}; copies per photo {copies}")
    t0 = time.perf_counter()
    data = load_data(recipe.data, seed=recipe.seed)
    measured = measure_splits(data, recipe, copies)
    (_, val, _), (_, test, seconds) = measured["val"], measured["test"]
    fixed = {k: v for k, v in q.limits.model_dump().items() if v is not None}
    gradable = [c.measures for c in val if c.gradable and c.measures is not None]
    limits, share = calibrate({k: np.array([m[k] for m in gradable]) for k in MEASURES}, q.target_gradable, fixed)
    gate = QualityGate(limits=limits)
    print(f"data and copies measured in {time.perf_counter() - t0:.1f} s ({seconds * 1e3:.2f} ms per measure)")
    print(
        f"limits (calibrated on {len(gradable)} gradable val photos/copies, target {q.target_gradable:.0%}, "
        f"reached {share:.1%}): " + ", ".join(f"{k} {v:.4g}" for k, v in limits.items())
    )
    test_pass = _verdicts(test, limits)
    as_taken = np.array([c.kind == "none" for c in test])
    imageability = proportion(int(test_pass[as_taken].sum()), int(as_taken.sum()))
    print(f"\nimageability on test (the test photos as taken): {_p(imageability)}")
    _table("degraded synthetic test set (test photos + copies)", gate_metrics(test, test_pass))

    from skimage import data as skdata

    real = np.asarray(Image.fromarray(skdata.retina()).resize((512, 512), Image.LANCZOS))
    found = find_field(real)
    a = gate.assess(real, found)
    print(
        f"\nreal photo skimage.data.retina() at 512 px: {'gradable' if a.gradable else 'UNGRADABLE'}, score "
        f"{a.score:.3f}, measures {a.measures}"
    )
    ma = skdata.microaneurysms()
    ma_rgb = np.repeat(ma[:, :, None], 3, axis=2)
    m = gate.assess(ma_rgb, find_field(ma_rgb))
    print(
        f"skimage.data.microaneurysms() ({ma.shape[1]}x{ma.shape[0]} red-free crop, no field edge): "
        f"{'gradable' if m.gradable else 'ungradable: ' + ', '.join(m.reasons)}, score {m.score:.3f}"
    )
    real_copies = [Measured(0, "none", 0.0, True, measure(real, found))]
    for kind, levels in LEVELS.items():
        for level, ok in levels:
            for s in range(args.real_seeds):
                rng = np.random.default_rng(np.random.SeedSequence([2024, s, len(real_copies)]))
                copy = degrade(real, kind, level, rng)
                f = find_field(copy)
                real_copies.append(Measured(0, kind, level, ok, None if f is None else measure(copy, f)))
    _table("real photo + degraded copies", gate_metrics(real_copies, _verdicts(real_copies, limits)))

    # ms per photo of the gate alone (predict has decoded the photo and found its field already): a 500x375 draft
    frame = np.zeros((375, 500, 3), np.uint8)
    frame[:, 62:437] = np.asarray(Image.fromarray(skdata.retina()).resize((375, 375), Image.LANCZOS))
    f = find_field(frame)
    for _ in range(20):
        gate.assess(frame, f)
    n = 300
    t0 = time.perf_counter()
    for _ in range(n):
        gate.assess(frame, f)
    print(f"\ngate: {(time.perf_counter() - t0) / n * 1e3:.2f} ms per photo (500x375 draft, field found; mean of {n})")


if __name__ == "__main__":
    main()
