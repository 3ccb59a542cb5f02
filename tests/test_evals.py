"""The evaluation harness: scoring is right, reproducible for any batch size, and bad input is handled."""

from __future__ import annotations

import json
import math

import pytest
import torch

from slmkit.errors import SlmError
from slmkit.evals.api import evaluate, parse_shots
from slmkit.evals.lm import LocalLM, LoglikelihoodRequest
from slmkit.evals.tasks import make_task

QUICK = ["hellaswag", "arc_easy", "piqa", "winogrande", "boolq", "mmlu", "lambada"]


def _strip_times(doc: dict) -> dict:
    doc = json.loads(json.dumps(doc))
    doc.pop("created"), doc.pop("batch_size")
    for r in doc["results"]:
        r.pop("seconds")
    return doc


def test_results_do_not_depend_on_batch_size_or_run(tiny_model, tiny_tokenizer, data_dir):
    kwargs = dict(task_names=QUICK, limit=12, data_dir=data_dir / "eval", progress=False)
    one = evaluate(LocalLM(tiny_model, tiny_tokenizer, batch_size=1), **kwargs)
    eight = evaluate(LocalLM(tiny_model, tiny_tokenizer, batch_size=8), **kwargs)
    again = evaluate(LocalLM(tiny_model, tiny_tokenizer, batch_size=8), **kwargs)
    assert _strip_times(one) == _strip_times(eight) == _strip_times(again)
    assert [r["task"] for r in one["results"]] == QUICK
    assert all(r["n"] == (12 * 57 if r["task"] == "mmlu" else 12) for r in one["results"])  # MMLU: per subject


def test_loglikelihood_is_the_sum_of_the_continuations_token_logprobs(tiny_model, tiny_tokenizer):
    lm = LocalLM(tiny_model, tiny_tokenizer, batch_size=3)
    requests = [LoglikelihoodRequest("Once upon a time", " there was"),
                LoglikelihoodRequest("Once upon a time ", "there was"),  # the trailing space moves over
                LoglikelihoodRequest("1, 2,", " 3")]
    scores = lm.loglikelihood(requests, progress=False)
    for request, score in zip(requests, scores):
        ctx, cont = lm.encode_pair(request.context, request.continuation)
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            lp = torch.log_softmax(tiny_model(ids[:, :-1]).float(), -1)[0]
        expected = sum(lp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
        assert score.logprob == pytest.approx(expected, abs=2e-4) and score.tokens == len(cont)
    assert scores[0].logprob == scores[1].logprob


def test_smollm_scores_like_transformers(smollm, hf_smollm):
    model, hf_tok = hf_smollm
    lm = LocalLM(smollm.model, smollm.tokenizer)
    context, continuation = "Question: What is the capital of France?\nAnswer:", " Paris"
    ours = lm.loglikelihood([LoglikelihoodRequest(context, continuation)], progress=False)[0]
    ids = hf_tok(context + continuation, return_tensors="pt").input_ids
    n = len(hf_tok(continuation).input_ids)
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits.float(), -1)[0]
    theirs = sum(lp[ids.shape[1] - n - 1 + i, ids[0, ids.shape[1] - n + i]].item() for i in range(n))
    assert ours.logprob == pytest.approx(theirs, abs=1e-3)


def test_prompt_formats_follow_the_harness(data_dir):
    eval_dir = data_dir / "eval"
    arc = make_task("arc_easy", eval_dir)
    doc = arc.eval_docs().rows[0]
    assert arc.text(doc).startswith("Question: ") and arc.text(doc).endswith("\nAnswer:")
    assert arc.requests(doc, "")[0].continuation == " " + arc.choices(doc)[0]
    hs = make_task("hellaswag", eval_dir)
    assert hs.text(hs.eval_docs().rows[0]) == "Roof shingle removal: A man is sitting on a roof. He"
    wg = make_task("winogrande", eval_dir)
    doc = wg.eval_docs().rows[0]
    reqs = wg.requests(doc, "")
    assert reqs[0].continuation == reqs[1].continuation and reqs[0].context.endswith(doc["option1"])
    mmlu = make_task("mmlu", eval_dir)
    doc = mmlu.eval_docs().rows[0]
    assert mmlu.text(doc).endswith("\nD. " + doc["choices"][3] + "\nAnswer:")
    pool = mmlu.fewshot_docs().rows
    shots = mmlu.fewshot_examples(doc, pool, 5, None)
    assert len(shots) == 5 and all(d["subject"] == doc["subject"] for d in shots) and doc not in shots


