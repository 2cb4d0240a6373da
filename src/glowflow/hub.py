"""Models on the Hugging Face Hub: a repo id wherever a checkpoint is taken, and the model card
that makes a checkpoint folder ready to upload (``hf upload org/name FOLDER``).

``Glow.from_pretrained("org/name")`` and ``glowflow sample org/name`` read the repo ``org/name``
(``org/name@revision`` for a branch, tag or commit) when no path of that name exists. Only the files
glowflow reads are fetched, with ``huggingface_hub.snapshot_download``, into the hub's own cache
(``HF_HUB_CACHE``, by default ``~/.cache/huggingface/hub``); with ``HF_HUB_OFFLINE=1`` the cached
copy is used and the network is never asked. huggingface_hub is optional (``pip install
"glowflow[hub]"``) and imported only when an id is read.

:func:`model_card` renders a registry entry (:data:`glowflow.pretrained.ENTRY_FIELDS`) as the
repo's ``README.md``; ``Glow.save_pretrained(directory, card={...})`` writes it with the checkpoint.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import yaml

from .pretrained import ENTRY_FIELDS

__all__ = ["HubError", "HUB_EXTRA", "CARD_NAME", "CARD_FIELDS", "HUB_FILES", "parse_hub_id", "is_hub_id",
           "download", "model_card"]

HUB_EXTRA = 'pip install "glowflow[hub]"'
CARD_NAME = "README.md"
# What a repo may hold that glowflow reads: a checkpoint folder at its top or a run directory's
# checkpoint/ (config.json, model.safetensors, checksums.json, train_config.json: checkpoint and
# rundir), and the directions beside it (directions.py). The optimizer state is never fetched.
_CHECKPOINT_FILES = ("config.json", "model.safetensors", "checksums.json", "train_config.json")
HUB_FILES = (*_CHECKPOINT_FILES, *(f"checkpoint/{f}" for f in _CHECKPOINT_FILES),
             "directions.safetensors", "directions.json")
# A card holds a registry entry's fields, and these, all optional: the repo id it is uploaded as,
# its licence as a Hub licence identifier ("mit", "cc-by-4.0"; default "other"), the Hub ids of
# its datasets, and more tags.
CARD_FIELDS = (*ENTRY_FIELDS, "name", "repo_id", "license", "datasets", "tags")
# glowflow's dataset name -> the dataset's id on the Hub, for a card's `datasets`
HUB_DATASETS = {"fashion-mnist": "zalando-datasets/fashion_mnist", "mnist": "ylecun/mnist",
                "cifar10": "uoft-cs/cifar10"}
TAGS = ("normalizing-flow", "glow", "pytorch")

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


# ------------------------------------------------------------------------------------ the card
def model_card(entry: Mapping, name: str, repo_id: str | None = None) -> str:
    """The Hub model card (``README.md``) of a model whose registry entry is ``entry``: YAML front
    matter the Hub reads (``library_name: glowflow``, licence, tags, datasets), then a title, the
    description, how to load it, a table of what the entry knows and the data's licence. Any field
    of :data:`CARD_FIELDS` may be missing; another key is refused.

    Example::

        >>> from glowflow import hub
        >>> card = hub.model_card({"dataset": "fashion-mnist", "n_bits": 8}, "tiny", repo_id="me/tiny")
        >>> card.splitlines()[:2]
        ['---', 'library_name: glowflow']
        >>> 'Glow.from_pretrained("me/tiny")' in card
        True
    """
    if not isinstance(entry, Mapping):
        raise ValueError(f"a model card is a dict of fields ({', '.join(CARD_FIELDS)}), got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(CARD_FIELDS))
    if unknown:
        raise ValueError(f"unknown model card field(s) {', '.join(map(repr, unknown))}; expected some of: "
                         f"{', '.join(CARD_FIELDS)}")
    repo_id = repo_id or entry.get("repo_id") or f"OWNER/{name}"
    dataset = entry.get("dataset")
    datasets = entry.get("datasets") or ([HUB_DATASETS[dataset]] if dataset in HUB_DATASETS else [])
    meta = {"library_name": "glowflow", "license": entry.get("license") or "other",
            "tags": [*TAGS, *([dataset] if dataset else []), *entry.get("tags", ())],
            "pipeline_tag": "unconditional-image-generation"}
    if datasets:
        meta["datasets"] = list(datasets)
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {name}", ""]
    if entry.get("description"):
        lines += [_sentence(entry["description"]), ""]
    lines += ["A [Glow](https://arxiv.org/abs/1807.03039) normalizing flow made with glowflow: an exact "
              "likelihood for images, sampling, and latent edits.", "",
              "```python", "from glowflow import Glow  # pip install \"glowflow[hub]\"", "",
              f'model = Glow.from_pretrained("{repo_id}")', "```", "",
              f"or from the command line: `glowflow sample {repo_id} --n 16 --out samples.png`.", ""]
    rows = _rows(entry)
    if rows:
        lines += ["| | |", "|---|---|", *(f"| {k} | {_cell(v)} |" for k, v in rows), ""]
    if entry.get("data_licence") or entry.get("acknowledgement"):
        lines += ["## Data", ""]
        if entry.get("data_licence"):
            lines += [f"Licence of the training data: {_sentence(entry['data_licence'])}", ""]
        if entry.get("acknowledgement"):
            lines += [f"Please acknowledge: {_sentence(entry['acknowledgement'])}", ""]
    return "\n".join(lines)


def _rows(entry: Mapping) -> list[tuple[str, str]]:
    """The table of a card: one row per field the entry has."""
    rows = []
    if entry.get("dataset"):
        rows.append(("dataset", entry["dataset"]))
    if entry.get("image_shape"):
        rows.append(("image shape (C x H x W)", " x ".join(str(n) for n in entry["image_shape"])))
    if entry.get("n_bits") is not None:
        rows.append(("bit depth", f"{entry['n_bits']} bits"))
    if entry.get("parameters") is not None:
        rows.append(("parameters", f"{entry['parameters']:,}"))
    if entry.get("test_bits_per_dim") is not None:
        bpd = f"{entry['test_bits_per_dim']}"
        if entry.get("test_bits_per_dim_se") is not None:
            bpd += f" ± {entry['test_bits_per_dim_se']}"
        if entry.get("test_images"):
            bpd += f" ({entry['test_images']:,} test images)"
        rows.append(("test bits/dim", bpd))
    if entry.get("eval_command"):
        rows.append(("measured by", f"`{entry['eval_command']}`"))
    if entry.get("train_command"):
        rows.append(("trained by", f"`{entry['train_command']}`"))
    if entry.get("directions") is not None:
        rows.append(("attribute directions", "yes (directions.safetensors)" if entry["directions"] else "none"))
    if entry.get("sha256"):
        size = f", {entry['size_bytes']:,} bytes" if entry.get("size_bytes") is not None else ""
        rows.append(("weights", f"model.safetensors{size}, SHA-256 `{entry['sha256']}`"))
    return rows


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _sentence(text: str) -> str:
    text = str(text).strip()
    return text if text.endswith((".", "!", "?")) else text + "."
