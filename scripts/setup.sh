#!/usr/bin/env bash
# Create (or update) the project's virtual environment with everything the demo and the tests need.
# Sourced by demo.sh and test.sh; safe to run again.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${UMEM_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
# torch 2.13.0: on these machines pip takes the local CPU build; set UMEM_TORCH to choose another.
TORCH_SPEC="${UMEM_TORCH:-torch==2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.umem-installed"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
  echo "[setup] installing clearml-unified-memory[test] (and torch, if missing: $TORCH_SPEC) into $VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  # a torch already there (from pip install -e '.[transformers]', say) is kept unless UMEM_TORCH asks for another
  if [ -n "${UMEM_TORCH:-}" ] || ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
  fi
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[test]"
  touch "$stamp"
fi
