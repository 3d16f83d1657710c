#!/usr/bin/env bash
# The clustering softmax on CUDA, both ways, side by side in one run: over dim 1 of U (N x K, the
# strided kernel) and over the last dimension of its transpose (what kernels._softmax_over_words
# does on CUDA). One profiled ClusterAttention training step per length, bf16, d 512, 8 heads,
# k = ceil(sqrt N) (python -m scripts.profile_attention --device cuda). On the GPU machine, after
# scripts/gpu/check.sh has installed the wheels into /tmp/clusterformer-site:
#
#   bash scripts/gpu/profile_softmax.sh > $OUT/profile_softmax.txt     # docs/data/gpu/profile_softmax.txt
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
export PYTHONPATH="$PWD:${CHECK_SITE:-/tmp/clusterformer-site}${PYTHONPATH:+:$PYTHONPATH}"
for variant in strided transposed; do
    for n in 2048 8192 32768; do
        b=20
        [[ $n == 32768 ]] && b=1
        timeout 60 python3 - "$variant" "$n" "$b" <<'PY' 2>&1 | grep -v USDT
import sys

import torch

import fairseq_clusterformer.modules.kernels as kernels
from scripts.profile_attention import main

variant, n, b = sys.argv[1:4]
if variant == "strided":
    kernels._softmax_over_words = lambda scores: torch.softmax(scores, dim=1)
print("## variant", variant)
main(["--device", "cuda", "--dtype", "bfloat16", "--n", n, "--batch", b, "--steps", "10", "--warmup", "3", "--top", "6"])
PY
    done
done
