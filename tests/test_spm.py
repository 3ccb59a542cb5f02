"""SentencePiece vocabularies in GGUF (tokenizer model `llama`: Llama 2, TinyLlama, Gemma, Phi-3):
a SentencePiece BPE model trained here with byte fallback, written as llama.cpp's converter writes
it, tokenizes in slmkit exactly as `sentencepiece` does on multilingual text (characters it never
saw fall back to bytes), and what slmkit writes back -- from the GGUF, or from its own
tokenizer.json, whose scores are then derived from the merges -- tokenizes the same in llama.cpp."""

from __future__ import annotations

import io

import gguf
import pytest

from slmkit.interop.gguf_vocab import read_tokenizer, write_tokenizer
from slmkit.tokenizer import Tokenizer

spm = pytest.importorskip("sentencepiece")

MULTILINGUAL = ["Der schnelle braune Fuchs springt über den faulen Hund.",
                "Le cœur a ses raisons que la raison ne connaît point.", "Η γρήγορη καφέ αλεπού πηδάει.",
                "敏捷的棕色狐狸跳过了懒狗。", "Быстрая коричневая лиса прыгает.", "El niño comió paella 🥘 ayer."]
TEXTS = ["Hello world, this is   a test.", *MULTILINGUAL, "Ünïcödé ✨ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ℕ 한국어 テスト", " leading space",
         "tabs\tand\nnewlines", "2024-12-04 3.14159"]


@pytest.fixture(scope="module")
def sentencepiece_model(data_dir):
    """A 800-piece BPE trained in-process: byte fallback, no normalisation (llama.cpp applies none)."""
    lines = (data_dir / "corpus" / "wikitext2" / "valid.txt").read_text().splitlines()[:3000]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for line in lines if line.strip()] + MULTILINGUAL * 20), model_writer=model,
        vocab_size=800, model_type="bpe", byte_fallback=True, character_coverage=0.995,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True, unk_id=0, bos_id=1,
        eos_id=2, minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def _converter_fields(sp) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and types as convert_hf_to_gguf.py's _create_vocab_sentencepiece takes them."""
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i) else 6 if sp.is_byte(i)
             else 1 for i in range(sp.get_piece_size())]
    return ([sp.id_to_piece(i) for i in range(sp.get_piece_size())],
            [sp.get_score(i) for i in range(sp.get_piece_size())], types)


def _vocab_gguf(path, write) -> None:
    """A vocabulary-only GGUF (llama.cpp loads it with vocab_only)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    for key in ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count"):
        writer.add_uint32(f"llama.{key}", 64)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    write(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _as_the_converter_writes(writer, sp) -> None:
    tokens, scores, types = _converter_fields(sp)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)


def _llama_cpp_ids(path, text: str) -> list[int] | None:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python checks the written file (CI has it)")
    vocab = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    return vocab.tokenize(text.encode(), add_bos=False, special=False)


def test_a_sentencepiece_gguf_tokenizes_and_decodes_like_sentencepiece(sentencepiece_model, tmp_path):
    sp = sentencepiece_model
    _vocab_gguf(tmp_path / "spm.gguf", lambda w: _as_the_converter_writes(w, sp))
    ours = read_tokenizer(gguf.GGUFReader(str(tmp_path / "spm.gguf")))
    assert ours.add_bos and ours.bos_token_id == 1  # llama.cpp's default for SentencePiece
    for text in TEXTS:
        ids = sp.encode(text)
        assert ours.encode(text, add_special=False) == ids, text
        assert ours.decode(ids) == sp.decode(ids), text
    fallback = sp.encode("𝔘𝔫𝔦")  # never seen: bytes
    assert all(sp.is_byte(i) for i in fallback if sp.id_to_piece(i) != "\u2581")


@pytest.mark.parametrize("source", ["gguf", "tokenizer.json"])
def test_what_slmkit_writes_back_tokenizes_the_same_in_llama_cpp(sentencepiece_model, tmp_path, source):
    sp = sentencepiece_model
    tokens, scores, types = _converter_fields(sp)
    tokenizer = Tokenizer.from_spm_vocab(tokens, scores, types, True, bos_token_id=1, eos_token_id=2)
    if source == "tokenizer.json":  # an HF directory: no scores on disk, they come from the merge ranks
        tokenizer.save(tmp_path / "hf")
        tokenizer = Tokenizer.from_dir(tmp_path / "hf")
        assert tokenizer.scores is None
    pieces, written_scores, written_types, prefix = tokenizer.spm_vocab()
    assert pieces == tokens and written_types == types and prefix
    if source == "gguf":
        assert written_scores == pytest.approx(scores)
    _vocab_gguf(tmp_path / "out.gguf", lambda w: write_tokenizer(w, tokenizer, len(tokens)))
    again = read_tokenizer(gguf.GGUFReader(str(tmp_path / "out.gguf")))
    for text in TEXTS:
        assert again.encode(text, add_special=False) == sp.encode(text), text
        assert _llama_cpp_ids(tmp_path / "out.gguf", text) == sp.encode(text), text


def test_an_unknown_gguf_tokenizer_model_is_refused(tmp_path):
    from slmkit.errors import SlmError

    _vocab_gguf(tmp_path / "t5.gguf", lambda w: (w.add_tokenizer_model("t5"), w.add_token_list(["<pad>", "a"])))
    with pytest.raises(SlmError, match="GGUF tokenizer 't5' is not supported"):
        read_tokenizer(gguf.GGUFReader(str(tmp_path / "t5.gguf")))
