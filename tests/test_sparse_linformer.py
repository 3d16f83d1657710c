"""The Sparse Transformer (fixed pattern) and Linformer baselines: the modules against float64
dense oracles, causality, padding and batch invariance, exact incremental decoding with beam
reordering; and inside the clusterformer model (in-process fairseq): flags, the refused causal
Linformer, decoding through the fairseq decoder, whole-model invariances."""

import importlib.util
import math
import os

import pytest
import torch
from fairseq import options, tasks

import fairseq_clusterformer  # noqa: F401
from fairseq_clusterformer.baselines.linformer import LinformerAttention
from fairseq_clusterformer.baselines.sparse import FairseqSelfAttention, SparseAttention
from fairseq_helpers import TINY, assert_decoding_with_reordering_equals_full_forward, build_toy_model, toy_batch

D, H = 16, 2


# ----------------------------------------------------------------------------------------------
# oracles: plain loops over the sentence's real words, written from the papers' definitions
def fixed_pattern(L: int, block: int, causal: bool) -> torch.Tensor:
    """L x L bool, the Sparse Transformer's fixed pattern with c = 1 (True: i attends to j)."""
    allow = torch.zeros(L, L, dtype=torch.bool)
    for i in range(L):
        for j in range(L):
            same_block = j // block == i // block  # A1
            summary = j % block == block - 1  # A2: the last position of a block
            allow[i, j] = (same_block or summary) and (j <= i or not causal)
    return allow


def dense_attention(m, x, allow):
    """Multi-head attention of the module's projections over x (L x d), dense mask allow (L x L)."""
    L = x.size(0)
    q, k, v = (p(x).view(L, m.num_heads, m.head_dim).transpose(0, 1) for p in (m.q_proj, m.k_proj, m.v_proj))
    scores = (q @ k.transpose(-1, -2) / math.sqrt(m.head_dim)).masked_fill(~allow, float("-inf"))
    return m.out_proj((scores.softmax(-1) @ v).transpose(0, 1).reshape(L, -1))


def sparse_oracle(m, x, pad, block_of_length):
    """Each sentence alone: its real words, the dense fixed-pattern mask, zeros at padding."""
    out = torch.zeros_like(x)
    for b in range(x.size(0)):
        idx = [t for t in range(x.size(1)) if pad is None or not bool(pad[b, t])]
        if idx:
            allow = fixed_pattern(len(idx), block_of_length(len(idx)), m.causal)
            out[b, idx] = dense_attention(m, x[b, idx], allow)
    return out


SPARSE_CASES = {
    "encoder-k3": (dict(num_blocks=3), lambda L: math.ceil(L / 3)),
    "encoder-auto": (dict(num_blocks="auto"), lambda L: math.ceil(L / math.ceil(math.sqrt(L)))),
    "encoder-k20": (dict(num_blocks=20), lambda L: 1),  # k > L: blocks of one word, full attention
    "encoder-fixed-l4": (dict(block_len=4), lambda L: 4),
    "decoder-l3": (dict(causal=True, block_len=3), lambda L: 3),
    "decoder-l1": (dict(causal=True, block_len=1), lambda L: 1),  # every word a summary: full causal
}


