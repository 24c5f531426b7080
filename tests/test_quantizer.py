"""The residual quantizer against independent float64 references."""

import threading

import pytest
import torch

from evotok_hf.modeling.quantizer import EvoTokResidualQuantizer


def make_quantizer(size=64, dim=8, pixel=2, semantic=4, **kwargs):
    torch.manual_seed(0)
    return EvoTokResidualQuantizer(size, dim, pixel, semantic, **kwargs)


def brute_force_codes(codebook: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """float64, full distance tensor (no matmul trick), first index on ties."""
    cb = codebook.double()
    residual = x.double().clone()
    codes = []
    for depth in range(cb.shape[0]):
        distances = ((residual[:, None, :] - cb[depth][None, :, :]) ** 2).sum(-1)
        idx = distances.argmin(dim=1)
        residual = residual - cb[depth][idx]
        codes.append(idx)
    return torch.stack(codes, dim=-1)


@pytest.mark.parametrize("chunk", [None, 1, 7, 1000])
def test_codes_equal_float64_brute_force_at_every_depth(chunk):
    q = make_quantizer(size=128, dim=8, semantic=6, search_chunk_size=chunk).eval()
    x = torch.randn(300, 8)
    out = q(x)
    expected = brute_force_codes(q.codebook, x)
    assert out.codes.shape == (300, 6)
    assert out.codes.dtype == torch.int64
    assert torch.equal(out.codes, expected)


@pytest.mark.parametrize("workers,chunk", [(2, 7), (3, 1), (4, 64), (2, None)])
def test_worker_pool_search_equals_brute_force_and_leaves_thread_settings(workers, chunk):
    """The CPU search with a pool of single-threaded workers gives the float64 codes and the caller's thread count;
    threads started afterwards get the process's setting again, not the workers' 1."""
    q = make_quantizer(size=128, dim=8, semantic=6, search_chunk_size=chunk, search_workers=workers).eval()
    if chunk is None:
        q._CPU_BLOCK_BYTES = 4 * 128 * workers * 16  # 16 rows a block: 300 rows make 19 blocks
    x = torch.randn(300, 8)
    before = torch.get_num_threads()
    out = q(x)
    assert torch.equal(out.codes, brute_force_codes(q.codebook, x))
    assert torch.get_num_threads() == before
    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert seen == [before]


def test_worker_pool_training_step_equals_the_serial_one():
    """EMA updates, restarts and every output of a training step are the same with one worker or several."""
    x = torch.randn(200, 8) * 2
    results = []
    for workers in (1, 3):
        q = make_quantizer(size=128, dim=8, semantic=5, search_chunk_size=9, search_workers=workers).train()
        torch.manual_seed(1)
        out = q(x)
        results.append((out.codes, out.semantic_latents, out.commitment_loss, q.codebook.clone(), q.cluster_size_ema.clone()))
    for serial, pooled in zip(*results):
        assert torch.equal(serial, pooled)


def test_partial_sums_and_commitment_loss_match_independent_computation():
    q = make_quantizer(semantic=5, pixel=3).eval()
    x = torch.randn(4, 3, 3, 8)
    out = q(x)
    codes = brute_force_codes(q.codebook, x.reshape(-1, 8))
    embeds = torch.stack([q.codebook[d].double()[codes[:, d]] for d in range(5)], dim=1)  # (N, D, dim)
    partial = embeds.cumsum(dim=1)
    torch.testing.assert_close(out.pixel_latents.reshape(-1, 8).double(), partial[:, 2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.semantic_latents.reshape(-1, 8).double(), partial[:, 4], rtol=1e-5, atol=1e-5)
    xd = x.reshape(-1, 1, 8).double()
    expected_commit = ((xd - partial) ** 2).mean(dim=(0, 2)).mean()
    torch.testing.assert_close(out.commitment_loss.double(), expected_commit, rtol=1e-5, atol=1e-7)


def test_straight_through_gradients_for_both_sums():
    q = make_quantizer().eval()
    x = torch.randn(10, 8, requires_grad=True)
    out = q(x)
    w_pix, w_sem = torch.randn(10, 8), torch.randn(10, 8)
    (out.pixel_latents * w_pix).sum().backward(retain_graph=True)
    torch.testing.assert_close(x.grad, w_pix)  # identity gradient through the pixel sum
    x.grad = None
    (out.semantic_latents * w_sem).sum().backward(retain_graph=True)
    torch.testing.assert_close(x.grad, w_sem)
    x.grad = None
    out.commitment_loss.backward()
    # d/dx mean_d mean((x - p_d)^2) = 2 (x - mean_d p_d) / numel
    codes = brute_force_codes(q.codebook, x.detach())
    partial = torch.stack([q.codebook[d][codes[:, d]] for d in range(4)], 1).cumsum(1)
    expected = 2 * (x.detach() - partial.mean(1)) / x.numel()
    torch.testing.assert_close(x.grad, expected, rtol=1e-4, atol=1e-6)
    assert q.codebook.grad is None


def test_usage_and_perplexity_match_histograms():
    q = make_quantizer(size=16, semantic=3).eval()
    x = torch.randn(50, 8)
    out = q(x)
    for d in range(3):
        counts = torch.bincount(out.codes[:, d], minlength=16).double()
        p = counts / counts.sum()
        nz = p[p > 0]
        assert out.codebook_usage[d].item() == pytest.approx((counts > 0).double().mean().item())
        assert out.perplexity[d].item() == pytest.approx(torch.exp(-(nz * nz.log()).sum()).item(), rel=1e-5)


def reference_ema(codebook, cluster, embed_sum, x, decay, eps, warming_up):
    """Straightforward float64 EMA step of every depth (no restart), following the residual of the pre-update codebooks."""
    cb, cs, es = codebook.double().clone(), cluster.double().clone(), embed_sum.double().clone()
    residual = x.double().clone()
    size = cb.shape[1]
    for d in range(cb.shape[0]):
        idx = ((residual[:, None] - cb[d][None]) ** 2).sum(-1).argmin(1)
        onehot = torch.zeros(residual.shape[0], size, dtype=torch.float64)
        onehot[torch.arange(residual.shape[0]), idx] = 1
        chosen = cb[d][idx].clone()
        cs[d] = decay * cs[d] + (1 - decay) * onehot.sum(0)
        n = cs[d].sum()
        smoothed = torch.clamp(n * (cs[d] + eps) / (n + size * eps), min=1.0)
        if warming_up:
            es[d] = cb[d] * smoothed[:, None]
        else:
            es[d] = decay * es[d] + (1 - decay) * onehot.t() @ residual
            cb[d] = es[d] / smoothed[:, None]
        residual = residual - chosen
    return cb, cs, es


def test_ema_update_matches_reference():
    q = make_quantizer(size=32, dim=4, pixel=1, semantic=3, restart_unused_codes=False).train()
    x = torch.randn(200, 4)
    for _ in range(3):
        expected = reference_ema(q.codebook, q.cluster_size_ema, q.embed_ema, x, 0.99, 1e-5, warming_up=False)
        q(x)
        for got, want in zip((q.codebook, q.cluster_size_ema, q.embed_ema), expected):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert int(q.ema_step) == 3


def test_ema_warmup_keeps_codebook_then_starts_updating():
    q = make_quantizer(size=32, dim=4, pixel=1, semantic=2, restart_unused_codes=False, ema_warmup_steps=2).train()
    x = torch.randn(100, 4)
    initial = q.codebook.detach().clone()
    for step in range(2):
        expected = reference_ema(q.codebook, q.cluster_size_ema, q.embed_ema, x, 0.99, 1e-5, warming_up=True)
        q(x)
        assert torch.equal(q.codebook, initial), "codebook moved during warm-up"
        torch.testing.assert_close(q.cluster_size_ema.double(), expected[1])
        torch.testing.assert_close(q.embed_ema.double(), expected[2], rtol=1e-5, atol=1e-6)
    expected = reference_ema(q.codebook, q.cluster_size_ema, q.embed_ema, x, 0.99, 1e-5, warming_up=False)
    q(x)
    assert not torch.equal(q.codebook, initial)
    torch.testing.assert_close(q.codebook.double(), expected[0], rtol=1e-5, atol=1e-6)


def test_dead_code_restart_replaces_unused_entries_with_batch_vectors():
    q = make_quantizer(size=64, dim=4, pixel=1, semantic=1).train()
    x = torch.randn(20, 4) * 0.1 + 5.0  # far from every entry: few entries win, the rest die
    before = q.codebook.detach().clone()
    counts = torch.bincount(brute_force_codes(before, x)[:, 0], minlength=64)
    q(x)
    # After one step from zero, every EMA count is 0.01 * count < 1: every entry restarts with count 1.
    assert torch.equal(q.cluster_size_ema[0], torch.ones(64))
    assert counts.sum() == 20
    # Restarted entries are vectors of this batch (the residual at depth 0 is x itself); 64 entries from 20 vectors
    # means the batch is tiled with uniform noise of at most 0.01 / sqrt(dim) per coordinate.
    distances = torch.cdist(q.codebook[0].double(), x.double())
    assert distances.min(dim=1).values.max() < 0.011
    assert len(torch.unique(q.codebook[0], dim=0)) == 64
    # Without restart the dead entries would keep moving toward zero, not onto the data.
    q2 = make_quantizer(size=64, dim=4, pixel=1, semantic=1, restart_unused_codes=False).train()
    q2(x)
    assert torch.cdist(q2.codebook[0].double(), x.double()).min(dim=1).values.max() > 1.0


def test_restart_only_touches_dead_entries():
    q = make_quantizer(size=8, dim=4, pixel=1, semantic=1).train()
    with torch.no_grad():
        q.cluster_size_ema.fill_(50.0)
        q.cluster_size_ema[0, 3] = 0.5  # the only dead entry (it will get no assignment below)
    x = q.codebook[0, [0, 1, 2]].detach().repeat(10, 1)  # all vectors land exactly on entries 0, 1, 2
    q(x)
    assert q.cluster_size_ema[0, 3] == 1.0
    assert torch.cdist(q.codebook[0, 3:4].double(), x.double()).min() < 1e-3
    assert (q.cluster_size_ema[0, [4, 5, 6, 7]] > 1).all()


def test_quantizer_is_fp32_and_identical_under_bf16_autocast():
    q = make_quantizer(size=256, dim=8, semantic=4).eval()
    x = torch.randn(500, 8)
    reference = q(x).codes
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(x)
        out_bf16_input = q(x.bfloat16())
    assert torch.equal(out.codes, reference)
    assert torch.equal(out_bf16_input.codes, brute_force_codes(q.codebook, x.bfloat16().float()))
    assert out_bf16_input.pixel_latents.dtype == torch.bfloat16


def test_embed_codes_any_prefix_and_cumulative():
    q = make_quantizer(semantic=4).eval()
    codes = torch.randint(0, 64, (2, 3, 4))
    for k in range(1, 5):
        expected = sum(q.codebook[d][codes[..., d]] for d in range(k))
        torch.testing.assert_close(q.embed_codes(codes[..., :k]), expected)
    cumulative = q.embed_codes(codes, return_cumulative=True)
    assert cumulative.shape == (2, 3, 4, 8)
    torch.testing.assert_close(cumulative[..., 1, :], q.codebook[0][codes[..., 0]] + q.codebook[1][codes[..., 1]])


@pytest.mark.parametrize(
    "codes, message",
    [
        (torch.zeros(2, 3, dtype=torch.int32), "int64"),
        (torch.zeros(2, 3), "int64"),
        (torch.zeros(2, 5, dtype=torch.long), "1 <= k <= 4"),
        (torch.zeros(2, 0, dtype=torch.long), "1 <= k <= 4"),
        (torch.full((2, 3), 64, dtype=torch.long), r"\[0, 64\)"),
        (torch.full((2, 3), -1, dtype=torch.long), r"\[0, 64\)"),
        ([[1, 2]], "torch.Tensor"),
    ],
)
def test_embed_codes_rejects_bad_codes(codes, message):
    with pytest.raises(ValueError, match=message):
        make_quantizer().embed_codes(codes)


def test_forward_rejects_bad_latents():
    q = make_quantizer()
    with pytest.raises(ValueError, match="codebook_dim=8"):
        q(torch.randn(3, 7))
    with pytest.raises(ValueError, match="floating point"):
        q(torch.ones(3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="pixel_depth"):
        EvoTokResidualQuantizer(8, 4, 0, 2)
    with pytest.raises(ValueError, match="semantic_depth"):
        EvoTokResidualQuantizer(8, 4, 2, -1)


def test_eval_mode_does_not_update():
    q = make_quantizer().eval()
    state = {k: v.clone() for k, v in q.state_dict().items()}
    q(torch.randn(30, 8))
    for k, v in q.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("size", [64, 96, 512, 1000])
def test_two_level_argmin_equals_argmin_including_ties(size):
    q = make_quantizer(size=size)
    distances = torch.randint(0, 5, (40, size)).float()  # many exact ties: the first index must win
    torch.testing.assert_close(q._first_argmin(distances), distances.argmin(dim=1), rtol=0, atol=0)
    distances = torch.randn(40, size)
    assert torch.equal(q._first_argmin(distances), distances.argmin(dim=1))


def test_restart_during_warmup_moves_only_dead_entries_and_keeps_sums_consistent():
    q = make_quantizer(size=16, dim=4, pixel=1, semantic=1, ema_warmup_steps=5).train()
    with torch.no_grad():
        q.cluster_size_ema.fill_(50.0)
        q.cluster_size_ema[0, :4] = 0.5  # entries 0..3 are dead and get no assignment below
    before = q.codebook.detach().clone()
    x = before[0, 4:8].repeat(5, 1)
    q(x)
    assert torch.equal(q.codebook[0, 4:], before[0, 4:])  # live entries stay put during the warm-up
    assert torch.cdist(q.codebook[0, :4].double(), x.double()).min(dim=1).values.max() < 1e-6
    cs = q.cluster_size_ema[0].double()
    smoothed = (cs.sum() * (cs + 1e-5) / (cs.sum() + 16 * 1e-5)).clamp(min=1)
    torch.testing.assert_close(q.embed_ema[0].double(), q.codebook[0].double() * smoothed[:, None])


def test_non_finite_latents_never_reach_the_ema_state():
    q = make_quantizer().train()
    state = {k: v.clone() for k, v in q.state_dict().items()}
    x = torch.randn(30, 8)
    x[3, 2] = float("nan")
    q(x)
    for k, v in q.state_dict().items():
        assert torch.equal(v, state[k]), k
    q(torch.randn(30, 8))
    assert int(q.ema_step) == 1  # a finite batch updates as usual
