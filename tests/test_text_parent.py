"""The transformer parent: tiny random models built in memory, folders and zips on disk, bad
input; the real MiniLM (marked realdata) when ../shared/data has it."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest
import torch

from branchnet.taps import module_fingerprint
from branchnet.text import ModelError, Pooling, TextParent, resolve_model
from branchnet.text.hub import OFFLINE_VARIABLES

MINILM = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "minilm" / "model.zip"
TEXTS = ["a short one", "a text that is quite a bit longer than the first", "mid length text",
         "x", "yet another text, with punctuation!"]


def test_taps_pooling_and_probe_output() -> None:
    p = TextParent.tiny(num_classes=4, probe_layer="layer.0")
    assert p.tap_names() == ["embeddings", "layer.0", "layer.1"]
    out = p(TEXTS)
    assert out.shape == (5, 4)
    assert not p.backbone.training and not any(q.requires_grad for q in p.backbone.parameters())
    p.train()
    assert p.training and not p.backbone.training  # the transformer never trains
    assert all(q.requires_grad for q in p.probe.parameters())
    feats = TextParent.tiny()(TEXTS)  # no probe: pooled features of the last layer
    assert feats.shape == (5, 16)


def test_dynamic_padding_gives_the_same_states_in_input_order() -> None:
    a = TextParent.tiny(batch_size=2).hidden_states(TEXTS)
    b = TextParent.tiny(batch_size=5, dynamic_padding=False).hidden_states(TEXTS)
    one = [TextParent.tiny().hidden_states([t]) for t in TEXTS]
    for k in range(3):
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a[k], torch.cat([o[k] for o in one]), atol=1e-5, rtol=1e-4)


def test_pooling_modes() -> None:
    h = torch.arange(24.0).view(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])  # right and left padding
    assert Pooling("cls")(h, mask)[0].tolist() == [0.0, 1.0, 2.0]
    assert Pooling("mean")(h, mask)[0].tolist() == [1.5, 2.5, 3.5]
    assert Pooling("last")(h, mask).tolist() == [[3.0, 4.0, 5.0], [21.0, 22.0, 23.0]]
    with pytest.raises(ModelError, match="pooling must be one of"):
        Pooling("max")


def test_truncation_is_counted() -> None:
    p = TextParent.tiny(max_length=8)
    info = p.truncation(["abc", "abcdefghijkl", "abcdefg"])  # 5, 14, 9 tokens with CLS/SEP
    assert info == {"texts": 3, "truncated": 2, "max_length": 8, "fraction": 2 / 3,
                    "longest": 14}


def test_fingerprint_covers_pooling_max_length_and_weights() -> None:
    base = module_fingerprint(TextParent.tiny())
    assert module_fingerprint(TextParent.tiny()) == base
    assert module_fingerprint(TextParent.tiny(pooling="cls")) != base
    assert module_fingerprint(TextParent.tiny(max_length=32)) != base
    assert module_fingerprint(TextParent.tiny(seed=1)) != base


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"pooling": "max"}, "pooling must be one of"),
    ({"max_length": 1000}, r"max_length must be an integer in \[2, 256\]"),
    ({"probe_layer": "layer.7"}, r"probe_layer must be one of \['embeddings', 'layer.0'"),
    ({"probe": "svm"}, "probe must be one of"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
])
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        TextParent.tiny(**kwargs)


@pytest.mark.parametrize(("texts", "message"), [
    (["fine", ""], "text #1 is empty"),
    (["fine", 3], "text #1 is int, not a string"),
    ("one string", "takes a batch of texts"),
])
def test_bad_texts(texts: object, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        TextParent.tiny()(texts)


def test_cls_pooling_refused_for_a_decoder() -> None:
    from transformers import GPT2Config, GPT2Model

    tiny = TextParent.tiny()
    model = GPT2Model(GPT2Config(vocab_size=60, n_embd=16, n_layer=1, n_head=2, n_positions=64))
    with pytest.raises(ModelError, match="pooling='cls' needs an encoder"):
        TextParent(model, tiny.tokenizer, pooling="cls")
    out = TextParent(model, tiny.tokenizer, pooling="last", max_length=32).hidden_states(TEXTS)
    assert len(out) == 2 and out[1].shape == (5, 16)


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    p = TextParent.tiny()
    folder = tmp_path / "tiny-bert"
    p.backbone.save_pretrained(folder)
    p.tokenizer.save_pretrained(folder)
    return folder


def test_folder_and_zip_load_offline(model_folder: Path, tmp_path: Path) -> None:
    a = TextParent.from_pretrained(model_folder, max_length=64)
    assert all(os.environ.get(v) == "1" for v in OFFLINE_VARIABLES)
    torch.testing.assert_close(a.hidden_states(TEXTS)[2], TextParent.tiny().hidden_states(TEXTS)[2])
    archive = tmp_path / "tiny.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in model_folder.iterdir():
            z.write(f, f"tiny-bert/{f.name}")  # wrapped in a top-level folder
    cache = tmp_path / "cache"
    unpacked = resolve_model(archive, cache)
    assert unpacked.parent.parent == cache / "models" and (unpacked / "config.json").is_file()
    assert resolve_model(archive, cache) == unpacked  # unpacked once
    b = TextParent.from_pretrained(archive, cache_dir=cache, max_length=64)
    assert b.spec["source"]["weights_sha256"] == a.spec["source"]["weights_sha256"]


def test_spec_round_trip_keeps_the_probe(model_folder: Path) -> None:
    p = TextParent.from_pretrained(model_folder, num_classes=3, max_length=64)
    with torch.no_grad():
        for q in p.probe.parameters():
            q.add_(1.0)
    q = TextParent.from_spec(p.spec)
    q.load_saved_state(p.saved_state())
    torch.testing.assert_close(q(TEXTS), p(TEXTS))
    assert set(p.saved_state()) == {"head.weight", "head.bias"}  # not the transformer


def test_bad_model_folders(model_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ModelError, match=r"is a file but not a \.zip"):
        resolve_model(tmp_path / "notes.txt")
    (model_folder / "model.safetensors").rename(model_folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"only pickled weights \(pytorch_model.bin\).*Convert"):
        resolve_model(model_folder)
    (model_folder / "pytorch_model.bin").unlink()
    with pytest.raises(ModelError, match="has no weights"):
        resolve_model(model_folder)
    (model_folder / "model.safetensors").write_bytes(b"")
    (model_folder / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match="has no tokenizer"):
        resolve_model(model_folder)
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="not a readable zip"):
        resolve_model(bad, tmp_path / "cache")


@pytest.mark.realdata
def test_minilm() -> None:
    if not MINILM.is_file():
        pytest.skip(f"MiniLM not found at {MINILM}")
    p = TextParent.from_pretrained(MINILM, num_classes=16, max_length=128)
    assert p.tap_names() == ["embeddings", *(f"layer.{i}" for i in range(6))]
    h = p.hidden_states(["a library for linear algebra", "an email client"])
    assert len(h) == 7 and h[6].shape == (2, 384)
