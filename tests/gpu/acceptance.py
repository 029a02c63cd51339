"""rho's GPU acceptance: every check a first GPU must pass, each in its own time-bounded process,
all figures into one JSON file.

    bash tests/gpu/run.sh [OUT_DIR]                          # a GPU machine: < 10 min on one H100/H200
    python tests/gpu/acceptance.py --out DIR --dry-run       # a CPU: the same steps at toy sizes

Steps, in order (each bounded by its limit and by what is left of ``--budget``):

* ``environment``  Python, torch, CUDA, the GPUs, megatron-core, Transformer Engine, the layer backend
* ``build``        the selective-loss extension built through torch's JIT (seconds), and ptxas'
                   registers / spill bytes per kernel for the GPU's architecture (sm_90 on a CPU)
* ``pytest_gpu``   ``pytest -m gpu`` (tests/test_gpu.py, tests/test_kernel.py): kernel parity with
                   float64 PyTorch for fp32/bf16/fp16, in place and not, odd and 128k vocabularies,
                   > 65535 rows, N*V > 2^31, empty and non-finite input, determinism, the current
                   stream; SDPA's FlashAttention backend on rho's GQA inputs
* ``kernel``       fused loss forward+backward time and effective GB/s (6 bytes per bf16 logit)
                   against the device's copy bandwidth (``rho bench kernel``'s measurement)
* ``train``        TinyLlama-1.1B shape on synthetic tokens, plain and SLM 0.6 with RHO_KERNEL=cuda:
                   tokens/s per GPU, MFU, the SLM step's overhead (``rho bench train``'s paired runs)
* ``score``        ``rho score`` tokens/s with the same shape (whole process)
* ``eval``         ``rho eval`` generating on the GPU (transformers, bf16; vLLM too when installed): a
                   random model of the TinyLlama shape and a tokenizer trained here, 32 GSM8K-style
                   problems, greedy: problems/s and at most 64 new tokens each (random weights: no
                   accuracy, the loop and its speed only)
* ``two_gpus``     with two or more GPUs: TP2 and DP2 training equal TP1, exact resume
                   (tests/test_train.py on NCCL)

Targets (``targets`` in the JSON; judged only on a GPU): >= 45,000 tokens/s per H100 for the
TinyLlama shape, SLM step <= 3 % slower than plain, fused loss >= 75 % of the copy bandwidth.
No figure is invented: a step that did not run says why.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))  # hf_models: the tests' tokenizer builder

STEP_LIMITS_S = {"environment": 60, "build": 300, "pytest_gpu": 240, "kernel": 120, "train": 330, "reference": 240,
                 "score": 180, "eval": 240, "two_gpus": 300}
TARGETS = {"tokens_per_s_per_gpu": 45_000, "slm_overhead_max": 0.03, "kernel_fraction_of_copy_min": 0.75}


def _gpu() -> bool:
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------------------------------- steps
def step_environment(dry: bool) -> dict:
    import dataclasses
    import platform
    from importlib import metadata

    import torch

    from parallel.model import layer_backend

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpus": gpus, "device": torch.cuda.get_device_name(0) if gpus else f"CPU ({os.cpu_count()} cores)",
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if gpus else None,
        "megatron_core": version("megatron-core"),
        "transformer_engine": version("transformer-engine") or version("transformer_engine"),
        "layer_backend": dataclasses.asdict(layer_backend()), "nvcc": shutil.which("nvcc"),
    }


def step_build(dry: bool) -> dict:
    import torch

    from cuda_ext import dispatch
    from cuda_ext.dispatch import CSRC

    backend = "cuda" if _gpu() else "cpu"
    t0 = time.perf_counter()
    module = dispatch.extension(backend)
    result = {"extension": backend, "built_or_loaded_s": round(time.perf_counter() - t0, 1), "path": module.__file__}
    if shutil.which("nvcc"):
        arch = "sm_{}{}".format(*torch.cuda.get_device_capability(0)) if _gpu() else "sm_90"
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run(["nvcc", "-c", "-O3", "--use_fast_math", f"-arch={arch}", "-Xptxas", "-v",
                                   str(CSRC / "selective_loss_cuda_kernels.cu"), "-o", f"{tmp}/k.o"],
                                  capture_output=True, text=True, timeout=240)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed for {arch}: {proc.stderr[-2000:]}")
        result.update(arch=arch, kernels=ptxas_usage(proc.stderr))
        result["spill_bytes_total"] = sum(k["spill_stores"] + k["spill_loads"] for k in result["kernels"].values())
    return result


def ptxas_usage(log: str) -> dict[str, dict[str, int]]:
    """Per kernel (mangled name): registers and spill bytes, from ``nvcc -Xptxas -v``'s report."""
    kernels: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?([\w$]+)'?", line)
        if m:
            current = m.group(1)
            kernels.setdefault(current, {"registers": 0, "spill_stores": 0, "spill_loads": 0})
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            kernels[current]["spill_stores"], kernels[current]["spill_loads"] = int(m.group(1)), int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            kernels[current]["registers"] = int(m.group(1))
    return kernels


