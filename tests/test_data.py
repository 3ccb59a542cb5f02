"""Data preparation: readers, filters, de-duplication, split, tokenization, packing, re-runs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from slmkit.data.dedup import DedupReport, exact_dedup, near_dedup
from slmkit.data.filters import FilterConfig, first_failure
from slmkit.data.prepare import PrepareConfig, prepare, split_documents
from slmkit.data.readers import expand_inputs, read_documents
from slmkit.errors import SlmError

STORY = ("Once upon a time there was a little fox who lived near a quiet river. Every morning the fox "
         "walked to the water, looked at the fish and dreamed about the sea. One day a bird told him "
         "where the river ended, and the fox decided to go and see it for himself.")


def test_txt_separators(tmp_path):
    eot = tmp_path / "a.txt"
    eot.write_text("first story\n<|endoftext|>\nsecond story\n<|endoftext|>\n")
    blank = tmp_path / "b.txt"
    blank.write_text("para one\n\n  \npara two\n")
    custom = tmp_path / "c.txt"
    custom.write_text("x###y###z")
    assert list(read_documents(eot)) == ["first story", "second story"]
    assert list(read_documents(blank)) == ["para one", "para two"]
    assert list(read_documents(custom, separator="###")) == ["x", "y", "z"]


def test_record_formats_and_missing_fields(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"body": "hello"}\n\n{"body": "world"}\n')
    assert list(read_documents(jsonl, text_field="body")) == ["hello", "world"]
    with pytest.raises(SlmError, match=r"d.jsonl:1 has no field 'text' \(fields: body\)"):
        list(read_documents(jsonl))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(SlmError, match="bad.jsonl:2 is not valid JSON"):
        list(read_documents(bad))
    csv_file = tmp_path / "e.csv"
    csv_file.write_text('id,review\n1,"good, really"\n2,bad\n')
    assert list(read_documents(csv_file, text_field="review")) == ["good, really", "bad"]
    with pytest.raises(SlmError, match="no column 'text'"):
        list(read_documents(csv_file))


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a doc", "another"], "n": [1, 2]}), tmp_path / "f.parquet")
    assert list(read_documents(tmp_path / "f.parquet")) == ["a doc", "another"]


def test_inputs_from_globs_and_directories(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.txt", "sub/b.jsonl", "sub/skip.md"):
        (tmp_path / name).write_text("x")
    assert [p.name for p in expand_inputs([str(tmp_path)])] == ["a.txt", "b.jsonl"]
    assert [p.name for p in expand_inputs([str(tmp_path / "*.txt")])] == ["a.txt"]
    with pytest.raises(SlmError, match="not found"):
        expand_inputs([str(tmp_path / "missing.txt")])
    with pytest.raises(SlmError, match="no file matches"):
        expand_inputs([str(tmp_path / "*.csv")])


def test_unreadable_and_non_utf8_files(tmp_path):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(SlmError, match="not UTF-8"):
        list(read_documents(latin))


@pytest.mark.parametrize("text,reason", [
    ("short", "min_chars"),
    ("1 2 3 4 5 6 7 8 9 0 " * 10, "min_mean_word_length"),
    ("Supercalifragilisticexpialidocious " * 10, "max_mean_word_length"),
    ("#### $$$$ %%%% &&&& **** @@@@ !!!! ^^^^ ~~~~ ==== ++++ abc " * 3, "symbol_ratio"),
    ("the same line again\n" * 10, "repeated_lines"),
    ("alpha beta gamma delta epsilon " * 12, "repeated_ngrams"),
    ("text with control \x00\x01\x02\x03 characters inside it, quite a few of them " + "\x07" * 5, "non_printable"),
    (STORY, None),
])
def test_each_filter(text, reason):
    assert first_failure(text, FilterConfig()) == reason


def test_exact_and_near_dedup():
    near = STORY.replace("quiet", "calm")
    other = STORY.replace("fox", "cat").replace("river", "forest").replace("fish", "trees")
    docs = [STORY, "  " + STORY.upper() + " ", near, other, "A different story about a robot who liked to bake."]
    report = DedupReport()
    kept = exact_dedup(docs, report)
    assert kept == [0, 2, 3, 4] and report.exact_removed == 1
    kept = near_dedup(docs, kept, report, threshold=0.7)
    assert kept == [0, 3, 4] and report.near_removed == 1 and report.near_clusters == 1


def test_split_is_seeded_and_disjoint():
    train, val = split_documents(list(range(100)), 0.2, seed=7)
    assert len(val) == 20 and not set(train) & set(val) and sorted(train + val) == list(range(100))
    assert split_documents(list(range(100)), 0.2, seed=7) == (train, val)
    assert split_documents(list(range(100)), 0.2, seed=8) != (train, val)


def test_prepare_end_to_end_and_rerun_is_a_noop(tmp_path, story_tokenizer_dir):
    corpus = tmp_path / "corpus.txt"
    docs = [STORY.replace("fox", animal) + f" The end of story {i}." for i, animal in
            enumerate(["fox", "owl", "bear", "frog", "deer", "duck", "goat", "lamb", "mole", "seal"])]
    corpus.write_text("\n<|endoftext|>\n".join(docs + [docs[0], "tiny"]))
    cfg = PrepareConfig(inputs=[str(corpus)], out=str(tmp_path / "out"), tokenizer=str(story_tokenizer_dir),
                        val_fraction=0.2, near_dedup=False)
    meta = prepare(cfg, log=lambda *_: None)
    assert meta["documents"] == {"read": 12, "kept": 10, "train": 8, "val": 2}
    assert meta["filters"]["min_chars"]["documents"] == 1 and meta["dedup"]["exact_removed"] == 1
    assert meta["dtype"] == "uint16"
    out = tmp_path / "out"
    tokens = np.fromfile(out / "train-00000.bin", dtype=np.uint16)
    assert tokens.size == meta["tokens"]["train"]
    sep = meta["tokenizer"]["separator_id"]
    assert (tokens == sep).sum() == 8 and tokens[-1] == sep
    from slmkit.tokenizer import Tokenizer

    text = Tokenizer.from_dir(out).decode(tokens.tolist(), skip_special=False)
    assert text.count("<|endoftext|>") == 8 and "Once upon a time" in text
    stamp = (out / "train-00000.bin").stat().st_mtime_ns
    messages = []
    prepare(cfg, log=messages.append)
    assert "up to date" in messages[0] and (out / "train-00000.bin").stat().st_mtime_ns == stamp
    corpus.write_text(corpus.read_text() + "\n<|endoftext|>\n" + STORY.replace("fox", "wolf"))
    assert prepare(cfg, log=lambda *_: None)["documents"]["read"] == 13


def test_prepare_bad_input(tmp_path, story_tokenizer_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(SlmError, match="hold no documents"):
        prepare(PrepareConfig(inputs=[str(empty)], out=str(tmp_path / "o"), tokenizer=str(story_tokenizer_dir)))
    with pytest.raises(SlmError, match="no inputs"):
        prepare(PrepareConfig(inputs=[], out=str(tmp_path / "o")))


def test_tokenizer_training(story_tokenizer_dir):
    from slmkit.tokenizer import Tokenizer, bytes_per_token

    tok = Tokenizer.from_dir(story_tokenizer_dir)
    assert tok.vocab_size == 512 and tok.pre == "smollm"
    assert [tok.token(i) for i in range(4)] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    assert tok.eos_token_id == 0 and tok.pad_token_id == 3
    assert bytes_per_token(tok, [STORY]) > 2.0
    assert tok.decode(tok.encode(STORY)) == STORY
    config = json.loads((story_tokenizer_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in config["chat_template"]


def test_cli_tokenizer_train_and_prepare(tmp_path, story_docs):
    import os
    import subprocess
    import sys

    corpus = tmp_path / "stories.jsonl"
    corpus.write_text("".join(json.dumps({"story": d}) + "\n" for d in story_docs[:200]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def slm(*args):
        return subprocess.run([sys.executable, "-m", "slmkit.cli", *args], capture_output=True, text=True, env=env,
                              timeout=300)

    trained = slm("tokenizer", "train", str(corpus), "--vocab-size", "400", "--out", str(tmp_path / "tok"),
                  "--text-field", "story")
    assert trained.returncode == 0, trained.stderr
    assert "400 tokens" in trained.stdout and "bytes per token" in trained.stdout
    prepared = slm("prepare", str(corpus), "text_field=story", "val_fraction=0.25", "filters.min_chars=10",
                   "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "out"))
    assert prepared.returncode == 0, prepared.stderr
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["documents"]["val"] == 50 and meta["config"]["filters"]["min_chars"] == 10
    missing = slm("prepare", str(corpus), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "o2"))
    assert missing.returncode == 2 and "no field 'text'" in missing.stderr and "Traceback" not in missing.stderr
    helped = slm("prepare", "--help")
    assert "filters.max_repeated_line_ratio" in helped.stdout and "share of lines" in helped.stdout
