"""SIFT and the sparse masks against references: dense AdamW on a masked dense increment, top-k of
reference gradients, merged weights, transformers reloading the merged model."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from test_hift import batches, config, loss_of
from torch.nn.utils import parametrize

from lowmem_ft.config import RunConfig
from lowmem_ft.engine.sparse_delta import SparseDeltaLinear
from lowmem_ft.errors import UserError
from lowmem_ft.methods import build_method
from lowmem_ft.methods.optimizers import make_optimizer
from lowmem_ft.targets import match_targets

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sift_config(**overrides) -> RunConfig:
    return config(**{"method": "sift", "sparsity": 0.05, **overrides})


def target_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]


def setup_sift(model, window: list[dict], **overrides):
    """SIFT set up on ``model`` with its entries chosen from ``window`` (one micro-batch each)."""
    cfg = sift_config(**overrides)
    method = build_method(cfg)
    method.setup(model)
    if method.selection_batches():
        n_targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)
        method.select(window, lambda b: (loss_of(model, b) * _targets(b) / n_targets).backward())
    return method


def _targets(batch) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def accumulate(model, micro_batches: list[dict]) -> float:
    """Backward over a step's micro-batches, each weighted by its share of the step's targets."""
    n = sum(_targets(b) for b in micro_batches)
    total = 0.0
    for b in micro_batches:
        loss = loss_of(model, b) * _targets(b) / n
        loss.backward()
        total += loss.item()
    return total


def sift_steps(model, method, steps: list[list[dict]]) -> list[float]:
    """The recipe's step with gradient accumulation over each step's micro-batches."""
    losses = []
    for step, micro_batches in enumerate(steps):
        method.begin_step(step)
        total = accumulate(model, micro_batches)
        method.reduce_gradients()
        method.optimizer.step()
        method.optimizer.zero_grad(set_to_none=True)
        method.end_step(step)
        losses.append(total)
    return losses


class _PlusFrozen(torch.nn.Module):
    """weight = base + D, with D the trained (dense) parameter starting at zero."""

    def __init__(self, base: torch.Tensor):
        super().__init__()
        self.register_buffer("base", base.detach().clone())

    def forward(self, delta):
        return self.base + delta

    def right_inverse(self, weight):
        return weight - self.base


def masked_adamw_reference(model, masks: dict[str, torch.Tensor], steps, lr=1e-2, wd=0.1):
    """Dense AdamW on a dense increment D per target, its gradient zeroed outside the mask."""
    model.requires_grad_(False)
    deltas = {}
    for name in masks:
        linear = model.get_submodule(name)
        parametrize.register_parametrization(linear, "weight", _PlusFrozen(linear.weight))
        delta = linear.parametrizations.weight.original
        delta.requires_grad_(True)
        deltas[name] = delta
    optimizer = make_optimizer("adamw", list(deltas.values()), lr, wd, decay_1d=True)
    losses = []
    for micro_batches in steps:
        total = accumulate(model, micro_batches)
        for name, delta in deltas.items():
            delta.grad.mul_(masks[name])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    return losses, deltas


def masks_of(method) -> dict[str, torch.Tensor]:
    masks = {}
    for name, layer in method.layers.items():
        mask = torch.zeros(layer.weight_numel)
        mask[layer.indices.long()] = 1
        masks[name] = mask.view(layer.out_features, layer.in_features)
    return masks


def increment_of(layer: SparseDeltaLinear) -> torch.Tensor:
    dense = torch.zeros(layer.weight_numel)
    dense[layer.indices.long()] = layer.values.detach()
    return dense.view(layer.out_features, layer.in_features)


# -- the update ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method_name", ["sift", "magnitude", "random"])
def test_sparse_steps_equal_dense_adamw_on_the_same_mask(method_name, small_model):
    """Three steps of two micro-batches each, weight decay on: losses and increments match dense
    AdamW on a masked dense increment; entries outside the mask never move."""
    data = batches(small_model, 7)
    reference = copy.deepcopy(small_model)
    method = setup_sift(small_model, data[:1], method=method_name)
    steps = [data[1:3], data[3:5], data[5:7]]
    losses = sift_steps(small_model, method, steps)

    ref_losses, deltas = masked_adamw_reference(reference, masks_of(method), steps)
    assert losses == pytest.approx(ref_losses, rel=1e-6)
    for name, layer in method.layers.items():
        torch.testing.assert_close(increment_of(layer), deltas[name].detach(), msg=name)
        assert (deltas[name][masks_of(method)[name] == 0] == 0).all()
    assert all(layer.values.abs().sum() > 0 for layer in method.layers.values()), (
        "every target trains, the first one in backward order included"
    )


def test_the_step_after_an_update_uses_the_updated_weights(small_model):
    """The reference code merged the increment one backward late: its next forward used stale weights."""
    data = batches(small_model, 3)
    plain = copy.deepcopy(small_model)
    method = setup_sift(small_model, data[:1])
    sift_steps(small_model, method, [data[1:2]])
    with torch.no_grad():
        for name, layer in method.layers.items():
            plain.get_submodule(name).weight += increment_of(layer)
    torch.testing.assert_close(loss_of(small_model, data[2]), loss_of(plain, data[2]))


def test_activation_checkpointing_gives_the_same_steps(small_model):
    """The recompute in the backward runs the sparse layer's forward again: same losses, same Δ."""
    from lowmem_ft.prepare import enable_checkpointing

    data = batches(small_model, 4)
    checkpointed = copy.deepcopy(small_model)
    enable_checkpointing(checkpointed)
    checkpointed.train()
    plain = setup_sift(small_model, data[:1])
    recomputed = setup_sift(checkpointed, data[:1])
    steps = [data[1:3], data[3:4]]
    calls = []
    next(iter(recomputed.layers.values())).register_forward_hook(lambda *_: calls.append(1))
    assert sift_steps(checkpointed, recomputed, steps) == pytest.approx(sift_steps(small_model, plain, steps))
    assert len(calls) == 2 * 3, "each micro-batch's forward runs again in the backward"
    for name, layer in plain.layers.items():
        assert torch.equal(layer.indices, recomputed.layers[name].indices)
        torch.testing.assert_close(layer.values, recomputed.layers[name].values, msg=name)


