# shellcheck shell=bash
# What the prepared GPU scripts (check.sh, converged.sh) share. Sourced, from the repository root.

# gpu_parse_args SCRIPT "$@": the scripts' options, --dry-run, --out DIR and --help (SCRIPT's
# header comment, up to its first line that is not a comment). Sets DRY (0 or 1) and OUTDIR
# (default: $OUT).
gpu_parse_args() {
    local script="$1"
    shift
    DRY=0
    OUTDIR="${OUT:-}"
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --dry-run) DRY=1 ;;
            --out)
                OUTDIR="$2"
                shift
                ;;
            -h | --help)
                sed -n '2,/^[^#]/p' "$script" | sed '$d' | sed 's/^# \{0,1\}//'
                exit 0
                ;;
            *)
                echo "unknown argument: $1 (see --help)" >&2
                exit 2
                ;;
        esac
        shift
    done
}

# gpu_output_dir NAME: OUTDIR made absolute, or a new folder /tmp/NAME.XXXXXX if none was given.
gpu_output_dir() {
    [[ -n "$OUTDIR" ]] || OUTDIR="$(mktemp -d "/tmp/$1.XXXXXX")"
    mkdir -p "$OUTDIR"
    OUTDIR="$(cd "$OUTDIR" && pwd)"
}

# gpu_install_wheels: the .whl/ wheels of scripts/gpu/prepare.sh into $SITE with pip --no-index
# --no-deps --target (the machine's torch is never touched), with $PY; then what they installed
# must import on their own (from another folder: not this checkout).
gpu_install_wheels() {
    shopt -s nullglob
    local wheels=(.whl/*.whl)
    if ((${#wheels[@]} == 0)); then
        echo "no wheels in .whl/: run scripts/gpu/prepare.sh on a machine with network first"
        return 1
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" || return 1
    (cd /tmp && PYTHONPATH="$SITE" "$PY" -c "import torch, fairseq, fairseq_clusterformer, hydra, omegaconf, bitarray, sacremoses, subword_nmt, tensorboardX
import reformer_pytorch, routing_transformer
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'fairseq', fairseq.__version__, 'plugin', fairseq_clusterformer.__file__)")
}