def step_pytest_gpu(dry: bool) -> dict:
    import xml.etree.ElementTree as ET

    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                               f"--junitxml={junit}", "tests/test_gpu.py", "tests/test_kernel.py"],
                              cwd=ROOT, capture_output=True, text=True)
        if not junit.exists():
            raise RuntimeError(f"pytest wrote no report (exit {proc.returncode}): {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                  if c.find("failure") is not None or c.find("error") is not None]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    result = {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
              "failed": failed, "tail": proc.stdout.strip().splitlines()[-1:] }
    if failed:
        result["status"] = "failed"
    return result


def step_kernel(dry: bool) -> dict:
    from rhocli.bench.kernel import copy_bandwidth_gbs, measure

    if dry:
        shapes, impls, dtype, reps = [(256, 1000)], ["cpu", "eager"], "float32", 1  # each its own process
    else:
        shapes, impls, dtype, reps = [(8192, 32000), (8192, 128256)], ["cuda", "cuda-inplace", "eager"], "bfloat16", 5
    copy = copy_bandwidth_gbs()
    bytes_per_logit = 6 if dtype in ("bfloat16", "float16") else 12  # read forward, read + write backward
    rows = []
    for tokens, vocab in shapes:
        for impl in impls:
            r = measure(impl, tokens, vocab, dtype, reps)
            if r.error:
                raise RuntimeError(f"{impl} {tokens}x{vocab}: {r.error}")
            gbs = bytes_per_logit * tokens * vocab / r.seconds / 1e9
            rows.append({"impl": impl, "tokens": tokens, "vocab": vocab, "dtype": dtype, "seconds": r.seconds,
                         "peak_extra_bytes": r.peak_extra_bytes, "effective_gbs": round(gbs, 1),
                         "fraction_of_copy": round(gbs / copy, 3) if copy else None})
    fused = [r["fraction_of_copy"] for r in rows if r["impl"].startswith("cuda") and r["fraction_of_copy"] is not None]
    return {"copy_gbs": copy, "results": rows, "fused_fraction_of_copy_min": min(fused) if fused else None}


def step_train(dry: bool) -> dict:
    from rhocli.train.bench import Arm, run_bench_train

    if dry:
        config, sets, steps, warmup, rounds = ROOT / "configs" / "tiny.yaml", [], 3, 1, 1
        os.environ["RHO_KERNEL"] = "cpu"
    else:
        # 16 x 2048 tokens a step (4 micro-batches of 4) keeps a step under a second at the target
        config = ROOT / "configs" / "tinyllama-1.1b.yaml"
        sets, steps, warmup, rounds = ["train.global_batch_size=16", "train.micro_batch_size=4"], 10, 3, 2
        os.environ["RHO_KERNEL"] = "cuda"
    extra = [a for s in sets for a in ("--set", s)]
    result = run_bench_train(config, 1, 1, 1, steps, warmup, extra, None,
                             arms=[Arm("plain"), Arm("slm 0.6", select_ratio=0.6)], rounds=rounds, alternate="run")
    plain, slm = result.reports
    comparison = result.comparison
    return {
        "config": config.name, "overrides": sets, "device": plain.device, "parameters": plain.parameters,
        "tokens_per_step": plain.tokens_per_step, "rounds": result.rounds, "steps_timed_per_run": steps - warmup,
        "plain": {"step_s": plain.step_time_s, "tokens_per_s_per_gpu": round(plain.tokens_per_s_per_device),
                  "tflops_per_gpu": plain.tflops_per_device, "mfu": plain.mfu},
        "slm": {"step_s": slm.step_time_s, "tokens_per_s_per_gpu": round(slm.tokens_per_s_per_device),
                "tflops_per_gpu": slm.tflops_per_device, "mfu": slm.mfu},
        "slm_overhead": round(comparison.median - 1, 4),
        "slm_overhead_ci": [None if c is None else round(c - 1, 4) for c in (comparison.ci_low, comparison.ci_high)],
    }


