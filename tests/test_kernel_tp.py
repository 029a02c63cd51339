"""Vocab-parallel fused selective loss in real gloo process groups: TP=2 and TP=4 give the same loss,
mask and (concatenated) gradient as TP=1, for the reference and for each kernel implementation."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.multiprocessing as mp

HAS_CXX = bool(shutil.which("c++") or shutil.which("g++"))


def _inputs(tokens=48, vocab=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, vocab, generator=g) * 3
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    ref_loss = torch.rand(tokens, generator=g) * 6
    mask = (torch.rand(tokens, generator=g) > 0.25).float()
    return logits, targets, ref_loss, mask


def _worker(rank, world, init_file, out_dir, kernel, fn_name):
    import torch.distributed as dist

    os.environ["RHO_KERNEL"] = kernel
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from cuda_ext import selective_loss, selective_loss_reference

        fn = selective_loss if fn_name == "fused" else selective_loss_reference
        logits, targets, ref_loss, mask = _inputs()
        shard = logits.shape[1] // world
        z = logits[:, rank * shard:(rank + 1) * shard].clone().requires_grad_()
        out = fn(z, targets, ref_loss, mask, 0.6, 12, vocab_start_index=rank * shard, tp_group=dist.group.WORLD)
        out.mean_kept_loss().backward()
        torch.save({"loss": out.loss.detach(), "kept": out.kept, "n": out.n_kept, "grad": z.grad}, f"{out_dir}/r{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kernel,fn_name", [("torch", "reference"), ("torch", "fused"),
                                            pytest.param("cpu", "fused", marks=pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler"))])
def test_tp_equals_tp1(tmp_path, world, kernel, fn_name):
    from cuda_ext import selective_loss_reference

    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path), kernel, fn_name), nprocs=world, join=True)
    logits, targets, ref_loss, mask = _inputs()
    z = logits.double().requires_grad_()
    ref = selective_loss_reference(z, targets, ref_loss.double(), mask, 0.6, 12)
    ref.mean_kept_loss().backward()
    results = [torch.load(tmp_path / f"r{r}.pt") for r in range(world)]
    for r in results:  # identical on all TP ranks
        assert torch.equal(r["loss"], results[0]["loss"]) and torch.equal(r["kept"], results[0]["kept"])
    assert torch.allclose(results[0]["loss"].double(), ref.loss, atol=2e-5)
    assert torch.equal(results[0]["kept"], ref.kept) and int(results[0]["n"]) == int(ref.n_kept)
    grad = torch.cat([r["grad"] for r in results], dim=1)
    assert torch.allclose(grad.double(), z.grad, atol=2e-6)
