"""Turn what the user typed as MODEL into a config and, when needed, a directory of weights.

MODEL can be, in this order of precedence:

1. an existing local directory in Hugging Face layout (``config.json``, ``*.safetensors``, tokenizer);
2. an alias from ``registry.ALIASES`` (``tiny``, ``llama-2-7b``, ...);
3. a hub id (``org/name``) whose files are already in the local Hugging Face cache.

Nothing is downloaded unless the caller passes ``allow_download=True`` (the CLI's ``--allow-download``).
Only safetensors weights are loaded: pickle checkpoints (``*.bin``, ``*.pt``) can run arbitrary code
when unpickled, and a fine-tuning tool has no reason to take that risk.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lowmem_ft.errors import UserError
from lowmem_ft.files import read_json_object
from lowmem_ft.models.registry import ALIASES, TINY_DIR, ModelAlias, alias_config_path

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# Files fetched from the hub: configs, safetensors weights and tokenizer files; never pickles.
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "tokenizer*"]
# "org/name" as the hub spells repository ids.
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ResolvedModel:
    spec: str  # what the user typed
    name: str  # short name for job directories: alias, or last path/hub component
    source: str  # "embedded" | "alias" | "local" | "hf-cache"
    hub_id: str | None
    config: PretrainedConfig
    weights_dir: Path | None  # holds config.json, *.safetensors and tokenizer files; None if not available


def resolve_model(
    spec: str,
    *,
    require_weights: bool = True,
    allow_download: bool = False,
    trust_remote_code: bool = False,
    cache_dir: str | Path | None = None,
) -> ResolvedModel:
    """Find the model named by ``spec`` without touching the network (unless ``allow_download``).

    ``require_weights=False`` is for planning: an alias then resolves from its shipped config even
    when no weights are on disk (``weights_dir`` is None). ``cache_dir`` overrides the Hugging Face
    cache location; huggingface_hub reads ``HF_HUB_CACHE`` once at import, so tests pass it here.
    """
    if not spec.strip():
        raise UserError("MODEL is empty; use an alias such as 'tiny', a local model directory or a hub id")
    local = Path(spec).expanduser()
    if local.is_dir():
        return _resolve_local(spec, local, require_weights, trust_remote_code)
    if local.exists():
        raise UserError(
            f"{spec}: is a file; MODEL must be a Hugging Face model directory, an alias or a hub id"
        )
    if spec.startswith(("/", "./", "../", "~")):  # clearly meant as a path, not a name
        raise UserError(f"{spec}: no such directory")

    alias = ALIASES.get(spec)
    if alias is not None and alias.name == "tiny":
        # The embedded model always has its weights: they ship inside the package.
        config = _load_config(TINY_DIR, "tiny", trust_remote_code)
        weights_dir = _weights_dir_or_fail(TINY_DIR, "tiny", require_weights=True)
        return ResolvedModel(spec, "tiny", "embedded", None, config, weights_dir)
    if alias is not None:
        return _resolve_alias(spec, alias, require_weights, allow_download, trust_remote_code, cache_dir)

    if HUB_ID_RE.match(spec):
        snapshot = _find_snapshot(spec, spec, require_weights, allow_download, cache_dir)
        if snapshot is None:  # not cached: without its config.json we cannot even plan
            # (a mistyped relative path, "runs/typo", looks like a hub id: say that it is neither)
            if not require_weights:  # (planning: its config alone, not gigabytes of weights)
                raise UserError(
                    f"no directory {spec} here, and {spec}'s config.json is not in the local Hugging Face "
                    f"cache; planning needs only that file: hf download {spec} config.json, or pass a "
                    "local model directory"
                )
            raise UserError(f"no directory {spec} here, and " + _not_cached_message(spec, None))
        config = _load_config(snapshot, spec, trust_remote_code)
        weights_dir = _weights_dir_or_fail(snapshot, spec, require_weights, hub_id=spec)
        return ResolvedModel(spec, spec.rsplit("/", 1)[1], "hf-cache", spec, config, weights_dir)

    examples = ", ".join(list(ALIASES)[:2])
    raise UserError(
        f"unknown model '{spec}'; use an alias ({examples}, …), a local Hugging Face model directory, "
        "or a hub id already in the local cache"
    )


def _resolve_local(
    spec: str, directory: Path, require_weights: bool, trust_remote_code: bool
) -> ResolvedModel:
    given, directory = directory, directory.resolve()
    if not (directory / "config.json").is_file():
        raise UserError(f"{spec}: not a Hugging Face model directory (no config.json)")
    config = _load_config(directory, spec, trust_remote_code)
    weights_dir = _weights_dir_or_fail(directory, spec, require_weights)
    # Named as the user named it (a symlink `llama-mine` to a snapshot named by its hash), unless
    # that is no name ("." or "..")
    name = _local_name(given) if given.name not in ("", ".", "..") else _local_name(directory)
    return ResolvedModel(spec, name, "local", None, config, weights_dir)


def _local_name(directory: Path) -> str:
    # A snapshot inside the HF cache is named by its commit hash; the repo folder above it
    # ("models--org--name") gives a name people recognise.
    if directory.parent.name == "snapshots" and directory.parent.parent.name.startswith("models--"):
        return directory.parent.parent.name.rsplit("--", 1)[-1]
    return directory.name


def _resolve_alias(
    spec: str,
    alias: ModelAlias,
    require_weights: bool,
    allow_download: bool,
    trust_remote_code: bool,
    cache_dir: str | Path | None,
) -> ResolvedModel:
    label = f"{alias.name} ({alias.hub_id})"
    # Planning an alias needs no download: its config ships with lowmem-ft.
    download = allow_download and require_weights
    snapshot = _find_snapshot(alias.hub_id, label, require_weights, download, cache_dir)
    if snapshot is None:
        if require_weights:
            raise UserError(_not_cached_message(alias.hub_id, alias))
        # Planning only: the shipped config describes the model exactly, no download needed.
        config = _load_config(alias_config_path(alias.name), label, trust_remote_code)
        return ResolvedModel(spec, alias.name, "alias", alias.hub_id, config, None)
    # With a snapshot on disk, its own config.json is the one the weights will be loaded with.
    config = _load_config(snapshot, label, trust_remote_code)
    weights_dir = _weights_dir_or_fail(snapshot, label, require_weights, hub_id=alias.hub_id)
    return ResolvedModel(spec, alias.name, "alias", alias.hub_id, config, weights_dir)


def _find_snapshot(
    hub_id: str,
    label: str,
    require_weights: bool,
    allow_download: bool,
    cache_dir: str | Path | None,
) -> Path | None:
    """The cached snapshot directory of ``hub_id``, downloading it first if allowed; None if absent.

    Without ``require_weights`` only ``config.json`` is looked for (and downloaded).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    # The patterns also tell huggingface_hub which files must be present for a cached snapshot to
    # count as complete.
    patterns = DOWNLOAD_PATTERNS if require_weights else ["config.json"]
    try:
        found = snapshot_download(hub_id, cache_dir=cache_dir, allow_patterns=patterns, local_files_only=True)
        snapshot = Path(found)
        if not require_weights or any(snapshot.glob("*.safetensors")):
            return snapshot
    except LocalEntryNotFoundError:
        snapshot = None
    except ValueError:  # huggingface_hub rejects ids it cannot use as repo names
        raise UserError(f"'{hub_id}' is not a valid hub id") from None
    if not allow_download:
        return snapshot  # None, or a snapshot without safetensors (reported by the caller)

    try:
        return Path(snapshot_download(hub_id, cache_dir=cache_dir, allow_patterns=patterns))
    except GatedRepoError:
        raise UserError(
            f"{label} is gated: accept the licence on https://huggingface.co/{hub_id} and log in with "
            "'hf auth login', then rerun"
        ) from None
    except RepositoryNotFoundError:
        raise UserError(
            f"{label}: no such model on the Hugging Face hub (or it is private: log in with 'hf auth login')"
        ) from None
    except OSError as exc:  # network down, HF_HUB_OFFLINE set, disk full, ...
        raise UserError(f"downloading {label} failed: {exc}") from None