def test_unknown_tasks_bad_rows_and_truncation(tiny_model, tiny_tokenizer, data_dir, tmp_path):
    with pytest.raises(SlmError, match="known tasks: hellaswag"):
        make_task("helaswag", data_dir / "eval")
    with pytest.raises(SlmError, match="--shots"):
        parse_shots("0,five")
    # a malformed row is skipped, counted, and its line named
    (tmp_path / "arc_easy").mkdir()
    source = (data_dir / "eval" / "arc_easy" / "ARC-Easy-Test.jsonl").read_text().splitlines()[:6]
    source[2] = '{"id": "broken", "question": '
    (tmp_path / "arc_easy" / "ARC-Easy-Test.jsonl").write_text("\n".join(source) + "\n")
    lm = LocalLM(tiny_model, tiny_tokenizer, batch_size=4, max_length=24)  # shorter than most prompts
    doc = evaluate(lm, ["arc_easy"], data_dir=tmp_path, progress=False)
    result = doc["results"][0]
    assert result["n"] == 5 and result["skipped"] == 1
    assert result["extra"]["first_bad_row"] == "ARC-Easy-Test.jsonl:3"
    assert result["truncated"] > 0  # prompts were cut from the left to fit, and counted


def test_fewshot_contexts_are_fixed_per_document(tiny_model, tiny_tokenizer, data_dir):
    from slmkit.evals.runner import fewshot_context

    task = make_task("arc_easy", data_dir / "eval")
    docs, pool = task.eval_docs().rows, task.fewshot_docs().rows
    first = fewshot_context(task, docs[3], 3, 2, 1234, pool)
    assert first == fewshot_context(task, docs[3], 3, 2, 1234, pool)
    assert first != fewshot_context(task, docs[3], 3, 2, 99, pool)
    assert first.count("\nAnswer: ") == 2 and first.endswith("\n\n")
    doc = evaluate(LocalLM(tiny_model, tiny_tokenizer), ["arc_easy"], shots=[0, 2], limit=6,
                   data_dir=data_dir / "eval", progress=False)
    assert set(doc["fewshot_gain"]["arc_easy"]["2-shot"]) == {"acc", "acc_norm"}


def test_gsm8k_answer_extraction():
    from slmkit.evals.tasks.gsm8k import Gsm8k

    task = Gsm8k(None)
    doc = {"question": "?", "answer": "She sells 9 eggs for $2 each.\n#### 1,018"}
    assert task.score(doc, " 9 * 2 = 18\n#### 1018") == {"exact_match_strict": 1.0, "exact_match_flexible": 1.0}
    assert task.score(doc, " so the answer is $1,018.") == {"exact_match_strict": 0.0, "exact_match_flexible": 1.0}
    assert task.score(doc, " #### 17") == {"exact_match_strict": 0.0, "exact_match_flexible": 0.0}


def test_humaneval_programs_run_fenced_in(data_dir):
    from slmkit.evals.sandbox import run_untrusted

    task = make_task("humaneval", data_dir / "eval")
    task.timeout = 3.0
    doc = task.eval_docs().rows[0]
    assert task.score(doc, doc["canonical_solution"]) == {"pass@1": 1.0}
    assert task.score(doc, "    return None\n") == {"pass@1": 0.0}
    assert task.score(doc, "    while True:\n        pass\n") == {"pass@1": 0.0}  # killed at the timeout
    assert run_untrusted("x = bytearray(1 << 34)", timeout=5).status == "memory"
    assert not run_untrusted("import socket\nsocket.create_connection(('127.0.0.1', 9))", timeout=5).passed


def test_sliding_window_perplexity(tiny_model, tiny_tokenizer, tmp_path):
    from slmkit.evals.perplexity import text_perplexity

    text = "Once upon a time there was a little robot who liked to count: 1, 2, 3, 42, 1000. " * 6
    path = tmp_path / "t.txt"
    path.write_text(text)
    ids = tiny_tokenizer.encode(text, add_special=False)
    whole = text_perplexity(tiny_model, tiny_tokenizer, path, context=len(ids), progress=False)
    with torch.no_grad():
        lp = torch.log_softmax(tiny_model(torch.tensor([ids[:-1]])).float(), -1)[0]
    nll = -lp.gather(-1, torch.tensor(ids[1:])[:, None]).sum().item()
    assert whole.tokens == len(ids) - 1 and whole.perplexity == pytest.approx(math.exp(nll / (len(ids) - 1)))
    assert whole.bits_per_byte == pytest.approx(nll / math.log(2) / len(text.encode()))
    windows = text_perplexity(tiny_model, tiny_tokenizer, path, context=32, stride=8, progress=False)
    assert windows.tokens == whole.tokens  # every token scored exactly once


def test_cli_eval(tmp_path, tiny_model, tiny_tokenizer, data_dir, capsys):
    from slmkit.cli import main
    from slmkit.interop.hf import save_hf

    save_hf(tiny_model, tiny_tokenizer, tmp_path / "m")
    assert main(["eval", "--tasks", "list"]) == 0
    assert "winogrande" in capsys.readouterr().out
    out = tmp_path / "r.json"
    assert main(["eval", str(tmp_path / "m"), "--tasks", "arc_easy,boolq", "--limit", "4", "-o", str(out),
                 "--data-dir", str(data_dir / "eval")]) == 0
    doc = json.loads(out.read_text())
    assert [r["task"] for r in doc["results"]] == ["arc_easy", "boolq"] and doc["seed"] == 1234
    assert main(["eval", str(tmp_path / "m"), "--tasks", "nope"]) == 2


