"""Helper of ``benchmarks/arm_check.sh``: the parts that run inside Python, on the x86 host or under qemu-aarch64.

The shell script drives the steps; this file does the work that needs Python. Each subcommand reads and writes
plain files, so the same code runs on the host (the reference) and under emulation (the ARM box):

    apt-sources                       (host) the host's Debian apt sources, for arm64
    cpuinfo  ROOT --cpu NAME          (ARM) write ROOT/proc/cpuinfo and the sysfs MIDR files for the emulated CPU
    plan     WORK TARGET...           (host) the bundles, the model files beside them and the inputs to feed them
    probe    WORK/plan.json OUT.json  (both) logits of every model file per runtime configuration, and which ops ran
                                      in which precision (OpenVINO runtime model, ONNX Runtime profile)
    predict-check BUNDLE CSV [CSV_X86] (both) `tlcompile predict`'s CSV against the bundle's golden decisions
    report   WORK X86.json ARM.json.. (host) the parity and ops tables; exit 1 when a gated comparison fails

Only the standard library, numpy, openvino and onnxruntime are imported here (never torch, never tlcompile's
training side), so the helper runs on the aarch64 install of the core dependencies alone.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import sys
from collections import Counter
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------------------------- tolerances
# ARM against x86 on the same model file and inputs. FP32 graphs: the build's own export parity limit
# (recipe export.parity_max_abs_diff default, also the golden tolerance of an fp32 bundle). Quantized graphs: the
# golden tolerance tlcompile gives int8 bundles (tlcompile.export.bundle.INT8_LOGIT_TOLERANCE): two CPUs may round
# a requantisation step differently.
FP32_TOLERANCE = 1e-3
INT8_TOLERANCE = 0.05

# -------------------------------------------------------------------------------------- emulated CPU identity
# MIDR_EL1 of qemu's CPU models (qemu target/arm/cpu64.c); "max" is qemu's own ("Q", implementer 0).
QEMU_MIDR = {
    "a64fx": 0x461F0010,
    "cortex-a35": 0x411FD040,
    "cortex-a53": 0x410FD034,
    "cortex-a55": 0x412FD050,
    "cortex-a57": 0x411FD070,
    "cortex-a72": 0x410FD083,
    "cortex-a76": 0x414FD0B1,
    "neoverse-n1": 0x414FD0C1,
    "max": 0x000F0510,
}
# Linux arm64 AT_HWCAP / AT_HWCAP2 bits, in the order /proc/cpuinfo prints their names (arch/arm64/kernel/cpuinfo.c).
HWCAP_NAMES = (
    "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 "
    "sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg"
).split()
HWCAP2_NAMES = (
    "dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm svef32mm svef64mm svebf16 i8mm bf16 "
    "dgh rng bti mte ecv afp rpres mte3 sme smei16i64 smef64f64 smei8i32 smef16f32 smeb16f32 smef32f32 smefa64 wfxt "
    "ebf16 sveebf16"
).split()
AT_HWCAP, AT_HWCAP2 = 16, 26


def hwcap_features() -> list[str]:
    """The CPU features the (emulated) kernel reports to this process, by name; [] off Linux/aarch64."""
    import ctypes

    try:
        getauxval = ctypes.CDLL(None).getauxval
    except (OSError, AttributeError):
        return []
    getauxval.restype, getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
    caps, caps2 = getauxval(AT_HWCAP), getauxval(AT_HWCAP2)
    names = [n for i, n in enumerate(HWCAP_NAMES) if caps >> i & 1]
    return names + [n for i, n in enumerate(HWCAP2_NAMES) if caps2 >> i & 1]


def cpuinfo_text(features: list[str], midr: int, cores: int) -> str:
    """/proc/cpuinfo as an arm64 Linux kernel writes it."""
    block = (
        "processor\t: {i}\nBogoMIPS\t: 50.00\nFeatures\t: {features}\nCPU implementer\t: 0x{impl:02x}\n"
        "CPU architecture: 8\nCPU variant\t: 0x{var:x}\nCPU part\t: 0x{part:03x}\nCPU revision\t: {rev}\n\n"
    )
    fields = {"impl": midr >> 24 & 0xFF, "var": midr >> 20 & 0xF, "part": midr >> 4 & 0xFFF, "rev": midr & 0xF}
    return "".join(block.format(i=i, features=" ".join(features), **fields) for i in range(cores))


def cmd_cpuinfo(args: argparse.Namespace) -> int:
    """Under qemu-user the guest reads the host's x86 /proc/cpuinfo (qemu 7.2 passes it through); ONNX Runtime's
    cpuinfo library then crashes at import (SIGSEGV) and OpenVINO cannot read MIDR_EL1. qemu -L ROOT serves
    ROOT/<path> in place of <path> when it exists, so write the files an arm64 kernel would show for this CPU."""
    root = Path(args.root)
    features = hwcap_features()
    if platform.machine() != "aarch64" or not features:
        print(
            f"cpuinfo: run this under qemu-aarch64 (machine {platform.machine()}, hwcaps {features or 'none'})",
            file=sys.stderr,
        )
        return 2
    midr = QEMU_MIDR.get(args.cpu, QEMU_MIDR["max"])
    (root / "proc").mkdir(parents=True, exist_ok=True)
    (root / "proc" / "cpuinfo").write_text(cpuinfo_text(features, midr, args.cores))
    for i in range(args.cores):
        ident = root / "sys/devices/system/cpu" / f"cpu{i}" / "regs/identification"
        ident.mkdir(parents=True, exist_ok=True)
        (ident / "midr_el1").write_text(f"0x{midr:016x}\n")
        (ident / "revidr_el1").write_text(f"0x{0:016x}\n")
    print(f"{args.cpu}: MIDR 0x{midr:08x}; features: {' '.join(features)}")
    return 0


# ------------------------------------------------------------------------------------------- apt-sources
def cmd_apt_sources(args: argparse.Namespace) -> int:
    """The host's own Debian sources (its mirror, suites, components and keyring), restricted to arm64: the arm64
    Python comes from the same archive the host installs from, through apt itself. Prints sources.list lines."""
    codename = ""
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            codename = line.partition("=")[2].strip().strip('"')
    stanzas: list[dict[str, str]] = []
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            parts = line.split("#", 1)[0].split()
            if not parts or parts[0] != "deb":
                continue
            opts = {}
            if parts[1].startswith("["):
                end = next(i for i, p in enumerate(parts) if p.endswith("]"))
                for o in " ".join(parts[1 : end + 1]).strip("[]").split():
                    k, _, v = o.partition("=")
                    opts[k] = v
                parts = [parts[0], *parts[end + 1 :]]
            stanzas.append(
                {
                    "Types": "deb",
                    "URIs": parts[1],
                    "Suites": parts[2],
                    "Components": " ".join(parts[3:]),
                    "Signed-By": opts.get("signed-by", ""),
                }
            )
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for block in path.read_text().split("\n\n"):
            fields: dict[str, str] = {}
            for line in block.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                k, _, v = line.partition(":")
                fields[k.strip()] = v.strip()
            if fields.get("Enabled", "yes").lower() != "no":
                stanzas.append(fields)
    lines = []
    for st in stanzas:
        if "deb" not in st.get("Types", "").split():
            continue
        for uri in st.get("URIs", "").split():
            for suite in st.get("Suites", "").split():
                if codename and suite.split("-")[0] != codename:
                    continue  # third-party repositories (their own suites) have no Debian arm64 Python
                signed = f" signed-by={st['Signed-By']}" if st.get("Signed-By", "").startswith("/") else ""
                lines.append(f"deb [arch=arm64{signed}] {uri} {suite} {st.get('Components', 'main')}")
    if not lines:
        print(f"apt-sources: no Debian '{codename}' source found in /etc/apt", file=sys.stderr)
        return 2
    print("\n".join(dict.fromkeys(lines)))
    return 0


# ---------------------------------------------------------------------------------------------------- plan
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _quantized(path: Path) -> bool:
    """A quantized graph: QDQ/QLinear ops in an .onnx file, FakeQuantize or 8-bit weights in an OpenVINO IR."""
    data = path.read_bytes()
    if path.suffix == ".onnx":
        return any(op in data for op in (b"QuantizeLinear", b"QLinearConv", b"ConvInteger", b"MatMulInteger"))
    return b'type="FakeQuantize"' in data or b'element_type="i8"' in data or b'element_type="u8"' in data


def resolve_bundle(target: Path) -> Path:
    """A bundle folder, or a build folder holding bundle/."""
    if (target / "bundle.json").is_file():
        return target
    if (target / "bundle" / "bundle.json").is_file():
        return target / "bundle"
    raise SystemExit(f"plan: '{target}' is neither a bundle folder (bundle.json) nor a build folder with bundle/")


def bundle_candidates(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Every candidate (artifact@runtime) of a bundle with its model entry, runtime, golden tolerance and expected
    decisions. Format 2 lists them in ``candidates`` (their golden keys override the shared ``golden``); format 1
    has one, the top-level model."""
    listed = meta.get("candidates")
    if not isinstance(listed, list) or not listed:
        artifact = meta.get("artifact", {}).get("name", "?")
        listed = [
            {
                "id": meta.get("candidate_id") or f"{artifact}@{meta['model']['runtime']}",
                "model": meta["model"],
                "golden": {},
            }
        ]
    out = []
    for c in listed:
        golden = {**meta["golden"], **c.get("golden", {})}
        out.append(
            {
                "id": c["id"],
                "entry": c["model"]["entry"],
                "runtime": c["model"]["runtime"],
                "precision": c["model"].get("precision", "f32"),
                "tolerance": float(golden["tolerance"]["max_abs_logit"]),
                "expected": golden.get("expected", []),
            }
        )
    return out


