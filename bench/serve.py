"""Serving under load: 32 concurrent streaming chat requests against `slm serve` on loopback, the
same requests one after another, an overload burst, a shared system prompt, and a sweep of bad requests.

    python bench/serve.py [--requests 32] [--max-tokens 64] [--max-batch 32] [--engines torch,llamacpp]

The server runs in its own process (`slm serve`); the official `openai` client streams each
request from a thread of this process and records its time to first token and total latency.
Prompts are the shared Self-Instruct user-oriented instructions (greedy decoding, so both passes
generate the same answers). Rows, for each engine in turn (torch: slmkit's PyTorch engine on fp32
weights; llamacpp: llama.cpp on the model's GGUF):
- aggregate throughput = completion tokens / wall time, concurrent vs sequential in this run (target:
  at least 3x), llama.cpp's concurrent throughput against torch's (target: 2x), TTFT p50 <= 2 s and
  p99 <= 5 s on llama.cpp (torch: p50 <= 3 s), greedy answers equal between the two passes;
- the prefix cache's and speculative decoding's counters from /metrics after those passes;
- overload: --burst requests at once against a server started with --max-queue --burst-queue; every
  request must get 200 or 429 with Retry-After, the server must stay up and log no traceback;
- a shared system prompt of --system-tokens tokens: --shared requests one after another (after one
  warm-up request), TTFT p50 with the prefix cache against a server started with --prefix-cache-mb 0
  (target: <= 0.3x), answers equal.
Then every bad request of the sweep must get a 4xx JSON error and the server must still answer
/health, and bench/tools.py's tool-calling requests run on the --tools-engine server (every emitted
call must parse and validate; `required` must always call). Writes bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from slmkit.data.shared import shared_data_dir  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from decode import cpu_name  # noqa: E402
from tools import PROMPTS, print_tools, run_tools  # noqa: E402

BAD_REQUESTS = {  # name -> (raw body, content type)
    "malformed JSON": b'{"model": "M", "messages": [',
    "wrong types": b'{"model": "M", "messages": "hello", "max_tokens": "many"}',
    "negative temperature": b'{"model": "M", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}',
    "huge max_tokens": b'{"model": "M", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000000000}',
    "unknown model": b'{"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}',
    "non-UTF-8 bytes": b'{"model": "M", "messages": [{"role": "user", "content": "\xff\xfe\xfa"}]}',
    "10 MB body": b'{"model": "M", "messages": [{"role": "user", "content": "' + b"x" * 10_000_000 + b'"}]}',
    "empty messages": b'{"model": "M", "messages": []}',
    "not JSON at all": b"\x00\x01\x02 hello",
}


def prompts(count: int) -> list[str]:
    data = shared_data_dir()
    if data is None:
        sys.exit("the shared data directory (../shared/data) is needed for the prompts")
    rows = [json.loads(line) for line in (data / "tasks" / "self_instruct_human" /
                                          "user_oriented_instructions.jsonl").read_text().splitlines()]
    out = []
    for row in rows:
        instance = (row.get("instances") or [{}])[0].get("input", "")
        text = row["instruction"] + ("\n\n" + instance if instance else "")
        if len(text) < 600:
            out.append(text)
        if len(out) == count:
            return out
    return out


def start_server(args, engine: str, *options: str) -> tuple[subprocess.Popen, str]:
    """`slm serve` for `engine` with the bench's settings (and extra flags); its log goes to a file
    (`server.log`) so the bench can look for tracebacks after it stops."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "slmkit.cli", "serve", f"{args.name}={args.model}", "--port", str(port),
               "--max-batch", str(args.max_batch), "--max-queue", str(args.requests * 2), "--dtype", args.dtype,
               "--engine", engine, "--context", str(args.context), *options]
    log = tempfile.NamedTemporaryFile("w+b", prefix="slm-serve-", suffix=".log", delete=False)
    server = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
                              stdout=subprocess.DEVNULL, stderr=log)
    server.log = Path(log.name)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if server.poll() is not None:
            sys.exit(f"the server exited: {server.log.read_text(errors='replace')[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return server, url
        except httpx.HTTPError:
            time.sleep(0.5)
    server.kill()
    sys.exit("the server did not start within 180 s")


def stop_server(server: subprocess.Popen) -> int:
    """Stop the server; the number of tracebacks in its log."""
    server.terminate()
    server.wait(timeout=30)
    tracebacks = server.log.read_text(errors="replace").count("Traceback")
    server.log.unlink()
    return tracebacks


def one_request(client, model: str, prompt: str, max_tokens: int, system: str | None = None) -> dict:
    started = time.perf_counter()
    first, pieces, tokens, error = None, [], 0, None
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    try:
        stream = client.chat.completions.create(model=model, messages=messages,
                                                max_tokens=max_tokens, temperature=0, stream=True,
                                                stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                if choice.delta.content:
                    first = first if first is not None else time.perf_counter() - started
                    pieces.append(choice.delta.content)
    except Exception as e:  # counted, reported; the bench goes on
        error = f"{type(e).__name__}: {e}"
    return {"ttft_s": first, "total_s": time.perf_counter() - started, "tokens": tokens, "text": "".join(pieces),
            "error": error}


def run_pass(url: str, model: str, texts: list[str], max_tokens: int, concurrent: bool,
             system: str | None = None) -> dict:
    client = openai.OpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600)
    started = time.perf_counter()
    if concurrent:
        with concurrent_pool(len(texts)) as pool:
            results = list(pool.map(lambda t: one_request(client, model, t, max_tokens, system), texts))
    else:
        results = [one_request(client, model, t, max_tokens, system) for t in texts]
    wall = time.perf_counter() - started
    ok = [r for r in results if not r["error"]]
    tokens = sum(r["tokens"] for r in ok)
    return {"wall_s": wall, "requests": len(results), "errors": len(results) - len(ok),
            "error_samples": [r["error"] for r in results if r["error"]][:3],
            "completion_tokens": tokens, "tokens_per_s": tokens / wall,
            "ttft_p50_s": pct([r["ttft_s"] for r in ok if r["ttft_s"] is not None], 50),
            "ttft_p99_s": pct([r["ttft_s"] for r in ok if r["ttft_s"] is not None], 99),
            "latency_p50_s": pct([r["total_s"] for r in ok], 50), "latency_p99_s": pct([r["total_s"] for r in ok], 99),
            "texts": [r["text"] for r in results]}


def concurrent_pool(n: int) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(n)


def pct(values: list[float], q: int) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def bad_input_sweep(url: str, model: str) -> dict:
    out = {}
    for name, body in BAD_REQUESTS.items():
        body = body.replace(b'"M"', json.dumps(model).encode())
        r = httpx.post(url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"},
                       timeout=60)
        try:
            error = r.json().get("error", {})
        except ValueError:
            error = {}
        out[name] = {"status": r.status_code, "json_error": bool(error.get("message")), "code": error.get("code")}
    out["healthy_after"] = httpx.get(url + "/health", timeout=10).status_code == 200
    return out


def overload(url: str, model: str, burst: int, max_tokens: int) -> dict:
    """`burst` chat requests at once (raw HTTP, so every status and header is seen)."""
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0}

    def ask(i: int) -> tuple[int, bool]:
        try:
            r = httpx.post(url + "/v1/chat/completions", timeout=600, json={
                **body, "messages": [{"role": "user", "content": f"Write one sentence about the number {i}."}]})
        except httpx.HTTPError:
            return -1, False
        return r.status_code, r.status_code != 429 or bool(r.headers.get("retry-after"))

    with concurrent_pool(burst) as pool:
        answers = list(pool.map(ask, range(burst)))
    statuses = [status for status, _ in answers]
    return {"requests": burst, "ok_200": statuses.count(200), "busy_429": statuses.count(429),
            "other": len(statuses) - statuses.count(200) - statuses.count(429),
            "retry_after_on_every_429": all(has for status, has in answers if status == 429),
            "alive_after": httpx.get(url + "/health", timeout=10).status_code == 200}


