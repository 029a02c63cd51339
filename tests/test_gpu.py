"""The CUDA path on a GPU: the fused loss kernel against float64 PyTorch, at the sizes and inputs
where CUDA code breaks (odd and 128k vocabularies, more rows than a grid's y dimension, more
elements than an int32 offset, empty input, non-finite rows), its determinism and stream semantics,
and SDPA's FlashAttention backend on rho's grouped-query inputs.

Every test is marked ``gpu`` and skips without CUDA; ``tests/gpu/run.sh`` runs them
(``pytest -m gpu``) with the rest of the GPU acceptance checks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@pytest.fixture(autouse=True)
def cuda_kernel(monkeypatch):
    """The compiled CUDA kernel and nothing else (a failed build fails the test, never falls back)."""
    monkeypatch.setenv("RHO_KERNEL", "cuda")


def _logits(tokens: int, vocab: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = (torch.randn(tokens, vocab, device="cuda", generator=g) * 3).to(dtype)
    targets = torch.randint(0, vocab, (tokens,), device="cuda", generator=g)
    return logits, targets


def _float64_truth(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token CE and d(sum of CE)/dlogits by PyTorch in float64."""
    z = logits.detach().double().requires_grad_()
    loss = F.cross_entropy(z, targets, reduction="none")
    loss.sum().backward()
    return loss.detach(), z.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "in-place"])
