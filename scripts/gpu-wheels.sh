#!/usr/bin/env bash
# Download the wheels the GPU proof needs beyond what the GPU machine's Python has, into .whl/
# (ignored by git; carried to the machine with the working tree). Run here, with network or a
# package mirror; the proof installs them there without one.
#
# The GPU machine has Python 3.12, torch, transformers 5.17, tokenizers, safetensors, accelerate,
# httpx, anyio, h11, click, psutil, pyyaml, prometheus-client and pytest (its image's package
# list); it lacks the router's web stack and transformers >= 5.25. Versions are those of this checkout's .venv
# when it has them, so the machine runs what the tests here ran. No torch, no CUDA libraries.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/.whl}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
# the router's web stack and what it needs that the machine lacks (tests/test_gpu_proof.py checks this
# list); then transformers >= 5.25 with what it needs beyond the image's: continuous batching needs it
# (the image's 5.17 lacks it, see docs/engines.md), so without these the proof measures the
# per-request path
PACKAGES=(fastapi starlette pydantic pydantic-core annotated-types typing-inspection typing-extensions
          uvicorn opentelemetry-api anyio annotated-doc h11 sniffio orjson
          transformers huggingface-hub tokenizers hf-xet httpx2 httpcore2 truststore kernels tomlkit)

specs=()
for name in "${PACKAGES[@]}"; do
  version="$("$PY" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$name")"
  specs+=("${name}${version:+==$version}")
done
rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${specs[@]}"
du -sh "$DEST"
ls "$DEST"
