"""Model registry, resolution and loading. Nothing here touches the network: hub lookups run against
fake caches built in tmp_path, with huggingface_hub forced offline."""

from __future__ import annotations

import json
import shutil
from fnmatch import fnmatch
from pathlib import Path

import pytest
import torch

from lowmem_ft.errors import UserError
from lowmem_ft.models import (
    ALIASES,
    alias_config_path,
    empty_model,
    load_model,
    load_tokenizer,
    resolve_model,
    weights_hash,
)

# Published parameter counts (tied embeddings counted once).
PUBLISHED_PARAMS = {
    "llama-7b": 6_738_415_616,
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-7b": 7_615_616_512,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
}
FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def offline_hub(tmp_path, monkeypatch):
    """Force huggingface_hub offline and away from the user's cache, even for calls without cache_dir.

    huggingface_hub copies the environment into ``constants`` at import, so the constants are patched
    as well as the variables.
    """
    from huggingface_hub import constants

    cache = tmp_path / "default-hf-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))


def fake_hub_cache(cache: Path, hub_id: str, files_from: Path) -> Path:
    """Lay out ``hub_id`` in ``cache`` the way huggingface_hub stores a downloaded snapshot."""
    repo = cache / ("models--" + hub_id.replace("/", "--"))
    snapshot = repo / "snapshots" / FAKE_COMMIT
    shutil.copytree(files_from, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(FAKE_COMMIT)
    return snapshot


@pytest.fixture(scope="module")
def tiny_loaded():
    resolved = resolve_model("tiny")
    return resolved, load_model(resolved, torch.float32), load_tokenizer(resolved)


# --- registry -------------------------------------------------------------------------------------


def test_every_alias_has_a_config_and_a_published_count():
    assert set(ALIASES) == set(PUBLISHED_PARAMS) | {"tiny"}
    for name, alias in ALIASES.items():
        assert alias.name == name
        assert alias_config_path(name).is_file()
        assert bool(alias.hub_id) == (name != "tiny")


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_alias_config_gives_published_parameter_count(name):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(alias_config_path(name))
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[name]


def test_tiny_config_matches_its_provenance(tiny_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    assert alias_config_path("tiny") == tiny_dir / "config.json"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_dir))
    provenance = json.loads((tiny_dir / "PROVENANCE.json").read_text())
    assert sum(p.numel() for p in model.parameters()) == provenance["parameters"]


# --- resolution ----------------------------------------------------------------------------------


