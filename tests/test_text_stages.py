"""A text parent run layer by layer: tiny BERT and tiny GPT-2 give the taps' features and the
parent's output exactly as a whole forward does, also after a select (which trims padding);
the real MiniLM (marked realdata) when ../shared/data has it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from branchnet.exits.stages import FullStages, StageError, split
from branchnet.taps import extract
from branchnet.text import ModelError, TextParent
from branchnet.text.stages import TextStages, TextState, UnstageableError, unstageable

MINILM = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "minilm" / "model.zip"
TEXTS = ["a short one", "a text that is quite a bit longer than the first", "mid length text",
         "x", "yet another text, with punctuation!"]
CLOSE = {"atol": 1e-5, "rtol": 1e-4}


def bert(**kwargs: object) -> TextParent:
    kwargs.setdefault("layers", 3)
    return TextParent.tiny(**kwargs)


def gpt2(**kwargs: object) -> TextParent:
    from transformers import GPT2Config, GPT2Model

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = GPT2Model(GPT2Config(vocab_size=60, n_embd=16, n_layer=3, n_head=2,
                                     n_positions=64))
    kwargs.setdefault("pooling", "last")
    kwargs.setdefault("max_length", 64)
    return TextParent(model, TextParent.tiny().tokenizer, **kwargs)


PARENTS = {"bert": bert, "gpt2": gpt2}
TAPS = [["embeddings"], ["layer.0"], ["layer.2"], ["embeddings", "layer.2"],
        ["layer.0", "layer.1", "layer.2"], ["embeddings", "layer.1"]]


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Tiny models: one thread."""


@pytest.mark.parametrize("kind", PARENTS)
@pytest.mark.parametrize("taps", TAPS, ids="+".join)
@pytest.mark.parametrize("probe_layer", ["layer.0", "layer.2"])
def test_features_and_output_equal_the_whole_forward(kind: str, taps: list[str],
                                                     probe_layer: str) -> None:
    parent = PARENTS[kind](num_classes=3, probe_layer=probe_layer, batch_size=2)
    st = parent.staged(taps)
    assert isinstance(st, TextStages) and st.splittable
    states = parent.hidden_states(TEXTS)
    names = parent.tap_names()
    feats, out = st(TEXTS)
    for tap, f in zip(taps, feats, strict=True):
        torch.testing.assert_close(f, states[names.index(tap)], **CLOSE)
        torch.testing.assert_close(f, extract(parent, tap, TEXTS), **CLOSE)
        assert not f.is_inference()  # can be fed to a trainable branch
    torch.testing.assert_close(out, parent(TEXTS), **CLOSE)


@pytest.mark.parametrize("kind", PARENTS)
def test_shuffled_and_subset_batches(kind: str) -> None:
    parent = PARENTS[kind](num_classes=2)
    st = parent.staged(["layer.0", "layer.2"])
    ref = parent.hidden_states(TEXTS)
    order = [3, 1, 4, 0]
    feats, out = st([TEXTS[i] for i in order])
    torch.testing.assert_close(feats[0], ref[1][order], **CLOSE)
    torch.testing.assert_close(feats[1], ref[3][order], **CLOSE)
    torch.testing.assert_close(out, parent(TEXTS)[order], **CLOSE)


@pytest.mark.parametrize("kind", PARENTS)
@pytest.mark.parametrize("dynamic_padding", [True, False])
def test_select_midway_equals_running_the_subset(kind: str, dynamic_padding: bool) -> None:
    parent = PARENTS[kind](num_classes=3, probe_layer="layer.1",
                           dynamic_padding=dynamic_padding)
    st = parent.staged(["embeddings", "layer.0", "layer.2"])
    state, _ = st.run(0, st.start(TEXTS))
    state, _ = st.run(1, state)
    state = st.select(state, torch.tensor([2, 0]))
    state, last = st.run(2, state)
    feats, out = st([TEXTS[2], TEXTS[0]])
    torch.testing.assert_close(last, feats[2], **CLOSE)
    torch.testing.assert_close(st.finish(state), out, **CLOSE)
    torch.testing.assert_close(out, parent(TEXTS)[[2, 0]], **CLOSE)


@pytest.mark.parametrize("kind", PARENTS)
def test_select_trims_padding_and_keeps_results(kind: str) -> None:
    parent = PARENTS[kind](num_classes=3)
    st = parent.staged(["layer.0", "layer.1"])
    full, _ = st.run(0, st.start(TEXTS))
    assert isinstance(full, TextState) and len(full) == 5
    longest = full.seq_len
    kept = st.select(full, [0, 2, 3, 4])  # the longest text (#1) leaves
    short = st.start([TEXTS[i] for i in (0, 2, 3, 4)])
    assert kept.seq_len == short.seq_len < longest
    assert kept.inputs["input_ids"].shape == kept.inputs["attention_mask"].shape == (4, kept.seq_len)
    untrimmed = st.select(full, [1, 0])  # the longest stays: nothing to trim
    assert untrimmed.seq_len == longest
    a, fa = st.run(1, kept)
    b, fb = st.run(1, st.run(0, short)[0])
    torch.testing.assert_close(fa, fb, **CLOSE)
    torch.testing.assert_close(st.finish(a), st.finish(b), **CLOSE)
    # a select after the probe layer was passed keeps its pooled state
    c = st.select(a, [3, 0])
    torch.testing.assert_close(st.finish(c), parent(TEXTS)[[4, 0]], **CLOSE)