def test_cli_bench_and_report(tmp_path, tiny_model, tiny_tokenizer, data_dir):
    from slmkit.cli import main
    from slmkit.interop.hf import save_hf

    save_hf(tiny_model, tiny_tokenizer, tmp_path / "m")
    bench = tmp_path / "bench.json"
    assert main(["bench", "tiny", str(tmp_path / "m"), "--prompt-tokens", "16", "--new-tokens", "4", "--runs", "2",
                 "--batch", "1,2", "-o", str(bench)]) == 0
    doc = json.loads(bench.read_text())
    first, second = doc["results"]
    assert set(first["batches"]) == {"1", "2"} and first["peak_mib"] > 0 and first["params"] > 0
    timing = second["batches"]["1"]["decode_tok_s"]
    assert 0 < timing["min"] <= timing["median"] <= timing["max"] and second["file_mib"] > 0
    assert main(["bench", "no-such-model"]) == 2
    evals = tmp_path / "eval.json"
    assert main(["eval", str(tmp_path / "m"), "--tasks", "arc_easy", "--limit", "3", "-o", str(evals),
                 "--data-dir", str(data_dir / "eval")]) == 0
    report_dir = tmp_path / "report"
    assert main(["report", str(evals), str(bench), "-o", str(report_dir)]) == 0
    text = (report_dir / "report.md").read_text()
    assert str(tmp_path / "m") in text and "arc_easy (0-shot)" in text
    assert (report_dir / "accuracy-vs-size.png").is_file() and (report_dir / "accuracy-vs-speed.png").is_file()


def test_an_openai_compatible_endpoint_scores_like_the_local_model(tiny_model, tiny_tokenizer, data_dir):
    """A minimal completions server (echo + logprobs, as vLLM and llama.cpp's server give) over the
    same tiny model: scoring through it must give the local results."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from slmkit.evals.endpoint import EndpointLM

    tok = tiny_tokenizer

    class Completions(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            ids = tok.encode(body["prompt"], add_special=False)
            with torch.no_grad():
                lp = torch.log_softmax(tiny_model(torch.tensor([[tok.bos_token_id] + ids[:-1]])).float(), -1)[0]
            logprobs = {"tokens": [tok.decode([i]) for i in ids],
                        "token_logprobs": [lp[j, t].item() for j, t in enumerate(ids)],
                        "text_offset": [len(tok.decode(ids[:j])) for j in range(len(ids))],
                        "top_logprobs": [{tok.decode([int(lp[j].argmax())]): lp[j].max().item()} for j in range(len(ids))]}
            payload = json.dumps({"choices": [{"text": body["prompt"], "logprobs": logprobs}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Completions)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        kwargs = dict(task_names=["arc_easy", "piqa"], limit=6, data_dir=data_dir / "eval", progress=False)
        remote = evaluate(EndpointLM(f"http://127.0.0.1:{server.server_port}", "tiny"), **kwargs)
    finally:
        server.shutdown()
    local = evaluate(LocalLM(tiny_model, tiny_tokenizer), **kwargs)
    assert [r["metrics"] for r in remote["results"]] == [r["metrics"] for r in local["results"]]
    with pytest.raises(SlmError, match="cannot reach"):
        EndpointLM("http://127.0.0.1:9", "x", timeout=2).generate_until(["hi"], ["\n"], 4, progress=False)


def test_hallucination_check_counts_answers_outside_the_label_set():
    from slmkit.evals.hallucination import check_labels

    labels = ["Migraine", "Common Cold", "Stomach flu", "Flu"]
    answers = ["migraine", "It is most likely a common cold.", "Stomach flu!", "Dragon pox", "flu or migraine",
               "", "the flu\nor maybe something else"]
    result = check_labels(answers, labels)
    assert (result.in_set, result.ambiguous, result.out_of_set) == (4, 1, 2)
    assert result.labels_named["stomach flu"] == 1 and result.labels_named["flu"] == 1
    assert result.examples == ["Dragon pox", ""] and result.hallucination_rate == pytest.approx(2 / 7)
    with pytest.raises(SlmError, match="empty"):
        check_labels(["x"], [" "])


def test_limits_take_the_first_documents_and_every_mmlu_subject(tiny_model, tiny_tokenizer, data_dir):
    doc = evaluate(LocalLM(tiny_model, tiny_tokenizer), ["mmlu", "winogrande"], limit={"mmlu": 1, "winogrande": 3},
                   data_dir=data_dir / "eval", progress=False)
    mmlu, wino = doc["results"]
    assert mmlu["n"] == 57 and len(mmlu["extra"]["groups"]) == 57 and wino["n"] == 3
    assert mmlu["metrics"]["acc_macro"] == pytest.approx(mmlu["metrics"]["acc"])  # one question per subject
