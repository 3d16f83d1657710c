# Sourced by the scripts in this folder: where the repo and its virtual environment are.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CLUSTERFORMER_VENV:-$ROOT/.venv}"
VPY="$VENV/bin/python"
export PATH="$VENV/bin:$PATH"