def sparse(case, seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    return SparseAttention(D, H, **SPARSE_CASES[case][0], **kw).to(dtype)


def padded_batch(seed=0, dtype=torch.float64):
    """B=4, N=13: no padding, left padding 5, right padding 4, and a sentence of one word."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 13, D, generator=g, dtype=dtype)
    pad = torch.zeros(4, 13, dtype=torch.bool)
    pad[1, :5] = True
    pad[2, 9:] = True
    pad[3, 1:] = True
    return x, pad


def test_the_oracle_is_the_papers_fixed_pattern():
    """Hand-checked rows for L = 10, l = 4 (blocks 0-3, 4-7, 8-9; summaries 3 and 7)."""
    enc, dec = fixed_pattern(10, 4, causal=False), fixed_pattern(10, 4, causal=True)
    rows = lambda m, i: set(torch.nonzero(m[i])[:, 0].tolist())  # noqa: E731
    assert rows(enc, 0) == {0, 1, 2, 3, 7}
    assert rows(enc, 5) == {3, 4, 5, 6, 7}
    assert rows(enc, 9) == {3, 7, 8, 9}  # the last block is short: it has no summary
    assert rows(dec, 0) == {0}
    assert rows(dec, 4) == {3, 4}
    assert rows(dec, 6) == {3, 4, 5, 6}
    assert rows(dec, 9) == {3, 7, 8, 9}


def test_fairseqs_sparse_mask_is_not_the_papers_pattern():
    """Why fairseq's SparseMultiheadAttention is not the oracle: with stride 4 and c = 1 its causal
    mask lets the first word of a block see the whole previous block (and its summaries take c + 1
    positions)."""
    from fairseq.modules.sparse_multihead_attention import SparseMultiheadAttention

    m = SparseMultiheadAttention(D, H, self_attention=True, stride=4, expressivity=1, is_bidirectional=False)
    allowed = m.buffered_sparse_mask(torch.zeros(1), 10, 10) == 0
    assert set(torch.nonzero(allowed[4])[:, 0].tolist()) == {0, 1, 2, 3, 4}
    assert not torch.equal(allowed, fixed_pattern(10, 4, causal=True))


@pytest.mark.parametrize("case", list(SPARSE_CASES))
@pytest.mark.parametrize("padded", [False, True])
def test_sparse_equals_the_dense_oracle_in_values_and_gradients(case, padded):
    m = sparse(case)
    x, pad = padded_batch()
    if not padded:
        pad = None
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = m(x1, pad)
    expected = sparse_oracle(m, x2, pad, SPARSE_CASES[case][1])
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-10)
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), [x1, *m.parameters()])
    ref_grads = torch.autograd.grad((expected * w).sum(), [x2, *m.parameters()])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_sparse_encoder_is_not_full_attention():
    """L = 12, k = 3: blocks of 4 words; word 0 depends on its block and the summaries 7 and 11,
    on nothing else."""
    m = sparse("encoder-k3")
    x = torch.randn(1, 12, D, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(m(x)[0, 0].sum(), x)
    reached = set(torch.nonzero(g[0].abs().sum(-1))[:, 0].tolist())
    assert reached == {0, 1, 2, 3, 7, 11}


@pytest.mark.parametrize("case", ["decoder-l3", "decoder-l1"])
def test_sparse_decoder_does_not_see_the_future(case):
    m = sparse(case)
    x = torch.randn(2, 11, D, dtype=torch.float64, requires_grad=True)
    out = m(x)
    for t in (0, 2, 3, 7, 10):
        (g,) = torch.autograd.grad(out[:, t].sum(), x, retain_graph=True)
        assert torch.all(g[:, t + 1 :] == 0), t
        changed = x.detach().clone()
        changed[:, t + 1 :] = torch.randn_like(changed[:, t + 1 :]) * 5
        torch.testing.assert_close(m(changed)[:, : t + 1], out[:, : t + 1].detach(), atol=1e-13, rtol=0)


def embed(sentence, length, side, seed):
    """The sentence (L x d) as row 1 of a batch of 3 padded to ``length`` with random padding
    content (inf included), beside batch mates of other lengths."""
    g = torch.Generator().manual_seed(seed)
    L = sentence.size(0)
    x = torch.randn(3, length, D, generator=g) * 3
    pad = torch.zeros(3, length, dtype=torch.bool)
    span = slice(length - L, length) if side == "left" else slice(0, L)
    pad[1] = True
    pad[1, span] = False
    x[1] = float("inf")
    x[1, span] = sentence
    pad[2, : length // 3] = True
    return x, pad, span


def make(kind):
    torch.manual_seed(0)
    if kind == "linformer":
        return LinformerAttention(D, H, proj_len=4, max_positions=32)
    return SparseAttention(D, H, **SPARSE_CASES[kind][0])


@pytest.mark.parametrize("kind", ["encoder-k3", "encoder-auto", "decoder-l3", "linformer"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_outputs_ignore_padding_and_batch_mates(kind, mode):
    m = make(kind).train(mode == "train")  # dropout 0: training mode takes the same path
    sentence = torch.randn(10, D)
    alone = m(sentence[None])[0]
    for length, side, seed in ((14, "left", 1), (14, "right", 2), (23, "left", 3)):
        x, pad, span = embed(sentence, length, side, seed)
        out = m(x, pad)
        torch.testing.assert_close(out[1, span], alone, atol=1e-5, rtol=1e-5)
        assert torch.all(out[pad] == 0) and torch.isfinite(out).all()


@pytest.mark.parametrize("case", ["decoder-l3", "decoder-l1"])
def test_sparse_step_by_step_with_beam_reordering_equals_the_full_forward(case):
    """Three hypotheses decoded position by position, reordered (beam search) after step 5, and
    padding steps inside one of them (skipped: they do not advance the sentence)."""
    m = sparse(case).eval()
    x = torch.randn(3, 12, D, dtype=torch.float64)
    pad = torch.zeros(3, 12, dtype=torch.bool)
    pad[2, 1] = pad[2, 8] = True
    order = torch.tensor([2, 0, 2])
    state, steps = None, []
    for t in range(12):
        if t == 5:
            state = SparseAttention.reorder_state(state, order)
            x, pad, steps = x[order], pad[order], [s[order] for s in steps]
        y, state = m.step(x[:, t : t + 1], state, pad[:, t])
        steps.append(y)
    torch.testing.assert_close(torch.cat(steps, 1), m(x, pad), atol=1e-12, rtol=1e-10)
    assert state["summary_key"].size(2) == 12 // m.block_len  # one summary per completed block


def load_fairseq_linformer():
    """fairseq's examples/linformer MultiheadLinearAttention, loaded from its file (its package's
    __init__ would register the linformer_roberta model a second time in some processes)."""
    import fairseq

    path = os.path.join(
        os.path.dirname(fairseq.__file__), "examples/linformer/linformer_src/modules/multihead_linear_attention.py"
    )
    spec = importlib.util.spec_from_file_location("fairseq_multihead_linear_attention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MultiheadLinearAttention


def fairseq_linformer_like(m):
    """fairseq's module (compressed = max_positions / k) with m's weights."""
    ref = load_fairseq_linformer()(
        D, H, self_attention=True, compressed=m.max_positions // m.proj_len, max_seq_len=m.max_positions
    ).to(m.q_proj.weight.dtype)
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            getattr(ref, name).load_state_dict(getattr(m, name).state_dict())
        ref.compress_k.weight.copy_(m.seq_proj_key.t())
        ref.compress_v.weight.copy_(m.seq_proj_value.t())
    return ref


def test_linformer_without_padding_equals_fairseqs_multihead_linear_attention():
    torch.manual_seed(0)
    m = LinformerAttention(D, H, proj_len=4, max_positions=32).double()
    ref = fairseq_linformer_like(m)
    for N in (3, 11, 32):  # fewer words than k, more, and the longest
        x = torch.randn(2, N, D, dtype=torch.float64)
        expected, _ = ref(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), need_weights=False)
        # fairseq's utils.softmax computes in float32, whatever the input dtype
        torch.testing.assert_close(m(x), expected.transpose(0, 1), atol=1e-6, rtol=1e-5)


def test_fairseqs_linformer_depends_on_padding_and_this_one_does_not():
    """What the fix is for: fairseq's module ignores the key-padding mask, so the padding's
    content reaches every word; here it is zeroed before the projection."""
    torch.manual_seed(0)
    m = LinformerAttention(D, H, proj_len=4, max_positions=32).double()
    ref = fairseq_linformer_like(m)
    sentence = torch.randn(6, D, dtype=torch.float64)
    outs, ref_outs = [], []
    for seed in (1, 2):
        x = torch.randn(1, 9, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        x[0, :6] = sentence
        pad = torch.zeros(1, 9, dtype=torch.bool)
        pad[0, 6:] = True
        outs.append(m(x, pad)[0, :6])
        t = x.transpose(0, 1)
        ref_outs.append(ref(t, t, t, key_padding_mask=pad, need_weights=False)[0][:6, 0])
    assert (ref_outs[0] - ref_outs[1]).abs().max() > 1e-3
    torch.testing.assert_close(outs[0], outs[1], atol=1e-12, rtol=0)
    torch.testing.assert_close(outs[0], m(sentence[None])[0], atol=1e-12, rtol=1e-10)


def test_linformer_uses_the_first_L_rows_and_mixes_all_words():
    torch.manual_seed(0)
    m = LinformerAttention(D, H, proj_len=4, max_positions=32).double()
    x, pad = padded_batch()
    x.requires_grad_()
    out = m(x, pad)
    out.sum().backward()
    longest = int((~pad).sum(1).max())
    assert torch.all(m.seq_proj_key.grad[longest:] == 0) and torch.all(m.seq_proj_value.grad[longest:] == 0)
    assert m.seq_proj_key.grad[:longest].abs().sum(-1).gt(0).all()
    assert torch.all(x.grad[pad] == 0)
    # Not causal: the first word depends on the last (why the decoder refuses it).
    y = torch.randn(1, 8, D, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(m(y)[0, 0].sum(), y)
    assert g[0, -1].abs().sum() > 0


def test_linformer_refuses_a_sentence_longer_than_its_projections():
    m = LinformerAttention(D, H, proj_len=4, max_positions=8)
    with pytest.raises(ValueError, match="a sentence of 9 words is longer than its 8 projection rows"):
        m(torch.randn(1, 9, D))
    pad = torch.zeros(2, 12, dtype=torch.bool)
    pad[:, 8:] = True  # padded past 8, but no sentence is longer: fine
    assert m(torch.randn(2, 12, D), pad).shape == (2, 12, D)


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: SparseAttention(D, H, causal=True), "needs a fixed block_len"),
        (lambda: SparseAttention(D, H, num_blocks=0), "num_blocks must be a positive integer"),
        (lambda: SparseAttention(D, H, block_len=0), "block_len must be a positive integer"),
        (lambda: SparseAttention(D, 3), "must be divisible by num_heads"),
        (lambda: LinformerAttention(D, H, proj_len=0), r"proj_len \(--linformer-k\) must be a positive integer"),
        (lambda: SparseAttention(D, H)(torch.randn(2, 5, D), torch.zeros(2, 4, dtype=torch.bool)), "key_padding_mask"),
        (lambda: SparseAttention(D, H).step(torch.randn(2, 1, D)), "needs the causal"),
        (lambda: SparseAttention(D, H, causal=True, block_len=2).step(torch.randn(2, 3, D)), "one position"),
        (lambda: FairseqSelfAttention(make("linformer"))(torch.randn(3, 1, D), incremental_state={}), "encoder"),
        # fairseq's cross-attention and score-exposing calls are refused by name
        (lambda: FairseqSelfAttention(make("linformer"))(*torch.randn(2, 3, 1, D)), "self-attention only"),
        (lambda: FairseqSelfAttention(make("encoder-k3"))(torch.randn(3, 1, D), static_kv=True), "self-attention only"),
        (lambda: FairseqSelfAttention(make("encoder-k3"))(torch.randn(3, 1, D), before_softmax=True), "pre-softmax"),
        (
            lambda: FairseqSelfAttention(make("encoder-k3"))(torch.randn(3, 1, D), attn_mask=torch.zeros(3, 3)),
            "attn_mask",
        ),
    ],
)
def test_bad_input_is_named(build, match):
    with pytest.raises(ValueError, match=match):
        build()


# ----------------------------------------------------------------------------------------------
# inside the clusterformer model
def build_model(toy_bin, enc, dec, extra=()):
    return build_toy_model(
        toy_bin, ["--causal-window", "3", "--self-attention-encoder", enc, "--self-attention-decoder", dec, *extra]
    )


batch = toy_batch


def test_flags_reach_the_modules_and_every_parameter_learns(toy_bin):
    _, model, args = build_model(toy_bin, "linformer", "sparse", ["--max-source-positions", "40"])
    assert args.linformer_k == 32  # the default, recorded in the args
    for layer in model.encoder.layers:
        a = layer.self_attn.attention
        assert isinstance(a, LinformerAttention) and (a.proj_len, a.max_positions) == (32, 40)
        assert a.seq_proj_key.shape == (40, 32)
    for layer in model.decoder.layers:
        a = layer.self_attn.attention
        assert isinstance(a, SparseAttention) and a.causal and a.block_len == 3
    _, model, args = build_model(toy_bin, "sparse", "full", ["--num-clusters", "5"])
    assert all(layer.self_attn.attention.num_blocks == 5 for layer in model.encoder.layers)
    _, model, _ = build_model(toy_bin, "sparse", "sparse", ["--num-clusters", "auto", "--causal-num-clusters", "3"])
    assert all(layer.self_attn.attention.num_blocks == "auto" for layer in model.encoder.layers)
    _, model, _ = build_model(toy_bin, "linformer", "cluster", ["--linformer-k", "7"])
    assert all(layer.self_attn.attention.proj_len == 7 for layer in model.encoder.layers)
    for enc in ("sparse", "linformer"):  # no parameter without a gradient (DDP needs none unused)
        task, model, _ = build_model(toy_bin, enc, "sparse")
        model.train()
        src, lengths, prev = batch(task)
        out, extra = model(src, lengths, prev)
        assert extra["clustering_loss"] is None and extra["commitment_loss"] is None
        out.sum().backward()
        unused = [n for n, p in model.named_parameters() if p.grad is None and p.numel()]
        assert unused == [], (enc, unused)


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--self-attention-decoder", "linformer"], "a causal Linformer does not exist"),
        (["--self-attention-encoder", "linformer", "--linformer-k", "0"], "--linformer-k must be >= 1"),
        (["--self-attention-decoder", "sparse", "--causal-window", "0"], "--causal-window"),
    ],
)
def test_bad_options_are_refused_saying_why(toy_bin, extra, match):
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser, [str(toy_bin), "--task", "translation", "--arch", "clusterformer_iwslt", *TINY, *extra]
    )
    with pytest.raises(ValueError, match=match):
        tasks.setup_task(args).build_model(args)


def test_incremental_decoding_with_reordering_equals_full_forward(toy_bin):
    task, model, _ = build_model(toy_bin, "linformer", "sparse")
    assert_decoding_with_reordering_equals_full_forward(task, model, tgt_len=14, reorder_at=7)


@pytest.mark.parametrize("enc", ["sparse", "linformer"])
def test_decoder_is_causal_and_translation_ignores_batch_mates_and_padding(toy_bin, enc):
    task, model, _ = build_model(toy_bin, enc, "sparse")
    src, lengths, prev = batch(task)
    out, _ = model(src, lengths, prev)
    for t in (0, 4, 9):
        changed = prev.clone()
        changed[:, t + 1 :] = (changed[:, t + 1 :] + 7) % len(task.target_dictionary)
        changed[:, t + 1 :].clamp_(min=task.target_dictionary.nspecial)
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
