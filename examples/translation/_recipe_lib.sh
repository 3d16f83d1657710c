# Shared by prepare-iwslt14.sh and prepare-wmt14en2de.sh (sourced, not run).
#
# Provides: $PY (the Python with sacremoses/subword-nmt), $PREP_PY (mt_prep.py), $WORKERS,
# say/die, run_step (resumable steps with marker files), fetch (download with checks),
# check_tgz and need_python_packages.

RECIPE_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$RECIPE_DIR/../.." && pwd)"
PREP_PY="$REPO_ROOT/fairseq_clusterformer/tools/mt_prep.py"

# The interpreter: $PYTHON if set, else this repository's .venv, else python3 on PATH.
if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then
    PY="$REPO_ROOT/.venv/bin/python"
else
    PY="$(command -v python3 || true)"
fi
WORKERS="${WORKERS:-$(nproc 2>/dev/null || echo 4)}"

say() { echo "[${RECIPE_NAME:-recipe}] $*"; }
die() {
    echo "[${RECIPE_NAME:-recipe}] ERROR: $*" >&2
    exit 1
}

# need_python_packages MODULE... : stop with the pip command to run when one is missing.
need_python_packages() {
    [[ -n "$PY" ]] || die "no python3 found; set PYTHON=/path/to/python"
    local missing=() mod
    for mod in "$@"; do
        "$PY" -c "import $mod" >/dev/null 2>&1 || missing+=("$mod")
    done
    if ((${#missing[@]})); then
        local pkgs="${missing[*]}"
        pkgs="${pkgs//subword_nmt/subword-nmt}"
        die "missing Python package(s) for $PY: ${missing[*]}
    install them with: $PY -m pip install $pkgs"
    fi
}

# run_step NAME COMMAND... : run COMMAND unless the step NAME finished before (marker file in
# $MARKERS). A step that fails leaves no marker, so the next run redoes it.
run_step() {
    local name="$1"
    shift
    local marker="$MARKERS/$name.done"
    if [[ -f "$marker" ]]; then
        say "step '$name' already done, skipping (delete $marker to redo it)"
        return 0
    fi
    say "step '$name'"
    "$@" || die "step '$name' failed (rerun the script to resume from this step)"
    mkdir -p "$MARKERS"
    date >"$marker"
}

# check_tgz FILE : true when FILE is a complete gzip'ed tar archive.
check_tgz() {
    gzip -t "$1" 2>/dev/null && tar tzf "$1" >/dev/null 2>&1
}

# fetch URL DEST : download URL to DEST (via DEST.part, so a broken download never looks
# finished); skip when DEST exists. Needs wget or curl.
fetch() {
    local url="$1" dest="$2"
    if [[ -s "$dest" ]]; then
        say "$(basename "$dest") already downloaded, skipping"
        return 0
    fi
    say "downloading $url"
    if command -v wget >/dev/null 2>&1; then
        wget -q --show-progress -O "$dest.part" "$url" || {
            rm -f "$dest.part"
            die "download failed: $url
    (no network? download it elsewhere and put it at $dest, or set ORIG to a folder that has it)"
        }
    elif command -v curl >/dev/null 2>&1; then
        curl -fL --retry 3 -o "$dest.part" "$url" || {
            rm -f "$dest.part"
            die "download failed: $url
    (no network? download it elsewhere and put it at $dest, or set ORIG to a folder that has it)"
        }
    else
        die "neither wget nor curl is installed: install one, or download $url to $dest yourself"
    fi
    [[ -s "$dest.part" ]] || die "downloaded file is empty: $url"
    mv "$dest.part" "$dest"
}

# prep ARGS... : run mt_prep.py with the chosen interpreter.
prep() {
    "$PY" "$PREP_PY" "$@"
}

# segmentation_key KEY : remember which segmentation (e.g. bpe-10000) PREP holds; when it changes,
# forget the markers of the segmentation steps (bpe-*, spm-*, clean-*) so that they run again.
segmentation_key() {
    local key="$1" file="$MARKERS/segmentation"
    if [[ -f "$file" && "$(cat "$file")" != "$key" ]]; then
        say "segmentation changed ($(cat "$file") -> $key): redoing the segmentation steps"
        rm -f "$MARKERS"/bpe-*.done "$MARKERS"/spm-*.done "$MARKERS"/clean-*.done
    fi
    echo "$key" >"$file"
}