def test_no_trimming_without_dynamic_padding() -> None:
    parent = bert(dynamic_padding=False)
    st = parent.staged(["layer.0"])
    state = st.select(st.start(TEXTS), [3])
    assert state.seq_len == parent.max_length


def test_empty_selection() -> None:
    parent = bert(num_classes=3)
    st = parent.staged(["layer.0", "layer.2"])
    state, _ = st.run(0, st.start(TEXTS))
    state = st.select(state, torch.tensor([], dtype=torch.long))
    state, f = st.run(1, state)
    assert f.shape == (0, 16) and st.finish(state).shape == (0, 3)


def test_probe_before_the_last_tap_and_no_probe() -> None:
    parent = bert(num_classes=4, probe_layer="embeddings")
    st = parent.staged(["layer.1", "layer.2"])
    state, _ = st.run(0, st.start(TEXTS))
    state = st.select(state, [4, 1])
    state, _ = st.run(1, state)
    torch.testing.assert_close(st.finish(state), parent(TEXTS)[[4, 1]], **CLOSE)
    plain = bert()  # no probe: the output is the pooled probe-layer state
    torch.testing.assert_close(plain.staged(["layer.0"])(TEXTS)[1], plain(TEXTS), **CLOSE)


def test_split_gives_text_stages() -> None:
    parent = bert()
    st = split(parent, ["layer.0", "layer.2"])
    assert isinstance(st, TextStages)
    assert repr(st) == "TextStages(TextParent, taps=['layer.0', 'layer.2'])"
    assert unstageable(parent) == ""


@pytest.mark.parametrize(("taps", "message"), [
    (["layer.2", "layer.0"], r"'layer.0' runs before 'layer.2'"),
    (["layer.1", "embeddings"], r"'embeddings' runs before 'layer.1'"),
    (["layer.7"], r"must be taps of the text parent, got \['layer.7'\]"),
    (["layer.0", "layer.0"], "must be different layers"),
    ([], "at least one"),
])
def test_bad_taps(taps: list[str], message: str) -> None:
    with pytest.raises(StageError, match=message):
        TextStages(bert(), taps)
    if taps:
        with pytest.raises(StageError, match=r"runs before|must be"):
            split(bert(), taps)


def test_bad_texts() -> None:
    st = bert().staged(["layer.0"])
    with pytest.raises(ModelError, match="text #1 is empty"):
        st.start(["fine", ""])


def test_unstageable_models_run_whole() -> None:
    parent = bert(num_classes=2)
    parent.backbone.config.layer_types = ["full_attention", "sliding_attention", "full_attention"]
    try:
        st = parent.staged(["layer.0"])
        assert isinstance(st, FullStages) and not st.splittable
        assert "layers are of different kinds" in st.reason
        with pytest.raises(UnstageableError, match="different kinds"):
            TextStages(parent, ["layer.0"])
        feats, out = st(TEXTS)
        torch.testing.assert_close(feats[0], parent.hidden_states(TEXTS)[1])
        torch.testing.assert_close(out, parent(TEXTS))
    finally:
        del parent.backbone.config.layer_types


@pytest.mark.realdata
def test_minilm_stages() -> None:
    if not MINILM.is_file():
        pytest.skip(f"MiniLM not found at {MINILM}")
    parent = TextParent.from_pretrained(MINILM, num_classes=4, max_length=128)
    texts = ["a library for linear algebra", "an email client", "x",
             "a fast, small web server written in rust, with tls and http/2 support"]
    st = split(parent, ["embeddings", "layer.1", "layer.5"])
    assert isinstance(st, TextStages)
    ref = parent.hidden_states(texts)
    feats, out = st(texts)
    for f, r in zip(feats, [ref[0], ref[2], ref[6]], strict=True):
        torch.testing.assert_close(f, r, **CLOSE)
    torch.testing.assert_close(out, parent(texts), **CLOSE)
    state, _ = st.run(1, st.run(0, st.start(texts))[0])
    state = st.select(state, [1, 0])
    assert state.seq_len < st.start(texts).seq_len
    state, f = st.run(2, state)
    torch.testing.assert_close(f, ref[6][[1, 0]], **CLOSE)
    torch.testing.assert_close(st.finish(state), parent(texts)[[1, 0]], **CLOSE)