def _not_cached_message(hub_id: str, alias: ModelAlias | None) -> str:
    label = f"{alias.name} ({hub_id})" if alias else hub_id
    includes = " ".join(f"--include '{pattern}'" for pattern in DOWNLOAD_PATTERNS)
    gated = "  (gated: accept the licence on the hub first)" if alias and alias.gated else ""
    return (
        f"weights for {label} are not in the local Hugging Face cache; download them with: "
        f"hf download {hub_id} {includes}{gated}, or pass a local model directory "
        "(`run` and `generate` also take --allow-download)"
    )


def _weights_dir_or_fail(
    directory: Path, label: str, require_weights: bool, hub_id: str | None = None
) -> Path | None:
    """``directory`` if it holds safetensors weights; otherwise None, or an error when they are required."""
    if any(directory.glob("*.safetensors")):
        return directory
    if not require_weights:
        return None
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    found = f" (found {', '.join(pickles[:3])})" if pickles else ""
    if hub_id is not None:
        how = (
            f"download them with: hf download {hub_id} --include '*.safetensors' "
            "(if the repository has none, see docs/models.md on converting)"
        )
    else:
        how = (
            'convert once with: python -c "import transformers as t; '
            f"t.AutoModelForCausalLM.from_pretrained('{directory}').save_pretrained('{directory}')\""
        )
    raise UserError(
        f"{label}: no *.safetensors weights in {directory}{found}; lowmem-ft loads only safetensors "
        f"weights, not pickle checkpoints (.bin/.pt can run code when loaded); {how}"
    )


def _load_config(location: Path, label: str, trust_remote_code: bool) -> PretrainedConfig:
    """Load a config from a model directory or a JSON file, refusing models we could not train."""
    from transformers import CONFIG_MAPPING, AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config_file = location / "config.json" if location.is_dir() else location
    raw = read_json_object(config_file, "model config")
    model_type = raw.get("model_type")
    if not model_type:
        raise UserError(
            f"{config_file}: no model_type, so not a Hugging Face model config; a model directory's "
            'config.json names its architecture there (e.g. "model_type": "llama")'
        )
    has_remote_code = "AutoModelForCausalLM" in raw.get("auto_map", {})

    # Checked before transformers sees the config: with custom code and no explicit choice it
    # would stop and ask on stdin, and for other failures its messages are long.
    if not (trust_remote_code and has_remote_code) and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        if has_remote_code:
            raise UserError(
                f"{label}: model type '{model_type}' needs the model's own Python code from its repository; "
                "rerun with --trust-remote-code if you trust that code"
            )
        if model_type in CONFIG_MAPPING:
            raise UserError(f"{label}: model type '{model_type}' is not a causal language model")
        import transformers

        raise UserError(
            f"{label}: model type '{model_type}' is not supported by transformers {transformers.__version__} "
            "(AutoModelForCausalLM), and its config.json names no code of its own (auto_map); a newer "
            "transformers may know it, or its repository's code files and auto_map are missing"
        )
    from huggingface_hub.errors import StrictDataclassError

    try:
        # trust_remote_code is passed explicitly, False unless the user asked, so transformers never prompts.
        return AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, StrictDataclassError) as exc:  # (a value of the wrong type)
        reason = " ".join(str(exc).split())  # (one line)
        raise UserError(f"{label}: cannot load config: {reason}; correct {config_file}") from None
