"""Tool calling through `slm serve` and the official openai client: 50 varied requests, each offered
3-5 tools (nested objects, enums, required parameters), under tool_choice `required` and `auto`.

    .venv/bin/python bench/tools.py [--engine torch] [--max-tokens 128] [--model smollm2-135m-instruct]

Every request expects one tool (the table below names it); the others offered are drawn at random
(seeded). Measured: how many emitted calls parse and validate against their tool's schema (target:
all), how often `required` yields a call (target: always), and how often `auto` chose a call and
the expected tool. bench/serve.py runs the same check on its server. Writes bench/results/tools.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from slmkit.toolcalls import ToolCall, invalid_call, read_tools  # noqa: E402


def _fn(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


S = {"type": "string"}
TOOLS = [
    _fn("get_weather", "Current weather for a city", {"city": S, "unit": {"enum": ["celsius", "fahrenheit"]}},
        ["city"]),
    _fn("convert_currency", "Convert money between currencies", {
        "amount": {"type": "number"}, "from_currency": {"enum": ["USD", "EUR", "GBP", "JPY"]},
        "to_currency": {"enum": ["USD", "EUR", "GBP", "JPY"]}}, ["amount", "from_currency", "to_currency"]),
    _fn("send_email", "Send an email", {"to": S, "subject": S, "body": S}, ["to", "subject"]),
    _fn("create_event", "Add an event to the calendar", {
        "title": S, "start": {"type": "object", "properties": {"date": S, "time": S}, "required": ["date"]},
        "attendees": {"type": "array", "items": S}}, ["title", "start"]),
    _fn("search_web", "Search the web", {"query": S, "max_results": {"type": "integer", "minimum": 1,
                                                                      "maximum": 10}}, ["query"]),
    _fn("book_flight", "Book a flight", {
        "origin": S, "destination": S, "date": S,
        "passengers": {"type": "object", "properties": {"adults": {"type": "integer", "minimum": 1},
                                                        "children": {"type": "integer", "minimum": 0}},
                       "required": ["adults"]},
        "cabin": {"enum": ["economy", "business", "first"]}}, ["origin", "destination", "date"]),
    _fn("set_timer", "Start a countdown timer", {"minutes": {"type": "integer", "minimum": 1}, "label": S},
        ["minutes"]),
    _fn("translate", "Translate text", {"text": S, "target_language": {
        "enum": ["French", "German", "Spanish", "Italian", "Japanese"]}}, ["text", "target_language"]),
    _fn("get_stock_price", "Latest price of a stock", {"symbol": S}, ["symbol"]),
    _fn("add_todo", "Add a task to the to-do list", {"task": S, "priority": {"enum": ["low", "medium", "high"]},
                                                     "due": S}, ["task"]),
    _fn("calculate", "Evaluate an arithmetic expression", {"expression": S}, ["expression"]),
    _fn("play_music", "Play music", {"artist": S, "song": S, "shuffle": {"type": "boolean"}}, []),
]
PROMPTS = [  # (user message, the tool it calls for)
    ("What's the weather like in Lisbon right now?", "get_weather"),
    ("Is it cold in Toronto today? Give me Fahrenheit.", "get_weather"),
    ("Tell me the temperature in Nairobi in celsius.", "get_weather"),
    ("Do I need an umbrella in London today?", "get_weather"),
    ("How many euros is 250 US dollars?", "convert_currency"),
    ("Convert 10000 JPY to GBP please.", "convert_currency"),
    ("I have 75 pounds sterling; what is that in dollars?", "convert_currency"),
    ("Exchange 40 EUR into yen.", "convert_currency"),
    ("Email anna@example.com with the subject 'Lunch' and ask if she is free on Friday.", "send_email"),
    ("Send a message to bob@work.org titled 'Report' saying the report is done.", "send_email"),
    ("Write to team@corp.com, subject 'Offsite', that the offsite moved to May.", "send_email"),
    ("Please email my landlord at rent@flat.net about the broken heater.", "send_email"),
    ("Put a dentist appointment in my calendar on 2025-03-14 at 09:30.", "create_event"),
    ("Schedule 'Project sync' on June 2nd at 3pm with Maria and Tom.", "create_event"),
    ("Add my mom's birthday party on 2025-08-20 to the calendar.", "create_event"),
    ("Create a calendar event called 'Gym' for tomorrow at 7:00.", "create_event"),
    ("Search the web for the best hiking trails near Denver.", "search_web"),
    ("Find me 3 articles about quantum computing.", "search_web"),
    ("Look up who won the 2018 World Cup.", "search_web"),
    ("Search online for vegan lasagna recipes, 5 results.", "search_web"),
    ("Book a flight from Boston to Paris on 2025-05-01 for two adults.", "book_flight"),
    ("I need a business class flight from Tokyo to Sydney on July 9.", "book_flight"),
    ("Get me a flight Madrid to Rome on 2025-10-12, two adults and one child.", "book_flight"),
    ("Fly me from Chicago to Denver next Monday, economy.", "book_flight"),
    ("Set a timer for 15 minutes.", "set_timer"),
    ("Remind me in 45 minutes to take the pizza out, label it pizza.", "set_timer"),
    ("Start a 5 minute countdown for my tea.", "set_timer"),
    ("Timer: 90 minutes, call it 'laundry'.", "set_timer"),
    ("Translate 'Where is the train station?' into German.", "translate"),
    ("How do you say 'thank you very much' in Japanese?", "translate"),
    ("Translate 'I love this city' to Italian.", "translate"),
    ("Put 'good morning, everyone' into Spanish.", "translate"),
    ("What's Apple's stock price?", "get_stock_price"),
    ("How is TSLA trading right now?", "get_stock_price"),
    ("Check the current price of MSFT shares.", "get_stock_price"),
    ("Give me the latest quote for NVDA.", "get_stock_price"),
    ("Add 'buy milk' to my to-do list.", "add_todo"),
    ("Add a high priority task: file taxes, due April 15.", "add_todo"),
    ("Remember to call the plumber, low priority.", "add_todo"),
    ("New to-do: renew passport by 2025-09-01, medium priority.", "add_todo"),
    ("What is 17 times 23?", "calculate"),
    ("Calculate (45 + 55) / 4.", "calculate"),
    ("What's the square of 12 minus 7?", "calculate"),
    ("Compute 2 to the power of 10.", "calculate"),
    ("Play some Beatles.", "play_music"),
    ("Put on 'Bohemian Rhapsody' by Queen.", "play_music"),
    ("Shuffle songs by Taylor Swift.", "play_music"),
    ("Play 'Clair de Lune' by Debussy.", "play_music"),
    ("What will the weather be in Oslo? Use celsius.", "get_weather"),
    ("How much is 1200 GBP in euros?", "convert_currency"),
]


def requests(seed: int = 0) -> list[dict]:
    """Each prompt with its expected tool and 2-4 others, in a shuffled order."""
    rng, by_name = random.Random(seed), {t["function"]["name"]: t for t in TOOLS}
    out = []
    for text, expected in PROMPTS:
        others = rng.sample([n for n in by_name if n != expected], rng.randint(2, 4))
        names = [expected, *others]
        rng.shuffle(names)
        out.append({"prompt": text, "expected": expected, "tools": [by_name[n] for n in names]})
    return out


def run_tools(client: openai.OpenAI, model: str, max_tokens: int = 128, seed: int = 0) -> dict:
    """Both tool choices over every request; counts and the failures, named."""
    results = {}
    for choice in ("required", "auto"):
        emitted = valid = calls_made = expected_hit = length_cut = 0
        failures, started = [], time.perf_counter()
        for row in requests(seed):
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": row["prompt"]}], tools=row["tools"],
                tool_choice=choice, max_tokens=max_tokens, temperature=0)
            answer = reply.choices[0]
            length_cut += answer.finish_reason == "length"
            calls = answer.message.tool_calls or []
            calls_made += bool(calls)
            expected_hit += any(c.function.name == row["expected"] for c in calls)
            tools = read_tools(row["tools"])
            for call in calls:
                emitted += 1
                problem = invalid_call(ToolCall(call.function.name, call.function.arguments), tools)
                valid += problem is None
                if problem:
                    failures.append({"prompt": row["prompt"], "call": call.function.name, "problem": problem})
            if choice == "required" and not calls:
                failures.append({"prompt": row["prompt"], "problem": f"no call ({answer.finish_reason})",
                                 "text": (answer.message.content or "")[:200]})
        n = len(PROMPTS)
        results[choice] = {"requests": n, "answers_with_a_call": calls_made, "emitted_calls": emitted,
                           "valid_calls": valid, "expected_tool_called": expected_hit, "cut_by_max_tokens": length_cut,
                           "seconds": round(time.perf_counter() - started, 1), "failures": failures}
    return results


def print_tools(results: dict) -> None:
    print(f"{'tool_choice':<12}{'calls':>8}{'valid':>10}{'expected tool':>15}{'cut':>6}{'s':>8}")
    for choice, r in results.items():
        print(f"{choice:<12}{r['answers_with_a_call']:>5}/{r['requests']:<3}{r['valid_calls']:>6}/{r['emitted_calls']:<3}"
              f"{r['expected_tool_called']:>11}/{r['requests']:<3}{r['cut_by_max_tokens']:>6}{r['seconds']:>8}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", default="torch", help="slm serve --engine")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "tools.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    from serve import start_server  # the same server bench/serve.py starts

    server, url = start_server(argparse.Namespace(model=args.model, name="m", max_batch=8, context=2048,
                                                  dtype="float32", requests=32), args.engine)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        results = run_tools(client, "m", args.max_tokens)
    finally:
        server.terminate()
        server.wait(timeout=30)
    report = {"model": args.model, "engine": args.engine, "max_tokens": args.max_tokens, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print_tools(results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
