"""The model: shapes, parameter counts, causality, the BERT loss, features, the KV cache and sampling."""

import math

import pytest
import torch

from igpt.generation.complete import generate, sample_next
from igpt.model.gpt import IGPT, PRESETS, IGPTConfig


def tiny(objective="ar", bias=False, **kw):
    torch.manual_seed(0)
    cfg = IGPTConfig(
        vocab_size=11, n_positions=20, n_layer=2, n_embd=24, n_head=3, bias=bias, objective=objective, **kw
    )
    m = IGPT(cfg)
    torch.nn.init.normal_(m.lm_head.weight, 0, 0.5)  # the zero-initialised head would hide bugs
    return m.eval()


def test_shapes_and_initial_loss():
    cfg = IGPTConfig(vocab_size=16, n_positions=64, n_layer=2, n_embd=32, n_head=4)
    m = IGPT(cfg)
    x = torch.randint(0, 16, (3, 64))
    logits, loss = m(x)
    assert logits.shape == (3, 64, 16)
    assert math.isclose(float(loss.detach()), math.log(16), rel_tol=1e-6)  # zero head: uniform prediction
    assert m.wte.weight.shape == (17, 32) and m.lm_head.weight.shape == (16, 32)  # SOS is input only


@pytest.mark.parametrize(
    "name, count", [("igpt-s", 76_571_648), ("igpt-m", 455_157_760), ("igpt-l", 1_362_250_752)]
)
def test_paper_parameter_counts(name, count):
    with torch.device("meta"):
        m = IGPT(IGPTConfig(vocab_size=512, n_positions=1024, **PRESETS[name]))
    assert m.num_params() == count


def test_norm_is_rms_without_centring_and_quick_gelu():
    from igpt.model.gpt import RMSNorm, quick_gelu

    n = RMSNorm(4)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(n(x), expected)
    assert not any("bias" in k for k in n.state_dict())
    torch.testing.assert_close(quick_gelu(x), x * torch.sigmoid(1.702 * x))


def test_ar_causality():
    m = tiny()
    x = torch.randint(0, 11, (2, 20))
    base = m.logits(x)
    for t in (0, 7, 19):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % 11
        out = m.logits(y)
        # logits row s predicts token s from tokens < s: rows <= t never see token t
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1])
        if t < 19:
            assert not torch.allclose(out[:, t + 1 :], base[:, t + 1 :])


@pytest.mark.parametrize("pattern", ["causal", "bidirectional", "mask"])
def test_matmul_attention_matches_the_fused_kernel(pattern, monkeypatch):
    """Training in bf16 on CPU takes attention's plain-product path; its output and gradients match
    scaled_dot_product_attention's (the fused path, forced by a zero length limit) for every pattern."""
    import igpt.model.gpt as M

    T = 12
    torch.manual_seed(1)
    q0, k0, v0 = (torch.randn(2, 3, T, 8) for _ in range(3))
    prefix = torch.arange(T) < 5
    causal = {
        "causal": True,
        "bidirectional": False,
        "mask": (torch.arange(T)[:, None] >= torch.arange(T)) | (prefix[:, None] & prefix[None, :]),
    }[pattern]
    g = torch.randn(2, 3, T, 8)

    def run(max_t):
        monkeypatch.setattr(M, "MATMUL_ATTENTION_MAX_T", max_t)
        q, k, v = (t.to(torch.bfloat16).requires_grad_() for t in (q0, k0, v0))
        y = M.attention(q, k, v, causal)
        (y.float() * g).sum().backward()
        return [t.float() for t in (y, q.grad, k.grad, v.grad)]

    fused, matmul = run(0), run(256)
    for a, b in zip(fused, matmul, strict=True):
        torch.testing.assert_close(b, a, atol=3e-2, rtol=3e-2)
    if pattern == "causal":  # the first query sees only the first key: its output is v's first row
        torch.testing.assert_close(matmul[0][:, :, 0], v0[:, :, 0].to(torch.bfloat16).float())


def test_ar_loss_is_next_token_cross_entropy():
    m = tiny()
    x = torch.randint(0, 11, (2, 20))
    logits, loss = m(x)
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), x.reshape(-1))
    torch.testing.assert_close(loss, ref)


def test_bert_loss_counts_only_masked_tokens():
    m = tiny("bert")
    x = torch.randint(0, 11, (2, 20))
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[0, 3] = mask[1, 10] = mask[1, 11] = True
    logits, loss = m(x, mask)
    ref = torch.nn.functional.cross_entropy(logits[mask], x[mask])
    torch.testing.assert_close(loss, ref)
    # changing an unmasked target token's identity where it is visible changes the inputs; changing the target
    # of a masked position does not change the logits (the model sees the mask embedding there)
    y = x.clone()
    y[0, 3] = (y[0, 3] + 1) % 11
    torch.testing.assert_close(m(y, mask)[0], logits)
    # bidirectional: the last token influences the first position's logits
    z = x.clone()
    z[:, 19] = (z[:, 19] + 1) % 11
    assert not torch.allclose(m.logits(z)[:, 0], m.logits(x)[:, 0])


