"""A frozen Hugging Face transformer as a branchnet parent: texts in, pooled hidden states as
taps, class scores from a probe (or the model's own classification head) out.

:class:`TextParent` is an ordinary ``nn.Module`` whose ``forward`` takes a batch of texts (a
:class:`~branchnet.data.Texts` or a list of strings). It tokenizes them (truncating at
``max_length``), sorts them by length and runs the transformer in sub-batches of
``batch_size`` padded only to their longest text (dynamic padding), pools every hidden state
per text (``cls`` token, ``mean`` over the attention mask, or ``last`` non-padding token), and
passes each pooled state through a tap point named ``embeddings``, ``layer.0``, ... so that
:mod:`branchnet.taps` and the activation cache read them like any layer (one forward fills all
of them). The transformer is frozen: eval mode, no gradients, inference mode.

Its output is the logits of the ``probe`` (a linear or MLP classifier on ``probe_layer``,
trained on cached features by :class:`~branchnet.tree.BranchTree`), or, without a probe, the
pooled ``probe_layer`` features.

Example (a tiny random BERT, no files):
    >>> parent = TextParent.tiny(num_classes=3, probe_layer="layer.1")
    >>> parent.tap_names()
    ['embeddings', 'layer.0', 'layer.1']
    >>> parent(["a short text", "another, slightly longer, text"]).shape
    torch.Size([2, 3])
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from branchnet import models
from branchnet.data.errors import DataError
from branchnet.data.texts import Texts
from branchnet.fileio import sha256_file
from branchnet.taps import module_fingerprint
from branchnet.text.hub import ModelError, load_pretrained, resolve_model

if TYPE_CHECKING:
    from branchnet.exits.stages import Stages

__all__ = ["POOLINGS", "PROBES", "Pooling", "TapPoint", "TextParent"]

POOLINGS = ("cls", "mean", "last")
PROBES = ("linear", "mlp")


class Pooling(nn.Module):
    """One vector per text from token states ``[B, L, H]`` and the attention mask ``[B, L]``:
    the first token (``cls``), the mean over real tokens (``mean``) or the last real token
    (``last``; right or left padding).

    >>> h = torch.arange(12.).view(1, 4, 3); m = torch.tensor([[1, 1, 1, 0]])
    >>> Pooling("mean")(h, m).tolist(), Pooling("last")(h, m).tolist()
    ([[3.0, 4.0, 5.0]], [[6.0, 7.0, 8.0]])
    """

    def __init__(self, mode: str = "mean") -> None:
        super().__init__()
        if mode not in POOLINGS:
            raise ModelError(f"pooling must be one of {list(POOLINGS)}, got {mode!r}")
        self.mode = mode

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.mode == "cls":
            return hidden[:, 0]
        m = mask.to(hidden.dtype)
        if self.mode == "mean":
            return (hidden * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1)
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (positions * mask).argmax(dim=1)
        return hidden[torch.arange(len(hidden), device=hidden.device), last]

    def extra_repr(self) -> str:
        return repr(self.mode)


class TapPoint(nn.Identity):
    """A named place where a pooled hidden state passes, for taps and the activation cache."""


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the tokenizer's full definition (vocabulary, normalizer, special tokens)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([tokenizer.padding_side, tokenizer.truncation_side,
                         str(tokenizer.all_special_tokens)]).encode())
    return h.hexdigest()


def _is_decoder(model: nn.Module) -> bool:
    """A causal (left-to-right) model: its first token sees only itself."""
    cfg = model.config
    if getattr(cfg, "is_decoder", False):
        return True
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = getattr(cfg, "model_type", None)
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


class TextParent(nn.Module):
    """A frozen transformer ``model`` with its ``tokenizer``, tapped at every hidden state.

    Args:
        model, tokenizer: a ``transformers`` base model (encoder or decoder) and its
            tokenizer; see :meth:`from_pretrained`.
        num_classes: output size of the probe; ``None`` for no probe.
        probe_layer: the tap the probe reads (default the last layer).
        probe: ``"linear"`` or ``"mlp"`` (``probe_hidden`` units, dropout ``probe_dropout``).
        pooling: ``"mean"`` (default), ``"cls"`` (encoders only) or ``"last"``.
        max_length: tokens per text at most; longer texts are truncated and counted
            (:meth:`truncation`).
        batch_size: texts per transformer call; ``dynamic_padding`` sorts the texts of a
            forward call by length and pads each sub-batch only to its longest text (else
            every text is padded to ``max_length``).
        source: where the model came from (recorded in :attr:`spec`, to load it again).
        memo: how many recent batches' hidden states to keep, so that evaluating the same
            texts several times (predict, scores, calibration) runs the transformer once
            (the transformer is frozen, so they cannot go stale); 0 turns it off.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        num_classes: int | None = None,
        probe_layer: str | None = None,
        probe: str = "linear",
        probe_hidden: int = 256,
        probe_dropout: float = 0.1,
        pooling: str = "mean",
        max_length: int = 128,
        batch_size: int = 32,
        dynamic_padding: bool = True,
        source: dict[str, Any] | None = None,
        memo: int = 8,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ModelError(f"pooling must be one of {list(POOLINGS)}, got {pooling!r}")
        if pooling == "cls" and _is_decoder(model):
            raise ModelError(f"pooling='cls' needs an encoder, but {type(model).__name__} is a "
                             "decoder (its first token sees only itself); use pooling='last' or "
                             "'mean'")
        limit = getattr(model.config, "max_position_embeddings", None) or 10**9
        if not (isinstance(max_length, int) and 2 <= max_length <= limit):
            raise ModelError(f"max_length must be an integer in [2, {limit}] for this model, "
                             f"got {max_length!r}")
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ModelError(f"batch_size must be a positive integer, got {batch_size!r}")
        if probe not in PROBES:
            raise ModelError(f"probe must be one of {list(PROBES)}, got {probe!r}")
        if tokenizer.pad_token is None:  # decoders often ship without one
            tokenizer.pad_token = tokenizer.eos_token
        self.backbone = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.pooling = Pooling(pooling)
        n_layers = int(model.config.num_hidden_layers)
        self.embeddings = TapPoint()
        self.layer = nn.ModuleList(TapPoint() for _ in range(n_layers))
        self.max_length = max_length
        self.batch_size = batch_size
        self.dynamic_padding = dynamic_padding
        self.hidden_size = int(model.config.hidden_size)
        self.probe_layer = probe_layer or f"layer.{n_layers - 1}"
        if self.probe_layer not in self.tap_names():
            raise ModelError(f"probe_layer must be one of {self.tap_names()}, got "
                             f"{self.probe_layer!r}")
        self.probe_kind, self.probe_hidden, self.probe_dropout = probe, probe_hidden, probe_dropout
        self.num_classes = num_classes
        self.probe = self._make_probe() if num_classes is not None else None
        self.source = dict(source or {})
        self.memo = memo
        self._memo: OrderedDict[tuple[str, ...], list[torch.Tensor]] = OrderedDict()
        self.tokenizer_fingerprint = _tokenizer_fingerprint(tokenizer)

    # ------------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, source: str | Path, *, cache_dir: str | Path | None = None,
                        **kwargs: Any) -> TextParent:
        """Load a local model folder or ``.zip`` (see :func:`~branchnet.text.hub.resolve_model`),
        offline and from safetensors only."""
        folder = resolve_model(source, cache_dir)
        model, tokenizer = load_pretrained(folder)
        weights = sorted(folder.glob("*.safetensors"))
        digest = sha256_file(weights[0]) if len(weights) == 1 else None
        return cls(model, tokenizer, source={"model": str(source), "weights_sha256": digest},
                   **kwargs)

    @classmethod
    def from_config(cls, source: str, num_classes: int | None = None, probe_layer: str | None = None,
                    probe: str = "linear", probe_hidden: int = 256, probe_dropout: float = 0.1,
                    pooling: str = "mean", max_length: int = 128,
                    batch_size: int = 32) -> TextParent:
        """The builder behind a config's ``{kind: transformer, source: ..., ...}``: a local
        model folder or zip (``source="tiny"``: :meth:`tiny`, for tests)."""
        kwargs = {"num_classes": num_classes, "probe_layer": probe_layer, "probe": probe,
                  "probe_hidden": probe_hidden, "probe_dropout": probe_dropout,
                  "pooling": pooling, "max_length": max_length, "batch_size": batch_size}
        if source == "tiny":
            return cls.tiny(**kwargs)
        return cls.from_pretrained(source, **kwargs)

    @classmethod
    def tiny(cls, hidden: int = 16, layers: int = 2, seed: int = 0, **kwargs: Any) -> TextParent:
        """A tiny randomly initialised BERT with a character-level tokenizer, built in memory
        (for tests and examples)."""
        from branchnet.text.hub import set_offline

        set_offline()
        from tokenizers import Tokenizer, normalizers, pre_tokenizers
        from tokenizers import models as tok_models
        from tokenizers.processors import TemplateProcessing
        from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

        chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'-()")
        vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *chars])}
        core = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
        core.normalizer = normalizers.Lowercase()
        core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
        core.post_processor = TemplateProcessing(single="[CLS] $A [SEP]",
                                                 special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]",
                                            unk_token="[UNK]", cls_token="[CLS]",
                                            sep_token="[SEP]")
        config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=2, intermediate_size=2 * hidden,
                            max_position_embeddings=256)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = BertModel(config, add_pooling_layer=False)
        kwargs.setdefault("max_length", 64)
        return cls(model, tokenizer, source={"tiny": {"hidden": hidden, "layers": layers,
                                                      "seed": seed}}, **kwargs)

    def _make_probe(self) -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            if self.probe_kind == "linear":
                return models.mlp([self.hidden_size], int(self.num_classes))
            return models.branch_head(self.hidden_size, int(self.num_classes),
                                      hidden=self.probe_hidden, dropout=self.probe_dropout)

    @property
    def spec(self) -> dict[str, Any]:
        """What :meth:`from_spec` needs to build this parent again (without probe weights)."""
        return {"kind": "transformer", "source": self.source, "num_classes": self.num_classes,
                "probe_layer": self.probe_layer, "probe": self.probe_kind,
                "probe_hidden": self.probe_hidden, "probe_dropout": self.probe_dropout,
                "pooling": self.pooling.mode, "max_length": self.max_length,
                "batch_size": self.batch_size, "tokenizer": self.tokenizer_fingerprint}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> TextParent:
        """Rebuild from :attr:`spec`; the model must be where it was, unchanged."""
        src = spec["source"]
        kwargs = {k: spec[k] for k in ("num_classes", "probe_layer", "probe", "probe_hidden",
                                       "probe_dropout", "pooling", "max_length", "batch_size")}
        if "tiny" in src:
            parent = cls.tiny(**src["tiny"], **kwargs)
        else:
            parent = cls.from_pretrained(src["model"], **kwargs)
            if src.get("weights_sha256") and parent.source["weights_sha256"] != src["weights_sha256"]:
                raise ModelError(f"the model at {src['model']} has changed since this run "
                                 "(its weights' SHA-256 differs); restore the original model")
        if parent.tokenizer_fingerprint != spec["tokenizer"]:
            raise ModelError(f"the tokenizer of {src} has changed since this run")
        return parent

    def saved_state(self) -> dict[str, torch.Tensor]:
        """The trained weights only (the probe's): the transformer is rebuilt from its folder."""
        return {} if self.probe is None else self.probe.state_dict()

    def load_saved_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`saved_state`."""
        if self.probe is not None:
            self.probe.load_state_dict(state)
        elif state:
            raise ModelError("saved probe weights given, but this parent has no probe")

    # ----------------------------------------------------------------------------- taps
    def tap_names(self) -> list[str]:
        """The taps: the embedding output and every transformer layer's output, pooled."""
        return ["embeddings", *(f"layer.{i}" for i in range(len(self.layer)))]

    def tap_fingerprint(self) -> str:
        """What the taps depend on, for activation-cache keys: the transformer's weights and
        structure, the tokenizer, pooling and max length (not the probe)."""
        h = hashlib.blake2b(digest_size=8)
        h.update(f"{module_fingerprint(self.backbone)}|{self.extra_repr()}|"
                 f"{len(self.layer)}".encode())
        return h.hexdigest()

    def staged(self, taps: list[str]) -> Stages:
        """This parent cut at ``taps`` (:func:`branchnet.exits.stages.split` calls this): a
        :class:`~branchnet.text.stages.TextStages` that runs the transformer layer by layer,
        or, for a transformer that cannot be run so, a
        :class:`~branchnet.exits.stages.FullStages` that says why in ``reason``.

        >>> TextParent.tiny().staged(["layer.0"])
        TextStages(TextParent, taps=['layer.0'])
        """
        from branchnet.exits.stages import FullStages
        from branchnet.text.stages import TextStages, unstageable

        why = unstageable(self)
        if why:
            return FullStages(self, taps, reason=f"{why}; every text runs the whole transformer")
        return TextStages(self, taps)

    def train(self, mode: bool = True) -> TextParent:
        """Only the probe trains; the transformer stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    def extra_repr(self) -> str:
        return (f"pooling={self.pooling.mode!r}, max_length={self.max_length}, "
                f"tokenizer={self.tokenizer_fingerprint}")

    # --------------------------------------------------------------------------- forward
    def _texts(self, texts: Sequence[str]) -> list[str]:
        """The batch as a list of strings, checked as :class:`Texts` checks (once: a Texts
        already was)."""
        if isinstance(texts, str):
            raise ModelError("a text parent takes a batch of texts (a list), got one string")
        if not isinstance(texts, Texts):
            try:
                texts = Texts(texts)
            except DataError as e:
                raise ModelError(str(e)) from None
        return texts.tolist()

    def _lengths(self, texts: list[str]) -> list[int]:
        enc = self.tokenizer(texts, truncation=False, verbose=False)
        return [len(ids) for ids in enc["input_ids"]]

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text (special tokens included) before truncation."""
        return self._lengths(self._texts(texts))

    def truncation(self, texts: Sequence[str]) -> dict[str, Any]:
        """How many of ``texts`` exceed ``max_length`` tokens (and are truncated)."""
        lengths = self.token_lengths(texts)
        cut = sum(n > self.max_length for n in lengths)
        return {"texts": len(lengths), "truncated": int(cut), "max_length": self.max_length,
                "fraction": cut / max(len(lengths), 1), "longest": max(lengths, default=0)}

    def hidden_states(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """Pooled hidden states ``[N, H]`` of every layer (embeddings first), in input order."""
        texts = self._texts(texts)
        key = tuple(texts)
        if key in self._memo:
            self._memo.move_to_end(key)
            return [h.clone() for h in self._memo[key]]
        device = next(self.backbone.parameters()).device
        order = list(range(len(texts)))
        if self.dynamic_padding:
            lengths = self._lengths(texts)
            order.sort(key=lambda i: lengths[i])
        n_states = len(self.layer) + 1
        out = [torch.empty(len(texts), self.hidden_size) for _ in range(n_states)]
        padding = "longest" if self.dynamic_padding else "max_length"
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                idx = order[start:start + self.batch_size]
                enc = self.tokenizer([texts[i] for i in idx], padding=padding, truncation=True,
                                     max_length=self.max_length, return_tensors="pt")
                enc = {k: v.to(device) for k, v in enc.items()}
                res = self.backbone(**enc, output_hidden_states=True)
                rows = torch.tensor(idx)
                for k, h in enumerate(res.hidden_states):
                    out[k][rows] = self.pooling(h, enc["attention_mask"]).float().cpu()
        if self.memo > 0:
            self._memo[key] = [h.clone() for h in out]
            while len(self._memo) > self.memo:
                self._memo.popitem(last=False)
        return out

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        states = self.hidden_states(texts)
        tapped = {"embeddings": self.embeddings(states[0])}
        for i, point in enumerate(self.layer):
            tapped[f"layer.{i}"] = point(states[i + 1])
        feats = tapped[self.probe_layer]
        if self.probe is not None:
            return self.probe(feats)
        return feats
