"""The clusterformer model in-process: causality, exact incremental decoding, batch invariance."""

import copy

import pytest
import torch
from fairseq import options, tasks

import fairseq_clusterformer  # noqa: F401
from fairseq_clusterformer.models.clusterformer import ClusterformerModel
from fairseq_helpers import TINY, assert_decoding_with_reordering_equals_full_forward, build_toy_model, toy_batch


def build(toy_bin, extra=()):
    task, model, _ = build_toy_model(toy_bin, extra)
    assert isinstance(model, ClusterformerModel)
    return task, model


batch = toy_batch


def test_only_self_attention_is_swapped(toy_bin):
    _, model = build(toy_bin)
    from fairseq.modules import MultiheadAttention

    from fairseq_clusterformer.modules.fairseq_cluster_attention import FairseqClusterAttention

    for layer in model.encoder.layers:
        assert isinstance(layer.self_attn, FairseqClusterAttention)
    for layer in model.decoder.layers:
        assert isinstance(layer.self_attn, FairseqClusterAttention)
        assert isinstance(layer.encoder_attn, MultiheadAttention)
    # Learned centroids: the first encoder layer and every decoder layer; later encoder layers
    # take the carried ones (and own no unused parameter).
    names = [n for n, _ in model.named_parameters() if n.endswith(".centroids")]
    assert names == ["encoder.layers.0.self_attn.attention.centroids"] + [
        f"decoder.layers.{i}.self_attn.attention.centroids" for i in range(2)
    ]


def test_full_attention_options(toy_bin):
    from fairseq.modules import MultiheadAttention

    _, model = build(toy_bin, ["--self-attention-encoder", "full", "--self-attention-decoder", "full"])
    assert all(isinstance(layer.self_attn, MultiheadAttention) for layer in model.encoder.layers)
    assert all(isinstance(layer.self_attn, MultiheadAttention) for layer in model.decoder.layers)
    src, lengths, prev = batch(build(toy_bin)[0])
    _, extra = model(src, lengths, prev)
    assert extra["clustering_loss"] is None


def test_every_cluster_flag_reaches_the_module(toy_bin):
    _, model = build(
        toy_bin,
        [
            "--num-clusters",
            "auto",
            "--causal-num-clusters",
            "5",
            "--causal-window",
            "3",
            "--causal-local-heads",
            "1",
            "--no-previous-block",
            "--cluster-similarity",
            "dot",
            "--max-clusters",
            "16",
            "--cluster-compile",
        ],
    )
    enc = model.encoder.layers[0].self_attn.attention
    dec = model.decoder.layers[0].self_attn.attention
    assert (enc.num_clusters, enc.previous_block, enc.similarity, enc.max_clusters) == ("auto", False, "dot", 16)
    assert (dec.num_clusters, dec.window, dec.causal, dec.local_heads) == (5, 3, True, 1)
    assert enc.local_heads == 0
    assert enc.centroids.shape == (16, 32)
    layers = list(model.encoder.layers) + list(model.decoder.layers)
    assert all(layer.self_attn.attention.compile_mode == "default" for layer in layers)
    _, plain = build(toy_bin, [])
    assert not any(layer.self_attn.attention.compile for layer in plain.encoder.layers)
    _, graphs = build(toy_bin, ["--cluster-compile", "--cluster-compile-mode", "reduce-overhead"])
    layers = list(graphs.encoder.layers) + list(graphs.decoder.layers)
    assert all(layer.self_attn.attention.compile_mode == "reduce-overhead" for layer in layers)
    _, unused = build(toy_bin, ["--cluster-compile-mode", "reduce-overhead"])  # without --cluster-compile
    assert not any(layer.self_attn.attention.compile for layer in unused.encoder.layers)


def test_flex_implementation_gives_the_fast_models_outputs(toy_bin):
    """--cluster-impl flex (FlexAttention; on the CPU forward only): the same translation
    model's outputs as the default implementation, on sentences long enough for the blocks."""
    task, fast = build(toy_bin, ["--causal-local-heads", "1"])
    _, flexed = build(toy_bin, ["--causal-local-heads", "1", "--cluster-impl", "flex"])
    layers = list(flexed.encoder.layers) + list(flexed.decoder.layers)
    assert all(layer.self_attn.attention.impl == "flex" for layer in layers)
    assert all(layer.self_attn.attention.impl == "fast" for layer in fast.encoder.layers)
    flexed.load_state_dict(fast.state_dict())
    fast.eval(), flexed.eval()
    src, lengths, prev = batch(task, n=3, src_len=150, tgt_len=140)
    src[1, :20] = task.source_dictionary.pad()  # left padding
    lengths[1] -= 20
    with torch.no_grad():
        out_fast, _ = fast(src, lengths, prev)
        out_flex, _ = flexed(src, lengths, prev)
    torch.testing.assert_close(out_flex, out_fast, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="impl='flex' has no attention dropout"):
        build(toy_bin, ["--cluster-impl", "flex", "--attention-dropout", "0.1"])