def step_reference(dry: bool) -> dict:
    """SLM with the reference run online (``rho train --reference``: the reference model on the GPU in
    bf16, scoring each step's micro-batches) against SLM from a score store, paired: the step-time
    ratio and each arm's peak GPU memory."""
    from rhocli.train.bench import Arm, run_bench_train

    if dry:  # the online reference on CPU: tests/test_reference.py; this bench arm: docs/selective.md's figures
        return {"skipped": "dry run: measured on a GPU only"}
    config = ROOT / "configs" / "tinyllama-1.1b.yaml"
    sets, steps, warmup, rounds = ["train.global_batch_size=16", "train.micro_batch_size=4"], 8, 3, 2
    extra = [a for s in sets for a in ("--set", s)]
    result = run_bench_train(config, 1, 1, 1, steps, warmup, extra, None, rounds=rounds, alternate="run",
                             arms=[Arm("slm 0.6, store", select_ratio=0.6),
                                   Arm("slm 0.6, reference online", select_ratio=0.6, reference_online=True)])
    store, online = result.reports
    return {
        "config": config.name, "overrides": sets, "device": store.device, "rounds": result.rounds,
        "store": {"step_s": store.step_time_s, "tokens_per_s_per_gpu": round(store.tokens_per_s_per_device),
                  "peak_memory_bytes": store.peak_memory_bytes},
        "online": {"step_s": online.step_time_s, "tokens_per_s_per_gpu": round(online.tokens_per_s_per_device),
                   "peak_memory_bytes": online.peak_memory_bytes},
        "online_over_store_step_time": round(result.comparison.median, 4),
    }


def step_score(dry: bool) -> dict:
    from rhocli.train.bench import write_synthetic_dataset
    from rhocli.core.formats.tokens import TOKENS

    config = ROOT / "configs" / ("tiny.yaml" if dry else "tinyllama-1.1b.yaml")
    tokens = 20_000 if dry else 2_000_000
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "synthetic"
        write_synthetic_dataset(data, 32000 if not dry else 512, tokens)
        small = ["--set", "train.global_batch_size=4", "--set", "train.micro_batch_size=1", "--set", "train.warmup_steps=0"]
        _rho("train", config, "--data", data, "--save", Path(tmp) / "model", "--steps", 1, *small,
             "--set", "train.seq_length=128" if dry else "train.seq_length=2048", "-q")
        t0 = time.perf_counter()
        _rho("score", "--model", Path(tmp) / "model", "--data", data, "--output", Path(tmp) / "scores", "-q")
        seconds = time.perf_counter() - t0
        scored = TOKENS.read(str(data) + ".json")["tokens"]
    return {"config": config.name, "tokens": scored, "seconds_whole_process": round(seconds, 2),
            "tokens_per_s_whole_process": round(scored / seconds)}


def step_eval(dry: bool) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from hf_models import write_bpe_tokenizer

    hf_logging.disable_progress_bar()

    problems = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have now?",
                 "answer": f"He has {a} + {b} = {a + b} apples.\n#### {a + b}"} for a, b in zip(range(3, 35), range(7, 39))]
    if dry:
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        problems, new_tokens, device, dtype = problems[:4], 8, "cpu", "fp32"
    else:  # TinyLlama-1.1B (configs/tinyllama-1.1b.yaml)
        shape = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4)
        new_tokens, device, dtype = 64, "cuda", "bf16"
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, data = Path(tmp) / "model", Path(tmp) / "problems.jsonl"
        data.write_text("".join(json.dumps(p) + "\n" for p in problems))
        write_bpe_tokenizer(model_dir, [p["question"] + " " + p["answer"] for p in problems] * 4, 1000, eos="</s>", bos="<s>")
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=32000, max_position_embeddings=2048, bos_token_id=1, eos_token_id=0, **shape)
        with torch.device(device):  # 1.1B random weights: initialised on the GPU in a blink, not for a minute on the CPU
            model = LlamaForCausalLM(config)
        model.to(torch.bfloat16).save_pretrained(model_dir)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()  # the GPU's memory for rho eval's own process
        backends = ["transformers"]
        if not dry:
            import importlib.util

            if importlib.util.find_spec("vllm"):
                backends.append("vllm")
            else:
                runs["vllm"] = {"status": "skipped", "why": "vLLM is not installed"}
        for backend in backends:
            out = Path(tmp) / f"eval-{backend}"
            extra = ["--device", device, "--batch-size", 16] if backend == "transformers" else ["--backend", "vllm"]
            extra += ["--dtype", dtype]
            t0 = time.perf_counter()
            _rho("eval", model_dir, "--task", "gsm8k", "--data", data, "--prompt", "cot", "--shots", 2,
                 "--max-new-tokens", new_tokens, "--output", out, *extra, "-q")
            seconds = time.perf_counter() - t0
            metrics = json.loads((out / "metrics.json").read_text())
            runs[backend] = {"problems": len(problems), "seconds_whole_process": round(seconds, 2),
                             "generation_s": metrics.get("time_s"), "problems_per_s": round(len(problems) / seconds, 2),
                             "new_tokens_per_problem_at_most": new_tokens}
    return {"device": device, "dtype": dtype, "shape": shape, "runs": runs}


