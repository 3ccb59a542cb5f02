"""`slm eval --data FILE.jsonl`: the user's own rows, scored as `slm finetune` formats them. A file
holding a built-in task's rows gives exactly the built-in scores; classification adds macro-F1,
per-class scores and the confusion matrix; generation adds exact match and chrF; bad rows are
refused with the file, line and field before any work."""

from __future__ import annotations

import json

import pytest

from slmkit.errors import SlmError
from slmkit.evals.lm import LocalLM, Score
from slmkit.evals.runner import run_task
from slmkit.evals.tasks import make_task
from slmkit.evals.tasks.userfile import bootstrap_se, class_report, confusion, macro_f1, user_task


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _task_file(task, path, n):
    """The first n documents of a built-in task, in its evaluation order, as a user's JSONL."""
    rows = [{"messages": d["example"].messages, **({"label": d["example"].label} if d["example"].label else {}),
             **({"references": d["example"].references} if task.data.kind == "generation" else {})}
            for d in task.eval_docs().rows[:n]]
    return _write(path, rows)


@pytest.mark.parametrize("name,n,tokens", [("symptom2disease", 30, None), ("scitldr", 6, 96)])
def test_a_file_of_a_builtin_tasks_rows_scores_exactly_like_the_task(name, n, tokens, tiny_model, tiny_tokenizer,
                                                                      data_dir, tmp_path):
    lm = LocalLM(tiny_model, tiny_tokenizer, batch_size=8)
    builtin = make_task(name, data_dir / "eval")
    mine = user_task(_task_file(builtin, tmp_path / "rows.jsonl", n), max_new_tokens=tokens or 256)
    assert type(mine).__name__ == ("FileClassification" if name == "symptom2disease" else "FileGeneration")
    want = run_task(lm, builtin, shots=0, limit=n, progress=False)
    got = run_task(lm, mine, shots=0, limit=n, progress=False)
    assert got.n == want.n == n
    for metric, value in want.metrics.items():
        assert got.metrics[metric] == value, metric
    answers = got.extra["answers"]
    assert len(answers) == n and answers[0]["where"].endswith(":1") and "answer" in answers[0]
    if name == "scitldr":
        assert 0.0 <= got.metrics["chrf"] <= 1.0 and "exact_match" in got.metrics


