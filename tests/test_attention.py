"""rho's fused attention (parallel/attention.py) against megatron-core's own DotProductAttention:
same inputs, forward and gradients, grouped-query and multi-head, at TP1 and TP2 (real gloo groups),
GPTDataset's boolean mask of packed documents through SDPA, and megatron's path taken for what SDPA
does not cover (a non-causal mask type)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("tp", [1, 2])
def test_sdpa_attention_equals_megatron_dot_product_attention(tp, tmp_path):
    from rhocli.core.launch import free_port

    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(tp), "--master-port",
         str(free_port()), str(root / "tests" / "attention_worker.py"), str(tp), str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for rank in range(tp) for line in (tmp_path / f"rank{rank}.txt").read_text().splitlines()]
    assert sorted(r[0] for r in rows) == sorted(["gqa", "mha", "no_mask_type", "packed"] * tp)
    for name, fwd, grad, fused in rows:
        assert float(fwd) < 1e-5 and float(grad) < 1e-5, (name, fwd, grad)
        # the causal cases take the SDPA path (packed documents' mask too); no_mask goes to megatron's code
        assert fused == ("0" if name == "no_mask_type" else "1"), name
