#!/usr/bin/env bash
# Fill .whl/ (ignored by git) with every wheel the GPU machine lacks, for scripts/gpu/check.sh.
# Run from any folder, on a machine that reaches the package registry (the GPU machine does not):
#
#   bash scripts/gpu/prepare.sh
#
# The GPU machine has CPython 3.12 on x86-64 with torch 2.11 (CUDA 13), numpy 2.x, sacrebleu,
# sentencepiece, pytest, hypothesis, matplotlib, psutil, tensorboard, protobuf, pyyaml, regex,
# tqdm, click, joblib, scikit-learn, cython and ninja, and no network. check.sh installs these
# wheels with `pip install --no-index --no-deps --target`, so torch is never replaced.
#
# fairseq: the prebuilt fork ve-fairseq 0.12.3 (its cp312 manylinux wheel), not fairseq-fixed
# (docs/scaling.md, "The GPU check", says why). Everything else is pure Python except bitarray.
# Versions are those of the CPU environment the tests run in.
# Environment: PYTHON (default python3), the interpreter whose pip downloads and builds.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY="${PYTHON:-python3}"
DEST=.whl
PIP=("$PY" -m pip --disable-pip-version-check --no-input)
TARGET=(--python-version 3.12 --implementation cp --abi cp312 --platform manylinux_2_28_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

# Exact versions: those of the CPU environment the tests run in (fairseq-fixed pins hydra-core
# 1.3.2 and omegaconf 2.3.0; hydra-core 1.3 wants antlr4 4.9.*).
BINARY=("ve-fairseq==0.12.3" "bitarray==3.12.3")
PURE=("hydra-core==1.3.2" "omegaconf==2.3.0" "sacremoses==0.2.0" "subword-nmt==0.3.8" "mock==5.2.0"
    "tensorboardX==2.6.5")
# The lsh and routing baselines (setup.py's `baselines` extra, docs/baselines.md). einops too, though
# the GPU machine has one: hyper-connections and torch-einops-utils need einops >= 0.8.1, and 0.8.2
# is the version the tests run with (pure Python; it shadows the machine's only in check.sh's runs).
BASELINES=("einops==0.8.2" "reformer-pytorch==1.4.4" "routing-transformer==1.6.1" "axial-positional-embedding==0.3.12"
    "CoLT5-attention==0.11.2" "hyper-connections==0.4.11" "local-attention==1.11.2" "mixture-of-experts==0.2.3"
    "product-key-memory==0.3.0" "torch-einops-utils==0.2.0")
SDIST_ONLY=("antlr4-python3-runtime==4.9.3") # no wheel on the registry: built here (pure Python)

rm -rf "$DEST"
mkdir -p "$DEST"
echo "[prepare] binary wheels for CPython 3.12, x86-64: ${BINARY[*]}"
"${PIP[@]}" download -q --no-deps --only-binary=:all: "${TARGET[@]}" -d "$DEST" "${BINARY[@]}"
echo "[prepare] pure-Python wheels: ${PURE[*]}"
"${PIP[@]}" download -q --no-deps --only-binary=:all: "${TARGET[@]}" -d "$DEST" "${PURE[@]}"
echo "[prepare] the baselines' packages: ${BASELINES[*]}"
"${PIP[@]}" download -q --no-deps --only-binary=:all: "${TARGET[@]}" -d "$DEST" "${BASELINES[@]}"
echo "[prepare] building wheels of source-only packages: ${SDIST_ONLY[*]}"
"${PIP[@]}" wheel -q --no-deps -w "$DEST" "${SDIST_ONLY[@]}"
echo "[prepare] this package (fairseq-clusterformer) as a wheel"
"${PIP[@]}" wheel -q --no-deps -w "$DEST" .
rm -rf build ./*.egg-info

# Every wheel must suit CPython 3.12 on x86-64 Linux, and there must be one version of each.
"$PY" - "$DEST" <<'EOF'
import sys
from pathlib import Path

wheels = sorted(Path(sys.argv[1]).glob("*.whl"))
names = {}
for w in wheels:
    name, version, *rest = w.name[:-4].split("-")
    py, abi, plat = rest[-3:]
    ok_py = any(t in py.split(".") for t in ("py3", "py2.py3", "cp312")) or py in ("py2.py3", "py3")
    ok_plat = plat == "any" or "x86_64" in plat
    if not (ok_py and ok_plat and abi in ("none", "cp312", "abi3")):
        sys.exit(f"[prepare] {w.name} does not suit CPython 3.12 on x86-64")
    if name.lower() in names:
        sys.exit(f"[prepare] two versions of {name}: {names[name.lower()]} and {w.name}")
    names[name.lower()] = w.name
total = sum(w.stat().st_size for w in wheels)
for w in wheels:
    print(f"  {w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
print(f"[prepare] {len(wheels)} wheels, {total / 2**20:.1f} MiB in all")
if total > 60 * 2**20:
    sys.exit("[prepare] more than 60 MiB: too much to carry to the GPU machine")
EOF
