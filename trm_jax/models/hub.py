"""Checkpoints from the Hugging Face hub: ``model.checkpoint = "hf:<repo_id>[@<revision>]"``.

The one place this library talks to the hub. A spec such as
``hf:openai/clip-vit-base-patch16`` names a repository instead of a local file; its files
are fetched with ``huggingface_hub.hf_hub_download`` into the usual hub cache, so
transformers, open_clip and ``hf download`` share one copy:

- cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``
  (``models--<org>--<name>/snapshots/<commit>/<file>``, ``refs/<branch>`` -> commit);
- ``HF_HUB_OFFLINE=1``: nothing is requested, only the cache is read;
- ``HF_ENDPOINT``: the hub (or a mirror) downloads come from.

These are read at each call, not at import, so a process (or a test) may set them late.
A file already in the cache is used without a network round trip: runs do not depend on
the hub being reachable once the files are there. Pin ``@<commit>`` for an exact copy.

What a model family reads from its repository (``files_for``): CLIP repos in the
transformers ``CLIPModel`` layout (``openai/clip-vit-base-patch16``) give
``model.safetensors`` + ``config.json`` and the tokenizer pair ``vocab.json`` +
``merges.txt``; ViT repos in the ``ViTModel`` layout (``google/vit-base-patch16-224-in21k``)
give ``model.safetensors`` + ``config.json``.

``status(spec, files)`` reports each file (cached or not, size, path, the command that
fetches it) without any network access, for a ``prepare`` step; ``resolve(spec, files,
download=)`` returns local paths or raises a one-line ``CheckpointError`` naming the
repository and the command.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Sequence
from typing import Any, NamedTuple

from trm_jax.errors import CheckpointError, ConfigError

PREFIX = "hf:"
WEIGHT_FILES = ("model.safetensors", "config.json")
TOKENIZER_FILES = ("vocab.json", "merges.txt")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class HubSpec(NamedTuple):
    """A parsed ``hf:<repo_id>[@<revision>]`` (``revision`` None = the ``main`` branch)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return PREFIX + self.repo_id + (f"@{self.revision}" if self.revision else "")


def is_hub(spec: Any) -> bool:
    """Whether ``spec`` (a config string) names a hub repository rather than a local path."""
    return isinstance(spec, str) and spec.startswith(PREFIX)


def parse(spec: str) -> HubSpec:
    """``'hf:org/name@rev'`` -> ``HubSpec('org/name', 'rev')`` (``ConfigError`` if malformed)."""
    if not is_hub(spec):
        raise ConfigError(f"{spec!r} is not a hub spec ({PREFIX}<org>/<name>[@<revision>])")
    repo_id, at, revision = spec[len(PREFIX) :].partition("@")
    if not _REPO_ID.match(repo_id) or (at and not revision):
        raise ConfigError(
            f"malformed hub spec {spec!r}; expected {PREFIX}<org>/<name>[@<revision>]"
        )
    return HubSpec(repo_id, revision or None)


def files_for(family: str) -> tuple[str, ...]:
    """The repository files a model of ``family`` ('clip' | 'vit') is built from."""
    if family not in ("clip", "vit"):
        raise ConfigError(f"no hub file list for model family {family!r} (clip, vit)")
    return WEIGHT_FILES + (TOKENIZER_FILES if family == "clip" else ())


def cache_dir() -> str:
    """The hub cache, from the environment now (huggingface_hub's order of precedence)."""
    env = os.environ
    path = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not path:
        cache_home = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(env.get("HF_HOME") or os.path.join(cache_home, "huggingface"), "hub")
    return os.path.expandvars(os.path.expanduser(path))


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or transformers' ``TRANSFORMERS_OFFLINE``) is set now."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def download_command(spec: str, files: Sequence[str]) -> str:
    """The shell command that puts ``files`` of ``spec`` into the cache (``hf`` CLI)."""
    parsed = parse(spec)
    words = ["hf", "download", parsed.repo_id, *files]
    if parsed.revision:
        words += ["--revision", parsed.revision]
    return shlex.join(words)


def _hf():
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(
            "hf: checkpoints need the huggingface_hub package: pip install huggingface_hub"
        ) from None
    return huggingface_hub


def _cached(parsed: HubSpec, filename: str) -> str | None:
    found = _hf().try_to_load_from_cache(
        parsed.repo_id, filename, cache_dir=cache_dir(), revision=parsed.revision
    )
    return found if isinstance(found, str) and os.path.isfile(found) else None


def status(spec: str, files: Sequence[str] = WEIGHT_FILES) -> list[dict[str, Any]]:
    """One record per file of ``spec``, from the cache alone (no network, nothing written).

    Keys: ``spec``, ``repo_id``, ``revision``, ``file``, ``present`` (bool), ``path`` and
    ``size`` (bytes; None when absent), ``cache_dir``, ``command`` (fetches all ``files``).
    """
    parsed = parse(spec)
    command = download_command(spec, files)
    out = []
    for name in files:
        path = _cached(parsed, name)
        out.append(
            {
                "spec": str(parsed),
                "repo_id": parsed.repo_id,
                "revision": parsed.revision or "main",
                "file": name,
                "present": path is not None,
                "path": path,
                "size": os.path.getsize(path) if path else None,
                "cache_dir": cache_dir(),
                "command": command,
            }
        )
    return out


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def resolve(
    spec: str, files: Sequence[str] = WEIGHT_FILES, *, download: bool = True
) -> dict[str, str]:
    """Local paths of ``files`` of ``spec`` (file name -> path in the hub cache).

    Cached files are used as they are. Missing ones are downloaded when ``download`` and
    not offline; otherwise, or when the hub cannot be reached or lacks the repository,
    revision or file, a one-line ``CheckpointError`` names ``spec`` and the command.
    """
    parsed = parse(spec)
    command = download_command(spec, files)
    paths = {name: _cached(parsed, name) for name in files}
    missing = [name for name, path in paths.items() if path is None]
    if missing and (offline() or not download):
        why = "HF_HUB_OFFLINE is set" if offline() else "downloads are off"
        raise CheckpointError(
            f"{parsed}: {', '.join(missing)} not in the Hugging Face cache {cache_dir()} "
            f"({why}); fetch with: {command}"
        )
    hf = _hf()
    from huggingface_hub import errors

    for name in missing:
        try:
            paths[name] = hf.hf_hub_download(
                parsed.repo_id,
                name,
                revision=parsed.revision,
                cache_dir=cache_dir(),
                endpoint=os.environ.get("HF_ENDPOINT") or None,
            )
        except errors.LocalEntryNotFoundError:
            raise CheckpointError(
                f"{parsed}: {name} not in the Hugging Face cache {cache_dir()} and the hub "
                f"could not be reached; fetch with: {command}"
            ) from None
        except errors.RepositoryNotFoundError:
            raise CheckpointError(
                f"{parsed}: no such Hugging Face repository, or it is private or gated "
                "(log in with: hf auth login)"
            ) from None
        except errors.RevisionNotFoundError:
            raise CheckpointError(
                f"{parsed}: revision {parsed.revision or 'main'} not found in {parsed.repo_id}"
            ) from None
        except errors.EntryNotFoundError:
            raise CheckpointError(
                f"{parsed}: the repository has no file {name} (a {', '.join(files)} "
                "repository in the transformers layout is expected)"
            ) from None
        except (OSError, ValueError) as err:
            raise CheckpointError(
                f"{parsed}: downloading {name} failed ({_first_line(err)}); fetch with: {command}"
            ) from None
    return paths