def chosen_candidate(root: Path, meta: dict[str, Any]) -> str:
    """What predict runs: the candidate device.json pins (written by verify on this box), else the build's choice."""
    cands = [c["id"] for c in bundle_candidates(meta)]
    try:
        chosen = json.loads((root / "device.json").read_text())["chosen"]
        if chosen in cands:
            return chosen
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return meta.get("default_candidate") or cands[0]


def cmd_plan(args: argparse.Namespace) -> int:
    """Which model files to run, with which inputs: every candidate model of every bundle, plus every exported
    model of the build the bundle sits in (BUILD/NN_export/*.onnx, *.xml), each fed its bundle's golden network
    inputs and their mirror images (the same preprocessing, twice the samples)."""
    import numpy as np

    work = Path(args.work)
    (work / "inputs").mkdir(parents=True, exist_ok=True)
    bundles, models, seen = [], [], {}
    for n, target in enumerate(args.targets):
        root = resolve_bundle(Path(target).resolve())
        meta = json.loads((root / "bundle.json").read_text())
        with np.load(root / meta["golden"]["file"], allow_pickle=False) as npz:
            x = npz["inputs"].astype(np.float32)
        x = np.ascontiguousarray(np.concatenate([x, x[..., ::-1]], axis=0))
        inputs = work / "inputs" / f"bundle{n}.npy"
        np.save(inputs, x)
        cands = bundle_candidates(meta)
        bundles.append(
            {
                "index": n,
                "root": str(root),
                "name": meta.get("name", "?"),
                "format_version": meta.get("format_version"),
                "default_candidate": meta.get("default_candidate") or cands[0]["id"],
                "candidates": [{k: c[k] for k in ("id", "entry", "runtime", "precision", "tolerance")} for c in cands],
                "golden_images": [str(root / p) for p in meta["golden"]["images"]],
                "inputs": str(inputs),
                "input_shape": list(x.shape),
            }
        )
        candidates = [((root / c["entry"]).resolve(), f"bundle{n}:{c['entry']}", c) for c in cands]
        build = root.parent
        for export_dir in sorted(p for p in build.glob("[0-9][0-9]_export") if p.is_dir()):
            for path in sorted([*export_dir.glob("*.onnx"), *export_dir.glob("*.xml")]):
                candidates.append((path.resolve(), f"{build.name}/{export_dir.name}/{path.name}", None))
        for path, label, cand in candidates:
            digest = _sha256(path)
            if digest not in seen:
                fmt = "onnx" if path.suffix == ".onnx" else "openvino"
                seen[digest] = {
                    "label": label,
                    "also": [],
                    "path": str(path),
                    "format": fmt,
                    "quantized": _quantized(path),
                    "inputs": str(inputs),
                    "bundle": n,
                    "sha256": digest,
                    "candidates": [],
                }
                models.append(seen[digest])
            elif label != seen[digest]["label"]:  # a bundle's model is a copy of an exported one: run it once
                seen[digest]["also"].append(label)
            if cand is not None:
                seen[digest]["candidates"].append(
                    {"id": f"bundle{n}:{cand['id']}", "runtime": cand["runtime"], "tolerance": cand["tolerance"]}
                )
    plan = {"work": str(work.resolve()), "bundles": bundles, "models": models}
    (work / "plan.json").write_text(json.dumps(plan, indent=2))
    for b in bundles:
        print(
            f"  bundle{b['index']}: {b['root']}: {b['name']}, format {b['format_version']}, "
            f"{len(b['golden_images'])} golden images; candidates {', '.join(c['id'] for c in b['candidates'])} "
            f"(build's choice {b['default_candidate']})"
        )
    print("  model files, each run on both machines with its bundle's golden inputs and their mirror images:")
    for m in models:
        names = " = ".join([m["label"], *m["also"]])
        role = (
            ", ".join(f"candidate {c['id']} (tolerance {c['tolerance']:g})" for c in m["candidates"])
            or "not in a bundle"
        )
        print(f"  {names}: {m['format']}, {'quantized' if m['quantized'] else 'fp32'}; {role}")
    return 0


