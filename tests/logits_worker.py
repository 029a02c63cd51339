"""Run under torchrun: rho's full-vocabulary logits for a token batch from a rho checkpoint, at the
layout given, saved by the rank that holds them (last pipeline stage, TP rank 0) for the test to
compare with transformers. Usage: logits_worker.py CKPT TOKENS.pt OUT.pt TP PP"""

import sys

import torch
import torch.distributed as dist


def main() -> None:
    ckpt_path, tokens_path, out_path, tp, pp = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    from rhocli.core.megatron_io import import_megatron

    import_megatron()  # as rho's ranks do: quietly, torch.compile deferred
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from parallel.checkpoint import load_checkpoint
    from parallel.config import ModelConfig
    from parallel.distributed import destroy_distributed, init_distributed
    from parallel.model import build_model, model_shape
    from rhocli.core.formats import checkpoint as ckpt

    init_distributed(tp, pp, seed=0)
    step = ckpt.resolve_checkpoint(ckpt_path)
    manifest = ckpt.read_manifest(step)
    cfg = ModelConfig(**manifest["model"])
    shape = model_shape(cfg, manifest["vocab_size"], tp, torch.float32)
    model = build_model(cfg, shape, tp, pp, ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage())
    load_checkpoint(step, [model])
    model.eval()
    tokens = torch.load(tokens_path)  # [b, s]
    b, s = tokens.shape
    store = {}

    def forward_step(data_iterator, m):
        batch = next(data_iterator)
        out = m(batch, torch.arange(s).unsqueeze(0).expand(b, s), attention_mask=None)

        def loss_func(logits):
            store["logits"] = logits.detach()
            return logits.sum(), torch.tensor(1, dtype=torch.int), {}

        return out, loss_func

    with torch.no_grad():
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([tokens]), model=[model],
                                    num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=True)
    if ps.is_pipeline_last_stage():
        local = store["logits"].contiguous()  # [b, s, vocab/tp]
        parts = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(parts, local, group=ps.get_tensor_model_parallel_group())
        if ps.get_tensor_model_parallel_rank() == 0:
            full = torch.cat(parts, dim=-1)[..., : manifest["vocab_size"]]
            torch.save(full, out_path)
    destroy_distributed()


if __name__ == "__main__":
    main()
