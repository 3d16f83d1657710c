"""Run fairseq-train, and on every rank also dump the model's parameters at each checkpoint save.

fairseq writes checkpoints from rank 0 only; to check that DDP keeps the ranks identical, each
rank saves its own copy beside them as params_rank{R}.pt. Usage: python ddp_driver.py <fairseq-train args>
"""

import os
import sys

import torch
from fairseq import checkpoint_utils
from fairseq_cli import train

_save = checkpoint_utils.save_checkpoint


def save_checkpoint(cfg, trainer, epoch_itr, val_loss):
    result = _save(cfg, trainer, epoch_itr, val_loss)
    rank = trainer.data_parallel_rank
    state = {k: v.detach().cpu().clone() for k, v in trainer.get_model().state_dict().items()}
    torch.save(
        {"num_updates": trainer.get_num_updates(), "model": state}, os.path.join(cfg.save_dir, f"params_rank{rank}.pt")
    )
    return result


checkpoint_utils.save_checkpoint = save_checkpoint
if __name__ == "__main__":
    sys.argv[0] = "fairseq-train"
    train.cli_main()