def test_forward_rounds_base_plus_increment_once_in_bf16():
    linear = torch.nn.Linear(16, 8).to(torch.bfloat16)
    layer = SparseDeltaLinear(linear)
    indices = torch.tensor([0, 5, 77], dtype=torch.int32)
    layer.set_entries(indices, torch.tensor([1e-3, -2e-3, 3e-4]))
    weight = layer.effective_weight(torch.bfloat16).reshape(-1)
    expected = (linear.weight.reshape(-1)[indices.long()].float() + layer.values.detach()).bfloat16()
    assert torch.equal(weight[indices.long()], expected)
    assert torch.equal(layer.base.weight, linear.weight), "the frozen base itself is never written"


# -- selection -------------------------------------------------------------------------------------
@pytest.mark.parametrize("score", ["grad", "grad2"])
@pytest.mark.parametrize("window", [1, 3])
def test_selection_picks_the_top_k_of_the_accumulated_gradient(score, window, small_model):
    data = batches(small_model, window)
    reference = copy.deepcopy(small_model)
    start = copy.deepcopy(small_model.state_dict())
    method = setup_sift(small_model, data, selection_batches=window, selection_score=score)

    n = sum(_targets(b) for b in data)
    scores = {name: 0 for name in method.layers}
    for b in data:
        reference.zero_grad(set_to_none=True)
        (loss_of(reference, b) * _targets(b) / n).backward()
        for name in scores:
            g = reference.get_submodule(name).weight.grad
            scores[name] = scores[name] + (g if score == "grad" else g**2)
    for name, layer in method.layers.items():
        k = method.k_for(layer)
        expected = torch.topk(scores[name].abs().reshape(-1), k).indices.sort().values
        assert torch.equal(layer.indices.long(), expected), name
        assert layer.values.abs().sum() == 0
    state = small_model.state_dict()
    for key, value in start.items():  # selection batches are looked at, never trained on
        name = key.replace(".weight", ".base.weight") if any(f"{p}." in key for p in LINEARS) else key
        torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=key)


def test_selection_in_several_passes_chooses_the_same_entries(small_model):
    data = batches(small_model, 3)
    other = copy.deepcopy(small_model)
    one = setup_sift(small_model, data, selection_batches=3)
    four = setup_sift(other, data, selection_batches=3, selection_passes=4)
    for name in one.layers:
        assert torch.equal(one.layers[name].indices, four.layers[name].indices), name


def test_random_and_magnitude_masks_are_what_they_claim(small_model):
    rand_a = setup_sift(copy.deepcopy(small_model), [], method="random", seed=1)
    rand_b = setup_sift(copy.deepcopy(small_model), [], method="random", seed=1)
    rand_c = setup_sift(copy.deepcopy(small_model), [], method="random", seed=2)
    magnitude = setup_sift(copy.deepcopy(small_model), [], method="magnitude")
    for name, layer in magnitude.layers.items():
        w = small_model.get_submodule(name).weight
        k = magnitude.k_for(layer)
        assert len(layer.indices) == k == math.ceil(0.05 * w.numel())
        assert torch.equal(layer.indices.long(), torch.topk(w.abs().reshape(-1), k).indices.sort().values)
        assert torch.equal(rand_a.layers[name].indices, rand_b.layers[name].indices)
        assert len(torch.unique(rand_a.layers[name].indices)) == k
    assert any(not torch.equal(rand_a.layers[n].indices, rand_c.layers[n].indices) for n in rand_a.layers), (
        "the seed changes the random mask"
    )


