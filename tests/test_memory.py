"""The per-rank memory estimate (parallel/memory.py, ``rho train --dry-run``) against ground truth it
does not compute itself:

* parameters: every rank's ``sum(p.numel())`` of the model megatron-core builds, at TP1, TP2, PP2 and
  PP2 x 2 virtual stages (real gloo process groups);
* activations: the bytes of the distinct storages autograd saves during one micro-batch's forward
  (``torch.autograd.graph.saved_tensors_hooks``; parameters excluded), on CPU, fp32 and bf16, with
  no, selective, MLP and full recomputation (uniform and block), at TP1, TP2 with and without
  sequence parallelism, and on each stage of PP2;
* the dry-run's rows: the weights of Mistral-7B at TP2 are those of TP1 less the TP-split half, by
  the arithmetic of ``parallel.model.count_parameters``.

The measurement runs once, in two worker processes (this file run under ``torch.distributed.run``),
and takes ~20 s on 2 cores (the tests that read it are marked slow); the estimate's own functions
run in the test process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# the tests' tiny model (tests/train_utils.py) and a micro-batch of 2 x 32 tokens
MODEL = dict(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
             max_position_embeddings=128)
VOCAB = 1000  # padded to 1024
SEQ, MICRO_BATCH = 32, 2

# (name, tp, pp, train options) of the activation cases: each is measured on every pipeline stage of
# its layout; the estimate is asked for the same options on CPU (composite RMSNorm)
CASES = [
    ("fp32", 1, 1, {}),
    ("bf16", 1, 1, {"precision": "bf16"}),
    ("selective", 1, 1, {"recompute": "selective"}),
    ("selective_mlp", 1, 1, {"recompute": "selective", "recompute_modules": ("core_attn", "mlp")}),
    ("full_uniform_1", 1, 1, {"recompute": "full"}),
    ("full_uniform_2", 1, 1, {"recompute": "full", "recompute_num_layers": 2}),
    ("full_block_1", 1, 1, {"recompute": "full", "recompute_method": "block"}),
    ("tp2", 2, 1, {}),
    ("tp2_sp", 2, 1, {"sequence_parallel": True}),
    ("tp2_sp_full", 2, 1, {"sequence_parallel": True, "recompute": "full"}),
    ("pp2", 1, 2, {}),
    ("pp2_full", 1, 2, {"recompute": "full", "recompute_num_layers": 2}),
]
# (tp, pp, vpp) layouts whose per-rank parameter counts are compared
PARAM_LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 2, 2)]


def _train_config(tp: int, pp: int, options: dict, vpp: int | None = None):
    from parallel.config import TrainConfig

    base = {"precision": "fp32", "seq_length": SEQ, "micro_batch_size": MICRO_BATCH, "global_batch_size": 8}
    return TrainConfig(tp=tp, pp=pp, virtual_pp=vpp, **{**base, **options})


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    """{"activations": {case: {pipeline rank: saved bytes}}, "params": {"TPxPPxVPP": {global rank:
    [pipeline rank, parameters]}}}, measured by 2 workers."""
    from rhocli.core.launch import free_port

    out = tmp_path_factory.mktemp("memory")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(free_port()), str(Path(__file__)), str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    merged: dict = {}
    for rank in range(2):
        for key, values in json.loads((out / f"rank{rank}.json").read_text()).items():
            for inner, by_rank in values.items():
                merged.setdefault(key, {}).setdefault(inner, {}).update(by_rank)
    return merged


@pytest.mark.slow  # the measuring workers: ~20 s once per module
@pytest.mark.parametrize("tp, pp, vpp", PARAM_LAYOUTS)
def test_parameters_per_rank_equal_the_built_model(measured, tp, pp, vpp):
    from parallel.config import ModelConfig
    from parallel.memory import rank_parameters

    model = ModelConfig(**MODEL)
    counts = measured["params"][f"{tp}x{pp}x{vpp}"]
    assert len(counts) == 2  # both ranks built a model
    for rank, (pipeline_rank, count) in counts.items():
        assert rank_parameters(model, VOCAB, tp, pp, vpp, pipeline_rank) == count, (tp, pp, vpp, rank)


@pytest.mark.slow  # the measuring workers: ~20 s once per module
@pytest.mark.parametrize("name, tp, pp, options", CASES, ids=[c[0] for c in CASES])
def test_saved_activations_equal_a_forward_pass(measured, name, tp, pp, options):
    """Exact on CPU, byte for byte: the estimate's per-micro-batch count is read off rho's layer."""
    from parallel.config import ModelConfig
    from parallel.memory import micro_batch_dims, microbatch_activations

    model = ModelConfig(**MODEL)
    train = _train_config(tp, pp, options)
    dims = micro_batch_dims(model, train, VOCAB, on_gpu=False)
    by_stage = measured["activations"][name]
    assert sorted(by_stage) == [str(stage) for stage in range(pp)]
    for stage, saved in by_stage.items():
        estimate = microbatch_activations(dims, model.num_layers // pp, first=int(stage) == 0, last=int(stage) == pp - 1,
                                          train=train, recompute=train.recompute)
        assert estimate.saved == saved, (name, stage, estimate, saved)


@pytest.mark.slow  # the measuring workers: ~20 s once per module
def test_recompute_shrinks_what_is_saved(measured):
    """The measured orders the estimate's rows rest on: full recompute keeps a small fraction, and
    with fused attention selective (core attention) recompute frees almost nothing."""
    a = {name: by_stage["0"] for name, by_stage in measured["activations"].items()}
    assert a["full_uniform_1"] < 0.45 * a["fp32"]  # the logits (vocab 1024 vs hidden 64) dominate what is left
    assert a["full_uniform_2"] < a["full_uniform_1"] < a["full_block_1"] < a["fp32"]
    assert 0.99 * a["fp32"] < a["selective"] < a["fp32"]
    assert a["selective_mlp"] < 0.8 * a["fp32"]


def test_estimate_counts_states_in_flight_and_sharding():
    """The combination rules, by hand: bytes per parameter of each part, the 1F1B in-flight count,
    the interleaved count of Korthikanti et al., the distributed optimizer's sharding."""
    from rhocli.core.megatron_io import import_megatron

    import_megatron()  # quietly: the estimate asks the trainer for the distributed optimizer's default
    from parallel.config import ModelConfig
    from parallel.memory import estimate_memory, micro_batches_in_flight, rank_parameters

    model = ModelConfig(**MODEL)
    params = rank_parameters(model, VOCAB, 1, 1, 1, 0)
    fp32 = estimate_memory(model, _train_config(1, 1, {"optimizer": "adam"}), VOCAB, dp=1)
    assert (fp32.weights, fp32.gradients, fp32.optimizer_state) == (4 * params, 4 * params, 8 * params)
    bf16 = estimate_memory(model, _train_config(1, 1, {"precision": "auto"}), VOCAB, dp=2, on_gpu=True)
    assert bf16.precision == "bf16" and bf16.distributed_optimizer  # a GPU's defaults at dp 2
    assert (bf16.weights, bf16.gradients, bf16.optimizer_state) == (2 * params, 4 * params, 12 * params // 2)
    sgd = estimate_memory(model, _train_config(1, 1, {"precision": "bf16", "optimizer": "sgd"}), VOCAB, dp=1)
    assert sgd.optimizer_state == 4 * params  # the fp32 main weights only
    assert bf16.total == bf16.weights + bf16.gradients + bf16.optimizer_state + bf16.activations

    assert [micro_batches_in_flight(4, 1, 8, r) for r in range(4)] == [4, 3, 2, 1]
    assert micro_batches_in_flight(4, 1, 2, 0) == 2 and micro_batches_in_flight(1, 1, 8, 0) == 1
    # interleaved, rank 0: pp·vpp + pp - 1 chunks of L/(pp·vpp) layers = L·(1 + (pp - 1)/(pp·vpp)) layers
    pp, vpp, layers = 4, 2, 32
    chunks = micro_batches_in_flight(pp, vpp, 16, 0)
    assert chunks * layers / (pp * vpp) == layers * (1 + (pp - 1) / (pp * vpp))

    # pp 2: the first stage holds 2 micro-batches of its layers, the last 1 plus the logits
    est = estimate_memory(model, _train_config(1, 2, {}), VOCAB, dp=1, on_gpu=False)
    assert est.micro_batches_in_flight == (2 if est.pipeline_rank == 0 else 1)
    assert est.activations_full_recompute < est.activations == est.activations_no_recompute


def _row_gib(stdout: str, label: str) -> float:
    match = re.search(rf"^\W*{label}\s+\W\s*([0-9.]+) GiB", stdout, re.MULTILINE)
    assert match, f"no {label!r} row in:\n{stdout}"
    return float(match.group(1))


def test_dry_run_prints_the_memory_rows(capsys, tmp_path, small_data):
    from parallel.config import ModelConfig
    from parallel.model import count_parameters
    from rho_cli import run_rho

    config = ROOT / "configs" / "mistral-7b.yaml"
    common = ("train", config, "--data", small_data, "--save", tmp_path / "run", "--dry-run")
    tp1 = run_rho(capsys, *common, "--tp", "1", "--set", "train.sequence_parallel=false")
    tp2 = run_rho(capsys, *common)  # the config's layout: tp 2, sequence parallel, selective recompute
    assert tp1.exit_code == 0 and tp2.exit_code == 0, tp1.stderr + tp2.stderr
    for label in ("weights", "gradients", "optimizer state", "activations", "without recompute",
                  "with full recompute", "total"):
        _row_gib(tp2.stdout, label)
    assert "memory per rank (estimate)" in tp2.stdout and not (tmp_path / "run").exists()

    # ground truth: count_parameters' arithmetic; TP splits all but the 2 norms per layer and the final one
    model = ModelConfig(**{k: v for k, v in _yaml_model(config).items()})
    total = count_parameters(model, 32000)
    norms = (2 * model.num_layers + 1) * model.hidden_size
    gib = 2 * total / 2**30  # bf16
    assert _row_gib(tp1.stdout, "weights") == pytest.approx(gib, abs=0.006)
    assert _row_gib(tp2.stdout, "weights") == pytest.approx(2 * ((total - norms) / 2 + norms) / 2**30, abs=0.006)
    assert _row_gib(tp2.stdout, "weights") == pytest.approx(gib / 2, rel=1e-3)
    # the distributed optimizer (a GPU's default for DP > 1) shards the 12 bytes/parameter of state
    dp8 = run_rho(capsys, *common, "--dp", "8")
    assert _row_gib(dp8.stdout, "optimizer state") == pytest.approx(_row_gib(tp2.stdout, "optimizer state") / 8, abs=0.01)


def _yaml_model(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())["model"]


# ------------------------------------------------------------------------------------------ the worker


def _saved_bytes(model, forward) -> int:
    """Bytes of the distinct storages autograd saves while ``forward()`` runs, parameters excluded
    (they are weights, not activations); a view counts its whole storage, which it keeps alive."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(storages.values())


def _set_layout(tp: int, pp: int, vpp: int, seed: int = 1234) -> None:
    """megatron's model-parallel groups for another layout over the same process group."""
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None)
    tensor_parallel.get_cuda_rng_tracker().reset()
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _measure_case(tp: int, pp: int, options: dict) -> int:
    import torch
    from megatron.core import parallel_state as ps

    from parallel.config import ModelConfig
    from parallel.memory import resolve_precision
    from parallel.model import build_model, model_features, model_shape

    model_cfg, train = ModelConfig(**MODEL), _train_config(tp, pp, options)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[resolve_precision(train.precision, on_gpu=False)]
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    model = build_model(model_cfg, model_shape(model_cfg, VOCAB, tp, dtype), tp, pp, first, last,
                        features=model_features(train))
    model.train()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=g)
    positions = torch.arange(SEQ).unsqueeze(0).expand(MICRO_BATCH, SEQ)
    if not first:  # what the previous stage sends: [s(/tp with SP), b, h], kept by the schedule
        s = SEQ // tp if train.sequence_parallel else SEQ
        model.set_input_tensor(torch.randn(s, MICRO_BATCH, model_cfg.hidden_size, dtype=dtype, requires_grad=True))
    return _saved_bytes(model, lambda: model(tokens, positions, None, labels=tokens if last else None))


