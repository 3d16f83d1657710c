"""fairseq's other entry points with the plugin: interactive, averaging, hydra, DDP, precision."""

import re

import pytest
import torch

import fairseq_clusterformer  # noqa: F401
from fairseq_helpers import (
    CLUSTER_CRITERION,
    REPO,
    TINY,
    USER_DIR,
    assert_interactive_translates_every_line,
    cli,
    generate,
    parse_generate,
    run,
    train,
    train_two_process_ddp,
)


def test_interactive_translates_stdin(toy_bin, smoke_checkpoint_dir):
    assert_interactive_translates_every_line(toy_bin, smoke_checkpoint_dir / "checkpoint_last.pt", beam=2)


def test_average_checkpoints(toy_bin, tmp_path):
    save = tmp_path / "avg"
    train(toy_bin, save, "clusterformer_iwslt", extra=TINY + CLUSTER_CRITERION + ["--max-epoch", "3"], max_update=100)
    out = run(
        [
            cli("clusterformer-average-checkpoints"),
            "--inputs",
            save,
            "--num-epoch-checkpoints",
            "2",
            "--output",
            save / "averaged.pt",
        ]
    )
    assert "averaging 2 checkpoints" in out.stdout
    a, b = (torch.load(save / f"checkpoint{e}.pt", weights_only=True)["model"] for e in (3, 2))
    avg = torch.load(save / "averaged.pt", weights_only=True)["model"]
    for name in a:
        torch.testing.assert_close(avg[name], (a[name] + b[name]) / 2)
    assert any(not torch.equal(a[n], b[n]) for n in a)  # the inputs really differ
    hyps = parse_generate(generate(toy_bin, save / "averaged.pt").stdout)
    assert sorted(hyps) == list(range(20))
    bad = run(
        [
            cli("clusterformer-average-checkpoints"),
            "--inputs",
            save,
            "--num-epoch-checkpoints",
            "9",
            "--output",
            save / "x.pt",
        ],
        check=False,
    )
    assert bad.returncode != 0 and "holds only 3 epoch checkpoints" in bad.stderr


def test_hydra_train_with_the_example_config(toy_bin, tmp_path):
    tiny = {
        "encoder_layers": 2,
        "decoder_layers": 2,
        "encoder_embed_dim": 32,
        "decoder_embed_dim": 32,
        "encoder_ffn_embed_dim": 64,
        "decoder_ffn_embed_dim": 64,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
    }
    out = run(
        [
            cli("fairseq-hydra-train"),
            "--config-dir",
            REPO / "examples" / "translation" / "config",
            "--config-name",
            "clusterformer_iwslt",
            f"task.data={toy_bin}",
            "task.source_lang=src",
            "task.target_lang=tgt",
            f"checkpoint.save_dir={tmp_path / 'ck'}",
            "optimization.max_update=12",
            "common.cpu=true",
            "dataset.max_tokens=500",
            "model.causal_window=8",
            f"common.user_dir={REPO / USER_DIR}",
            *[f"+model.{k}={v}" for k, v in tiny.items()],
        ],
        cwd=tmp_path,
    )
    log = out.stdout + out.stderr
    assert "done training" in log
    assert "clustering_loss" in log and "sorting_loss" in log
    state = torch.load(tmp_path / "ck" / "checkpoint_last.pt", weights_only=True)
    assert state["optimizer_history"][-1]["num_updates"] == 12
    assert state["cfg"]["model"]["_name"] == "clusterformer_iwslt"


def test_two_process_gloo_ddp_keeps_ranks_identical(toy_bin, tmp_path):
    save = tmp_path / "ddp"
    _, r0, _ = train_two_process_ddp(
        toy_bin, save, ["--lr-scheduler", "inverse_sqrt", "--warmup-updates", "5", "--dropout", "0.1"], max_update=12
    )
    # The copies are the model fairseq saved (so the dump really is the trained model).
    saved = torch.load(save / "checkpoint_last.pt", weights_only=True)["model"]
    assert all(torch.equal(saved[n], r0["model"][n]) for n in saved)


def test_update_freq_accumulates(toy_bin, tmp_path):
    out = train(
        toy_bin,
        tmp_path / "uf",
        "clusterformer_iwslt",
        extra=TINY + CLUSTER_CRITERION + ["--update-freq", "2", "--max-epoch", "2"],
        max_update=100,
    )
    log = out.stdout + out.stderr
    epoch1 = [l for l in log.splitlines() if "| train | epoch 001" in l][0]
    n_batches = int(re.search(r"num_updates (\d+)", epoch1).group(1))
    one = train(
        toy_bin,
        tmp_path / "uf1",
        "clusterformer_iwslt",
        extra=TINY + CLUSTER_CRITERION + ["--max-epoch", "1"],
        max_update=100,
    )
    single = [l for l in (one.stdout + one.stderr).splitlines() if "| train | epoch 001" in l][0]
    assert n_batches == -(-int(re.search(r"num_updates (\d+)", single).group(1)) // 2)
    assert "clustering_loss" in epoch1 and "sorting_loss" in epoch1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_criterion_in_half_precision(toy_bin, dtype):
    """fairseq's --fp16 needs CUDA and its --bf16 a TPU in these builds, so on the CPU we run the
    model and criterion in the half dtype directly: losses finite, terms logged, grads finite."""
    from fairseq import options, tasks

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser, [str(toy_bin), "--task", "translation", "--arch", "clusterformer_iwslt", *TINY, *CLUSTER_CRITERION]
    )
    task = tasks.setup_task(args)
    task.load_dataset("valid")
    model = task.build_model(args).to(dtype)
    criterion = task.build_criterion(args)
    itr = task.get_batch_iterator(task.dataset("valid"), max_tokens=400).next_epoch_itr(shuffle=False)
    sample = next(iter(itr))
    loss, sample_size, log = criterion(model, sample)
    loss.backward()
    assert torch.isfinite(loss)
    for name in ("clustering_loss", "sorting_loss"):
        assert torch.isfinite(log[name]) and -1.01 <= float(log[name]) / sample_size <= 1.01
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("weight", ["-0.1", "nan", "inf"])
def test_bad_loss_weights_are_named(toy_bin, tmp_path, weight):
    out = train(
        toy_bin,
        tmp_path / "w",
        "clusterformer_iwslt",
        extra=TINY + CLUSTER_CRITERION + ["--clustering-loss-weight", weight],
        max_update=1,
        check=False,
    )
    assert out.returncode != 0
    assert "--clustering-loss-weight must be a finite number >= 0" in out.stderr
