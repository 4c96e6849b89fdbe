"""What a model source provides (geometry, weights, tokenizer), and the on-disk cache of it.

Dequantizing a GGUF file takes seconds and reading its metadata alone ~5 s, so the
converted weights, the tokenizer.json and the metadata are cached under
~/.cache/symphony/<xxh3 of the source file> and a warm start only maps them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

from symphony.engine.config import ModelConfig
from symphony.engine.errors import LoadError

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
_HASH_CHUNK = 1 << 24


@dataclass(frozen=True)
class TokenizerInfo:
    """The tokenizer a model ships: tokenizer.json text, chat template, special ids."""

    tokenizer_json: str
    chat_template: str | None
    bos_token_id: int | None
    eos_token_id: int | None


@dataclass
class ModelFiles:
    """Everything loaded from one model source, ready to build the engine."""

    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: TokenizerInfo
    fingerprint: str = ""  # xxh3-128 of the source file(s); names the model in KV files


def cache_root() -> Path:
    env = os.environ.get("SYMPHONY_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "symphony"


def hash_file(path: Path) -> str:
    """xxh3-128 of a file's bytes, in hex."""
    digest = xxhash.xxh3_128()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_source(path: Path) -> str:
    """Fingerprint a model source: a GGUF file, or a directory of safetensors + configs."""
    if path.is_file():
        return hash_file(path)
    digest = xxhash.xxh3_128()
    for member in sorted(path.iterdir()):
        if member.suffix in (".safetensors", ".json") and member.is_file():
            digest.update(member.name.encode())
            digest.update(hash_file(member).encode())
    return digest.hexdigest()


def _save(files: ModelFiles, directory: Path) -> None:
    from safetensors.torch import save_file

    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory.parent))
    try:
        save_file(files.weights, str(tmp / "weights.safetensors"))
        (tmp / "tokenizer.json").write_text(files.tokenizer.tokenizer_json)
        meta = {
            "format": CACHE_FORMAT,
            "config": json.loads(files.config.to_json()),
            "chat_template": files.tokenizer.chat_template,
            "bos_token_id": files.tokenizer.bos_token_id,
            "eos_token_id": files.tokenizer.eos_token_id,
        }
        (tmp / "model.json").write_text(json.dumps(meta, indent=1))
        # rename is atomic: a crash leaves either no entry or a whole one
        os.rename(tmp, directory)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (directory / "model.json").exists():
            raise


def _load_cached(directory: Path, fingerprint: str) -> ModelFiles | None:
    meta_path = directory / "model.json"
    if not meta_path.exists():
        return None
    from safetensors.torch import load_file

    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != CACHE_FORMAT:
            return None
        tokenizer = TokenizerInfo(
            tokenizer_json=(directory / "tokenizer.json").read_text(),
            chat_template=meta["chat_template"],
            bos_token_id=meta["bos_token_id"],
            eos_token_id=meta["eos_token_id"],
        )
        weights = load_file(str(directory / "weights.safetensors"))
        config = ModelConfig.from_dict(meta["config"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring damaged weight cache %s: %s", directory, exc)
        return None
    return ModelFiles(config, weights, tokenizer, fingerprint)


def load_model_files(path: str | os.PathLike[str], use_cache: bool = True) -> ModelFiles:
    """Load a GGUF file or a Hugging Face safetensors directory, through the cache.

    Raises:
        LoadError: the source is missing, malformed or of an unsupported model.
    """
    source = Path(path).expanduser()
    if not source.exists():
        raise LoadError(f"model not found: {source}")
    if source.is_dir():
        from symphony.engine.safetensors_loader import check_hf_dir

        check_hf_dir(source)
    else:
        from symphony.engine.gguf_loader import check_gguf_header

        check_gguf_header(source)
    fingerprint = hash_source(source)
    directory = cache_root() / fingerprint
    if use_cache and (cached := _load_cached(directory, fingerprint)):
        log.info("loaded %s from cache %s", source.name, directory)
        return cached
    if source.is_dir():
        from symphony.engine.safetensors_loader import load_hf_dir

        files = load_hf_dir(source)
    else:
        from symphony.engine.gguf_loader import load_gguf

        files = load_gguf(source)
    files.fingerprint = fingerprint
    if use_cache:
        try:
            _save(files, directory)
        except OSError as exc:
            log.warning("could not write weight cache %s: %s", directory, exc)
    return files