# -- memory ----------------------------------------------------------------------------------------
def test_backward_holds_one_dense_weight_gradient_at_a_time():
    """Wide layers and short sequences, so dense weight gradients dwarf activations: the memory the
    backward adds stays near one dense weight, not the sum over the 14 targets."""
    from memtrace import backward_extra_bytes
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=1024, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4)
    )  # fmt: skip
    data = batches(model, 2)
    method = setup_sift(model, data[:1], sparsity=0.01)
    largest = 4 * max(layer.weight_numel for layer in method.layers.values())
    total = 4 * sum(layer.weight_numel for layer in method.layers.values())
    extra = backward_extra_bytes(model, lambda: loss_of(model, data[1]))
    assert extra <= 1.5 * largest, (extra, largest)  # one dense weight, plus activation gradients
    assert total > 4 * largest  # keeping them all would fail the bound above several times over


# -- quantised base ------------------------------------------------------------------------------------
@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantised_base_trains_the_increment_on_the_dequantised_weights(quant, small_model):
    """The forward uses dequantise(W) + Δ; steps equal masked AdamW from the dequantised model."""
    data = batches(small_model, 3)
    original = copy.deepcopy(small_model)
    method = setup_sift(small_model, data[:1], base_quant=quant, method="magnitude")
    reference = copy.deepcopy(small_model)  # wrapped; rebuild a plain model from dequantised bases
    plain = _plain_copy(reference, method)
    steps = [data[1:2], data[2:3]]
    losses = sift_steps(small_model, method, steps)
    ref_losses, deltas = masked_adamw_reference(plain, masks_of(method), steps)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    for name, layer in method.layers.items():
        torch.testing.assert_close(increment_of(layer), deltas[name].detach(), msg=name)
    name, layer = next(iter(method.layers.items()))
    error = layer.base.dense(torch.float32)[0] - original.get_submodule(name).weight
    assert 0 < error.abs().max() < 0.25 * original.get_submodule(name).weight.abs().max()
    assert layer.base.codes.dtype == torch.uint8


def _plain_copy(wrapped_model, method):
    """A model with nn.Linear layers holding the dequantised base weights of ``wrapped_model``."""
    for name, layer in method.layers.items():
        parent_name, _, child = name.rpartition(".")
        linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(layer.base.dense(torch.float32)[0])
        setattr(wrapped_model.get_submodule(parent_name), child, linear)
    return wrapped_model


# -- state ---------------------------------------------------------------------------------------------
def test_state_dict_round_trip_continues_exactly(small_model):
    data = batches(small_model, 5)
    steps = [[b] for b in data[1:]]
    interrupted_model, fresh_model = copy.deepcopy(small_model), copy.deepcopy(small_model)
    method = setup_sift(small_model, data[:1])
    uninterrupted = sift_steps(small_model, method, steps)

    first = setup_sift(interrupted_model, data[:1])
    sift_steps(interrupted_model, first, steps[:2])
    state = copy.deepcopy(first.state_dict())
    second = build_method(sift_config())  # a new process: the base model as loaded, then the checkpoint
    second.setup(fresh_model)
    second.load_state_dict(state)
    assert second.selection_batches() == 0, "a restored selection is not run again"
    continued = sift_steps(fresh_model, second, steps[2:])
    assert continued == uninterrupted[2:]


# -- targets -------------------------------------------------------------------------------------------
def test_targets_select_by_keyword_and_pattern(small_model):
    names = target_names(small_model) + ["lm_head"]
    assert len(match_targets(names, "all-linear")) == 14
    assert {n.rsplit(".", 1)[1] for n in match_targets(names, "attention")} == set(LINEARS[:4])
    assert {n.rsplit(".", 1)[1] for n in match_targets(names, "mlp")} == set(LINEARS[4:])
    assert match_targets(names, "layers.1.*.down_proj") == ["model.layers.1.mlp.down_proj"]
    assert len(match_targets(names, "q_proj,v_proj")) == 4
    assert match_targets(names, "mlp,lm_head")[-1] == "lm_head"
    with pytest.raises(UserError, match="matches no linear layer.*q_proj"):
        match_targets(names, "qproj")
    with pytest.raises(UserError, match="not a linear layer"):
        match_targets(names, "embed_tokens", ["model.embed_tokens"])


def test_tied_head_is_refused(small_model):
    small_model.config.tie_word_embeddings = True
    small_model.lm_head.weight = small_model.model.embed_tokens.weight
    with pytest.raises(UserError, match="shares its weight"):
        build_method(sift_config(targets="all-linear,lm_head")).setup(small_model)