def test_decoder_local_heads_default_to_half_the_heads(toy_bin):
    _, model = build(toy_bin)
    assert [layer.self_attn.attention.local_heads for layer in model.decoder.layers] == [2, 2]
    _, model = build(toy_bin, ["--causal-local-heads", "0"])
    assert [layer.self_attn.attention.local_heads for layer in model.decoder.layers] == [0, 0]


def test_checkpoints_from_before_local_heads_keep_a_fully_clustered_decoder(toy_bin):
    """Their saved args have no causal_local_heads at all (fairseq-train records it, "half" by
    default): they must load with the decoder they were trained with, not the new default."""
    from fairseq import models

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser, [str(toy_bin), "--task", "translation", "--arch", "clusterformer_iwslt", *TINY]
    )
    assert args.causal_local_heads == "half"
    del args.causal_local_heads
    model = models.build_model(args, tasks.setup_task(args))  # as a checkpoint load does: arch first
    assert [layer.self_attn.attention.local_heads for layer in model.decoder.layers] == [0, 0]


def test_encoder_local_heads_flag(toy_bin):
    """--local-heads reaches every clustering encoder layer; absent from a checkpoint's args
    (a model from before the option), the encoder has none."""
    from fairseq import models

    _, model = build(toy_bin, ["--local-heads", "half"])
    assert [layer.self_attn.attention.local_heads for layer in model.encoder.layers] == [2, 2]
    assert [layer.self_attn.attention.local_heads for layer in model.decoder.layers] == [2, 2]
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser, [str(toy_bin), "--task", "translation", "--arch", "clusterformer_iwslt", *TINY]
    )
    assert args.local_heads == "0"
    del args.local_heads
    model = models.build_model(args, tasks.setup_task(args))
    assert [layer.self_attn.attention.local_heads for layer in model.encoder.layers] == [0, 0]
    with pytest.raises(ValueError, match="--local-heads must be in \\[0, 4\\]"):
        build(toy_bin, ["--local-heads", "5"])


def test_state_dicts_without_a_version_are_upgraded(toy_bin):
    """A state dict from before the clusterformer_version stamp (version 1) loads through
    fairseq's upgrade; a stray centroid parameter of a carried-centroid layer is dropped; a
    newer version than this code reads is refused by name."""
    task, model = build(toy_bin)
    src, lengths, prev = batch(task)
    out, _ = model(src, lengths, prev)
    state = model.state_dict()
    assert state["encoder.clusterformer_version"].item() == 2
    old = {k: v for k, v in state.items() if k != "encoder.clusterformer_version"}
    old["encoder.layers.1.self_attn.attention.centroids"] = torch.randn(3, 32)
    _, fresh = build(toy_bin)
    fresh.load_state_dict(old)  # fairseq's load_state_dict runs upgrade_state_dict first (strict)
    assert torch.equal(fresh.eval()(src, lengths, prev)[0], out)
    assert "encoder.layers.1.self_attn.attention.centroids" not in old
    assert old["encoder.clusterformer_version"].item() == 2
    newer = dict(state, **{"encoder.clusterformer_version": torch.tensor([3.0])})
    with pytest.raises(ValueError, match="newer fairseq-clusterformer"):
        fresh.load_state_dict(newer)


def test_decoder_is_causal_through_every_layer(toy_bin):
    task, model = build(toy_bin)
    src, lengths, prev = batch(task)
    out, _ = model(src, lengths, prev)
    for t in (0, 4, 9):
        changed = prev.clone()
        changed[:, t + 1 :] = (changed[:, t + 1 :] + 7) % len(task.target_dictionary)
        changed[:, t + 1 :].clamp_(min=task.target_dictionary.nspecial)
        out2, _ = model(src, lengths, changed)
        assert torch.equal(out2[:, : t + 1], out[:, : t + 1])


@pytest.mark.parametrize("local_heads", ["0", "1"])
def test_incremental_decoding_with_reordering_equals_full_forward(toy_bin, local_heads):
    task, model = build(toy_bin, ["--causal-local-heads", local_heads])
    assert_decoding_with_reordering_equals_full_forward(task, model)


