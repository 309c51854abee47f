#!/usr/bin/env bash
# The main job: set up, then serve three tiny models with room for one and print TTFT per tier.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
exec "${UMEM_VENV:-$ROOT/.venv}/bin/clearml-umem" demo "$@"