# --------------------------------------------------------------------------------------------------- probe
# Layer types that only hold or pass data; left out of the ops tables (they are not executed kernels).
_OV_SKIP = {"Const", "Input", "Output", "Parameter", "Result"}
_OV_COMPUTE = {"Convolution", "GroupConvolution", "FullyConnected", "MatMul", "Deconvolution"}
_ORT_QUANT_TYPES = {"uint8", "int8"}


def _ov_probe(core: Any, path: str, x: Any, threads: int, hint: str | None) -> dict[str, Any]:
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
    if hint:
        config["INFERENCE_PRECISION_HINT"] = hint
    compiled = core.compile_model(path, "CPU", config)
    request = compiled.create_infer_request()
    import numpy as np

    outs = []
    for i in range(x.shape[0]):  # batch 1, as a clinic's box decides one photo at a time
        request.infer({0: x[i : i + 1]})
        outs.append(np.array(request.get_output_tensor(0).data, copy=True))
    counts: Counter[tuple[str, str]] = Counter()
    prims: dict[tuple[str, str], Counter[str]] = {}
    compute: Counter[str] = Counter()
    lowered: list[str] = []  # compute ops that run in f16/bf16 although f32 was asked for
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "layerType" not in info:
            continue
        layer = info["layerType"].astype(str)
        prec = info["runtimePrecision"].astype(str).lower() if "runtimePrecision" in info else "?"
        if layer in _OV_SKIP:
            continue
        counts[(layer, prec)] += 1
        prim = info["primitiveType"].astype(str) if "primitiveType" in info else "?"
        prims.setdefault((layer, prec), Counter())[prim] += 1
        if layer in _OV_COMPUTE:
            compute[prec] += 1
            if hint == "f32" and prec in ("f16", "bf16"):
                lowered.append(f"{op.get_friendly_name()} ({prec}, {prim})")
    hint_value = compiled.get_property("INFERENCE_PRECISION_HINT")
    return {
        "logits": np.concatenate(outs, axis=0).tolist(),
        "precision_hint": hint_value.to_string() if hasattr(hint_value, "to_string") else str(hint_value),
        "exec_precision": compute.most_common(1)[0][0] if compute else "?",
        "ops": [
            [layer, prec, n, dict(prims[(layer, prec)].most_common())] for (layer, prec), n in sorted(counts.items())
        ],
        "lowered": lowered,
    }


