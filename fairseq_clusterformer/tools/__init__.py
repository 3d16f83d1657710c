"""The user tools, installed as console commands (setup.py's entry points):

    clusterformer-choose-k              sweep k on a short budget and recommend one (choose_k.py)
    clusterformer-show-clusters         which words each layer clusters together (show_clusters.py)
    clusterformer-average-checkpoints   average the last N checkpoints (average_checkpoints.py)
    clusterformer-mt-prep               the recipes' network-free text steps (mt_prep.py)

runs.py runs fairseq's commands for clusterformer-choose-k (command lines, progress lines, peak
memory, log parsing) from the current directory, and stats.py holds its statistical tests; neither
knows where a checkout lives. mt_prep.py is also run by file path from the shell recipes (it
imports nothing from this package, so a recipe step does not pay for importing fairseq). The
experiment harness that reproduces docs/results.md lives in the checkout (scripts/experiments/).
"""