def decode_savings(url: str) -> dict:
    """The prefix cache's and speculative decoding's counters from the server's /metrics."""
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(("slmkit_prefix_cache", "slmkit_speculative")):
            name, value = line.split("{")[0], float(line.rsplit(" ", 1)[1])
            out[name.removeprefix("slmkit_").removesuffix("_total")] = value
    return out


def system_prompt(model: str, tokens: int) -> str:
    """A system prompt of about `tokens` tokens: a research assistant's brief with SciTLDR abstracts."""
    from slmkit.load import load_tokenizer

    rows = [json.loads(line) for line in (shared_data_dir() / "tasks" / "scitldr" / "dev.jsonl").open()][:40]
    text = "You help a research group. Answer briefly. The papers they discuss:\n\n" + "\n\n".join(
        " ".join(row["source"]) for row in rows)
    tokenizer = load_tokenizer(model)
    return tokenizer.decode(tokenizer.encode(text)[:tokens])


def shared_prefix(args, engine: str, texts: list[str], system: str) -> dict:
    """The same requests after one warm-up that shares their system prompt, on a server with the
    prefix cache and on one without (--prefix-cache-mb 0), one after another: TTFT of each."""
    runs = {}
    for name, options in (("cached", ()), ("uncached", ("--prefix-cache-mb", "0"))):
        server, url = start_server(args, engine, *options)
        try:
            run_pass(url, args.name, ["Which paper is about language models?"], 8, False, system)  # warm-up
            result = run_pass(url, args.name, texts, args.shared_tokens, False, system)
            result["metrics"] = decode_savings(url)
        finally:
            tracebacks = stop_server(server)
        runs[name] = {**result, "tracebacks": tracebacks}
    same = sum(a == b for a, b in zip(runs["cached"].pop("texts"), runs["uncached"].pop("texts")))
    return {**runs, "same_answers": same,
            "ttft_ratio": runs["cached"]["ttft_p50_s"] / runs["uncached"]["ttft_p50_s"]}


