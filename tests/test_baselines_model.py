"""The LSH and routing choices inside the clusterformer model (in-process, fairseq): flags,
exact incremental decoding with beam reordering, causality, batch invariance, losses."""

import pytest
import torch
from fairseq import options, tasks

import fairseq_clusterformer  # noqa: F401
from fairseq_helpers import TINY, assert_decoding_with_reordering_equals_full_forward, build_toy_model, toy_batch

pytest.importorskip("reformer_pytorch", reason="needs the baselines extra")
pytest.importorskip("routing_transformer", reason="needs the baselines extra")


def build(toy_bin, enc, dec, extra=()):
    return build_toy_model(
        toy_bin, ["--causal-window", "2", "--self-attention-encoder", enc, "--self-attention-decoder", dec, *extra]
    )


batch = toy_batch


def test_flags_reach_the_modules_and_are_recorded(toy_bin):
    from fairseq_clusterformer.baselines.fairseq_adapters import FairseqBaselineAttention
    from fairseq_clusterformer.baselines.lsh import LSHEncoderAttention
    from fairseq_clusterformer.baselines.routers import LSHRouter, RoutingRouter
    from fairseq_clusterformer.baselines.routing import RoutingEncoderAttention

    _, model, args = build(toy_bin, "lsh", "routing", ["--lsh-n-hashes", "3", "--num-clusters", "5"])
    assert args.lsh_n_hashes == 3 and args.routing_local_heads == "half"
    for layer in model.encoder.layers:
        assert isinstance(layer.self_attn, FairseqBaselineAttention)
        a = layer.self_attn.attention
        assert isinstance(a, LSHEncoderAttention) and (a.n_buckets, a.n_hashes) == (6, 3)  # k = 5 -> 6 buckets
    for layer in model.decoder.layers:
        a = layer.self_attn.attention
        assert isinstance(a.router, RoutingRouter) and a.num_clusters == 5 and a.window == 2 and a.local_heads == 2
        assert a.centroids is None and a.centroid_proj is None
    _, model, args = build(toy_bin, "routing", "lsh", ["--routing-local-heads", "1"])
    assert args.lsh_n_hashes == 8  # the package's default, recorded in the args
    for layer in model.encoder.layers:
        a = layer.self_attn.attention
        assert isinstance(a, RoutingEncoderAttention) and (a.num_clusters, a.local_heads) == (3, 1)
    for layer in model.decoder.layers:
        a = layer.self_attn.attention
        assert isinstance(a.router, LSHRouter) and a.num_clusters == 4  # k = 3 -> 4 buckets
    # No parameter is left without a gradient (DDP would need find_unused_parameters).
    for kind in ("routing", "lsh"):
        task, model, _ = build(toy_bin, kind, kind)
        model.train()
        src, lengths, prev = batch(task)
        out, extra = model(src, lengths, prev)
        assert extra["clustering_loss"] is None
        assert (extra["commitment_loss"] is None) == (kind == "lsh")
        (out.sum() + (0 if extra["commitment_loss"] is None else extra["commitment_loss"])).backward()
        unused = [n for n, p in model.named_parameters() if p.grad is None and p.numel()]
        assert unused == [], (kind, unused)


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--self-attention-encoder", "lsh", "--num-clusters", "auto", "--causal-num-clusters", "3"], "not 'auto'"),
        (["--self-attention-encoder", "routing", "--routing-local-heads", "4"], "must leave a routed head"),
        (["--self-attention-encoder", "lsh", "--lsh-n-hashes", "0"], "--lsh-n-hashes must be >= 1"),
    ],
)
def test_bad_baseline_options_are_named(toy_bin, extra, match):
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser, [str(toy_bin), "--task", "translation", "--arch", "clusterformer_iwslt", *TINY, *extra]
    )
    with pytest.raises(ValueError, match=match):
        tasks.setup_task(args).build_model(args)


@pytest.mark.parametrize("enc,dec", [("lsh", "lsh"), ("routing", "routing")])
def test_incremental_decoding_with_reordering_equals_full_forward(toy_bin, enc, dec):
    task, model, _ = build(toy_bin, enc, dec)
    assert_decoding_with_reordering_equals_full_forward(task, model, tgt_len=14)


@pytest.mark.parametrize("enc,dec", [("lsh", "routing"), ("routing", "lsh")])
def test_decoder_is_causal_and_translation_ignores_batch_mates_and_padding(toy_bin, enc, dec):
    task, model, _ = build(toy_bin, enc, dec)
    src, lengths, prev = batch(task)
    out, _ = model(src, lengths, prev)
    for t in (0, 4, 9):
        changed = prev.clone()
        changed[:, t + 1 :] = (changed[:, t + 1 :] + 7) % len(task.target_dictionary)
        changed[:, t + 1 :].clamp_(min=task.target_dictionary.nspecial)
        # equal to float rounding (module tests: zero gradient from later words)
        torch.testing.assert_close(model(src, lengths, changed)[0][:, : t + 1], out[:, : t + 1], atol=1e-5, rtol=0)
    d = task.source_dictionary
    src, lengths, prev = batch(task, n=1, src_len=7, tgt_len=6)
    alone, _ = model(src, lengths, prev)
    other_src, _, other_prev = batch(task, n=3, src_len=12, tgt_len=10, seed=3)
    big_src = other_src.clone()
    big_src[1] = d.pad()
    big_src[1, -7:] = src[0]  # left-padded source (fairseq's default)
    big_prev = other_prev.clone()
    big_prev[1] = d.pad()
    big_prev[1, :6] = prev[0]
    out, _ = model(big_src, torch.tensor([12, 7, 12]), big_prev)
    torch.testing.assert_close(out[1, :6], alone[0], atol=1e-5, rtol=1e-5)


def test_commitment_loss_reaches_the_criterion(toy_bin):
    task, model, args = build(
        toy_bin,
        "routing",
        "full",
        [
            "--criterion",
            "label_smoothed_cross_entropy_with_clustering",
            "--commitment-loss-weight",
            "0.5",
            "--dropout",
            "0",
        ],
    )
    criterion = task.build_criterion(args)
    task.load_dataset("valid")
    sample = next(iter(task.get_batch_iterator(task.dataset("valid"), max_tokens=400).next_epoch_itr(shuffle=False)))
    model.train()
    loss, sample_size, log = criterion(model, sample)
    assert "clustering_loss" not in log and "commitment_loss" in log
    torch.testing.assert_close(loss.detach(), log["loss"])
    nll_only = criterion.compute_loss(model, model(**sample["net_input"]), sample)[0]
    torch.testing.assert_close(loss.detach() - nll_only.detach(), 0.5 * log["commitment_loss"], rtol=1e-4, atol=1e-4)
