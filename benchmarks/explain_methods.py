"""Which heatmap method for ``predict --explain``: cost per image and faithfulness, measured on a built bundle.

    python benchmarks/explain_methods.py BUILD_DIR [--limit N] [--runtime openvino|onnxruntime] [--artifact fp32]

BUILD_DIR is a finished build of a synthetic recipe (the quickstart): its ``bundle/`` is explained and its
``01_data/splits.csv`` names the test images, which are re-rendered with the generator's lesion record
(``synthetic.draw_with_lesions``: the same bytes the build trained and tested on). On every referable test image
with a painted lesion in the field, each method's heatmap plays the pointing game (``tlcompile.runtime.explain``):
hit when its peak is within the tolerance of a painted lesion. Printed per method: ms per image (the heatmap alone,
this CPU, the bundle's thread count), hit rate with a Wilson 95% CI, and the chance and field-centre baselines.

Methods: occlusion (the shipped one), occlusion with stride = patch (coarse), RISE with 256 and 512 masks, and
the white-box activation map (mean over channels of the last feature map, read as an extra output of the OpenVINO
IR: what OpenVINO XAI's ActivationMap inserts; recipro-CAM needs the XAI toolkit, whose releases pin an older
OpenVINO and numpy).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tlcompile.data import synthetic
from tlcompile.runtime import explain
from tlcompile.runtime.bundle import load_bundle
from tlcompile.runtime.preprocess import prepare_with_field, to_input


class ActivationMap:
    """OpenVINO IR with the global pool's input as an extra output: mean over channels, resized to the input."""

    def __init__(self, xml: Path, threads: int) -> None:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(xml))
        pools = [
            op
            for op in model.get_ordered_ops()
            if op.get_type_name() in ("ReduceMean", "AvgPool", "AdaptiveAvgPool")
            and len(op.input(0).get_partial_shape()) == 4
        ]
        feature = pools[-1].input(0).get_source_output()
        model.add_outputs([feature])
        self._compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads})
        self._request = self._compiled.create_infer_request()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self._request.infer({0: x})
        fmap = self._request.get_output_tensor(1).data[0]
        act = fmap.mean(axis=0).astype(np.float32)
        size = x.shape[-1]
        return np.asarray(Image.fromarray(act, "F").resize((size, size), Image.BILINEAR), dtype=np.float32)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("build", type=Path)
    ap.add_argument("--limit", type=int, default=0, help="at most this many referable test images (0: all)")
    ap.add_argument("--runtime", default=None, help="candidate runtime (default: the bundle's default candidate)")
    ap.add_argument("--artifact", default="fp32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--methods", default="occlusion,occlusion-coarse,rise256,rise512,activation")
    args = ap.parse_args()

    bundle = load_bundle(args.build / "bundle")
    if args.runtime:
        bundle = bundle.candidate(f"{args.artifact}@{args.runtime}")
    spec = bundle.preprocessing
    session = bundle.open_session(threads=args.threads)
    recipe = _recipe(args.build)
    d = recipe["data"]
    raw_size = int(round(d["image_size"] * 1.25))  # as data.datamodule._load_synthetic renders them
    difficulty = synthetic.DEFAULT_DIFFICULTY if d.get("difficulty") is None else d["difficulty"]
    rows = list(csv.DictReader(open(args.build / "01_data" / "splits.csv")))
    test = [int(r["image"].rsplit("_", 1)[1]) for r in rows if r["split"] == "test" and int(r["grade"]) >= 2]
    if args.limit:
        test = test[: args.limit]
    methods = args.methods.split(",")
    act = ActivationMap(bundle.model_path, session.threads) if "activation" in methods else None
    tol = explain.tolerance_px(spec.size)
    cases: dict[str, list] = {m: [] for m in methods}
    ms: dict[str, list[float]] = {m: [] for m in methods}
    for index in test:
        raw, grade, lesions = synthetic.draw_with_lesions(
            index, seed=recipe["seed"], size=raw_size, difficulty=difficulty, style=d.get("style", "default")
        )
        crop, found = prepare_with_field(raw, spec)
        if found is None:
            continue
        x = to_input(crop, spec)
        field = explain.field_mask(crop, spec)
        les = explain.to_network_frame(lesions, raw, spec)
        for m in methods:
            t0 = time.perf_counter()
            if m == "occlusion":
                heat = explain.occlusion_map(session, x, spec, temperature=bundle.temperature)
            elif m == "occlusion-coarse":  # stride = patch: a quarter of the passes
                patch = max(2, round(spec.size * explain.PATCH_FRACTION))
                heat = explain.occlusion_map(session, x, spec, temperature=bundle.temperature, stride=patch)
            elif m.startswith("rise"):
                heat = explain.rise_map(session, x, spec, temperature=bundle.temperature, masks=int(m[4:]))
            else:
                heat = act(x)
            ms[m].append((time.perf_counter() - t0) * 1e3)
            case = explain.pointing_case(heat, les, field, tol)
            if case is not None:
                cases[m].append(case)
    print(f"bundle {bundle.root} ({bundle.candidate_id}, {session.threads} threads), {len(test)} referable test images")
    print(f"{'method':<12} {'ms/image':>9} {'hit rate [95% CI]':>24} {'chance [CI]':>20} {'centre [CI]':>22}  n")
    for m in methods:
        g = explain.pointing_game(cases[m], tolerance=tol, size=spec.size)
        print(
            f"{m:<12} {np.median(ms[m]):>9.1f} {_fmt(g['hit_rate']):>24} {_fmt(g['chance']):>20} "
            f"{_fmt(g['centre']):>22}  {g['n']}"
        )
    print(f"tolerance {tol:.1f} px at {spec.size} px input; lesion pixel: painted opacity >= {explain.LESION_LEVEL}")
    return 0


def _fmt(p: dict) -> str:
    if p["value"] is None:
        return "-"
    lo, hi = p["ci"] or (float("nan"), float("nan"))
    return f"{p['value']:.3f} [{lo:.3f}, {hi:.3f}]"


def _recipe(build: Path) -> dict:
    import yaml

    path = build / "recipe.resolved.yaml"
    if path.exists():
        return yaml.safe_load(path.read_text())
    return json.loads((build / "report.json").read_text())["recipe"]


if __name__ == "__main__":
    sys.exit(main())
