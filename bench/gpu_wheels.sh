#!/usr/bin/env bash
# `make gpu-wheels`: fill gpu-wheels/ (git-ignored) with what bench/gpu_check.sh installs on a GPU
# machine that has no network. Run it where the network is.
#   gpu-wheels/deps/     pinned pure-Python wheels the GPU image lacks in our version (transformers)
#   gpu-wheels/kernels/  mamba-ssm and causal-conv1d wheels for the GPU machine's Python, torch and CUDA,
#                        from the packages' GitHub releases (they publish no wheels on the package index),
#                        or put there by hand; what was not found is listed in kernels/missing.txt
# The target defaults to this workplace's GPU image (Python 3.12, torch 2.11, CUDA 13, C++11 ABI);
# override with TARGET_PY=3.11 TARGET_TORCH=2.13 TARGET_CUDA=12 TARGET_ABI=TRUE. FETCH_RELEASES=0 skips
# the GitHub download (a machine that reaches only the package index).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
TARGET_PY=${TARGET_PY:-3.12} TARGET_TORCH=${TARGET_TORCH:-2.11} TARGET_CUDA=${TARGET_CUDA:-13} TARGET_ABI=${TARGET_ABI:-TRUE}
FETCH_RELEASES=${FETCH_RELEASES:-1}
mkdir -p gpu-wheels/deps gpu-wheels/kernels
: > gpu-wheels/kernels/missing.txt
transformers=$(grep -o '"transformers==[^"]*"' pyproject.toml | tr -d '"')
platforms=""
for platform in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do platforms+=" --platform $platform"; done
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$TARGET_PY" --implementation cp \
  $platforms -d gpu-wheels/deps "$transformers"
py_tag="cp${TARGET_PY/./}"
# The kernels' versions: envs/requirements-gpu.txt; their release assets are named
# <package>-<version>+cu<CUDA major>torch<torch major.minor>cxx11abi<TRUE|FALSE>-<py>-<py>-linux_x86_64.whl
while IFS='==' read -r name _ version; do
  case "$name" in mamba-ssm) repo=state-spaces/mamba ;; causal-conv1d) repo=Dao-AILab/causal-conv1d ;; *) continue ;; esac
  file="${name//-/_}-${version}+cu${TARGET_CUDA}torch${TARGET_TORCH}cxx11abi${TARGET_ABI}-${py_tag}-${py_tag}-linux_x86_64.whl"
  if ls gpu-wheels/kernels/"${name//-/_}"-*.whl >/dev/null 2>&1; then
    echo "gpu-wheels: have $(ls gpu-wheels/kernels/"${name//-/_}"-*.whl)"
  elif [ "$FETCH_RELEASES" = 1 ] && curl -fsSL -o "gpu-wheels/kernels/$file" \
      "https://github.com/$repo/releases/download/v$version/${file//+/%2B}"; then
    echo "gpu-wheels: fetched $file"
  else
    rm -f "gpu-wheels/kernels/$file"
    echo "$file (release v$version of $repo; fetch tried: $FETCH_RELEASES)" >> gpu-wheels/kernels/missing.txt
    echo "gpu-wheels: no $file: the GPU check will use the reference path for it"
  fi
done < envs/requirements-gpu.txt
du -sh gpu-wheels
