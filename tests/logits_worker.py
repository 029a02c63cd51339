"""Run under torchrun: rho's full-vocabulary logits for token batches from rho checkpoints, at the
layout given, each saved by the rank that holds them (last pipeline stage, TP rank 0) for the test to
compare with transformers. One launch serves several checkpoints (each rank's megatron-core import
and process groups are paid once). Usage: logits_worker.py TP PP CKPT TOKENS.pt OUT.pt [CKPT TOKENS.pt OUT.pt ...]"""

import sys

import torch
import torch.distributed as dist


def logits_of(ckpt_path: str, tokens_path: str, out_path: str, tp: int, pp: int) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from parallel.checkpoint import load_checkpoint
    from parallel.config import ModelConfig
    from parallel.model import build_model, model_shape
    from rhocli.core.formats import checkpoint as ckpt

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
    dist.barrier()


def main() -> None:
    tp, pp, jobs = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    from rhocli.core.megatron_io import import_megatron

    import_megatron()  # as rho's ranks do: quietly, torch.compile deferred
    from parallel.distributed import destroy_distributed, init_distributed

    init_distributed(tp, pp, seed=0)
    for i in range(0, len(jobs), 3):
        logits_of(jobs[i], jobs[i + 1], jobs[i + 2], tp, pp)
    destroy_distributed()


if __name__ == "__main__":
    main()
