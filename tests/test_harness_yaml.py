"""lm-evaluation-harness task YAMLs from a local folder (`slm eval --include-path`): the harness's own
arc_easy.yaml over local files scores exactly like the built-in ARC-Easy; generate_until with its
filters and exact_match options; what slmkit does not run is refused with the file and key."""

from __future__ import annotations

import json

import pytest

from slmkit.errors import SlmError
from slmkit.evals.lm import LocalLM
from slmkit.evals.runner import run_task
from slmkit.evals.tasks import make_task
from slmkit.evals.tasks.harness_yaml import harness_tasks

# lm-evaluation-harness's tasks/arc/arc_easy.yaml, but for its dataset: local files in HF's schema
ARC_YAML = """\
tag: [ai2_arc]
task: my_arc_easy
dataset_path: json
dataset_kwargs:
  data_files: {train: train.jsonl, test: test.jsonl}
output_type: multiple_choice
training_split: train
test_split: test
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{choices.label.index(answerKey)}}"
doc_to_choice: "{{choices.text}}"
should_decontaminate: true
doc_to_decontamination_query: "Question: {{question}}\\nAnswer:"
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
metadata: {version: 1.0}
"""


def _hf_arc(rows) -> str:
    return "".join(json.dumps({"id": r["id"], "question": r["question"]["stem"], "answerKey": r["answerKey"],
                               "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                                           "label": [c["label"] for c in r["question"]["choices"]]}}) + "\n"
                   for r in rows)


def test_the_harness_arc_easy_yaml_scores_like_the_builtin_task(tmp_path, tiny_model, tiny_tokenizer, data_dir):
    builtin = make_task("arc_easy", data_dir / "eval")
    (tmp_path / "test.jsonl").write_text(_hf_arc(builtin.eval_docs().rows[:16]))
    (tmp_path / "train.jsonl").write_text(_hf_arc(builtin.fewshot_docs().rows[:40]))
    (tmp_path / "arc.yaml").write_text(ARC_YAML)
    mine = harness_tasks(tmp_path)["my_arc_easy"]
    lm = LocalLM(tiny_model, tiny_tokenizer)
    want = run_task(lm, builtin, shots=0, limit=16, progress=False)
    got = run_task(lm, mine, shots=0, limit=16, progress=False)
    assert got.metrics == want.metrics and got.n == 16
    doc = mine.eval_docs().rows[0]
    assert mine.text(doc) == builtin.text(builtin.eval_docs().rows[0])
    assert mine.requests(doc, mine.text(doc))[0].continuation == " " + doc["choices"]["text"][0]
    assert len(mine.fewshot_docs().rows) == 40


class SayingLM:
    def __init__(self, says):
        self.says, self.prompts = says, []

    def generate_until(self, prompts, until, max_new_tokens, progress=False):
        self.prompts, self.until, self.max_new_tokens = prompts, until, max_new_tokens
        return [(s, False) for s in self.says]


def test_generate_until_with_a_regex_filter_and_exact_match_options(tmp_path):
    (tmp_path / "qa.csv").write_text("q,a\nTwo plus two?,4\nName the red planet.,Mars\nThree times three?,9\n")
    (tmp_path / "base.yaml").write_text("dataset_path: csv\ndataset_kwargs: {data_files: {test: qa.csv}}\n"
                                        "output_type: generate_until\ntest_split: test\n")
    (tmp_path / "qa.yaml").write_text(
        "include: base.yaml\ntask: qa\ndescription: \"Answer briefly.\\n\"\ndoc_to_text: \"Q: {{q}}\\nA:\"\n"
        "doc_to_target: a\ngeneration_kwargs: {until: [\"\\n\"], max_gen_toks: 12}\n"
        "metric_list: [{metric: exact_match, ignore_case: true, ignore_punctuation: true}]\n"
        "filter_list: [{name: strict, filter: [{function: regex, regex_pattern: \"is (\\\\w+)\"}, {function: take_first}]}]\n")
    task = harness_tasks(tmp_path)["qa"]
    lm = SayingLM([" It is 4.", " I think it is MARS!", " nine"])
    result = run_task(lm, task, shots=0, progress=False)
    assert result.metrics["exact_match"] == pytest.approx(2 / 3)  # "nine" matches no "is (\w+)": [invalid]
    assert lm.prompts[0] == "Answer briefly.\nQ: Two plus two?\nA:"
    assert lm.until == ["\n"] and lm.max_new_tokens == 12


@pytest.mark.parametrize("extra, message", [
    ("process_docs: !function utils.process_docs\n", r"process_docs: !function utils\.process_docs"),
    ("metric_list: [{metric: bleu}]\n", "metric bleu is not supported"),
    ("output_type: loglikelihood_rolling\n", "output_type 'loglikelihood_rolling' is not supported"),
    ("num_choices: 4\n", r"unsupported key\(s\) num_choices"),
])
def test_what_slmkit_does_not_run_is_refused(tmp_path, extra, message):
    (tmp_path / "t.jsonl").write_text('{"q": "a", "a": "b"}\n')
    (tmp_path / "t.yaml").write_text("task: t\ndataset_path: json\ndataset_kwargs: {data_files: {test: t.jsonl}}\n"
                                     "test_split: test\ndoc_to_text: q\ndoc_to_target: a\n" + extra)
    with pytest.raises(SlmError, match=message):
        harness_tasks(tmp_path)


def test_hub_datasets_and_missing_files_are_refused(tmp_path):
    (tmp_path / "t.yaml").write_text("task: t\ndataset_path: allenai/ai2_arc\ndataset_name: ARC-Easy\n")
    with pytest.raises(SlmError, match="dataset_path 'allenai/ai2_arc' is not a local file"):
        harness_tasks(tmp_path)
    (tmp_path / "t.yaml").write_text("task: t\ndataset_path: json\ndataset_kwargs: {data_files: {test: gone.jsonl}}\n")
    with pytest.raises(SlmError, match="gone.jsonl' .split test. not found"):
        harness_tasks(tmp_path)
