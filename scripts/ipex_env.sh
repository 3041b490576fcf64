#!/usr/bin/env bash
# Build the OPTIONAL Intel Extension for PyTorch environment for fusepass.
#
#   scripts/ipex_env.sh [VENV_DIR]        (default: /work/main/.venv-ipex)
#
# IPEX 2.8.0 (last CPU release) only works with torch 2.8.x; the only torch 2.8.0
# on PyPI is the CUDA 12.8 build, which runs fine on CPU but needs the nvidia
# runtime libraries importable.  This is the "lean" recipe from
# /work/shared/IPEX_ENV.md: torch + IPEX with --no-deps, their pure-python deps,
# and only the nvidia wheels that `import torch` actually dlopens (--no-deps).
# Triton, nvrtc, cusolver, nvtx are deliberately NOT installed.
#
# Idempotent: if the venv already imports torch 2.8 + IPEX, nothing is done.
# Never touches the default /work/main/.venv.
set -euo pipefail

VENV="${1:-/work/main/.venv-ipex}"
REPO="/work/main"
PY="${PYTHON:-python3}"

TORCH_VER="2.8.0"
IPEX_VER="2.8.0"
CHECK='import torch, intel_extension_for_pytorch as ipex; print(torch.__version__, ipex.__version__)'

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "$CHECK" >/dev/null 2>&1; then
    echo "[ipex_env] $VENV already imports IPEX: $("$VENV/bin/python" -c "$CHECK" 2>/dev/null | tail -n1) -- nothing to do"
    exit 0
fi

start=$(date +%s)
echo "[ipex_env] creating $VENV"
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check --no-input)

# 1. torch (CUDA 12.8 build, the only 2.8.0 on PyPI) and IPEX, without their deps
"${PIP[@]}" --no-deps "torch==${TORCH_VER}" "intel-extension-for-pytorch==${IPEX_VER}"

# 2. pure-python deps of torch / IPEX, plus what the probes and tests need
"${PIP[@]}" filelock typing-extensions sympy networkx jinja2 fsspec numpy psutil packaging \
    hypothesis pytest

# 3. the nvidia libraries `import torch` needs (pinned to torch 2.8.0's requirements)
"${PIP[@]}" --no-deps \
    nvidia-cuda-runtime-cu12==12.8.90 \
    nvidia-cublas-cu12==12.8.4.1 \
    nvidia-cudnn-cu12==9.10.2.21 \
    nvidia-cufft-cu12==11.3.3.83 \
    nvidia-cufile-cu12==1.13.1.3 \
    nvidia-curand-cu12==10.3.9.90 \
    nvidia-cusparse-cu12==12.5.8.93 \
    nvidia-cusparselt-cu12==0.7.1 \
    nvidia-nccl-cu12==2.27.3 \
    nvidia-nvjitlink-cu12==12.8.93 \
    nvidia-cuda-cupti-cu12==12.8.90

# 4. fusepass itself (editable, no deps) -- only once the package exists
if [ -f "$REPO/pyproject.toml" ]; then
    "${PIP[@]}" --no-deps -e "$REPO"
else
    echo "[ipex_env] $REPO/pyproject.toml not found: skipping 'pip install -e $REPO'"
fi

# 5. verify
"$VENV/bin/python" -c "$CHECK"
end=$(date +%s)
echo "[ipex_env] done in $((end - start)) s; size: $(du -sh "$VENV" | cut -f1)"
