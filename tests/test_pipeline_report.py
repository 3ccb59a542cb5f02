"""The pipeline's report page and model card, from fake but plausible evaluation rows: the table
holds every stage (missing values as "–"), the HTML page is self-contained with one inline SVG per
plot, headless Chromium renders it, and the card's front matter is YAML whose model-index holds
the final stage's scores. No model is loaded."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from slmkit.pipeline.card import write_model_card
from slmkit.pipeline.report import markdown_table, write_report

CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")

ROWS = [
    {"stage": "01-base", "model": "runs/s2d/01-base", "params": 134515008, "file_mib": 513.1,
     "peak_rss_mib": 1210.0, "prefill_tps": 180.4, "decode_tps": 11.2,
     "task": {"name": "symptom2disease", "metric": "acc", "value": 0.112, "stderr": 0.021, "n": 191},
     "general": {"arc_easy": {"metric": "acc_norm", "value": 0.55}, "piqa": {"metric": "acc_norm", "value": 0.63}},
     "hallucination_rate": 0.31, "wall_s": 12.0},
    {"stage": "03-finetune", "model": "runs/s2d/03-finetune", "params": 134515008, "file_mib": 513.1,
     "peak_rss_mib": 1190.0, "prefill_tps": None, "decode_tps": None,  # speed not measured
     "task": {"name": "symptom2disease", "metric": "acc", "value": 0.927, "stderr": 0.019, "n": 191},
     "general": {"arc_easy": {"metric": "acc_norm", "value": 0.52}, "piqa": {"metric": "acc_norm", "value": 0.61}},
     "hallucination_rate": 0.0, "wall_s": 449.3},
    {"stage": "04-quantize", "model": "runs/s2d/04-quantize", "params": 134515008, "file_mib": 144.8,
     "peak_rss_mib": 640.0, "prefill_tps": 350.2, "decode_tps": 20.1,
     "task": {"name": "symptom2disease", "metric": "acc", "value": 0.915, "stderr": 0.02, "n": 191},
     "general": {"arc_easy": {"metric": "acc_norm", "value": 0.51}, "piqa": {"metric": "acc_norm", "value": 0.60}},
     "hallucination_rate": 0.004, "wall_s": 95.0},
]
STAGES = [r["stage"] for r in ROWS]
PLOT_IDS = ["plot-quality-size", "plot-quality-speed", "plot-curves-03-finetune"]


def _run_dir(root: Path) -> Path:
    """A training run directory as train/loop.py leaves it: train rows every step, eval rows every 10."""
    run = root / "03-finetune"
    run.mkdir(parents=True)
    lines = []
    for step in range(1, 41):
        lines.append({"kind": "train", "step": step, "loss": 3.0 / step**0.5, "lr": 1e-4, "grad_norm": 1.0,
                      "tokens": 512 * step, "tok_per_s": 900.0})
        if step % 10 == 0:
            lines.append({"kind": "eval", "step": step, "val_loss": 3.2 / step**0.4, "val_ppl": 2.0,
                          "best_val_loss": 3.2 / step**0.4})
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pipeline")
    curves = {"03-finetune": _run_dir(root / "work"), "02-distill": root / "work" / "never-ran"}
    answers = [{"question": "I have a rash & <itch>", "expected": "psoriasis", "final model": "Psoriasis"}]
    return write_report(root / "report", "pipeline <s2d>", ROWS, curves,
                        notes=["03-finetune: ran (449s)"], answers=answers)


class _Page(HTMLParser):
    """What the tests look at in report.html: ids, the #stages table's cells, external references."""

    def __init__(self):
        super().__init__()
        self.ids, self.svg_ids, self.external, self.tags = set(), [], [], []
        self.head, self.body, self._table, self._cell, self._row = [], [], None, None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        self.ids.add(attrs.get("id"))
        if tag == "svg" and attrs.get("id", "").startswith("plot-"):
            self.svg_ids.append(attrs["id"])
        self.external += [v for k, v in attrs.items() if k in ("src", "href") and v and "://" in v]
        if tag == "table":
            self._table = attrs.get("id")
        elif tag == "tr" and self._table == "stages":
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append((tag, self._cell))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            (self.head if self._row[0][0] == "th" else self.body).append([c for _, c in self._row])
            self._row = None
        elif tag == "table":
            self._table = None


def _parse(file: Path) -> _Page:
    page = _Page()
    page.feed(file.read_text(encoding="utf-8"))
    return page


def test_markdown_report_has_every_stage_with_missing_values_as_dashes(report):
    html_file, md_file = report
    md = md_file.read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| 0")}
    assert list(rows) == STAGES
    assert "symptom2disease acc (191 rows)" in md and "arc_easy acc_norm" in md and "piqa acc_norm" in md
    assert "134.5M" in rows["01-base"] and "0.927 ± 0.019" in rows["03-finetune"]
    assert rows["03-finetune"].count("–") == 2  # prefill and decode tok/s were not measured
    assert "7m 29s" in rows["03-finetune"] and "0.4%" in rows["04-quantize"]
    for plot in PLOT_IDS:
        assert f"(plots/{plot}.png)" in md
        assert (md_file.parent / "plots" / f"{plot}.png").stat().st_size > 1000
    assert "skipped" in md and "never-ran" in md  # the curve without metrics.jsonl says why it is missing
    assert not list(md_file.parent.rglob("*.tmp"))  # atomic writes leave no temporaries