def bench_engine(args, engine: str, texts: list[str], shared_texts: list[str], system: str,
                 sweep: bool) -> tuple[dict, dict | None, dict | None]:
    """One engine's rows: concurrent and sequential passes, counters, overload, shared system prompt;
    also the bad-input sweep (when `sweep`) and the tool-calling requests (on the --tools-engine)."""
    server, url = start_server(args, engine)
    swept, tool_rows = None, None
    try:
        run_pass(url, args.name, texts[:2], 8, concurrent=False)  # warm-up
        together = run_pass(url, args.name, texts, args.max_tokens, concurrent=True)
        alone = run_pass(url, args.name, texts, args.max_tokens, concurrent=False)
        savings = decode_savings(url)
        if sweep:
            swept = bad_input_sweep(url, args.name)
        if engine == args.tools_engine:
            client = openai.OpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600)
            tool_rows = run_tools(client, args.name)
        peak = peak_rss_mib(server.pid)
    finally:
        tracebacks = stop_server(server)
    server, url = start_server(args, engine, "--max-queue", str(args.burst_queue))
    try:
        burst = overload(url, args.name, args.burst, 16)
    finally:
        tracebacks_burst = stop_server(server)
    burst["tracebacks"] = tracebacks_burst
    shared = shared_prefix(args, engine, shared_texts, system)
    same = sum(a == b for a, b in zip(together.pop("texts"), alone.pop("texts")))
    run = {"concurrent": together, "sequential": alone, "same_answers": same, "peak_rss_mib": peak,
           "throughput_x": together["tokens_per_s"] / alone["tokens_per_s"], "decode_savings": savings,
           "tracebacks": tracebacks, "overload": burst, "shared_prefix": shared}
    return run, swept, tool_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=32, help="the server's decode batch (32: every request "
                        "joins at once, so time to first token is one batched prefill, not a wait in the queue)")
    parser.add_argument("--engines", default="torch,llamacpp", help="slm serve --engine values, one run each")
    parser.add_argument("--context", type=int, default=1024, help="slm serve --context (tokens per request)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--name", default="smollm2")
    parser.add_argument("--dtype", default="float32", help="as slm serve's default (see its --help)")
    parser.add_argument("--tools-engine", default="torch", help="the engine whose server also runs bench/tools.py's "
                        "50 tool-calling requests under required and auto ('none': skip)")
    parser.add_argument("--burst", type=int, default=128, help="requests sent at once in the overload row")
    parser.add_argument("--burst-queue", type=int, default=64, help="the overload server's --max-queue")
    parser.add_argument("--shared", type=int, default=16, help="requests in the shared-system-prompt row")
    parser.add_argument("--system-tokens", type=int, default=512, help="that row's system prompt length")
    parser.add_argument("--shared-tokens", type=int, default=16, help="new tokens per request in that row")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve.json"))
    args = parser.parse_args()
    texts, shared_texts = prompts(args.requests), prompts(args.shared)
    system = system_prompt(args.model, args.system_tokens)
    runs, sweep, tool_rows = {}, None, None
    for engine in args.engines.split(","):
        runs[engine], engine_sweep, engine_tools = bench_engine(args, engine, texts, shared_texts, system,
                                                                sweep is None)
        sweep, tool_rows = sweep or engine_sweep, tool_rows or engine_tools
    report = {"bench": "serve", "model": args.model, "tools": tool_rows, "dtype": args.dtype,
              "max_batch": args.max_batch,
              "context": args.context, "requests": args.requests, "max_tokens": args.max_tokens, "engines": runs,
              "bad_input": sweep, "targets": targets(runs, sweep, tool_rows), "machine": cpu_name(),
              "command": " ".join(["python", *sys.argv]), "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)
    if tool_rows:
        print(f"\ntool calling on the {args.tools_engine} engine ({len(PROMPTS)} requests, max_tokens 128):")
        print_tools(tool_rows)
    for check, ok in report["targets"].items():
        print(f"{'PASS' if ok else 'MISS'}  {check}")


def targets(runs: dict, sweep: dict, tool_rows: dict | None) -> dict:
    out = {"zero_errors": all(r[p]["errors"] == 0 for r in runs.values() for p in ("concurrent", "sequential")),
           "no_tracebacks": all(r["tracebacks"] == 0 and r["overload"]["tracebacks"] == 0 for r in runs.values()),
           "bad_input_all_4xx_json": all(400 <= v["status"] < 500 and v["json_error"]
                                         for k, v in sweep.items() if k != "healthy_after"),
           "healthy_after_sweep": sweep["healthy_after"]}
    for engine, r in runs.items():
        out[f"{engine}_concurrent_3x_sequential"] = r["throughput_x"] >= 3.0
        burst = r["overload"]
        out[f"{engine}_overload_200_or_429_with_retry_after"] = (
            burst["other"] == 0 and burst["retry_after_on_every_429"] and burst["alive_after"])
        out[f"{engine}_shared_prompt_ttft_le_0.3x_uncached"] = r["shared_prefix"]["ttft_ratio"] <= 0.3
    if "torch" in runs:
        out["torch_ttft_p50_le_3s"] = (runs["torch"]["concurrent"]["ttft_p50_s"] or 1e9) <= 3.0
    if "llamacpp" in runs:
        together = runs["llamacpp"]["concurrent"]
        out["llamacpp_ttft_p50_le_2s_p99_le_5s"] = (together["ttft_p50_s"] or 1e9) <= 2 and \
            (together["ttft_p99_s"] or 1e9) <= 5
        out["llamacpp_greedy_answers_equal"] = runs["llamacpp"]["same_answers"] == together["requests"]
    if {"torch", "llamacpp"} <= set(runs):
        ratio = runs["llamacpp"]["concurrent"]["tokens_per_s"] / runs["torch"]["concurrent"]["tokens_per_s"]
        out["llamacpp_aggregate_2x_torch"] = ratio >= 2.0
    if tool_rows:
        out["tools_all_emitted_calls_valid"] = all(r["valid_calls"] == r["emitted_calls"] for r in tool_rows.values())
        out["tools_required_always_calls"] = tool_rows["required"]["answers_with_a_call"] == len(PROMPTS)
    return out


def peak_rss_mib(pid: int) -> float | None:
    """The server process's peak resident memory (VmHWM), read before it is stopped."""
    try:
        line = next(line for line in open(f"/proc/{pid}/status") if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) / 1024


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report['requests']} streaming chat requests, {report['max_tokens']} tokens each "
                        f"({report['model']}, batch {report['max_batch']})")
    for column in ("engine", "pass", "errors", "tokens", "wall s", "tok/s", "TTFT p50", "TTFT p99", "latency p50",
                   "latency p99", "peak RSS MiB"):
        table.add_column(column, justify="left" if column in ("engine", "pass") else "right")
    fmt = lambda v: f"{v:.2f}" if v is not None else "-"  # noqa: E731
    for engine, run in report["engines"].items():
        for name in ("concurrent", "sequential"):
            r = run[name]
            table.add_row(engine, name, str(r["errors"]), str(r["completion_tokens"]), f"{r['wall_s']:.1f}",
                          f"{r['tokens_per_s']:.1f}", fmt(r["ttft_p50_s"]), fmt(r["ttft_p99_s"]),
                          fmt(r["latency_p50_s"]), fmt(r["latency_p99_s"]), fmt(run["peak_rss_mib"]))
    Console().print(table)
    for engine, run in report["engines"].items():
        print(f"{engine}: concurrent {run['throughput_x']:.2f}x sequential; identical answers "
              f"{run['same_answers']}/{report['requests']}")
    sweep = Table(title="bad-input sweep")
    for column in ("request", "status", "OpenAI error JSON", "code"):
        sweep.add_column(column)
    for name, v in report["bad_input"].items():
        if name != "healthy_after":
            sweep.add_row(name, str(v["status"]), "yes" if v["json_error"] else "NO", str(v["code"]))
    Console().print(sweep)
    print(f"healthy after the sweep: {report['bad_input']['healthy_after']}")
    print_load_rows(report)