class PickingLM:
    """Log-likelihoods that favour a scripted label per document; free answers from a script."""

    def __init__(self, tokenizer, labels, picks, says):
        self.tokenizer, self.labels, self.picks, self.says = tokenizer, labels, picks, says

    def loglikelihood(self, requests, progress=False):
        return [Score(0.0 if self.labels[i % len(self.labels)] == self.picks[i // len(self.labels)] else -3.0,
                      False, 1, False) for i in range(len(requests))]

    def generate_until(self, prompts, until, max_new_tokens, progress=False):
        return [(s, False) for s in self.says]


def test_classification_scores_macro_f1_per_class_and_confusion(tiny_tokenizer, tmp_path):
    gold = ["cat", "cat", "cat", "dog", "dog", "eel"]
    picks = ["cat", "cat", "dog", "dog", "cat", "eel"]
    says = ["cat", "a dog", "maybe a bird", "dog", "cat", "eel."]
    path = _write(tmp_path / "pets.jsonl", [{"prompt": f"animal {i}: ", "label": g} for i, g in enumerate(gold)])
    task = user_task(path)
    result = run_task(PickingLM(tiny_tokenizer, ["cat", "dog", "eel"], picks, says), task, shots=0, progress=False)
    assert result.metrics["acc"] == pytest.approx(4 / 6)
    assert result.metrics["exact_match"] == pytest.approx(3 / 6)  # "cat", "dog", "eel." (punctuation aside)
    assert result.metrics["hallucination_rate"] == pytest.approx(1 / 6)  # "maybe a bird"
    # cat: P 2/3 R 2/3; dog: P 1/2 R 1/2; eel: P 1 R 1 -> macro-F1 (2/3 + 1/2 + 1) / 3
    assert result.metrics["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert result.stderr["macro_f1"] > 0
    assert result.extra["confusion"] == [[2, 1, 0], [1, 1, 0], [0, 0, 1]]
    cat = result.extra["per_class"]["cat"]
    assert cat["precision"] == pytest.approx(2 / 3) and cat["recall"] == pytest.approx(2 / 3) and cat["support"] == 3
    # a prompt row's answer is the label then the end-of-sequence token, as fine-tuning trains it
    task.bind(tiny_tokenizer)
    eos = tiny_tokenizer.token(tiny_tokenizer.eos_token_id)
    assert task.answer_text(task.eval_docs().rows[0], "cat") == f"cat{eos}"


def test_class_scores_agree_with_their_definitions():
    gold, pred, labels = list("aabbbc"), list("abbbcc"), ["a", "b", "c", "d"]
    assert confusion(gold, pred, labels) == [[1, 1, 0, 0], [0, 2, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    report = class_report(gold, pred, labels)
    assert report["b"]["precision"] == pytest.approx(2 / 3) and report["b"]["recall"] == pytest.approx(2 / 3)
    # "d" neither occurs nor is predicted: it does not dilute the macro mean
    f1 = lambda p, r: 2 * p * r / (p + r)  # noqa: E731
    assert macro_f1(gold, pred, labels) == pytest.approx((f1(1, 0.5) + f1(2 / 3, 2 / 3) + f1(0.5, 1)) / 3)
    assert bootstrap_se(gold, pred, labels) == bootstrap_se(gold, pred, labels) > 0  # seeded


def test_answers_without_labels_from_a_closed_set_are_classes(tmp_path):
    rows = [{"prompt": f"review {i}: ", "completion": ["positive", "negative"][i % 2]} for i in range(12)]
    assert type(user_task(_write(tmp_path / "a.jsonl", rows))).__name__ == "FileClassification"
    rows = [{"prompt": f"q{i}", "completion": f"answer number {i}"} for i in range(12)]
    assert type(user_task(_write(tmp_path / "b.jsonl", rows))).__name__ == "FileGeneration"


def test_bad_rows_are_refused_with_file_line_and_field(tmp_path):
    chat = lambda text, **extra: {"messages": [{"role": "user", "content": text}], **extra}  # noqa: E731
    cases = [
        ([chat("a", label="x"), {"prompt": "b", "label": "y"}], r"b\.jsonl:2: a prompt row in a file of chat rows"),
        ([chat("a", label="x"), chat("b")], r"b\.jsonl:2: no 'label' where the rows before have one"),
        ([chat("a", label="")], r"b\.jsonl:1: 'label' must be non-empty text"),
        ([chat("a", references=["ok", " "])], r"b\.jsonl:1: reference 1 is empty"),
        ([chat("a")], r"b\.jsonl:1: nothing to score against"),
        ([{"text": "a"}], r"b\.jsonl:1: neither 'messages' nor 'prompt'"),
    ]
    for rows, message in cases:
        with pytest.raises(SlmError, match=message):
            user_task(_write(tmp_path / "b.jsonl", rows))
    train = _write(tmp_path / "train.jsonl", [chat("a", label="flu"), chat("b", label="cold")])
    test = _write(tmp_path / "test.jsonl", [chat("c", label="flu"), chat("d", label="measles")])
    with pytest.raises(SlmError, match=r"test\.jsonl:2: label 'measles' never appears in the training file"):
        user_task(test, train=train)
    assert user_task(test, train=_write(tmp_path / "t2.jsonl", [chat("a", label="flu"), chat("b", label="measles")]))
    with pytest.raises(SlmError, match="few-shot examples come from the training file"):
        user_task(test).fewshot_docs()


def test_cli_eval_data_writes_answers_and_the_confusion_plot(tmp_path, tiny_model, tiny_tokenizer, capsys):
    from slmkit.cli import main
    from slmkit.interop.hf import save_hf

    save_hf(tiny_model, tiny_tokenizer, tmp_path / "m")
    rows = [{"messages": [{"role": "user", "content": f"robot {i}"}], "label": ["one", "two"][i % 2]} for i in range(6)]
    data = _write(tmp_path / "mine.jsonl", rows)
    out = tmp_path / "r.json"
    assert main(["eval", str(tmp_path / "m"), "--data", str(data), "-o", str(out)]) == 0
    doc = json.loads(out.read_text())
    (result,) = doc["results"]
    assert result["task"] == "file:mine.jsonl" and result["n"] == 6 and "macro_f1" in result["metrics"]
    answers = [json.loads(line) for line in (tmp_path / "r.answers.jsonl").read_text().splitlines()]
    assert [a["expected"] for a in answers] == ["one", "two"] * 3 and "answers" not in result["extra"]
    assert (tmp_path / "r.confusion.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "per class" in printed and "r.answers.jsonl" in printed
    assert main(["eval", str(tmp_path / "m"), "--data", str(tmp_path / "nope.jsonl")]) == 2
