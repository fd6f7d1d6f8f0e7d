#!/usr/bin/env bash
# Prove that `tlcompile verify` and `tlcompile predict` work on linux-aarch64 with golden parity, on an x86 Debian
# host, under qemu-user: an arm64 CPython from Debian's own arm64 packages, the aarch64 wheels of tlcompile's core
# dependencies (numpy, Pillow, onnxruntime, openvino, typer, rich, pydantic, PyYAML ... at the host venv's versions),
# and this repository's tlcompile on PYTHONPATH (the runtime half never imports torch; the ARM side has none).
#
#   benchmarks/arm_check.sh [--cpu NAME[,NAME...]] [BUNDLE_OR_BUILD_DIR ...]
#
# With no folder it builds a tiny bundle once (cached): fp32 and int8 candidates on OpenVINO and ONNX Runtime.
# A folder is a bundle (bundle.json) or a build folder holding bundle/; the build's exported models
# (BUILD/NN_export/*.onnx, *.xml) are compared too. For the quickstart: benchmarks/arm_check.sh runs/quickstart
#
# Per bundle, under qemu-aarch64: `python -m tlcompile.cli verify` (manifest + golden parity, PASS/FAIL) and
# `python -m tlcompile.cli predict` on the golden images (decisions checked against the build's). Per model file:
# logits on ARM vs on this x86 host for the same inputs, and which ops ran in which precision (OpenVINO runtime
# model rt_info; ONNX Runtime profile), for OpenVINO both with f32 pinned (as bundles run) and at its default
# precision hint. Latency under emulation means nothing: none is reported (verify's own timings are blanked).
#
# Environment: ARM_CACHE (default ~/.cache/tlcompile-arm: sysroot, wheels, tiny bundles, last run's files),
# ARM_CPU or --cpu (qemu CPU models, comma-separated; default cortex-a76: ARMv8.2 with fp16 and dot product, as in a
# Raspberry Pi 5 or Graviton2; cortex-a72 is plain ARMv8.0, as in a Raspberry Pi 4; `qemu-aarch64 -cpu help` lists
# them), ARM_THREADS (default 2),
# ARM_STRICT=1 (fail when any bundle candidate, not only the one verify pins, is beyond its golden tolerance on ARM),
# HOST_PY (default REPO/.venv/bin/python), ARM_REBUILD=1 (rebuild the tiny bundle), ARM_VERIFY_ARGS (extra options of
# the ARM verify, e.g. --no-pin to skip its emulated benchmark and pin).
# Exit: 0 PASS; 1 parity FAIL (verify FAIL, predict's decisions, or the pinned candidate's logits ARM vs x86 beyond
# its golden tolerance); 2 a step could not be done.
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HELPER="$REPO/benchmarks/arm_check.py"
CACHE=${ARM_CACHE:-$HOME/.cache/tlcompile-arm}
CPUS=${ARM_CPU:-cortex-a76}
THREADS=${ARM_THREADS:-2}
HOST_PY=${HOST_PY:-$REPO/.venv/bin/python}
TARGETS=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --cpu) CPUS=$2; shift 2 ;;
    --cpu=*) CPUS=${1#--cpu=}; shift ;;
    -h|--help) sed -n '2,27p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "arm_check: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) TARGETS+=("$(cd "$1" 2>/dev/null && pwd || echo "$1")"); shift ;;
  esac
done
IFS=', ' read -r -a CPU_LIST <<<"$CPUS"
WORK="$CACHE/work"
LOGS="$WORK/logs"
NSTEPS=8
STEP_NO=0
STEP_NAME=start
START=$SECONDS
export TLCOMPILE_NUM_THREADS=$THREADS PYTHONDONTWRITEBYTECODE=1