def print_load_rows(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    fmt = lambda v: f"{v:.2f}" if v is not None else "-"  # noqa: E731
    burst = Table(title="overload: requests sent at once against a bounded queue")
    for column in ("engine", "requests", "200", "429", "other", "Retry-After on 429", "alive", "tracebacks"):
        burst.add_column(column)
    shared = Table(title="a shared system prompt: requests one after another, prefix cache on vs off")
    for column in ("engine", "TTFT p50 cached", "TTFT p50 uncached", "ratio", "same answers", "reused tokens"):
        shared.add_column(column)
    savings = Table(title="decode savings after the concurrent and sequential passes (/metrics)")
    for column in ("engine", "prefix lookups", "hits", "reused tokens", "evictions", "drafted", "accepted"):
        savings.add_column(column)
    for engine, run in report["engines"].items():
        b, s, m = run["overload"], run["shared_prefix"], run["decode_savings"]
        burst.add_row(engine, str(b["requests"]), str(b["ok_200"]), str(b["busy_429"]), str(b["other"]),
                      str(b["retry_after_on_every_429"]), str(b["alive_after"]), str(b["tracebacks"]))
        shared.add_row(engine, fmt(s["cached"]["ttft_p50_s"]), fmt(s["uncached"]["ttft_p50_s"]), fmt(s["ttft_ratio"]),
                       f"{s['same_answers']}/{s['cached']['requests']}",
                       str(int(s["cached"]["metrics"].get("prefix_cache_reused_tokens", 0))))
        savings.add_row(engine, *(str(int(m.get(k, 0))) for k in (
            "prefix_cache_lookups", "prefix_cache_hits", "prefix_cache_reused_tokens", "prefix_cache_evictions",
            "speculative_drafted_tokens", "speculative_accepted_tokens")))
    for table in (burst, shared, savings):
        Console().print(table)


if __name__ == "__main__":
    main()