def test_the_table_says_how_many_rows_each_score_counts():
    fewer = [*ROWS[:2], {**ROWS[2], "task": {**ROWS[2]["task"], "n": 96}}]
    md = markdown_table(fewer)
    assert "symptom2disease acc |" in md  # the counts differ: each cell says its own
    assert "0.927 ± 0.019 (n=191)" in md and "0.915 ± 0.020 (n=96)" in md


def test_html_report_is_one_self_contained_page_with_table_and_plots(report):
    html_file, _ = report
    page = _parse(html_file)
    assert page.head[0][:2] == ["stage", "parameters"] and "symptom2disease acc (191 rows)" in page.head[0]
    assert [row[0] for row in page.body] == STAGES
    assert all(len(row) == len(page.head[0]) for row in page.body)
    assert page.svg_ids == PLOT_IDS
    assert "plot-curves-02-distill-skipped" in page.ids and "answers" in page.ids
    assert "script" not in page.tags and "img" not in page.tags and "link" not in page.tags
    assert page.external == []
    text = html_file.read_text(encoding="utf-8")
    assert 'src="http' not in text and 'href="http' not in text and "@import" not in text
    assert "pipeline &lt;s2d&gt;" in text and "&lt;itch&gt;" in text  # text is escaped, not markup


def test_a_plot_without_data_is_skipped_and_said_so(tmp_path):
    rows = [{"stage": "01-base", "params": 1000}]  # nothing measured
    html_file, md_file = write_report(tmp_path, "empty", rows, {})
    page = _parse(html_file)
    assert page.svg_ids == [] and {"plot-quality-size-skipped", "plot-quality-speed-skipped"} <= page.ids
    assert [row[0] for row in page.body] == ["01-base"] and page.body[0].count("–") == len(page.body[0]) - 2
    assert md_file.read_text().count("*skipped:") == 2 and not (tmp_path / "plots").exists()


def test_card_front_matter_is_yaml_with_the_final_stage_results(tmp_path):
    pipeline_yaml = "name: s2d\nbase:\n  model: smollm2-135m-instruct\nfinetune:\n  task: symptom2disease\n"
    card = write_model_card(tmp_path, "s2d", "HuggingFaceTB/SmolLM2-135M-Instruct", pipeline_yaml, ROWS,
                            "04-quantize", extra={"gguf": str(tmp_path.parent / "s2d-q8_0.gguf"),
                                                  "license": "apache-2.0", "tags": ["medical"]})
    text = card.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["library_name"] == "slmkit" and meta["pipeline_tag"] == "text-generation"
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    assert meta["tags"][:2] == ["slmkit", "small-language-model"] and "medical" in meta["tags"]
    assert "gguf" not in meta  # a file path, used in the usage section, not front matter
    [model] = meta["model-index"]
    assert model["name"] == "s2d"
    final = ROWS[-1]
    expected = {final["task"]["name"]: (final["task"]["metric"], final["task"]["value"])}
    expected |= {name: (e["metric"], e["value"]) for name, e in final["general"].items()}
    got = {}
    for result in model["results"]:
        assert result["task"] == {"type": "text-generation"}
        assert result["dataset"]["name"] == result["dataset"]["type"]
        [metric] = result["metrics"]
        got[result["dataset"]["name"]] = (metric["type"], metric["value"])
        assert metric["name"]
    assert got == expected
    assert "```yaml\n" + pipeline_yaml in text  # the pipeline, verbatim
    assert markdown_table(ROWS) in text
    assert "llama-cli -m s2d-q8_0.gguf" in text and "slm chat " + tmp_path.name in text
    assert "## Limitations" in text and "held-out" in text and "Hallucination rate" in text


def test_card_refuses_a_final_stage_without_a_row(tmp_path):
    from slmkit.errors import SlmError

    with pytest.raises(SlmError, match="04-quantize"):
        write_model_card(tmp_path, "s2d", "base", "name: s2d\n", ROWS[:2], "04-quantize")


@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs chromium and chromedriver "
                    "(apt install chromium chromium-driver)")
def test_report_page_renders_in_chromium(report):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,700"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        browser.get(report[0].resolve().as_uri())
        body_rows = browser.find_elements(By.CSS_SELECTOR, "#stages tbody tr")
        assert [r.find_element(By.TAG_NAME, "td").text for r in body_rows] == STAGES
        for plot in PLOT_IDS:
            box = browser.execute_script(
                "const r = document.getElementById(arguments[0]).getBoundingClientRect();"
                "return [r.width, r.height];", plot)
            assert box[0] > 100 and box[1] > 100, (plot, box)
        assert browser.execute_script("return document.querySelectorAll('svg text').length") > 20
    finally:
        browser.quit()
