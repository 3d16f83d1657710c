#!/usr/bin/env bash
# Set up (or reuse) the project's virtual environment: torch, then a fairseq that works on
# Python 3.11/3.12, then this package with its test extras. Shared by demo.sh and test.sh.
#
# Environment knobs (all optional):
#   PYTHON=python3.12          interpreter used to create .venv (default: python3)
#   CLUSTERFORMER_VENV=path    use another venv folder instead of ./.venv
#   TORCH_SPEC="torch==2.13.0" what to pip-install when no torch is found (default shown)
#   FAIRSEQ_DIST=source|prebuilt
#                              source (default): fairseq-fixed 0.12.3.1 built from source against
#                              the installed torch; prebuilt: ve-fairseq 0.12.3 wheels (Linux
#                              x86_64, cp311/cp312 only). docs/install.md explains the choice.
#   BOOTSTRAP_FORCE=1          redo every step even if the environment looks up to date
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
FAIRSEQ_DIST="${FAIRSEQ_DIST:-source}"
FAIRSEQ_SOURCE_SPEC="fairseq-fixed==0.12.3.1"
FAIRSEQ_PREBUILT_SPEC="ve-fairseq==0.12.3"

step() { echo "[bootstrap] $*"; }
die() {
    echo "[bootstrap] ERROR: $*" >&2
    exit 1
}
PIP=("$VPY" -m pip --disable-pip-version-check --no-input)

# Fast path: nothing changed since the last successful run and everything imports.
STAMP="$VENV/.clusterformer-bootstrap"
fingerprint="$(cat setup.py scripts/bootstrap.sh | sha1sum | cut -d' ' -f1)"
if [[ -z "${BOOTSTRAP_FORCE:-}" && -f "$STAMP" && "$(cat "$STAMP")" == "$fingerprint" ]] &&
    "$VPY" -c "import torch, fairseq, fairseq_clusterformer" >/dev/null 2>&1; then
    step "environment up to date: $VENV (BOOTSTRAP_FORCE=1 redoes it)"
    exit 0
fi

# 1. The virtual environment.
command -v "$PYTHON" >/dev/null || die "no '$PYTHON' on PATH; set PYTHON=/path/to/python3.11"
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 9), sys.version' 2>/dev/null ||
    die "$PYTHON is older than 3.9; set PYTHON=/path/to/python3.11"
if [[ ! -x "$VPY" ]]; then
    venv_flags=()
    if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
        # Keep the torch the user already has (e.g. a CUDA build) instead of installing another.
        step "creating $VENV (sharing $PYTHON's site-packages, which already has torch)"
        venv_flags+=(--system-site-packages)
    else
        step "creating $VENV with $PYTHON ($("$PYTHON" --version 2>&1))"
    fi
    "$PYTHON" -m venv "${venv_flags[@]}" "$VENV" || die "could not create $VENV (on Debian: apt-get install python3-venv)"
else
    step "reusing $VENV ($("$VPY" --version 2>&1))"
fi

# 2. torch first, so that nothing later makes pip choose one (a multi-GB CUDA build) by itself.
if torch_version="$("$VPY" -c 'import torch; print(torch.__version__)' 2>/dev/null)"; then
    step "keeping torch $torch_version"
else
    step "installing $TORCH_SPEC (set TORCH_SPEC to choose another build)"
    "${PIP[@]}" install --progress-bar off $TORCH_SPEC || die "could not install '$TORCH_SPEC'"
fi

# 3. A fairseq that imports on Python 3.11/3.12. Never a second distribution over a working one.
if fairseq_version="$("$VPY" -c 'import fairseq; print(fairseq.__version__)' 2>/dev/null)"; then
    step "keeping fairseq $fairseq_version ($("$VPY" -m pip list 2>/dev/null | grep -iE '^(ve-)?fairseq(-fixed)? ' | tr -s ' ' || true))"
else
    installed="$("$VPY" -m pip list 2>/dev/null | grep -iE '^(ve-fairseq|fairseq-fixed|fairseq) ' || true)"
    if [[ -n "$installed" ]]; then
        die "a fairseq distribution is installed but does not import: $installed
    see the error with: $VPY -c 'import fairseq'
    fix: $VPY -m pip uninstall -y ${installed%% *} && bash scripts/bootstrap.sh"
    fi
    case "$FAIRSEQ_DIST" in
        source)
            step "building $FAIRSEQ_SOURCE_SPEC from source against the installed torch (3-4 minutes the first time; pip caches the wheel)"
            "${PIP[@]}" install --progress-bar off "cython" "numpy" "wheel" "setuptools" ||
                die "could not install fairseq's build requirements (cython numpy wheel setuptools)"
            # --no-build-isolation: otherwise pip builds in a fresh env and downloads a CUDA torch.
            "${PIP[@]}" install --progress-bar off --no-build-isolation "$FAIRSEQ_SOURCE_SPEC" ||
                die "building $FAIRSEQ_SOURCE_SPEC failed (needs gcc/g++ and the Python headers; or try FAIRSEQ_DIST=prebuilt)"
            ;;
        prebuilt)
            step "installing prebuilt $FAIRSEQ_PREBUILT_SPEC"
            "${PIP[@]}" install --progress-bar off "$FAIRSEQ_PREBUILT_SPEC" ||
                die "could not install $FAIRSEQ_PREBUILT_SPEC (wheels exist only for Linux x86_64, Python 3.11/3.12; use FAIRSEQ_DIST=source)"
            ;;
        *) die "FAIRSEQ_DIST must be 'source' or 'prebuilt', not '$FAIRSEQ_DIST'" ;;
    esac
    "$VPY" -c 'import fairseq' || die "fairseq was installed but does not import (error above)"
fi

# 4. This package, editable, with the test extras and the pinned LSH/routing baselines.
step "installing fairseq-clusterformer (pip install -e .[test,baselines])"
"${PIP[@]}" install --progress-bar off -q -e ".[test,baselines]" || die "pip install -e .[test,baselines] failed"
"$VPY" -c "import fairseq_clusterformer" || die "the plugin does not import (error above)"
# The checkpoint autoload hook is opt-in (clusterformer-autoload --install; docs/install.md).
echo "$fingerprint" >"$STAMP"
step "ready: $VPY"
