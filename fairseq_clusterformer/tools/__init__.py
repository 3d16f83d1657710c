"""The user tools, installed as console commands (setup.py's entry points):

    clusterformer-choose-k              sweep k on a short budget and recommend one (choose_k.py)
    clusterformer-show-clusters         which words each layer clusters together (show_clusters.py)
    clusterformer-average-checkpoints   average the last N checkpoints (average_checkpoints.py)
    clusterformer-prepare-data          tokenise, BPE and binarise Multi30k / IWSLT14 (prepare_data.py)
    clusterformer-mt-prep               the recipes' network-free text steps (mt_prep.py)

mt_prep.py is also run by file path from the shell recipes (it imports nothing from this
package, so a recipe step does not pay for importing fairseq).
"""