def step_two_gpus(dry: bool) -> dict:
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < 2:
        return {"status": "skipped", "why": f"{gpus} GPU(s): TP2/DP2 need two"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_train.py", "-k",
                           "(layouts_match_tp1pp1 and (dp2 or tp2-sp)) or exact_resume"],
                          cwd=ROOT, capture_output=True, text=True)
    return {"status": "ok" if proc.returncode == 0 else "failed", "summary": proc.stdout.strip().splitlines()[-1:]}


def _rho(*args) -> None:
    proc = subprocess.run([sys.executable, "-m", "rhocli", *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"rho {' '.join(map(str, args[:1]))} exited {proc.returncode}: {proc.stderr.strip()[-1500:]}")


STEPS = {"environment": step_environment, "build": step_build, "pytest_gpu": step_pytest_gpu, "kernel": step_kernel,
         "train": step_train, "reference": step_reference, "score": step_score, "eval": step_eval,
         "two_gpus": step_two_gpus}


# ---------------------------------------------------------------------------------------- driver
def verdict(steps: dict, gpu: bool) -> dict:
    """Each target met / missed / not measured (never judged on a CPU)."""
    if not gpu:
        return {name: "not measured (no GPU)" for name in TARGETS}
    train, kernel = steps.get("train", {}), steps.get("kernel", {})

    def judge(value, ok) -> str:
        return "not measured" if value is None else ("met" if ok(value) else "missed")

    return {
        "tokens_per_s_per_gpu": judge((train.get("plain") or {}).get("tokens_per_s_per_gpu"),
                                      lambda v: v >= TARGETS["tokens_per_s_per_gpu"]),
        "slm_overhead_max": judge(train.get("slm_overhead"), lambda v: v <= TARGETS["slm_overhead_max"]),
        "kernel_fraction_of_copy_min": judge(kernel.get("fused_fraction_of_copy_min"),
                                             lambda v: v >= TARGETS["kernel_fraction_of_copy_min"]),
    }


def run_all(out: Path, budget_s: float, dry: bool, only: list[str] | None) -> dict:
    start = time.monotonic()
    report: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "dry_run": dry,
                    "budget_s": budget_s, "targets": TARGETS, "steps": {}}
    out.mkdir(parents=True, exist_ok=True)
    for name in only or list(STEPS):
        left = budget_s - (time.monotonic() - start)
        limit = min(STEP_LIMITS_S[name], left)
        if limit < 10:
            report["steps"][name] = {"status": "not run", "why": "the time budget is spent"}
            continue
        report["steps"][name] = _run_step(name, limit, dry)
        (out / "gpu-acceptance.json").write_text(json.dumps(report, indent=2))  # as far as it got
    report["device"] = report["steps"].get("environment", {}).get("device")
    report["verdict"] = verdict(report["steps"], gpu=_gpu() and not dry)
    report["seconds"] = round(time.monotonic() - start, 1)
    (out / "gpu-acceptance.json").write_text(json.dumps(report, indent=2))
    return report


def _run_step(name: str, limit: float, dry: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--step", name, "--result", str(result_file), *(["--dry-run"] if dry else [])]
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            _, err = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the step and everything it started
            proc.communicate()
            return {"status": "timeout", "limit_s": round(limit), "seconds": round(time.monotonic() - t0, 1)}
        seconds = round(time.monotonic() - t0, 1)
        if proc.returncode != 0 or not result_file.exists():
            return {"status": "failed", "seconds": seconds, "error": err.strip()[-3000:]}
        result = json.loads(result_file.read_text())
    return {"status": "ok", **result, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-acceptance"))
    parser.add_argument("--budget", type=float, default=570.0, help="seconds for all steps together")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes, for a CPU (checks the plumbing)")
    parser.add_argument("--only", action="append", choices=list(STEPS), help="run only this step; repeat")
    parser.add_argument("--step", choices=list(STEPS), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step:  # one step, in its own process
        os.chdir(ROOT)
        args.result.write_text(json.dumps(STEPS[args.step](args.dry_run)))
        return 0
    report = run_all(args.out, args.budget, args.dry_run, args.only)
    bad = [n for n, s in report["steps"].items() if s["status"] not in ("ok", "skipped")]
    print(json.dumps({"device": report["device"], "verdict": report["verdict"], "steps_not_ok": bad,
                      "json": str(args.out / "gpu-acceptance.json")}, indent=2))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