def test_flags_of_sparse_methods_are_checked():
    for overrides, message in [
        ({"method": "full", "sparsity": 0.01}, "--sparsity applies to --method sift"),
        ({"method": "hift", "selection_batches": 4}, "--selection-batches applies to --method sift"),
        ({"sparsity": 1.5}, "in \\(0, 1\\]"),
        ({"base_quant": "fp8"}, "--base-quant must be one of none, int8, nf4"),
        ({"selection_score": "fisher"}, "--selection-score must be grad"),
        ({"targets": "q_proj,,v_proj"}, "empty item"),
    ]:
        with pytest.raises(UserError, match=message):
            RunConfig.create(model="t", data=Path("x.jsonl"), **{"method": "sift", **overrides}).validate()


# -- as a user runs it ---------------------------------------------------------------------------------
def test_sift_job_exports_a_small_delta_that_merges_into_the_trained_model(tmp_path, capsys, tiny_dir):
    """Train through the recipe, then `lowmem-ft export --merge`: transformers loads the merged
    model and its logits are the in-training model's; a base with other weights is refused."""
    import shutil

    from safetensors.torch import load_file, save_file
    from test_cli import cli, small_data
    from transformers import AutoModelForCausalLM

    from lowmem_ft import prepare
    from lowmem_ft import train as recipe
    from lowmem_ft.jobs import Job

    data = small_data.__wrapped__(tmp_path)
    cfg = RunConfig.create(model="tiny", data=data, out=tmp_path / "job", method="sift", sparsity=0.01,
                           max_steps=3,
                    batch_size=8, micro_batch_size=4, seq_len=96, lr=1e-2)  # fmt: skip
    s = prepare.setup(cfg)
    job = Job.create(cfg.out, cfg.to_json(), max_steps=s.max_steps)
    recipe.train(s, job, show_progress=False)
    stdout = capsys.readouterr().out
    assert "selection  top 1.00% of each weight" in stdout and "delta.safetensors" in stdout

    delta = job.dir / "delta.safetensors"
    assert delta.stat().st_size < 0.05 * (tiny_dir / "model.safetensors").stat().st_size
    code, shown, err = cli(capsys, "export", job.dir)
    assert code == 0 and f"in {len(s.method.layers)} weights" in shown, err

    merged = tmp_path / "merged"
    code, _, err = cli(capsys, "export", job.dir, "--merge", "--out", merged, "--save-dtype", "fp32")
    assert code == 0, err
    reloaded = AutoModelForCausalLM.from_pretrained(merged)
    batch = next(iter(s.batcher.next_step()))
    s.model.eval()
    with torch.no_grad():
        expected = s.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    for name, layer in s.method.layers.items():  # the merge is base + Δ exactly (fp32)
        torch.testing.assert_close(
            reloaded.get_submodule(name).weight, layer.effective_weight(torch.float32), rtol=0, atol=0
        )

    other_base = tmp_path / "other-base"
    shutil.copytree(tiny_dir, other_base)
    tensors = load_file(other_base / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.01
    save_file(tensors, other_base / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()  # transformers' loading bar above is not the command's output
    code, _, err = cli(capsys, "export", job.dir, "--merge", "--out", tmp_path / "m2", "--base", other_base)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "is not the base this delta" in err
    assert not (tmp_path / "m2").exists()


def test_export_explains_what_it_cannot_do(tmp_path, capsys):
    code, _, err = cli_run(capsys, "export", tmp_path / "nowhere")
    assert code == 2 and "no such job directory" in err
    job = tmp_path / "full-job"
    (job / "model").mkdir(parents=True)
    (job / "job.json").write_text('{"status": "done", "config": {"method": "full"}}')
    code, _, err = cli_run(capsys, "export", job, "--merge", "--out", tmp_path / "m")
    assert code == 2 and "its full model is already in" in err
    code, _, err = cli_run(capsys, "export", job, "--merge")
    assert code == 2 and "--merge needs --out" in err
    stopped = tmp_path / "stopped-job"
    stopped.mkdir()
    (stopped / "job.json").write_text('{"status": "interrupted", "config": {"method": "sift"}}')
    code, _, err = cli_run(capsys, "export", stopped)
    assert code == 2 and err.strip().endswith(f"`lowmem-ft resume {stopped}` continues it")
    (stopped / "job.json").write_text("[1]")  # damaged: one line, as resume says it
    code, _, err = cli_run(capsys, "export", stopped)
    assert code == 2 and err.strip() == (
        f"error: {stopped / 'job.json'}: holds a JSON list, not the JSON object a job record is"
    )


def cli_run(capsys, *args):
    from test_cli import cli

    return cli(capsys, *args)