def _ort_probe(path: str, x: Any, threads: int, work: Path) -> dict[str, Any]:
    import numpy as np
    import onnxruntime as ort

    def session(profile: bool) -> Any:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # what tlcompile's session uses
        opts.log_severity_level = 3
        if profile:
            opts.enable_profiling = True
            opts.profile_file_prefix = str(work / f"ort-profile-{os.getpid()}")
        return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])

    sess = session(False)
    name = sess.get_inputs()[0].name
    logits = np.concatenate([sess.run(None, {name: x[i : i + 1]})[0] for i in range(x.shape[0])], axis=0)
    # One profiled run: every kernel that executed, with its op type and the element types of its inputs.
    prof = session(True)
    prof.run(None, {name: x[:1]})
    trace = Path(prof.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    nodes: dict[str, tuple[str, str, str]] = {}
    for ev in events:
        if ev.get("cat") != "Node" or not ev.get("name", "").endswith("_kernel_time"):
            continue
        a = ev.get("args", {})
        types = [next(iter(t)) for t in a.get("input_type_shape", []) if t]
        quant = sorted({t for t in types if t in _ORT_QUANT_TYPES})
        dtype = "/".join(quant) if quant else (types[0] if types else "?")
        nodes[ev["name"]] = (a.get("op_name", "?"), dtype, a.get("provider", "?"))
    counts = Counter((op, dtype) for op, dtype, _ in nodes.values())
    providers = Counter(p for _, _, p in nodes.values())
    quantized_kernels = sum(
        n
        for (op, dtype), n in counts.items()
        if set(dtype.split("/")) & _ORT_QUANT_TYPES
        and op.startswith(("QLinear", "QGemm", "ConvInteger", "MatMulInteger", "DynamicQuantize"))
    )
    return {
        "logits": logits.tolist(),
        "precision_hint": "-",
        "exec_precision": "int8" if quantized_kernels else "f32",
        "ops": [[op, dtype, n, dict(providers)] for (op, dtype), n in sorted(counts.items())],
    }


def _machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "machine": platform.machine(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
    }
    try:
        from tlcompile.runtime.cpuinfo import cpu_info  # torch-free; what tlcompile itself reports about this box

        info["tlcompile_cpu_info"] = cpu_info()
    except Exception as err:  # noqa: BLE001 - informative only
        info["tlcompile_cpu_info"] = f"unavailable: {err}"
    info["hwcaps"] = hwcap_features() if platform.machine() == "aarch64" else []
    for mod in ("numpy", "onnxruntime", "openvino", "PIL"):
        try:
            info[f"{mod}_version"] = __import__(mod).__version__
        except Exception as err:  # noqa: BLE001
            info[f"{mod}_version"] = f"unavailable: {err}"
    return info


def cmd_probe(args: argparse.Namespace) -> int:
    import numpy as np

    plan = json.loads(Path(args.plan).read_text())
    work = Path(args.out).parent
    out: dict[str, Any] = {"machine": _machine_info(), "results": [], "errors": []}
    core = None
    try:
        import openvino as ov

        core = ov.Core()
        hint = core.get_property("CPU", "INFERENCE_PRECISION_HINT")
        out["machine"]["openvino_cpu"] = {
            "device_name": str(core.get_property("CPU", "FULL_DEVICE_NAME")),
            "default_inference_precision_hint": hint.to_string() if hasattr(hint, "to_string") else str(hint),
            "optimization_capabilities": [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")],
        }
    except Exception as err:  # noqa: BLE001 - recorded; every OpenVINO row then fails
        out["errors"].append(f"openvino: {err}")
    for m in plan["models"]:
        x = np.load(m["inputs"])
        configs = [("onnxruntime", None)] if m["format"] == "onnx" else [("openvino", "f32"), ("openvino", None)]
        for runtime, hint in configs:
            row = {"model": m["label"], "runtime": runtime, "config": hint or "default"}
            try:
                if runtime == "openvino":
                    if core is None:
                        raise RuntimeError("openvino did not import")
                    row.update(_ov_probe(core, m["path"], x, args.threads, hint))
                else:
                    row.update(_ort_probe(m["path"], x, args.threads, work))
            except Exception as err:  # noqa: BLE001 - a model that cannot run here is a result
                row["error"] = (
                    f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300] if str(err).strip() else ''}"
                )
            out["results"].append(row)
            state = row.get("error") or f"ran in {row['exec_precision']} (precision hint {row['precision_hint']})"
            print(f"  {m['label']}: {runtime} {row['config']}: {state}", flush=True)
    Path(args.out).write_text(json.dumps(out))
    return 0