step() { STEP_NO=$1; STEP_NAME=$2; printf '\n== [%s/%s] %s ==\n' "$1" "$NSTEPS" "$2"; }
die() {  # die MESSAGE [LOGFILE]: the log's tail for diagnosis, then one line naming the step
  if [[ -n ${2:-} && -s ${2:-} ]]; then
    echo "  --- last lines of $2 ---" >&2
    tail -n 15 "$2" | sed 's/^/  | /' >&2
  fi
  echo "arm_check: FAILED at step $STEP_NO/$NSTEPS ($STEP_NAME): $1" >&2
  exit 2
}
trap 'die "unexpected error in: $BASH_COMMAND (line $LINENO)"' ERR
quiet() { local log=$1; shift; "$@" >"$log" 2>&1; }  # quiet LOG cmd...: all output to LOG
# show LOG PREFIX: a log, less OpenVINO's aarch64 notices; of a Python traceback only its last lines (the error).
show() {
  if grep -q '^Traceback (most recent call last)' "$1"; then
    echo "${2}(raised a Python traceback, full text in $1; its last lines:)"
    { grep -vE '^src/plugins/|^[[:space:]]*$' "$1" || true; } | tail -n 4 | sed "s/^/$2/"
  else
    { grep -vE '^src/plugins/|^[[:space:]]*$' "$1" || true; } | sed "s/^/$2/"
  fi
}
# verify writes device.json (its pin for this CPU) into the bundle: each machine works on its own copy, and the
# bundles given are never modified.
copy_bundle() { rm -rf "$2" && mkdir -p "$(dirname "$2")" && cp -a "$1" "$2" && rm -f "$2/device.json"; }
# Latency under emulation means nothing: verify's timing figures are blanked, its checks shown as printed.
no_latency() { sed -E 's/; p50 [0-9.]+ ms, p90 [0-9.]+ ms \(spread [0-9.]+\)//; s/[0-9]+(\.[0-9]+)? ms/[latency not shown]/g; s/ \(spread [0-9.]+\)//g'; }
last_error() { { grep -vE '^src/plugins/|^[[:space:]]*$' "$1" || true; } | tail -n 1 | sed 's/^[[:space:]]*//' | cut -c1-300; }
golden_images() { "$HOST_PY" -c "import json,sys; [print(p) for p in json.load(open(sys.argv[1]))['bundles'][int(sys.argv[2])]['golden_images']]" "$WORK/plan.json" "$1"; }

# ------------------------------------------------------------------------------------------------- preflight
step 1 "preflight: host tools, cache $CACHE"
[[ -r /etc/os-release ]] && . /etc/os-release
[[ ${ID:-} == debian ]] || die "needs a Debian host (apt with Debian's arm64 archive); this is '${PRETTY_NAME:-unknown}'"
CODENAME=${VERSION_CODENAME:?}
command -v qemu-aarch64 >/dev/null || die "qemu-aarch64 not on PATH: apt-get install qemu-user"
for tool in apt-get apt-cache dpkg-deb flock sha256sum; do
  command -v $tool >/dev/null || die "'$tool' not found"
done
[[ -x $HOST_PY ]] || die "no host Python at $HOST_PY (make the venv: make test, or set HOST_PY)"
"$HOST_PY" -c "import tlcompile.cli, numpy, openvino, onnxruntime" 2>/dev/null \
  || die "$HOST_PY cannot import tlcompile with its runtimes (pip install -e $REPO)"
QEMU_CPUS=" $( (qemu-aarch64 -cpu help || true) | tail -n +2 | xargs) "  # it exits 1 after listing
for cpu in "${CPU_LIST[@]}"; do
  [[ $QEMU_CPUS == *" $cpu "* ]] || die "qemu-aarch64 has no CPU model '$cpu'; valid:$QEMU_CPUS"
done
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock -n 9 || die "another arm_check.sh holds $CACHE/.lock; wait for it or set ARM_CACHE"
rm -rf "$WORK" && mkdir -p "$LOGS"
echo "  host: $(uname -m), Debian $CODENAME, $(qemu-aarch64 --version | head -n 1); host Python $("$HOST_PY" -c 'import sys; print(sys.version.split()[0])')"
echo "  emulated CPU model(s): ${CPU_LIST[*]}; inference threads $THREADS; work files in $WORK"

# ------------------------------------------------------------------------------------------ arm64 CPython
step 2 "arm64 CPython from Debian $CODENAME's arm64 packages (apt-get download + dpkg-deb -x)"
APT="$CACHE/apt"
mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/state"
touch "$APT/status"
"$HOST_PY" "$HELPER" apt-sources >"$APT/sources.list.new" 2>"$LOGS/apt-sources.log" \
  || die "cannot derive arm64 sources from /etc/apt" "$LOGS/apt-sources.log"
