#!/usr/bin/env bash
# GPU readiness check for a GPU machine lent for a few minutes with no network: installs what
# `make gpu-wheels` put in gpu-wheels/ (the pinned transformers, and the Mamba kernels where a wheel
# matches this machine's Python, torch, CUDA and C++ ABI; else the reference path is used and that is
# recorded), then runs bench/gpu_check.py: tests/test_gpu.py, a bf16 extraction and the steering
# sweep benchmark, into one JSON, $OUT/gpu_check.json (bench/out/gpu_check.json when OUT is unset).
# On a CPU it runs too: the GPU parts are skipped with their reason, and the JSON is still written.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-bench/out}
SITE=${GPU_CHECK_SITE:-/tmp/gpu-check-site}
mkdir -p "$OUT" "$SITE"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
install() { "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$@"; }
if ls gpu-wheels/deps/*.whl >/dev/null 2>&1; then
  install gpu-wheels/deps/*.whl || echo "gpu_check: installing gpu-wheels/deps failed; the machine's own versions are used"
fi
# The wheel tag this machine needs, as the kernels' release assets name it.
tag=$("$PYTHON" -c 'import sys, torch
cuda = torch.version.cuda.split(".")[0] if torch.version.cuda else "none"
major, minor = torch.__version__.split("+")[0].split(".")[:2]
py = f"cp{sys.version_info.major}{sys.version_info.minor}"
print(f"cu{cuda}torch{major}.{minor}cxx11abi{str(torch._C._GLIBCXX_USE_CXX11_ABI).upper()}-{py}-{py}")')
kernels_json="$OUT/kernel_install.json"
"$PYTHON" - "$tag" "$kernels_json" "$SITE" <<'PY'
import glob, json, subprocess, sys
tag, out, site = sys.argv[1:4]
record = {"wheel_tag_needed": tag, "carried": sorted(p.split("/")[-1] for p in glob.glob("gpu-wheels/kernels/*.whl"))}
try:
    record["missing_at_download"] = open("gpu-wheels/kernels/missing.txt").read().split("\n")[:-1]
except FileNotFoundError:
    record["missing_at_download"] = "gpu-wheels/kernels/missing.txt absent: `make gpu-wheels` was not run"
for package in ("mamba_ssm", "causal_conv1d"):
    matching = [p for p in glob.glob(f"gpu-wheels/kernels/{package}-*.whl") if f"+{tag}-" in p]
    if not matching:
        record[package] = f"no carried wheel for {tag}: reference path"
        continue
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                           "--upgrade", "--target", site, matching[0]], capture_output=True, text=True)
    name = matching[0].split("/")[-1]
    record[package] = f"installed {name}" if done.returncode == 0 else f"install failed: {done.stderr[-500:]}"
json.dump(record, open(out, "w"), indent=1)
print(json.dumps(record))
PY
"$PYTHON" bench/gpu_check.py --out "$OUT/gpu_check.json" --kernels-json "$kernels_json" "$@"
