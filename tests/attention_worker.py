"""Run under torchrun: rho's SDPAttention against megatron-core's own DotProductAttention on the same
random query/key/value (this rank's heads), forward and backward. Writes OUT_DIR/rank<R>.txt, one
line per case: ``CASE max_forward_diff max_grad_diff fused`` (fused: whether SDPAttention took its
SDPA path). Usage: attention_worker.py TP OUT_DIR"""

import sys

import torch


def main() -> None:
    tp, out_dir = int(sys.argv[1]), sys.argv[2]
    from rhocli.core.megatron_io import import_megatron

    import_megatron()  # as rho's ranks do: quietly, torch.compile deferred
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from parallel.attention import SDPAttention
    from parallel.config import ModelConfig
    from parallel.distributed import destroy_distributed, init_distributed
    from parallel.model import transformer_config

    init_distributed(tp, 1, seed=0)
    rank = ps.get_tensor_model_parallel_rank()
    lines = []
    # (heads, KV groups, head size, sequence, batch, mask type)
    cases = {
        "gqa": (4, 2, 16, 24, 3, AttnMaskType.causal),
        "mha": (4, 4, 8, 17, 2, AttnMaskType.causal),
        "no_mask_type": (4, 2, 16, 9, 2, AttnMaskType.no_mask),  # not causal: megatron's own path
        "packed": (4, 2, 16, 24, 2, AttnMaskType.causal),  # + GPTDataset's mask of packed documents
    }
    for name, (heads, groups, head, s, b, mask_type) in cases.items():
        cfg = ModelConfig(num_layers=1, hidden_size=heads * head, ffn_hidden_size=4 * heads * head,
                          num_attention_heads=heads, num_query_groups=groups, max_position_embeddings=64)
        config = transformer_config(cfg, tp, 1, torch.float32)
        ours = SDPAttention(config, layer_number=1, attn_mask_type=mask_type, attention_type="self")
        theirs = DotProductAttention(config, layer_number=1, attn_mask_type=mask_type, attention_type="self")
        g = torch.Generator().manual_seed(1234 + rank)
        q = torch.randn(s, b, heads // tp, head, generator=g)
        k = torch.randn(s, b, groups // tp, head, generator=g)
        v = torch.randn(s, b, groups // tp, head, generator=g)
        upstream = torch.randn(s, b, heads // tp * head, generator=g)
        results = []
        for module in (ours, theirs):
            qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
            mask = None
            if mask_type == AttnMaskType.no_mask:
                mask = torch.zeros(b, 1, s, s, dtype=torch.bool)  # attend everywhere
            if name == "packed":  # documents [0, 7), [7, 15), [15, 24): True = hidden (megatron's convention)
                doc = torch.tensor([0] * 7 + [1] * 8 + [2] * 9)
                visible = torch.tril(torch.ones(s, s, dtype=torch.bool)) & (doc[:, None] == doc[None, :])
                mask = (~visible)[None, None].expand(b, 1, s, s)
            out = module(qq, kk, vv, mask)
            (out * upstream).sum().backward()
            results.append((out.detach(), [t.grad for t in (qq, kk, vv)]))
        fused = ours._fused_path(None if name in ("gqa", "mha") else mask, None, None, None)
        fwd = (results[0][0] - results[1][0]).abs().max().item()
        grad = max((a - c).abs().max().item() for a, c in zip(results[0][1], results[1][1]))
        lines.append(f"{name} {fwd:.3e} {grad:.3e} {int(fused)}\n")
    with open(f"{out_dir}/rank{rank}.txt", "w") as f:
        f.writelines(lines)
    destroy_distributed()


if __name__ == "__main__":
    main()
