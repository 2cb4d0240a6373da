"""Models on the Hugging Face Hub: a repo id wherever a checkpoint is taken.

``Glow.from_pretrained("org/name")`` and ``glowflow sample org/name`` read the repo ``org/name``
(``org/name@revision`` for a branch, tag or commit) when no path of that name exists. Only the files
glowflow reads are fetched, with ``huggingface_hub.snapshot_download``, into the hub's own cache
(``HF_HUB_CACHE``, by default ``~/.cache/huggingface/hub``); with ``HF_HUB_OFFLINE=1`` the cached
copy is used and the network is never asked. huggingface_hub is optional (``pip install
"glowflow[hub]"``) and imported only when an id is read.
"""
from __future__ import annotations

import re
from pathlib import Path

__all__ = ["HubError", "HUB_EXTRA", "HUB_FILES", "parse_hub_id", "is_hub_id", "download"]

HUB_EXTRA = 'pip install "glowflow[hub]"'
# What a repo may hold that glowflow reads: a checkpoint folder at its top or a run directory's
# checkpoint/ (config.json, model.safetensors, checksums.json, train_config.json: checkpoint and
# rundir), and the directions beside it (directions.py). The optimizer state is never fetched.
_CHECKPOINT_FILES = ("config.json", "model.safetensors", "checksums.json", "train_config.json")
HUB_FILES = (*_CHECKPOINT_FILES, *(f"checkpoint/{f}" for f in _CHECKPOINT_FILES),
             "directions.safetensors", "directions.json")

# owner/name as the Hub spells them (letters, digits, - _ ., not starting with . or -), then an
# optional @revision; exactly one "/", so "./x", "../x" and "/abs" never read as an id
_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,95}"
_HUB_ID = re.compile(rf"(?P<repo>{_NAME}/{_NAME})(?:@(?P<revision>[A-Za-z0-9_][A-Za-z0-9_.-]*))?")


class HubError(ValueError):
    """A Hub id that cannot be read: huggingface_hub missing, no such repo, offline and not cached."""


def parse_hub_id(text) -> tuple[str, str | None] | None:
    """``"org/name@rev"`` -> ``("org/name", "rev")``, ``"org/name"`` -> ``("org/name", None)``; None
    for what does not look like a Hub id. Whether a path of that name exists is not looked at here:
    :func:`glowflow.checkpoint.resolve_model_dir` lets a path that exists win."""
    match = _HUB_ID.fullmatch(str(text))
    if match is None or ".." in match["repo"] or "--" in match["repo"] or match["repo"].endswith(".git"):
        return None
    return match["repo"], match["revision"]


def is_hub_id(text) -> bool:
    """Whether ``text`` reads as a Hub repo id (``owner/name`` or ``owner/name@revision``)."""
    return parse_hub_id(text) is not None


def download(text) -> Path:
    """The local folder of Hub id ``text`` in the hub's cache, fetched first unless cached and
    current (or ``HF_HUB_OFFLINE`` is set). Every failure is a :class:`HubError` naming the id."""
    parsed = parse_hub_id(text)
    if parsed is None:
        raise HubError(f"{text!r} is not a Hugging Face Hub id: expected owner/name or owner/name@revision")
    repo, revision = parsed
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError:
        raise HubError(f"{text} is not a path that exists, and reading it as a Hugging Face Hub id needs "
                       f"huggingface_hub, which is not installed: {HUB_EXTRA}") from None
    try:
        # no cache_dir and no local_files_only: HF_HUB_CACHE and HF_HUB_OFFLINE keep their meaning
        folder = huggingface_hub.snapshot_download(repo, revision=revision, allow_patterns=list(HUB_FILES),
                                                   library_name="glowflow")
    except Exception as e:  # noqa: BLE001 (the client's errors differ by version and transport; each is a failed fetch)
        raise HubError(_failure(text, repo, revision, e, constants)) from None
    return Path(folder)


def _failure(text, repo: str, revision: str | None, error: Exception, constants) -> str:
    """One plain sentence for a failed fetch, naming the id."""
    kinds = {c.__name__ for c in type(error).__mro__}
    detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    if "RevisionNotFoundError" in kinds:
        return f"the Hugging Face Hub repo {repo} has no revision {revision!r} ({detail})"
    if "RepositoryNotFoundError" in kinds:  # also a gated or private repo without a token
        return (f"{text} is neither a path that exists nor a model repo on the Hugging Face Hub that this machine "
                "can read (a private or gated repo needs `hf auth login`)")
    if "LocalEntryNotFoundError" in kinds:
        cache = getattr(constants, "HF_HUB_CACHE", "the hub's cache")
        why = ("HF_HUB_OFFLINE is set" if getattr(constants, "HF_HUB_OFFLINE", False)
               else "the Hub could not be reached")
        return (f"{text} is not a path that exists, and the Hugging Face Hub model {repo} is not in the local cache "
                f"({cache}) while {why}: fetch it once online, or pass a local checkpoint ({detail})")
    return f"could not fetch {text} from the Hugging Face Hub: {type(error).__name__}: {detail}"