# ------------------------------------------------------------------------------------------- predict-check
def _read_csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {Path(r["file"]).name: r for r in csv.DictReader(f)}


def cmd_predict_check(args: argparse.Namespace) -> int:
    """`tlcompile predict`'s CSV on the golden images must give the golden decisions of the candidate it ran (the one
    verify pinned on this box, else the build's choice); with the x86 CSV, say how far the two are apart."""
    root = resolve_bundle(Path(args.bundle))
    meta = json.loads((root / "bundle.json").read_text())
    cid = chosen_candidate(root, meta)
    expected = next(c["expected"] for c in bundle_candidates(meta) if c["id"] == cid)
    got = _read_csv(Path(args.csv))
    problems, max_dp = [], 0.0
    for exp in expected:
        name = Path(exp["image"]).name
        row = got.get(name)
        if row is None:
            problems.append(f"{name}: not in the predict output")
            continue
        if row.get("error"):
            problems.append(f"{name}: {row['error']}")
            continue
        if row["referral"] != exp["referral"]:
            problems.append(f"{name}: referral '{row['referral']}', the build said '{exp['referral']}'")
        if exp.get("referable_dr_probability") is not None and row.get("referable_dr_probability"):
            max_dp = max(max_dp, abs(float(row["referable_dr_probability"]) - exp["referable_dr_probability"]))
    if not expected:
        problems.append(f"bundle.json has no golden expected decisions for {cid}")
    line = (
        f"  predict ran {cid}: {len(got)} images; "
        f"{len(expected) - len(problems)}/{len(expected)} decisions as the build's "
        f"golden samples; max |ΔP(referable DR)| vs build {max_dp:.2e}"
    )
    if args.reference:
        ref_root = Path(args.reference_bundle) if args.reference_bundle else root
        ref_cid = chosen_candidate(resolve_bundle(ref_root), meta)
        if ref_cid != cid:
            line += f"; x86 predict ran {ref_cid} (pinned there), so the two are not compared image by image"
        else:
            ref = _read_csv(Path(args.reference))
            common = [
                n
                for n in got
                if n in ref and got[n].get("referable_dr_probability") and ref[n].get("referable_dr_probability")
            ]
            dp = max(
                (
                    abs(float(got[n]["referable_dr_probability"]) - float(ref[n]["referable_dr_probability"]))
                    for n in common
                ),
                default=float("nan"),
            )
            same = sum(got[n]["referral"] == ref[n]["referral"] for n in common)
            line += f"; vs x86 predict ({ref_cid}): {same}/{len(common)} same referral, max |ΔP| {dp:.2e}"
    print(line)
    for p in problems:
        print(f"    {p}")
    return 1 if problems else 0


