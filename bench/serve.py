"""Serving under load: 32 concurrent streaming chat requests against `slm serve` on loopback, the
same requests one after another, and a sweep of bad requests.

    python bench/serve.py [--requests 32] [--max-tokens 64] [--max-batch 32] [--engines torch,llamacpp]

The server runs in its own process (`slm serve`); the official `openai` client streams each
request from a thread of this process and records its time to first token and total latency.
Prompts are the shared Self-Instruct user-oriented instructions (greedy decoding, so both passes
generate the same answers). Aggregate throughput = completion tokens / wall time, concurrent vs
sequential in this run (target: at least 3x), for each engine in turn (torch: slmkit's PyTorch
engine on fp32 weights; llamacpp: llama.cpp on the bundled GGUF as it is), and llama.cpp's
concurrent throughput against torch's (target: 2x), and torch's TTFT p50 (target: <= 3 s). Then every bad request of the sweep must get a 4xx
JSON error and the server must still answer /health. Then bench/tools.py's tool-calling requests
run on the --tools-engine server (every emitted call must parse and validate; `required` must always
call). Writes bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
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


def start_server(args, engine: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "slmkit.cli", "serve", f"{args.name}={args.model}", "--port", str(port),
               "--max-batch", str(args.max_batch), "--max-queue", str(args.requests * 2), "--dtype", args.dtype,
               "--engine", engine, "--context", str(args.context)]
    server = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if server.poll() is not None:
            sys.exit(f"the server exited: {server.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return server, url
        except httpx.HTTPError:
            time.sleep(0.5)
    server.kill()
    sys.exit("the server did not start within 180 s")


def one_request(client, model: str, prompt: str, max_tokens: int) -> dict:
    started = time.perf_counter()
    first, pieces, tokens, error = None, [], 0, None
    try:
        stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
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


def run_pass(url: str, model: str, texts: list[str], max_tokens: int, concurrent: bool) -> dict:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600)
    started = time.perf_counter()
    if concurrent:
        with concurrent_pool(len(texts)) as pool:
            results = list(pool.map(lambda t: one_request(client, model, t, max_tokens), texts))
    else:
        results = [one_request(client, model, t, max_tokens) for t in texts]
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
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve.json"))
    args = parser.parse_args()
    texts = prompts(args.requests)
    runs, sweep, tool_rows = {}, None, None
    for engine in args.engines.split(","):
        server, url = start_server(args, engine)
        try:
            run_pass(url, args.name, texts[:2], 8, concurrent=False)  # warm-up
            together = run_pass(url, args.name, texts, args.max_tokens, concurrent=True)
            alone = run_pass(url, args.name, texts, args.max_tokens, concurrent=False)
            sweep = sweep or bad_input_sweep(url, args.name)
            if engine == args.tools_engine:
                client = openai.OpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600)
                tool_rows = run_tools(client, args.name)
            peak = peak_rss_mib(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=30)
        same = sum(a == b for a, b in zip(together.pop("texts"), alone.pop("texts")))
        runs[engine] = {"concurrent": together, "sequential": alone, "same_answers": same, "peak_rss_mib": peak,
                        "throughput_x": together["tokens_per_s"] / alone["tokens_per_s"]}
    targets = {"zero_errors": all(r[p]["errors"] == 0 for r in runs.values() for p in ("concurrent", "sequential")),
               "bad_input_all_4xx_json": all(400 <= v["status"] < 500 and v["json_error"]
                                             for k, v in sweep.items() if k != "healthy_after"),
               "healthy_after_sweep": sweep["healthy_after"]}
    for engine, r in runs.items():
        targets[f"{engine}_concurrent_3x_sequential"] = r["throughput_x"] >= 3.0
    if "torch" in runs:
        targets["torch_ttft_p50_le_3s"] = (runs["torch"]["concurrent"]["ttft_p50_s"] or 1e9) <= 3.0
    if {"torch", "llamacpp"} <= set(runs):
        ratio = runs["llamacpp"]["concurrent"]["tokens_per_s"] / runs["torch"]["concurrent"]["tokens_per_s"]
        targets["llamacpp_aggregate_2x_torch"] = ratio >= 2.0
    if tool_rows:
        targets["tools_all_emitted_calls_valid"] = all(r["valid_calls"] == r["emitted_calls"] for r in tool_rows.values())
        targets["tools_required_always_calls"] = tool_rows["required"]["answers_with_a_call"] == len(PROMPTS)
    report = {"bench": "serve", "model": args.model, "tools": tool_rows, "dtype": args.dtype, "max_batch": args.max_batch,
              "context": args.context, "requests": args.requests, "max_tokens": args.max_tokens, "engines": runs,
              "bad_input": sweep, "targets": targets, "machine": cpu_name(),
              "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)
    if tool_rows:
        print(f"\ntool calling on the {args.tools_engine} engine ({len(PROMPTS)} requests, max_tokens 128):")
        print_tools(tool_rows)


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
    for check, ok in report["targets"].items():
        print(f"{'PASS' if ok else 'MISS'}  {check}")


if __name__ == "__main__":
    main()