def test_tiny_is_embedded_and_runs(tiny_loaded, tiny_dir):
    resolved, model, tokenizer = tiny_loaded
    assert (resolved.source, resolved.name, resolved.hub_id) == ("embedded", "tiny", None)
    assert resolved.weights_dir == tiny_dir
    assert model.dtype == torch.float32 and next(model.parameters()).device.type == "cpu"
    batch = tokenizer("Return the number of items in a container.", return_tensors="pt")
    n = batch["input_ids"].shape[1]
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, n, resolved.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_a_saved_model_writes_a_tied_embedding_once_as_its_base_does(tiny_loaded, tiny_dir, tmp_path):
    """The embedded model ties its head to its input embedding (as most small models do): the saved
    model holds the tensor once, like the base (a second copy was a fifth of tiny's file), and loads
    tied, with the weights it was given."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from lowmem_ft.models.saving import save_hf_model

    resolved, model, tokenizer = tiny_loaded
    assert resolved.config.tie_word_embeddings
    out = save_hf_model(model, tokenizer, tmp_path / "saved", torch.bfloat16, tiny_dir)

    def names(directory: Path) -> set[str]:
        with safe_open(directory / "model.safetensors", "pt") as f:
            return set(f.keys())

    assert names(out) == names(tiny_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))


def test_an_empty_model_has_the_loaded_ones_modules_and_no_memory(tiny_loaded):
    """What the ranks of a sharded run build before rank 0 sends the weights: the same parameters
    and buffers (the head still tied), all on the meta device; the config it was built from still
    says the dtype the weights are stored in (the exported model's default)."""
    resolved, model, _ = tiny_loaded
    stored = resolved.config.dtype
    empty = empty_model(resolved.config, torch.float32)
    assert resolved.config.dtype == stored == torch.bfloat16
    shapes = {name: t.shape for name, t in empty.state_dict().items()}
    assert shapes == {name: t.shape for name, t in model.state_dict().items()}
    assert [name for name, _ in empty.named_buffers()] == [name for name, _ in model.named_buffers()]
    assert all(t.is_meta for t in [*empty.parameters(), *empty.buffers()])
    assert empty.lm_head.weight is empty.model.embed_tokens.weight


def test_local_directory(tmp_path, tiny_dir):
    local = tmp_path / "my-model"
    shutil.copytree(tiny_dir, local)
    resolved = resolve_model(str(local))
    assert (resolved.source, resolved.name, resolved.hub_id) == ("local", "my-model", None)
    assert resolved.weights_dir == local
    assert resolved.config.model_type == "llama"


def test_local_directory_without_config(tmp_path):
    with pytest.raises(UserError, match=r"not a Hugging Face model directory \(no config.json\)"):
        resolve_model(str(tmp_path))


def test_unknown_model(tmp_path):
    with pytest.raises(UserError, match=r"unknown model 'xyz'; use an alias \(tiny, llama-7b, …\)"):
        resolve_model("xyz")
    with pytest.raises(UserError, match="no such directory"):
        resolve_model(str(tmp_path / "absent"))


def test_alias_without_cached_weights(tmp_path):
    with pytest.raises(UserError) as caught:
        resolve_model("llama-2-7b", cache_dir=tmp_path)
    message = str(caught.value)
    assert "meta-llama/Llama-2-7b-hf" in message
    assert "hf download meta-llama/Llama-2-7b-hf" in message
    assert "--allow-download" in message and "gated" in message


def test_alias_for_planning_needs_no_weights(tmp_path):
    resolved = resolve_model("mistral-7b", require_weights=False, cache_dir=tmp_path)
    assert (resolved.source, resolved.name, resolved.hub_id) == (
        "alias",
        "mistral-7b",
        "mistralai/Mistral-7B-v0.1",
    )
    assert resolved.weights_dir is None
    assert resolved.config.sliding_window == 4096
    with pytest.raises(UserError, match="no weights available"):
        load_model(resolved, torch.float32)


def test_hub_id_found_in_cache(tmp_path, tiny_dir):
    snapshot = fake_hub_cache(tmp_path, "org/name", tiny_dir)
    resolved = resolve_model("org/name", cache_dir=tmp_path)
    assert (resolved.source, resolved.name, resolved.hub_id) == ("hf-cache", "name", "org/name")
    assert resolved.weights_dir == snapshot
    # A snapshot passed as a directory is named after its repository, not its commit hash.
    assert resolve_model(str(snapshot)).name == "name"
    # A link to it is named as the user named it (the job directory is called after it)
    (tmp_path / "llama-mine").symlink_to(snapshot)
    assert resolve_model(str(tmp_path / "llama-mine")).name == "llama-mine"


def test_alias_found_in_cache_uses_cached_config(tmp_path, tiny_dir):
    snapshot = fake_hub_cache(tmp_path, "Qwen/Qwen2.5-0.5B", tiny_dir)
    resolved = resolve_model("qwen2.5-0.5b", cache_dir=tmp_path)
    assert (resolved.source, resolved.weights_dir) == ("alias", snapshot)
    assert resolved.config.model_type == "llama"  # the config that goes with the cached weights


def test_hub_id_not_in_cache(tmp_path):
    with pytest.raises(
        UserError, match="no directory org/absent here, and weights for org/absent are not in the local"
    ):
        resolve_model("org/absent", cache_dir=tmp_path)
    # planning needs only its config.json, and says so (it advised downloading the weights)
    with pytest.raises(
        UserError, match="config.json is not in the local Hugging Face cache; planning needs only"
    ):
        resolve_model("org/absent", require_weights=False, cache_dir=tmp_path)


def test_allow_download_fetches_only_safe_files(tmp_path, tiny_dir, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def fake_snapshot_download(repo_id, *, local_files_only=False, allow_patterns=None, cache_dir=None):
        calls.append((local_files_only, allow_patterns))
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        return str(fake_hub_cache(Path(cache_dir), repo_id, tiny_dir))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    resolved = resolve_model("org/new", allow_download=True, cache_dir=tmp_path)
    assert resolved.weights_dir is not None
    local_only, patterns = calls[-1]
    assert local_only is False and "*.safetensors" in patterns
    pickles = ["pytorch_model.bin", "model.pt", "consolidated.00.pth"]
    assert not any(fnmatch(name, pattern) for name in pickles for pattern in patterns)


def test_pickle_only_directory_is_refused(tmp_path, tiny_dir):
    shutil.copy(tiny_dir / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(UserError, match="only safetensors") as caught:
        resolve_model(str(tmp_path))
    assert "pytorch_model.bin" in str(caught.value)
    # Planning only needs the config, so the same directory is fine without weights.
    assert resolve_model(str(tmp_path), require_weights=False).weights_dir is None


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"model_type": "t5"}, "not a causal language model"),
        ({"model_type": "custom", "auto_map": {"AutoModelForCausalLM": "m.M"}}, "--trust-remote-code"),
        ({"model_type": "no-such-type"}, "no code of its own .auto_map.; a newer transformers may know"),
    ],
)
def test_unsupported_model_types(tmp_path, config, expected):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=expected):
        resolve_model(str(tmp_path), require_weights=False)


# --- loading helpers -----------------------------------------------------------------------------


def test_tokenizer_without_pad_gets_eos(tmp_path, tiny_dir):
    local = tmp_path / "no-pad"
    shutil.copytree(tiny_dir, local)
    tokenizer_config = json.loads((local / "tokenizer_config.json").read_text())
    del tokenizer_config["pad_token"]
    (local / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    tokenizer = load_tokenizer(resolve_model(str(local)))
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"


def test_weights_hash(tmp_path, tiny_dir):
    local = tmp_path / "copy"
    shutil.copytree(tiny_dir, local)
    first = weights_hash(local)
    assert first == weights_hash(local) and len(first) == 64
    (local / "tokenizer.json").write_text("{}")  # not a weights file: no effect
    assert weights_hash(local) == first
    weights = local / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert weights_hash(local) != first