def _count_params(tp: int, pp: int, vpp: int) -> int:
    import torch

    from parallel.config import ModelConfig
    from parallel.model import build_model_chunks, model_features, model_shape

    model_cfg = ModelConfig(**MODEL)
    features = model_features(_train_config(tp, pp, {}, vpp=vpp))  # the trainer's: the virtual stages included
    chunks = build_model_chunks(model_cfg, model_shape(model_cfg, VOCAB, tp, torch.float32), tp, pp, vpp, features)
    return sum(p.numel() for chunk in chunks for p in chunk.parameters())


def worker(out_dir: str) -> None:
    """Under torch.distributed.run with 2 processes: every layout over the same 2 ranks."""
    from rhocli.core.megatron_io import import_megatron

    import_megatron()
    from megatron.core import parallel_state as ps

    from parallel.distributed import destroy_distributed, init_distributed

    layout = init_distributed(1, 1, seed=1234)
    result: dict = {"params": {}, "activations": {}}
    try:
        for tp, pp, vpp in PARAM_LAYOUTS:
            _set_layout(tp, pp, vpp)
            result["params"][f"{tp}x{pp}x{vpp}"] = {str(layout.rank): [ps.get_pipeline_model_parallel_rank(),
                                                                        _count_params(tp, pp, vpp)]}
        for i, (name, tp, pp, options) in enumerate(CASES):
            _set_layout(tp, pp, 1)
            if tp * pp == 1 and i % 2 != layout.rank:  # single-rank cases: shared out between the 2 ranks
                continue
            saved = _measure_case(tp, pp, options)
            if ps.get_tensor_model_parallel_rank() == 0:  # TP ranks are alike; one per pipeline stage
                result["activations"][name] = {str(ps.get_pipeline_model_parallel_rank()): saved}
    finally:
        destroy_distributed()
    Path(out_dir, f"rank{layout.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    worker(sys.argv[1])