@pytest.mark.parametrize("tokens,vocab", [(7, 3), (4099, 32001), (2048, 128256)])
def test_per_token_loss_and_gradient_match_float64(dtype, inplace, tokens, vocab):
    from cuda_ext import per_token_loss
    from cuda_ext.dispatch import last_choice

    logits, targets = _logits(tokens, vocab, dtype)
    want_loss, want_grad = _float64_truth(logits, targets)
    z = logits.clone().requires_grad_()
    loss = per_token_loss(z, targets, inplace_backward=inplace)
    loss.sum().backward()  # a stride-0 grad_loss, as in training
    assert last_choice()[f"cuda/{dtype}"].backend == "cuda"
    tol = TOL[dtype]
    torch.testing.assert_close(loss.double(), want_loss, rtol=tol, atol=tol)
    torch.testing.assert_close(z.grad.double(), want_grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("ratio,segment", [(0.6, None), (0.3, 16)])
def test_selection_matches_the_reference_on_the_kernels_own_excess(ratio, segment):
    from cuda_ext import selective_loss
    from cuda_ext.reference import topk_mask_reference

    logits, targets = _logits(4096, 32000, torch.bfloat16, seed=1)
    ref_loss = torch.rand(4096, device="cuda") * 8
    mask = torch.rand(4096, device="cuda") > 0.2
    out = selective_loss(logits.clone().requires_grad_(), targets, ref_loss, mask.float(), ratio, segment)
    excess = out.loss.detach() - ref_loss
    expected = topk_mask_reference(excess.cpu(), mask.cpu(), ratio, segment)
    assert torch.equal(out.kept.cpu(), expected)


def test_more_rows_than_a_grid_dimension():
    """70,000 rows: past the 65,535 limit of a CUDA grid's y and z dimensions."""
    from cuda_ext import per_token_loss

    logits, targets = _logits(70_000, 64, torch.float32)
    want_loss, want_grad = _float64_truth(logits, targets)
    z = logits.clone().requires_grad_()
    loss = per_token_loss(z, targets)
    loss.sum().backward()
    torch.testing.assert_close(loss.double(), want_loss, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(z.grad.double(), want_grad, rtol=2e-5, atol=2e-5)


def test_more_elements_than_an_int32_offset():
    """16,900 x 128,256 bf16 logits (2.17e9 elements, 4.3 GB): rows past element 2^31 are read and
    their gradients written at the right places (checked on the first and last rows)."""
    from cuda_ext import per_token_loss

    tokens, vocab = 16_900, 128_256
    assert tokens * vocab > 2**31
    logits, targets = _logits(tokens, vocab, torch.bfloat16)
    rows = torch.cat([torch.arange(4), torch.arange(tokens - 4, tokens)]).cuda()
    want_loss, want_grad = _float64_truth(logits[rows], targets[rows])
    z = logits.requires_grad_()
    loss = per_token_loss(z, targets, inplace_backward=True)
    loss.sum().backward()
    torch.testing.assert_close(loss[rows].double(), want_loss, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(z.grad[rows].double(), want_grad, rtol=2e-2, atol=2e-2)


def test_empty_input():
    from cuda_ext import per_token_loss, selective_loss

    z = torch.empty(0, 32000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    targets = torch.empty(0, dtype=torch.long, device="cuda")
    loss = per_token_loss(z, targets)
    loss.sum().backward()
    assert loss.shape == (0,) and z.grad.shape == (0, 32000)
    out = selective_loss(z, targets, torch.empty(0, device="cuda"), torch.empty(0, device="cuda"), 0.6)
    assert out.kept.shape == (0,) and int(out.n_kept) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_rows_give_torchs_logsumexp(dtype):
    from cuda_ext import dispatch

    logits = torch.randn(5, 1000, device="cuda").to(dtype)
    logits[1, 7] = float("inf")
    logits[2, 3] = float("nan")
    logits[3] = float("-inf")
    logits[4, 0] = float("nan")
    logits[4, 1] = float("inf")
    targets = torch.zeros(5, dtype=torch.long, device="cuda")
    lse, _ = dispatch.extension("cuda").row_stats(logits, targets, 0)
    expected = torch.logsumexp(logits.float(), dim=-1)
    torch.testing.assert_close(lse, expected, equal_nan=True, rtol=1e-5, atol=1e-5)


def test_deterministic():
    """Two runs on the same inputs: bitwise equal losses, gradients and selections."""
    from cuda_ext import selective_loss

    logits, targets = _logits(8192, 32000, torch.bfloat16, seed=3)
    ref_loss = torch.rand(8192, device="cuda") * 8
    mask = torch.ones(8192, device="cuda")
    runs = []
    for _ in range(2):
        z = logits.clone().requires_grad_()
        out = selective_loss(z, targets, ref_loss, mask, 0.6, 2048)
        out.mean_kept_loss().backward()
        runs.append((out.loss.detach(), out.kept, z.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_kernels_run_on_the_current_stream():
    """The logits are written on a side stream that is still busy (a long sleep first); the kernels
    enqueued on that stream must see them. Launched on the default stream instead, they would read
    the zeros that were there before."""
    from cuda_ext import per_token_loss

    source, targets = _logits(4096, 32000, torch.float32, seed=4)
    want_loss, _ = _float64_truth(source, targets)
    logits = torch.zeros_like(source)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time on this stream only
        logits.copy_(source)
        loss = per_token_loss(logits, targets)
    side.synchronize()
    torch.testing.assert_close(loss.double(), want_loss, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sdpa_takes_the_flash_backend_with_rhos_gqa_inputs(dtype):
    """rho's attention (``parallel.attention.causal_sdpa``: megatron's [s, b, heads, hn] layout as
    strided views, grouped-query K/V) runs on FlashAttention (only that backend allowed) and equals
    the math backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from parallel.attention import causal_sdpa

    s, b, heads, groups, hn = 2048, 2, 32, 4, 64  # TinyLlama's attention shape
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(s, b, heads, hn, device="cuda", generator=g).to(dtype)
    k = torch.randn(s, b, groups, hn, device="cuda", generator=g).to(dtype)
    v = torch.randn(s, b, groups, hn, device="cuda", generator=g).to(dtype)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        flash = causal_sdpa(q, k, v, None)
    with sdpa_kernel(SDPBackend.MATH):
        math_ = causal_sdpa(q.float(), k.float(), v.float(), None)
    assert flash.shape == (s, b, heads * hn)
    torch.testing.assert_close(flash.float(), math_, rtol=2e-2, atol=2e-2)


def test_transformer_engine_layers_take_the_local_specs_weights_and_agree(monkeypatch):
    """The Transformer Engine backend has the local spec's parameter names (a checkpoint of either
    loads into the other) and, given the same weights, the same logits within bf16 tolerance."""
    from parallel.model import LayerBackend, _te_importable, build_model, model_shape

    if not _te_importable():
        pytest.skip("transformer_engine does not import here")
    from parallel.config import ModelConfig
    from parallel.distributed import destroy_distributed, init_distributed

    for name, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT="29533").items():
        monkeypatch.setenv(name, value)
    init_distributed(1, 1, seed=0)
    try:
        cfg = ModelConfig(num_layers=2, hidden_size=256, ffn_hidden_size=688, num_attention_heads=8,
                          num_query_groups=2, max_position_embeddings=512, vocab_size=1000)
        shape = model_shape(cfg, 1000, 1, torch.bfloat16)
        local = build_model(cfg, shape, 1, 1, True, True, backend=LayerBackend("local", "sdpa", True)).cuda()
        te = build_model(cfg, shape, 1, 1, True, True, backend=LayerBackend("transformer_engine", "te", True))
        weights = {k: v for k, v in local.state_dict().items() if "_extra_state" not in k}
        assert weights.keys() == {k for k in te.state_dict() if "_extra_state" not in k}
        te.load_state_dict(weights, strict=False)
        tokens = torch.randint(0, 1000, (2, 256), device="cuda")
        positions = torch.arange(256, device="cuda").expand(2, -1)
        with torch.no_grad():
            a = local(tokens, positions, attention_mask=None).float()
            b = te(tokens, positions, attention_mask=None).float()
        torch.testing.assert_close(b, a, rtol=5e-2, atol=5e-2)
    finally:
        destroy_distributed()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_documents_mask_on_cuda_equals_each_document_alone(dtype):
    """``--separate-documents`` on a GPU: the local spec is chosen even where Transformer Engine is
    installed, and SDPA with GPTDataset's mask of packed documents gives, for every document, what
    causal attention over that document alone gives."""
    from parallel.attention import causal_sdpa
    from parallel.model import layer_backend

    assert layer_backend(on_gpu=True, te_available=True, local=True).layer_spec == "local"
    g = torch.Generator(device="cuda").manual_seed(3)
    s, b, heads, groups, hn = 96, 2, 8, 2, 64
    q = torch.randn(s, b, heads, hn, device="cuda", generator=g, dtype=dtype)
    k = torch.randn(s, b, groups, hn, device="cuda", generator=g, dtype=dtype)
    v = torch.randn(s, b, groups, hn, device="cuda", generator=g, dtype=dtype)
    cuts = [0, 30, 31, 70, 96]  # a one-token document included
    doc = torch.repeat_interleave(torch.arange(4, device="cuda"), torch.tensor(cuts, device="cuda").diff())
    visible = torch.tril(torch.ones(s, s, dtype=torch.bool, device="cuda")) & (doc[:, None] == doc[None, :])
    packed = causal_sdpa(q, k, v, None, visible[None, None].expand(b, 1, s, s))
    for a, e in zip(cuts, cuts[1:]):
        alone = causal_sdpa(q[a:e], k[a:e], v[a:e], None)
        torch.testing.assert_close(packed[a:e], alone, atol=TOL[dtype] * 10, rtol=TOL[dtype] * 10)