def test_features_are_mean_of_normed_states():
    m = tiny()
    x = torch.randint(0, 11, (5, 20))
    f = m.features(x, layers=[0, 1, 2], batch_size=2)
    assert sorted(f) == [0, 1, 2] and f[0].shape == (5, 24)
    hs = m.get_intermediate_layers(x, [2])
    torch.testing.assert_close(f[2], hs[2].mean(1))
    emb = m.embed(x)
    torch.testing.assert_close(f[0], m.h[0].ln_1(emb).mean(1))
    with pytest.raises(ValueError):
        m.features(x, layers=[3])


@pytest.mark.parametrize("bias,fold", [(False, True), (True, True), (True, False)])
def test_kv_cache_matches_full_forward(bias, fold, monkeypatch):
    from igpt.generation.complete import DecodeWeights

    # fold=False: the decode path of models too big to copy their weights (norm gains applied, not folded)
    monkeypatch.setattr(DecodeWeights, "FOLD_LIMIT", DecodeWeights.FOLD_LIMIT if fold else 0)
    m = tiny(bias=bias)
    assert DecodeWeights(m).folded == fold
    for p in m.parameters():
        torch.nn.init.normal_(p, 0, 0.2)
    x = torch.randint(0, 11, (3, 20))
    # greedy generation with the cache must equal argmax of full forward passes, token by token
    prefix = x[:, :5]
    out = generate(m, prefix, 15, temperature=0)
    seq = prefix
    for _ in range(15):
        nxt = m.logits(torch.cat([seq, torch.zeros(3, 1, dtype=torch.long)], 1))[:, seq.shape[1]].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], 1)
    torch.testing.assert_close(out, seq)
    # cached logits equal the full forward's within float tolerance
    from igpt.generation.complete import KVCache, decode_step

    cache = KVCache(m.config, 3, 20, "cpu", torch.float32)
    inp = torch.cat([torch.full((3, 1), 11), x[:, :-1]], 1)
    rows = []
    for t in range(20):
        h = m.wte(inp[:, t : t + 1]) + m.wpe.weight[t : t + 1]
        for i, blk in enumerate(m.h):
            h = blk(h, True, cache.slot(i))
        cache.pos += 1
        rows.append(m.lm_head(m.ln_f(h)))
    torch.testing.assert_close(torch.cat(rows, 1), m.logits(x), rtol=1e-5, atol=1e-5)
    # the fast decode step's logits (folded or not) equal the full forward's, position by position
    cache = KVCache(m.config, 3, 20, "cpu", torch.float32)
    h = m.wte(inp[:, :1]) + m.wpe.weight[:1]
    for i, blk in enumerate(m.h):
        h = blk(h, True, cache.slot(i))
    cache.pos = 1
    w = DecodeWeights(m)
    steps = [m.lm_head(m.ln_f(h))[:, 0]]
    for t in range(1, 20):
        steps.append(decode_step(m, inp[:, t], cache, w))  # the token at position t -> logits of position t
    torch.testing.assert_close(torch.stack(steps, 1), m.logits(x), rtol=1e-4, atol=1e-4)


def test_generate_seeded_and_unconditional():
    m = tiny()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = generate(m, torch.zeros(4, 0, dtype=torch.long), 20, generator=g1)
    b = generate(m, torch.zeros(4, 0, dtype=torch.long), 20, generator=g2)
    assert a.shape == (4, 20) and torch.equal(a, b)
    assert a.min() >= 0 and a.max() < 11


def test_sampling_filters():
    torch.manual_seed(0)
    logits = torch.randn(64, 11) * 3
    g = torch.Generator().manual_seed(0)
    allowed_k = torch.topk(logits, 3).indices
    for _ in range(20):
        s = sample_next(logits, 1.0, top_k=3, generator=g)
        assert (allowed_k == s[:, None]).any(1).all()
    probs = torch.softmax(logits, -1)
    srt, idx = probs.sort(-1, descending=True)
    keep_n = ((srt.cumsum(-1) - srt) < 0.5).sum(-1)  # smallest prefix reaching 0.5
    for _ in range(20):
        s = sample_next(logits, 1.0, top_p=0.5, generator=g)
        rank = (idx == s[:, None]).float().argmax(-1)
        assert (rank < keep_n).all()
    torch.testing.assert_close(sample_next(logits, 1e-6, generator=g), logits.argmax(-1))
    torch.testing.assert_close(sample_next(logits, 0.0), logits.argmax(-1))


def test_tiny_model_overfits_a_few_images():
    torch.manual_seed(0)
    m = IGPT(IGPTConfig(vocab_size=8, n_positions=16, n_layer=2, n_embd=32, n_head=2))
    x = torch.randint(0, 8, (4, 16))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, betas=(0.9, 0.95))
    for _ in range(300):
        _, loss = m(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.1  # from ln 8 = 2.08
