"""The fine-tuning tasks as harness tasks: fixed splits that keep the test rows out of training,
label-set scoring by log-likelihood and by free answer with the hallucination rate, ROUGE for
summaries, and chat-template prompts with few-shot turns."""

from __future__ import annotations

import pytest

from slmkit.data.tasks import TASKS, FinetuneData, finetune_examples, task_data
from slmkit.errors import SlmError
from slmkit.evals.lm import Score
from slmkit.evals.runner import run_task
from slmkit.evals.tasks import make_task
from slmkit.load import load_tokenizer


@pytest.fixture(scope="module")
def smol_tok():
    return load_tokenizer("smollm2-135m-instruct")


class ScriptedLM:
    """Answers from a script, document by document in the runner's order: log-likelihoods favour
    `pick(doc)`, free answers are `say(doc)`."""

    def __init__(self, tokenizer, rows, labels, pick, say):
        self.tokenizer, self.rows, self.labels, self.pick, self.say = tokenizer, rows, labels, pick, say
        self.requests = []

    def loglikelihood(self, requests, progress=False):
        self.requests = requests
        scores = [Score(0.0 if label == self.pick(doc) else -5.0, False, 1, False)
                  for doc in self.rows for label in self.labels]
        assert len(scores) == len(requests)
        return scores

    def generate_until(self, prompts, until, max_new_tokens, progress=False):
        assert len(prompts) == len(self.rows)
        return [(self.say(doc), False) for doc in self.rows]


def test_splits_are_fixed_disjoint_and_stratified(data_dir):
    for name in TASKS:
        first, again = task_data(name, data_dir / "tasks"), task_data(name, data_dir / "tasks")
        keys = lambda rows: [e.messages[-2]["content"] + "|" + e.where for e in rows]  # noqa: E731
        assert keys(first.test) == keys(again.test) and keys(first.train) == keys(again.train)
        assert not set(keys(first.test)) & set(keys(first.train) + keys(first.val)), name
    s2d = task_data("symptom2disease", data_dir / "tasks")
    assert len(s2d.labels) == 24 and {e.label for e in s2d.test} == set(s2d.labels)
    train, val = finetune_examples(FinetuneData(task="symptom2disease"))
    assert len(train) == len(s2d.train) and len(val) == len(s2d.val)
    with pytest.raises(SlmError, match="unknown task 'symptoms'"):
        task_data("symptoms")


def test_label_tasks_score_by_likelihood_and_by_free_answer(data_dir, smol_tok):
    task = make_task("symptom2disease", data_dir / "eval")
    task.bind(smol_tok)
    rows = task.eval_docs().rows[:12]
    gold = lambda d: d["example"].label  # noqa: E731
    wrong = lambda d: next(label for label in task.data.labels if label != gold(d))  # noqa: E731
    # right by likelihood; free answers: 4 right, 4 naming a wrong label, 4 naming nothing
    say = {id(d): [gold(d), f"It is {wrong(d)}.", "I think you should rest."][i % 3] for i, d in enumerate(rows)}
    lm = ScriptedLM(smol_tok, rows, task.data.labels, gold, lambda d: say[id(d)])
    result = run_task(lm, task, shots=0, limit=12, progress=False)
    assert result.n == 12 and result.metrics == {"acc": 1.0, "exact_match": 4 / 12, "hallucination_rate": 4 / 12}
    first = lm.requests[0]
    assert first.continuation == f"{task.data.labels[0]}<|im_end|>"  # the trained span, end of turn included
    assert first.context.endswith(rows[0]["example"].messages[-2]["content"] + "<|im_end|>\n<|im_start|>assistant\n")


def test_few_shot_examples_are_earlier_chat_turns_from_the_train_split(data_dir, smol_tok):
    task = make_task("sentiment", data_dir / "eval")
    task.bind(smol_tok)
    doc = task.eval_docs().rows[0]
    import random

    examples = task.fewshot_examples(doc, task.fewshot_docs().rows, 5, random.Random(0))
    prompt = task.context(doc, examples)
    assert prompt.count("<|im_start|>user") == 6 and prompt.count("<|im_start|>assistant") == 6
    assert prompt.count("<|im_start|>system") == 1 and prompt.endswith("<|im_start|>assistant\n")
    train_texts = {e.messages[-2]["content"] for e in task.data.train}
    assert all(ex["example"].messages[-2]["content"] in train_texts for ex in examples)


def test_summaries_get_rouge_against_the_best_reference(data_dir, smol_tok):
    task = make_task("scitldr", data_dir / "eval")
    doc = task.eval_docs().rows[0]
    refs = doc["example"].references
    assert len(refs) > 1
    perfect = task.score(doc, refs[-1])
    assert perfect == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}  # the best reference counts
    assert task.score(doc, "completely unrelated words here")["rouge1"] < 0.2


def test_chat_tasks_need_a_chat_template(data_dir, tiny_model):
    task = make_task("sentiment", data_dir / "eval")
    with pytest.raises(SlmError, match="needs a local model that has one"):
        run_task(object(), task, shots=0, limit=2, progress=False)