def test_translation_does_not_depend_on_batch_mates_or_padding(toy_bin):
    task, model = build(toy_bin)
    d = task.source_dictionary
    src, lengths, prev = batch(task, n=1, src_len=7, tgt_len=6)
    alone, _ = model(src, lengths, prev)
    # The same sentence, left-padded in the source (fairseq's default) and right-padded in the
    # target, among longer batch mates.
    other_src, _, other_prev = batch(task, n=3, src_len=12, tgt_len=10, seed=3)
    big_src = other_src.clone()
    big_src[1] = d.pad()
    big_src[1, -7:] = src[0]
    big_prev = other_prev.clone()
    big_prev[1] = d.pad()
    big_prev[1, :6] = prev[0]
    out, _ = model(big_src, torch.tensor([12, 7, 12]), big_prev)
    torch.testing.assert_close(out[1, :6], alone[0], atol=1e-5, rtol=1e-5)


def test_losses_are_returned_and_train_the_centroids(toy_bin):
    task, model = build(toy_bin)
    model.train()
    src, lengths, prev = batch(task)
    _, extra = model(src, lengths, prev)
    (extra["clustering_loss"] + extra["sorting_loss"]).backward()
    for name, p in model.named_parameters():
        if "centroid" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_each_encoder_layer_clusters_with_the_previous_layers_centroids(toy_bin):
    """Layer i receives exactly layer i-1's updated centroids (value), and layer i's losses
    reach layer 0's learned centroids through them (gradient)."""
    task, model = build(toy_bin, ["--encoder-layers", "3"])
    src, lengths, _ = batch(task)
    calls = []

    def record(module, args, kwargs, output):
        calls.append((kwargs["centroids"], output[1]))

    hooks = [layer.register_forward_hook(record, with_kwargs=True) for layer in model.encoder.layers]
    encoder_out = model.encoder(src, src_lengths=lengths)
    for h in hooks:
        h.remove()
    assert len(calls) == 3 and calls[0][0] is None
    for i in (1, 2):
        assert calls[i][0] is calls[i - 1][1]  # the very tensor layer i-1 returned
        assert calls[i][0].shape == (src.size(0), 3, 32)

    # Gradient: the last layer's clustering loss flows back through the centroids handed to it
    # and on to layer 0's learned centroid parameter.
    loss = encoder_out["clustering_losses"][2]
    handed, first = calls[2][0], model.encoder.layers[0].self_attn.attention.centroids
    grad_handed, grad_first = torch.autograd.grad(loss, [handed, first])
    assert grad_handed.abs().sum() > 0 and grad_first.abs().sum() > 0


@pytest.mark.parametrize(
    "flags",
    [["--checkpoint-activations"], ["--checkpoint-activations", "--offload-activations"]],
    ids=["checkpoint", "offload"],
)
def test_activation_checkpointing_gives_the_same_gradients(toy_bin, flags):
    grads = {}
    for name, extra in (("plain", []), ("checkpointed", flags)):
        task, model = build(toy_bin, extra)
        model.train()  # dropout is 0 in TINY, so the two runs are deterministic
        src, lengths, prev = batch(task)
        out, extra_out = model(src, lengths, prev)
        loss = out.log_softmax(-1).mean() + 0.3 * extra_out["clustering_loss"] + 0.7 * extra_out["sorting_loss"]
        loss.backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["plain"].keys() == grads["checkpointed"].keys()
    assert any("centroid" in n for n in grads["plain"])
    for n, g in grads["plain"].items():
        torch.testing.assert_close(grads["checkpointed"][n], g, atol=1e-6, rtol=1e-6, msg=n)


def test_state_dict_round_trip_gives_identical_outputs(toy_bin, tmp_path):
    task, model = build(toy_bin)
    src, lengths, prev = batch(task)
    out, _ = model(src, lengths, prev)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    _, fresh = build(toy_bin)
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    fresh.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    out2, _ = fresh.eval()(src, lengths, prev)
    assert torch.equal(out, out2)
    assert torch.equal(copy.deepcopy(model)(src, lengths, prev)[0], out)


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--num-clusters", "0"], "num_clusters must be >= 1"),
        (["--num-clusters", "-3"], "num_clusters must be >= 1"),
        (["--num-clusters", "x"], "positive integer or 'auto'"),
        (["--num-clusters", "300"], "larger than max_clusters"),
        (["--num-clusters", "auto"], "--causal-num-clusters"),
        (["--causal-window", "0"], "window must be >= 1"),
        (["--causal-local-heads", "5"], "--causal-local-heads must be in \\[0, 4\\]"),
        (["--causal-local-heads", "most"], "--causal-local-heads must be an integer or 'half'"),
    ],
)
def test_bad_model_options_are_named(toy_bin, extra, match):
    with pytest.raises(ValueError, match=match):
        build(toy_bin, extra)
