"""``rho eval --lm-eval``: lm-evaluation-harness's ``simple_evaluate`` on a rho checkpoint, with a task
defined in a local YAML over a local jsonl. Ground truth: the same multiple-choice accuracy computed
here from transformers' own log-likelihoods of each choice."""

from __future__ import annotations

import json

import pytest
import torch

from rho_cli import run_rho

pytestmark = pytest.mark.slow

DOCS = [
    {"question": "Natalia sold 48 clips", "choices": [" in April", " the lobster", " and tabs"], "label": 0},
    {"question": "The European lobster is", "choices": [" a species", " 72 clips", " emoji"], "label": 0},
    {"question": "Weng earns", "choices": [" $12 an hour", " café", " spaces"], "label": 0},
    {"question": "A second line", "choices": [" with an embedded", " Atlantic", " 0.2 x 50"], "label": 1},
    {"question": "She sold 48 / 2 = 24", "choices": [" clips in May", " naïve", " lobster"], "label": 2},
]

TASK_YAML = """task: rho_local_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
target_delimiter: ""
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def _transformers_accuracy(model_dir) -> float:
    """acc as lm-eval defines it: the choice with the highest summed log-likelihood of its tokens
    given the question (the pair encoded whole, the choice's tokens scored)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    right = 0
    for doc in DOCS:
        context = tok(doc["question"], add_special_tokens=False).input_ids
        scores = []
        for choice in doc["choices"]:
            whole = tok(doc["question"] + choice, add_special_tokens=False).input_ids
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = model(ids).logits.log_softmax(-1)[0]
            n = len(whole) - len(context)
            scores.append(sum(logp[len(whole) - n - 1 + i, whole[len(whole) - n + i]].item() for i in range(n)))
        right += int(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    return right / len(DOCS)


def test_lm_eval_local_task_on_a_rho_checkpoint(tmp_path, llama_tp2pp2, capsys, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "choice.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "rho_local_choice.yaml").write_text(TASK_YAML.format(data=data))
    r = run_rho(capsys, "eval", llama_tp2pp2.tp2pp2, "--lm-eval", "rho_local_choice", "--include-path", tasks,
                "--tokenizer", llama_tp2pp2.hf_dir, "--device", "cpu", "--batch-size", 2, "--output", tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    result = json.loads((tmp_path / "out" / "lm_eval.json").read_text())["results"]["rho_local_choice"]
    assert result["acc,none"] == pytest.approx(_transformers_accuracy(llama_tp2pp2.hf_dir))
    assert "rho_local_choice" in r.stdout

    unknown = run_rho(capsys, "eval", llama_tp2pp2.tp2pp2, "--lm-eval", "no_such_task", "--include-path", tasks,
                      "--device", "cpu", "--output", tmp_path / "out2")
    assert unknown.exit_code == 2 and "unknown task(s) no_such_task" in unknown.stderr
