"""Embeddings: mean-pooled, L2-normalised final hidden states equal to a direct forward pass (ours one
text at a time, and transformers' last_hidden_state) whatever the batch; `slm embed` writes them as
.npy; `/v1/embeddings` answers the official openai client (floats and base64) and refuses bad input
with an OpenAI-style 400."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from serving import served  # noqa: E402

from slmkit.errors import SlmError  # noqa: E402
from slmkit.infer.embed import Embedder  # noqa: E402
from slmkit.serve.backend import LocalBackend  # noqa: E402

TEXTS = ["Once upon a time", "a little robot who liked to count: 1, 2, 3", "42", "there was a robot",
         "count to 1000, little robot, count to 1000 and then count again"]


def _direct(model, tokenizer, text: str) -> torch.Tensor:
    ids = torch.tensor([tokenizer.encode(text, add_special=True)])
    hidden = model.final_hidden(ids)[0].float()  # (T, C)
    return torch.nn.functional.normalize(hidden.mean(0), dim=-1)


def test_vectors_equal_a_direct_forward_pass_whatever_the_batch(tiny_model, tiny_tokenizer):
    for batch in (1, 2, 5):
        got = Embedder(tiny_model, tiny_tokenizer, batch_size=batch).embed(TEXTS)
        for text, vector in zip(TEXTS, got.vectors):
            assert torch.allclose(vector, _direct(tiny_model, tiny_tokenizer, text), atol=1e-5)
    assert torch.allclose(got.vectors.norm(dim=-1), torch.ones(len(TEXTS)))
    assert got.tokens == [len(tiny_tokenizer.encode(t, add_special=True)) for t in TEXTS]


def test_vectors_match_transformers_last_hidden_state(tmp_path, tiny_model, tiny_tokenizer):
    transformers = pytest.importorskip("transformers")
    from slmkit.interop.hf import save_hf

    save_hf(tiny_model, tiny_tokenizer, tmp_path)
    hf = transformers.AutoModel.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    got = Embedder(tiny_model, tiny_tokenizer).embed(TEXTS).vectors
    for text, vector in zip(TEXTS, got):
        ids = torch.tensor([tiny_tokenizer.encode(text, add_special=True)])
        with torch.no_grad():
            last = hf(ids).last_hidden_state[0]  # after the final norm, as ours
        assert torch.allclose(vector, torch.nn.functional.normalize(last.mean(0), dim=-1), atol=1e-4)


def test_bad_input_is_refused_with_the_limit(tiny_model, tiny_tokenizer):
    embedder = Embedder(tiny_model, tiny_tokenizer)
    with pytest.raises(SlmError, match="no input to embed"):
        embedder.embed([])
    with pytest.raises(SlmError, match="input 1 is empty"):
        embedder.embed(["a", ""])
    with pytest.raises(SlmError, match=rf"input 0 has \d+ tokens; the model's context holds {embedder.context}"):
        embedder.embed(["robot " * 2000])


def test_slm_embed_writes_the_vectors(tmp_path, tiny_model, tiny_tokenizer):
    from slmkit.cli import main
    from slmkit.interop.hf import save_hf

    save_hf(tiny_model, tiny_tokenizer, tmp_path / "m")
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in TEXTS))
    out = tmp_path / "v.npy"
    assert main(["embed", str(tmp_path / "m"), str(tmp_path / "in.jsonl"), "--field", "body", "-o", str(out)]) == 0
    vectors = np.load(out)
    assert vectors.shape == (len(TEXTS), tiny_model.config.hidden_size) and vectors.dtype == np.float32
    want = Embedder(tiny_model, tiny_tokenizer).embed(TEXTS).vectors.numpy()
    assert np.allclose(vectors, want, atol=1e-5)
    assert main(["embed", str(tmp_path / "m"), str(tmp_path / "in.jsonl"), "-o", str(out)]) == 2  # no `text` field


def test_the_openai_client_gets_embeddings(tiny_model, tiny_tokenizer):
    want = Embedder(tiny_model, tiny_tokenizer).embed(TEXTS)
    with served({"tiny": LocalBackend("tiny", tiny_model, tiny_tokenizer)}) as server:
        client = server.client()
        answer = client.embeddings.create(model="tiny", input=TEXTS, encoding_format="float")
        assert [d.index for d in answer.data] == list(range(len(TEXTS)))
        assert np.allclose(np.array([d.embedding for d in answer.data]), want.vectors.numpy(), atol=1e-5)
        assert answer.usage.prompt_tokens == answer.usage.total_tokens == sum(want.tokens)
        one = client.embeddings.create(model="tiny", input=TEXTS[0])  # the client asks for base64 by default
        assert np.allclose(one.data[0].embedding, want.vectors[0].numpy(), atol=1e-5)
        raw = httpx.post(server.url + "/v1/embeddings", json={"model": "tiny", "input": [TEXTS[1]],
                                                               "encoding_format": "base64"}, timeout=30).json()
        decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
        assert np.allclose(decoded, want.vectors[1].numpy(), atol=1e-5)
        ids = tiny_tokenizer.encode(TEXTS[2], add_special=True)
        by_ids = httpx.post(server.url + "/v1/embeddings", json={"model": "tiny", "input": [ids]}, timeout=30).json()
        assert np.allclose(by_ids["data"][0]["embedding"], want.vectors[2].numpy(), atol=1e-5)
        bad = [({"model": "tiny", "input": []}, "no input to embed"),
               ({"model": "tiny", "input": ["robot " * 2000]}, "the model's context holds"),
               ({"model": "tiny", "input": "a", "dimensions": 8}, "dimensions"),
               ({"model": "tiny", "input": "a", "encoding_format": "int8"}, "encoding_format"),
               ({"model": "nope", "input": "a"}, "nope")]
        for body, message in bad:
            r = httpx.post(server.url + "/v1/embeddings", json=body, timeout=30)
            assert r.status_code in (400, 404) and message in r.json()["error"]["message"], (body, r.text)


def test_llamacpp_embeddings_equal_ours_and_are_served(tmp_path, tiny_model, tiny_tokenizer):
    """llama.cpp's embeddings mode on an f32 GGUF of the same weights: the same vectors within 1e-4,
    however the texts are packed into its passes; and a llama.cpp-served model answers /v1/embeddings."""
    llamacpp = pytest.importorskip("slmkit.infer.llamacpp")
    if not llamacpp.available():
        pytest.skip("llama-cpp-python is not installed")
    from slmkit.interop.gguf import write_gguf
    from slmkit.serve.runners import LlamaCppRunner

    gguf = write_gguf(tiny_model, tiny_tokenizer, tmp_path / "tiny-f32.gguf", "f32")
    engine = llamacpp.LlamaCppEngine(gguf, tiny_model.config, max_seq_len=64, sequences=2)
    ours = Embedder(tiny_model, tiny_tokenizer).embed(TEXTS).vectors
    for batch in (1, 5):
        theirs = llamacpp.LlamaCppEmbedder(engine, tiny_tokenizer, batch_size=batch).embed(TEXTS).vectors
        assert (theirs - ours).abs().max() < 1e-4
    packed = llamacpp.LlamaCppEmbedder(engine, tiny_tokenizer, batch_size=5, context=24)  # a few texts per pass
    assert (packed.embed(TEXTS).vectors - ours).abs().max() < 1e-4
    with pytest.raises(SlmError, match="context holds 24"):
        packed.embed(["count " * 30])
    backend = LocalBackend("tiny", tiny_model, tiny_tokenizer)
    backend.scheduler.runner = LlamaCppRunner(engine)  # as `slm serve --engine llamacpp` runs it
    with served({"tiny": backend}) as srv:
        data = srv.client().embeddings.create(model="tiny", input=TEXTS, encoding_format="float").data
    assert np.abs(np.array([d.embedding for d in data]) - ours.numpy()).max() < 1e-4