# -------------------------------------------------------------------------------------------------- report
def _max_abs(a: Any, b: Any) -> float:
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.abs(a - b).max())


def _top1(a: Any, b: Any) -> str:
    import numpy as np

    a, b = np.asarray(a), np.asarray(b)
    return f"{int((a.argmax(1) == b.argmax(1)).sum())}/{a.shape[0]}" if a.shape == b.shape else "-"


def _table(headers: list[str], rows: list[list[str]], indent: str = "  ") -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=False)]
    fmt = lambda r: indent + "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)).rstrip()  # noqa: E731
    return "\n".join([fmt(headers), indent + "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)])


def _roles(model: dict[str, Any], runtime: str, config: str) -> list[dict[str, Any]]:
    """The bundle candidates a row stands for: the candidate's model file on the candidate's runtime, in the
    configuration the bundle runs it with (OpenVINO with f32 pinned; ONNX Runtime). [] for a row reported only."""
    runs_as = "f32" if runtime == "openvino" else "default"
    return [c for c in model.get("candidates", []) if c["runtime"] == runtime and config == runs_as]


def _file_tolerance(plan: dict[str, Any], model: dict[str, Any]) -> float:
    """For a row that is not a candidate: the golden tolerance its bundle gives candidates of the same kind (fp32 or
    quantized), else tlcompile's defaults."""
    same_kind = [
        c["tolerance"]
        for m in plan["models"]
        if m.get("bundle") == model.get("bundle") and m.get("quantized") == model.get("quantized")
        for c in m.get("candidates", [])
    ]
    return min(same_kind) if same_kind else INT8_TOLERANCE if model.get("quantized") else FP32_TOLERANCE


def compare(
    plan: dict[str, Any], x86: dict[str, Any], arm: dict[str, Any], running: set[str], strict: bool
) -> tuple[list[list[str]], list[str], list[str]]:
    """One row per model file and runtime configuration: ARM against x86 on the same inputs.

    Roles: 'runs' is the candidate predict runs on this ARM box (verify's pin): beyond its golden tolerance the check
    fails. 'candidate' is another candidate of the bundle: beyond tolerance it is a warning (verify leaves a candidate
    that does not reproduce its golden outputs unpinned on this box), a failure with strict. 'info' rows are reported
    only, against the tolerance a bundle would give the file; OpenVINO's default-hint rows are compared with x86 at
    f32, the precision the golden outputs were made in."""
    models = {m["label"]: m for m in plan["models"]}
    ref = {(r["model"], r["runtime"], r["config"]): r for r in x86["results"]}
    rows, failures, warnings = [], [], []
    for r in arm["results"]:
        m = models.get(r["model"], {})
        cands = _roles(m, r["runtime"], r["config"])
        runs = [c for c in cands if c["id"] in running]
        role = "runs" if runs else "candidate" if cands else "info"
        tol = min(c["tolerance"] for c in cands) if cands else _file_tolerance(plan, m)
        same = ref.get((r["model"], r["runtime"], r["config"]), {})
        default_row = r["runtime"] == "openvino" and r["config"] == "default"
        base = ref.get((r["model"], r["runtime"], "f32"), {}) if default_row else same
        label = f"openvino, {r['config']} hint" if r["runtime"] == "openvino" else r["runtime"]
        names = ", ".join(c["id"] for c in cands) or "not a candidate"
        if "error" in r or "error" in base or not base:
            d, within = None, False
            detail = r.get("error") or base.get("error") or "no x86 result"
        else:
            d = _max_abs(r["logits"], base["logits"])
            within = d <= tol
            detail = f"max |Δlogit| ARM vs x86 {d:.2e} > tolerance {tol:g}"
        if within:
            verdict = "PASS" if role != "info" else "within"
        elif role == "runs" or (role == "candidate" and strict):
            verdict = "FAIL"
            failures.append(f"{r['model']} on {label} ({names}): {detail}")
        elif role == "candidate":
            verdict = "WARN"
            warnings.append(f"{r['model']} on {label} ({names}, not pinned on this box): {detail}")
        else:
            verdict = "over" if d is not None else "error"
            warnings.append(f"{r['model']} on {label} (reported only): {detail}")
        vs = "x86 f32 hint" if default_row else "x86, same"
        if default_row and same and "error" not in same and d is not None:
            vs += f" ({_max_abs(r['logits'], same['logits']):.1e} vs x86 {same['precision_hint']} hint)"
        rows.append(
            [
                r["model"],
                label,
                r.get("exec_precision", "-"),
                base.get("exec_precision", "-"),
                f"{d:.2e}" if d is not None else "ERROR",
                vs,
                f"{tol:g}",
                _top1(r["logits"], base["logits"]) if d is not None else "-",
                f"{role}: {verdict}",
            ]
        )
    return rows, failures, warnings


def _running(plan: dict[str, Any], cpu: str) -> set[str]:
    """The candidate predict runs on the ARM box, per bundle: what verify pinned in the ARM copy's device.json."""
    work = Path(plan.get("work", "."))
    out = set()
    for b in plan["bundles"]:
        copy = work / "bundles" / f"{cpu}-{b['index']}"
        root = copy if (copy / "bundle.json").is_file() else Path(b["root"])
        out.add(f"bundle{b['index']}:{chosen_candidate(root, json.loads((root / 'bundle.json').read_text()))}")
    return out


def cmd_report(args: argparse.Namespace) -> int:
    plan = json.loads(Path(args.plan).read_text())
    x86 = json.loads(Path(args.x86).read_text())
    status = 0
    for arm_path in args.arm:
        arm = json.loads(Path(arm_path).read_text())
        cpu = Path(arm_path).stem.removeprefix("probe-arm-")
        am, xm = arm["machine"], x86["machine"]
        print(f"\n-- machines ({cpu}) --")
        for who, m in (("ARM", am), ("x86", xm)):
            ovc = m.get("openvino_cpu", {})
            tci = m.get("tlcompile_cpu_info", {})
            isa = ",".join(tci.get("isa", [])) if isinstance(tci, dict) else tci
            print(
                f"  {who}: platform.machine() {m['machine']}; python {m['python']}; numpy {m['numpy_version']}, "
                f"onnxruntime {m['onnxruntime_version']}, openvino {m['openvino_version']}, Pillow {m['PIL_version']}"
            )
            print(
                f"       tlcompile cpu_info: machine {tci.get('machine') if isinstance(tci, dict) else '?'}, model "
                f"'{tci.get('model') if isinstance(tci, dict) else '?'}', isa [{isa}]"
            )
            print(
                f"       OpenVINO CPU: '{ovc.get('device_name', '?')}'; default INFERENCE_PRECISION_HINT "
                f"{ovc.get('default_inference_precision_hint', '?')}; capabilities "
                f"{','.join(ovc.get('optimization_capabilities', []))}"
            )
            if m.get("hwcaps"):
                print(f"       hwcaps (AT_HWCAP/AT_HWCAP2): {' '.join(m['hwcaps'])}")
        for e in arm.get("errors", []):
            print(f"  ARM error: {e}")

        running = _running(plan, cpu)
        rows, failures, warnings = compare(plan, x86, arm, running, args.strict)
        print(
            f"\n-- parity: the same model file and inputs on ARM ({cpu}) vs x86: max |Δlogit| over "
            f"{plan['bundles'][0]['input_shape'][0]} inputs (golden + mirrored), batch 1 --"
        )
        print(
            _table(
                [
                    "model file",
                    "runtime",
                    "ARM ran",
                    "x86 ran",
                    "max|Δlogit|",
                    "ARM vs",
                    "tolerance",
                    "top-1",
                    "role: result",
                ],
                rows,
            )
        )
        print(
            "  runs: the candidate verify pinned on this ARM box, "
            f"which predict runs ({', '.join(sorted(running))}); candidate: "
            "another candidate of the bundle, in the configuration the bundle runs it with; both held to their golden "
            "tolerance. info: reported only (tolerance a bundle would give the file)."
        )

        print(f"\n-- ops that ran on ARM ({cpu}): (layer or op type, runtime precision) -> count --")
        for r in arm["results"]:
            head = f"  {r['model']} on {r['runtime']}" + (f", {r['config']} hint" if r["runtime"] == "openvino" else "")
            if "error" in r:
                print(f"{head}: ERROR {r['error']}")
                continue
            print(f"{head}: precision hint {r['precision_hint']}; compute ops in {r['exec_precision']}")
            if r["runtime"] == "openvino":
                table = [
                    [op, prec, str(n), ", ".join(f"{k} x{v}" for k, v in prims.items())]
                    for op, prec, n, prims in r["ops"]
                ]
                print(_table(["layerType", "runtimePrecision", "count", "primitiveType"], table, indent="      "))
                if r.get("lowered"):
                    print(f"      not in f32 despite the f32 hint: {'; '.join(r['lowered'])}")
            else:
                table = [[op, dtype, str(n), ", ".join(provs)] for op, dtype, n, provs in r["ops"]]
                print(_table(["op_type", "input dtype", "count", "provider"], table, indent="      "))
        print("\n-- the same on x86 (compute ops only) --")
        for r in x86["results"]:
            if "error" in r:
                print(f"  {r['model']} on {r['runtime']} {r['config']}: ERROR {r['error']}")
                continue
            compute = [
                f"{op}:{prec} x{n}"
                for op, prec, n, _ in r["ops"]
                if op in _OV_COMPUTE or op.startswith(("Conv", "QLinear", "QGemm", "Gemm", "MatMul", "FusedConv"))
            ]
            print(
                f"  {r['model']} on {r['runtime']}"
                + (f", {r['config']} hint" if r["runtime"] == "openvino" else "")
                + f": hint {r['precision_hint']}: {', '.join(compute)}"
            )
        passed = sum(1 for r in rows if r[-1].endswith(": PASS"))
        if warnings:
            print(f"\nwarnings ({cpu}):")
            for w in warnings:
                print(f"  {w}")
        if failures:
            status = 1
            print(f"\nparity on ARM ({cpu}): FAIL")
            for f in failures:
                print(f"  {f}")
        else:
            unreproduced = sum(1 for r in rows if r[-1] == "candidate: WARN")
            print(
                f"\nparity on ARM ({cpu}): PASS ({passed} bundle-candidate comparison(s) within golden tolerance"
                + (f"; {unreproduced} other candidate(s) not reproducible here, see warnings" if unreproduced else "")
                + ")"
            )
    return status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("cpuinfo")
    s.add_argument("root")
    s.add_argument("--cpu", required=True)
    s.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    s.set_defaults(fn=cmd_cpuinfo)
    s = sub.add_parser("apt-sources")
    s.set_defaults(fn=cmd_apt_sources)
    s = sub.add_parser("plan")
    s.add_argument("work")
    s.add_argument("targets", nargs="+")
    s.set_defaults(fn=cmd_plan)
    s = sub.add_parser("probe")
    s.add_argument("plan")
    s.add_argument("out")
    s.add_argument("--threads", type=int, default=2)
    s.set_defaults(fn=cmd_probe)
    s = sub.add_parser("predict-check")
    s.add_argument("bundle")
    s.add_argument("csv")
    s.add_argument("reference", nargs="?", help="the x86 predict CSV")
    s.add_argument("reference_bundle", nargs="?", help="the bundle copy the x86 predict ran on (its device.json)")
    s.set_defaults(fn=cmd_predict_check)
    s = sub.add_parser("report")
    s.add_argument("plan")
    s.add_argument("x86")
    s.add_argument("arm", nargs="+")
    s.add_argument(
        "--strict", action="store_true", help="fail on any bundle candidate beyond tolerance, not only the pinned one"
    )
    s.set_defaults(fn=cmd_report)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
