"""Local pretrained models: find, unpack, check and load a Hugging Face model folder, offline.

branchnet never downloads: ``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE`` and
``HF_DATASETS_OFFLINE`` are set before ``transformers`` is imported, and every load passes
``local_files_only=True``. Weights are read from safetensors only (``use_safetensors=True``); a
folder with only pickled weights (``pytorch_model.bin``) is refused, since unpickling can run
code.

A model may be a folder or a ``.zip`` of one; a zip is unpacked once into
``$BRANCHNET_CACHE_DIR/models/<name>-<sha256 prefix>/`` (atomically, keyed by its checksum).

Example:
    >>> import tempfile
    >>> resolve_model(tempfile.mkdtemp())            # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    branchnet.text.hub.ModelError: model folder ... has no config.json; expected a Hugging ...
"""

from __future__ import annotations

import os
import shutil
import uuid
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from branchnet.errors import BranchnetError
from branchnet.fileio import sha256_file

__all__ = ["ModelError", "load_pretrained", "resolve_model", "set_offline"]

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model",
                    "spiece.model", "sentencepiece.bpe.model")
_PICKLED = ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack", "model.ckpt.index")
_COMPLETE = ".branchnet-complete"


class ModelError(BranchnetError, ValueError):
    """A pretrained model cannot be found, unpacked or loaded as asked."""


def set_offline() -> None:
    """Switch the Hugging Face libraries to offline mode (call before importing them)."""
    for var in OFFLINE_VARIABLES:
        os.environ[var] = "1"


def _model_root(folder: Path) -> Path:
    """The folder holding config.json: ``folder`` itself or its one subfolder (zips often
    wrap the model in a top-level folder)."""
    if (folder / "config.json").is_file():
        return folder
    subs = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))]
    if len(subs) == 1 and (subs[0] / "config.json").is_file():
        return subs[0]
    return folder


def _unzip(archive: Path, cache_dir: Path) -> Path:
    digest = sha256_file(archive)
    stem = archive.name.removesuffix(".zip")
    target = cache_dir / "models" / f"{stem}-{digest[:16]}"
    if (target / _COMPLETE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    try:
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                p = PurePosixPath(name)
                if p.is_absolute() or ".." in p.parts:
                    raise ModelError(f"model archive {archive} has an unsafe member {name!r}")
            z.extractall(tmp)
        (tmp / _COMPLETE).write_text(digest + "\n", encoding="utf-8")
        try:
            os.replace(tmp, target)
        except OSError:  # unpacked meanwhile by another process
            if not (target / _COMPLETE).is_file():
                raise
    except zipfile.BadZipFile as e:
        raise ModelError(f"model archive {archive} is not a readable zip file: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _check_folder(folder: Path) -> None:
    files = {p.name for p in folder.iterdir()}
    expected = ("expected a Hugging Face model folder (config.json, model.safetensors, "
                "tokenizer files)")
    if "config.json" not in files:
        raise ModelError(f"model folder {folder} has no config.json; {expected}")
    if not any(f.endswith(".safetensors") or f == "model.safetensors.index.json" for f in files):
        pickled = sorted(files & set(_PICKLED)) or sorted(f for f in files if f.endswith(".bin"))
        if pickled:
            raise ModelError(
                f"model folder {folder} has only pickled weights ({', '.join(pickled)}); "
                "branchnet reads safetensors only, because loading a pickle can run code. "
                "Convert it once where you trust the file: python -c \"from transformers "
                f"import AutoModel as A; A.from_pretrained('{folder}')"
                f".save_pretrained('{folder}')\"")
        raise ModelError(f"model folder {folder} has no weights (model.safetensors); {expected}")
    if not files & set(_TOKENIZER_FILES):
        raise ModelError(f"model folder {folder} has no tokenizer (none of "
                         f"{', '.join(_TOKENIZER_FILES)}); {expected}")


def resolve_model(source: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The checked model folder for ``source`` (a folder, or a ``.zip`` unpacked once into
    ``cache_dir/models/``; default ``$BRANCHNET_CACHE_DIR``)."""
    from branchnet.data.imagefolder import default_cache_dir

    path = Path(source).expanduser()
    if not path.exists():
        raise ModelError(f"model {str(source)!r} does not exist; give a Hugging Face model "
                         "folder or a .zip of one")
    if path.is_file():
        if path.suffix.lower() != ".zip":
            raise ModelError(f"model {str(source)!r} is a file but not a .zip; give a Hugging "
                             "Face model folder or a .zip of one")
        path = _unzip(path, Path(cache_dir) if cache_dir else default_cache_dir())
    folder = _model_root(path)
    _check_folder(folder)
    return folder


def load_pretrained(folder: str | Path, *, with_head: bool = False) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a checked local folder (see :func:`resolve_model`),
    offline, safetensors only. ``with_head`` loads a sequence-classification model."""
    set_offline()
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    cls = AutoModelForSequenceClassification if with_head else AutoModel
    folder = str(folder)
    try:
        model = cls.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot load the model in {folder}: {e}") from e
    return model, tokenizer