mv "$APT/sources.list.new" "$APT/sources.list"
# A private apt state: the host's dpkg architectures and package lists stay untouched.
APT_OPTS=(-o "Dir::State=$APT/state" -o "Dir::State::Lists=$APT/lists" -o "Dir::State::status=$APT/status"
  -o "Dir::Cache=$APT/cache" -o "Dir::Etc::SourceList=$APT/sources.list" -o "Dir::Etc::SourceParts=/nonexistent"
  -o "APT::Architecture=arm64" -o "APT::Architectures::=arm64" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root")
if [[ ! -s $APT/.updated || -n $(find "$APT/.updated" -mmin +1440 2>/dev/null) ]]; then
  quiet "$LOGS/apt-update.log" apt-get "${APT_OPTS[@]}" update || die "apt-get update (arm64 lists) failed" "$LOGS/apt-update.log"
  date >"$APT/.updated"
fi
PYVER=$(apt-cache "${APT_OPTS[@]}" show python3-minimal 2>/dev/null | grep -E '^(Pre-)?Depends:' | grep -o 'python3\.[0-9]*-minimal' | head -n 1 | sed 's/^python//; s/-minimal$//') || true
[[ -n $PYVER ]] || die "no arm64 python3-minimal in Debian $CODENAME's lists"
# python and libstdc++/libgomp (the wheels' C++ runtime), with their library dependencies; not perl/dpkg/tar, which
# the mime and install helpers pull in and Python never runs.
PKGS=$(apt-cache "${APT_OPTS[@]}" depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
  --no-replaces --no-enhances "python$PYVER-minimal" "libpython$PYVER-stdlib" libstdc++6 libgomp1 2>"$LOGS/apt-depends.log" \
  | grep -v '^ ' | grep -v '^<' | sort -u \
  | grep -vE '^(dpkg|install-info|perl|perl-base|perl-modules-.*|libperl.*|mailcap|mime-support|tar|debconf.*)$' | xargs) \
  || die "apt-cache depends failed" "$LOGS/apt-depends.log"
SYSROOT="$CACHE/sysroot-$CODENAME-arm64"
PYBIN="$SYSROOT/usr/bin/python$PYVER"
if [[ ! -f $SYSROOT/.complete || $(cat "$SYSROOT/.complete") != "$PKGS" ]]; then
  DEBS="$CACHE/debs"
  mkdir -p "$DEBS"
  (cd "$DEBS" && quiet "$LOGS/apt-download.log" apt-get "${APT_OPTS[@]}" download $PKGS) \
    || die "apt-get download of the arm64 packages failed" "$LOGS/apt-download.log"
  rm -rf "$SYSROOT.tmp" && mkdir -p "$SYSROOT.tmp"
  for pkg in $PKGS; do
    deb=$(ls -t "$DEBS/${pkg}_"*_arm64.deb "$DEBS/${pkg}_"*_all.deb 2>/dev/null | head -n 1) || true
    [[ -n $deb ]] || die "package $pkg was not downloaded"
    dpkg-deb -x "$deb" "$SYSROOT.tmp" || die "dpkg-deb -x $deb failed"
  done
  echo "$PKGS" >"$SYSROOT.tmp/.complete"
  rm -rf "$SYSROOT" && mv "$SYSROOT.tmp" "$SYSROOT"
  echo "  unpacked $(wc -w <<<"$PKGS") packages into $SYSROOT"
else
  echo "  cached: $SYSROOT"
fi
[[ -x $PYBIN ]] || die "$PYBIN missing after unpacking"
GLIBC=$(apt-cache "${APT_OPTS[@]}" show libc6 2>/dev/null | grep -m1 '^Version:' | grep -o '2\.[0-9]*' | head -n 1) || true
[[ -n $GLIBC ]] || die "cannot tell the arm64 glibc version from the package lists"
echo "  python$PYVER (arm64) $(qemu-aarch64 -L "$SYSROOT" "$PYBIN" -S -c 'import platform, sys; print(sys.version.split()[0], "on", platform.machine())' 2>&1); glibc $GLIBC"

# ------------------------------------------------------------------------------------------ aarch64 wheels
step 3 "aarch64 wheels of tlcompile's core dependencies, at the host venv's versions (pip download --platform)"
CORE=$("$HOST_PY" - "$REPO/pyproject.toml" <<'EOF'
import re, sys, tomllib
from importlib.metadata import version
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
names = [re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0] for d in deps]
print(" ".join(f"{n}=={version(n)}" for n in names))
EOF
) || die "cannot read the core dependencies from pyproject.toml and the host venv"
"$HOST_PY" -m pip freeze 2>/dev/null | grep -vE '^(-e |#)| @ ' >"$WORK/constraints.txt" || true
PLATFORMS=(--platform manylinux2014_aarch64)
for minor in $(seq 17 "${GLIBC#2.}"); do PLATFORMS+=(--platform "manylinux_2_${minor}_aarch64"); done
PIP_TARGET_OPTS=(--only-binary=:all: "${PLATFORMS[@]}" --python-version "$PYVER" --implementation cp)
KEY=$( (echo "$CORE"; echo "${PIP_TARGET_OPTS[*]}") | sha256sum | cut -c1-12)  # the pins decide the install
SITE="$CACHE/site-$KEY"
echo "  pins: $CORE"
if [[ ! -f $SITE/.complete ]]; then
  WHEELS="$CACHE/wheels-$KEY"
  mkdir -p "$WHEELS"
  if ! quiet "$LOGS/pip-download.log" nice -n 10 "$HOST_PY" -m pip download --disable-pip-version-check \
      "${PIP_TARGET_OPTS[@]}" -c "$WORK/constraints.txt" -d "$WHEELS" $CORE; then
    missing=$(grep -oE 'No matching distribution found for [^ ]+' "$LOGS/pip-download.log" | head -n 1 | awk '{print $NF}')
    die "no aarch64 wheel for CPython $PYVER of '${missing:-see log}' (pip download --platform manylinux*_aarch64)" "$LOGS/pip-download.log"
  fi
  rm -rf "$SITE.tmp"
  quiet "$LOGS/pip-install.log" nice -n 10 "$HOST_PY" -m pip install --disable-pip-version-check --no-index --no-deps \
    "${PIP_TARGET_OPTS[@]}" --target "$SITE.tmp" "$WHEELS"/*.whl \
    || die "pip install --target of the aarch64 wheels failed" "$LOGS/pip-install.log"
  ls "$WHEELS" >"$SITE.tmp/.complete"
  rm -rf "$SITE" && mv "$SITE.tmp" "$SITE"
  for old in "$CACHE"/site-* "$CACHE"/wheels-*; do  # installs for other pins (the host venv moved on)
    [[ $old == "$SITE" || $old == "$WHEELS" ]] || rm -rf "$old"
  done
else
  echo "  cached: $SITE"
fi
sed 's/^/  wheel: /' "$SITE/.complete"
if grep -q 'x86_64' "$SITE/.complete"; then die "an x86_64 wheel slipped into $SITE"; fi

# ------------------------------------------------------------------------------ emulated CPUs, smoke test
step 4 "emulated aarch64 box(es): qemu-aarch64 -cpu ${CPU_LIST[*]}; imports without torch"
# qemu-user 7.2 shows the guest the host's x86 /proc/cpuinfo, on which ONNX Runtime's cpuinfo crashes (SIGSEGV at
# import) and OpenVINO finds no MIDR_EL1. qemu -L ROOT serves ROOT/<path> first, so each CPU model gets a root:
# the sysroot's etc, lib, usr, plus the /proc/cpuinfo and sysfs MIDR an arm64 kernel would show, with the features
# the emulated CPU reports (AT_HWCAP).
arm_root() { echo "$CACHE/cpu/$1"; }
arm_py() {  # arm_py CPU ARGS...: the arm64 Python under qemu, tlcompile from this repo, the aarch64 site
  PYTHONPATH="$SITE:$REPO" PYTHONNOUSERSITE=1 nice -n 10 qemu-aarch64 -cpu "$1" -L "$(arm_root "$1")" "$PYBIN" -s "${@:2}"
}
for cpu in "${CPU_LIST[@]}"; do
  root=$(arm_root "$cpu")
  rm -rf "$root" && mkdir -p "$root"
  for d in etc lib usr; do ln -s "$SYSROOT/$d" "$root/$d"; done
  qemu-aarch64 -cpu "$cpu" -L "$root" "$PYBIN" -I "$HELPER" cpuinfo "$root" --cpu "$cpu" --cores "$(nproc)" >"$LOGS/cpuinfo-$cpu.log" 2>&1 \
    || die "could not write the emulated /proc/cpuinfo for $cpu" "$LOGS/cpuinfo-$cpu.log"
  echo "  $(cat "$LOGS/cpuinfo-$cpu.log")"
  arm_py "$cpu" - >"$LOGS/smoke-$cpu.log" 2>&1 <<'EOF' || die "the aarch64 install does not import on $cpu" "$LOGS/smoke-$cpu.log"
import importlib, platform, sys
import numpy, PIL, onnxruntime, openvino
import tlcompile.cli, tlcompile.runtime.bundle, tlcompile.runtime.predict, tlcompile.runtime.serve
heavy = sorted(m for m in ("torch", "torchvision", "nncf", "onnx", "sklearn") if m in sys.modules)
assert not heavy, f"the runtime imported {heavy}"
try:
    importlib.import_module("torch")
    raise SystemExit("torch is importable here: this would not prove a torch-free runtime")
except ModuleNotFoundError:
    pass
print(f"platform.machine() {platform.machine()}, {platform.platform()}; python {sys.version.split()[0]}; numpy {numpy.__version__}, "
      f"Pillow {PIL.__version__}, onnxruntime {onnxruntime.__version__}, openvino {openvino.__version__}; torch not installed")
EOF
  echo "  $cpu: $(tail -n 1 "$LOGS/smoke-$cpu.log")"
done

# --------------------------------------------------------------------------------------------------- bundles
step 5 "bundles"
if [[ ${#TARGETS[@]} -eq 0 ]]; then
  TINY="$CACHE/tiny"
  mkdir -p "$TINY"
  cat >"$TINY/recipe.yaml" <<'EOF'
# arm_check.sh's tiny build: the quickstart's model and data, scaled down to build in ~3 min on 2 cores. Its bundle
# carries every candidate (fp32 and int8, each on OpenVINO and ONNX Runtime) for verify to check on the box.
name: arm-check-tiny
seed: 0
data: {source: synthetic, num_images: 300, image_size: 96, task: referable, split: {val: 0.2, test: 0.2}}
model: {arch: mobilenet_v3_small, pretrained: none}
train: {epochs: 2, batch_size: 32, optimizer: adamw, lr: 0.002, schedule: cosine}
quantize: {method: ptq, calibration_images: 64}
export: {formats: [onnx, openvino], parity_images: 16}
bench: {runtimes: [openvino, onnxruntime], warmup: 2, iterations: 5}
evaluate: {bootstrap_resamples: 200}
bundle: {runtime: auto, candidates: all}
EOF
  # Rebuilt when the recipe or the code that writes and reads bundles changes (or with ARM_REBUILD=1).
  RKEY=$( { cat "$TINY/recipe.yaml"; cat "$REPO/tlcompile/export/bundle.py" "$REPO/tlcompile/runtime/bundle.py" 2>/dev/null || true; } \
    | sha256sum | cut -c1-12)
  TARGETS=("$TINY/build")
  fresh=0
  if [[ -z ${ARM_REBUILD:-} && -f $TINY/.complete && $(cat "$TINY/.complete") == "$RKEY" ]]; then
    copy_bundle "$TINY/build/bundle" "$WORK/bundles/cached"
    (cd "$REPO" && quiet "$LOGS/verify-cached.log" "$HOST_PY" -m tlcompile.cli verify --no-pin "$WORK/bundles/cached") && fresh=1
    rm -rf "$WORK/bundles/cached"
    [[ $fresh == 1 ]] && echo "  cached, and it verifies on this host: $TINY/build"
  fi
  if [[ $fresh == 0 ]]; then
    "$HOST_PY" -c "import torch, nncf" 2>/dev/null \
      || die "no bundle given and $HOST_PY cannot build one (needs the [train] extras); pass a bundle or build folder"
    rm -rf "$TINY/build" "$TINY/.complete"
    echo "  tlcompile build $TINY/recipe.yaml --out $TINY/build (~3 min) ..."
    (cd "$REPO" && quiet "$LOGS/build.log" nice -n 10 "$HOST_PY" -m tlcompile.cli build "$TINY/recipe.yaml" --out "$TINY/build") \
      || die "tlcompile build of the tiny recipe failed" "$LOGS/build.log"
    [[ -f $TINY/build/bundle/bundle.json ]] || die "the tiny build wrote no bundle" "$LOGS/build.log"
    echo "$RKEY" >"$TINY/.complete"
  fi
fi
"$HOST_PY" "$HELPER" plan "$WORK" "${TARGETS[@]}" >"$LOGS/plan.log" 2>&1 || die "cannot read the bundle(s)" "$LOGS/plan.log"
cat "$LOGS/plan.log"
mapfile -t BUNDLES < <("$HOST_PY" -c "import json,sys; [print(b['root']) for b in json.load(open(sys.argv[1]))['bundles']]" "$WORK/plan.json")

# ------------------------------------------------------------------------------------------ x86 reference
step 6 "x86 reference on this host: tlcompile verify, predict, probe"
for i in "${!BUNDLES[@]}"; do
  b="$WORK/bundles/x86-$i"
  copy_bundle "${BUNDLES[$i]}" "$b"
  (cd "$REPO" && "$HOST_PY" -m tlcompile.cli verify "$b" >"$LOGS/verify-x86-$i.log" 2>&1) \
    || die "tlcompile verify fails on the x86 host itself: the bundle is damaged or stale (rebuild it)" "$LOGS/verify-x86-$i.log"
  show "$LOGS/verify-x86-$i.log" "  x86 | " | no_latency
  mapfile -t imgs < <(golden_images "$i")
  (cd "$REPO" && quiet "$LOGS/predict-x86-$i.log" "$HOST_PY" -m tlcompile.cli predict "$b" "${imgs[@]}" --csv "$WORK/predict-x86-$i.csv") \
    || die "tlcompile predict fails on the x86 host" "$LOGS/predict-x86-$i.log"
  "$HOST_PY" "$HELPER" predict-check "$b" "$WORK/predict-x86-$i.csv" >"$LOGS/predict-check-x86-$i.log" 2>&1 \
    || die "tlcompile predict on the x86 host does not reproduce the golden decisions" "$LOGS/predict-check-x86-$i.log"
  sed 's/^  /  x86 | /' "$LOGS/predict-check-x86-$i.log"
done
(cd "$REPO" && quiet "$LOGS/probe-x86.log" nice -n 10 "$HOST_PY" "$HELPER" probe "$WORK/plan.json" "$WORK/probe-x86.json" --threads "$THREADS") \
  || die "the x86 probe failed" "$LOGS/probe-x86.log"
show "$LOGS/probe-x86.log" "  x86 |"

# --------------------------------------------------------------------------------------------------- ARM
step 7 "on linux-aarch64 under qemu-aarch64: tlcompile verify, predict, probe"
FAILS=()
for cpu in "${CPU_LIST[@]}"; do
  for i in "${!BUNDLES[@]}"; do
    b="$WORK/bundles/$cpu-$i"
    copy_bundle "${BUNDLES[$i]}" "$b"
    echo "  -- $cpu: python -m tlcompile.cli verify ${ARM_VERIFY_ARGS:+$ARM_VERIFY_ARGS }BUNDLE   (BUNDLE: a copy of ${BUNDLES[$i]})"
    rc=0
    # shellcheck disable=SC2086 # ARM_VERIFY_ARGS: extra verify options, split on purpose (e.g. --no-pin)
    (cd "$REPO" && arm_py "$cpu" -m tlcompile.cli verify ${ARM_VERIFY_ARGS:-} "$b") >"$LOGS/verify-arm-$cpu-$i.log" 2>&1 || rc=$?
    show "$LOGS/verify-arm-$cpu-$i.log" "     " | no_latency
    if [[ $rc -ne 0 ]] && grep -q '^FAIL' "$LOGS/verify-arm-$cpu-$i.log"; then
      FAILS+=("tlcompile verify on $cpu: $(grep '^FAIL' "$LOGS/verify-arm-$cpu-$i.log")")
    elif [[ $rc -ne 0 ]]; then  # no verdict: it raised (a traceback) instead of reporting the problem
      FAILS+=("tlcompile verify on $cpu crashed (exit $rc, no PASS/FAIL verdict): $(last_error "$LOGS/verify-arm-$cpu-$i.log")")
    fi
    mapfile -t imgs < <(golden_images "$i")
    echo "  -- $cpu: python -m tlcompile.cli predict BUNDLE ${#imgs[@]} golden images (golden/*.png) --csv predict-arm-$cpu-$i.csv"
    rc=0
    (cd "$REPO" && arm_py "$cpu" -m tlcompile.cli predict "$b" "${imgs[@]}" --csv "$WORK/predict-arm-$cpu-$i.csv") \
      >"$LOGS/predict-arm-$cpu-$i.log" 2>&1 || rc=$?
    show "$LOGS/predict-arm-$cpu-$i.log" "     "
    if [[ $rc -ne 0 || ! -s $WORK/predict-arm-$cpu-$i.csv ]]; then
      FAILS+=("tlcompile predict on $cpu: exit $rc: $(last_error "$LOGS/predict-arm-$cpu-$i.log")")
      continue
    fi
    "$HOST_PY" "$HELPER" predict-check "$b" "$WORK/predict-arm-$cpu-$i.csv" "$WORK/predict-x86-$i.csv" "$WORK/bundles/x86-$i" \
      || FAILS+=("tlcompile predict on $cpu: decisions differ from the build's golden samples")
  done
  echo "  -- $cpu: probe every model file (OpenVINO: f32 hint and default hint; ONNX Runtime: profiled)"
  (cd "$REPO" && arm_py "$cpu" "$HELPER" probe "$WORK/plan.json" "$WORK/probe-arm-$cpu.json" --threads "$THREADS") \
    >"$LOGS/probe-arm-$cpu.log" 2>&1 || die "the ARM probe crashed under qemu-aarch64 ($cpu)" "$LOGS/probe-arm-$cpu.log"
  show "$LOGS/probe-arm-$cpu.log" "    "
done

# ------------------------------------------------------------------------------------------------- report
step 8 "report: ARM vs x86 parity per model file and runtime; ops and precisions on ARM"
ARM_JSONS=()
for cpu in "${CPU_LIST[@]}"; do ARM_JSONS+=("$WORK/probe-arm-$cpu.json"); done
rc=0
"$HOST_PY" "$HELPER" report "$WORK/plan.json" "$WORK/probe-x86.json" "${ARM_JSONS[@]}" ${ARM_STRICT:+--strict} | tee "$WORK/report.txt" || rc=$?
[[ $rc -eq 1 ]] && FAILS+=("ARM vs x86 logits beyond golden tolerance (see the parity table)")
[[ $rc -gt 1 ]] && die "the report failed (rc $rc)"

trap - ERR
echo
echo "note: under qemu-user the guest's platform.machine() is aarch64; /proc/cpuinfo and the sysfs MIDR files it reads"
echo "      are the ones this script wrote for the emulated CPU (qemu 7.2 would show the host's x86 ones). No latency"
echo "      is reported: timing under emulation means nothing. Files: $WORK"
elapsed=$((SECONDS - START))
if [[ ${#FAILS[@]} -gt 0 ]]; then
  echo "ARM CHECK: FAIL (${elapsed}s)"
  printf '  %s\n' "${FAILS[@]}"
  exit 1
fi
echo "ARM CHECK: PASS: tlcompile verify and predict on linux-aarch64 (${CPU_LIST[*]}) with golden parity; ${#BUNDLES[@]} bundle(s) (${elapsed}s)"
