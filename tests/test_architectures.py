"""Every method on every architecture (issue 18's matrix): small random-initialised models of nine
Hugging Face architectures (tests/architectures.py), each method run for a few steps through the
command line, its result exported (merged where it is a delta or an adapter), loaded back with
transformers alone, and its loss on the evaluation file computed here: it must be the run's own
final evaluation loss. docs/models.md shows the matrix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from architectures import ARCHITECTURES, build_model

from lowmem_ft.cli import main
from lowmem_ft.registry import METHOD_SPECS

RUN = ["--max-steps", "2", "--batch-size", "4", "--micro-batch-size", "4", "--seq-len", "48"]
RUN += ["--eval-every", "0", "--lr", "1e-2", "-q"]


def cli(*args) -> int:
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("architectures")
    records = [{"prompt": f"Q: {i} plus one?\nA:", "completion": f" {i + 1}."} for i in range(16)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:4]))
    return root


@pytest.fixture(scope="module")
def models(files):
    built = {name: build_model(name, files / "models" / name) for name in ARCHITECTURES}
    for name, directory in built.items():  # the terms a model comes with, as Llama's do
        (Path(directory) / "LICENSE.txt").write_text(f"{name}'s license\n")
    return built


def eval_loss_with_transformers(model_dir, base_dir, eval_file) -> float:
    """Mean cross-entropy per completion token of the saved model, loaded by transformers alone,
    on the evaluation examples as the data pipeline tokenises them (tested in test_data.py)."""
    from transformers import AutoModelForCausalLM

    from lowmem_ft.data import read_records, tokenize_records
    from lowmem_ft.models import load_tokenizer, resolve_model

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    records, fmt, _ = read_records(eval_file)
    examples, _ = tokenize_records(records, fmt, load_tokenizer(resolve_model(str(base_dir))), 48)
    total, count = 0.0, 0
    for example in examples:
        ids, labels = torch.tensor([example.input_ids]), torch.tensor(example.labels)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        total += F.cross_entropy(logits.float(), labels[1:], ignore_index=-100, reduction="sum").item()
        count += int((labels[1:] != -100).sum())
    return total / count


@pytest.mark.parametrize("method", list(METHOD_SPECS))
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_method_trains_exports_and_reloads_on_architecture(architecture, method, models, files, tmp_path):
    base = models[architecture]
    job = tmp_path / "job"
    args = ["run", base, files / "train.jsonl", "--eval-data", files / "eval.jsonl", "--out", job]
    assert cli(*args, "--method", method, *RUN) == 0
    record = json.loads((job / "job.json").read_text())
    assert record["status"] == "done" and record["eval_loss"] < record["eval_loss_start"]
    result = job / "model"
    if METHOD_SPECS[method].result != "model":  # a sparse delta or a LoRA adapter: merged into the base
        result = tmp_path / "merged"
        assert cli("export", job, "--merge", "--out", result) == 0
    loss = eval_loss_with_transformers(result, base, files / "eval.jsonl")
    assert loss == pytest.approx(record["eval_loss"], rel=1e-4)
    # The base's terms travel with what was made from it (the adapter too)
    copies = [result / "LICENSE.txt"] + ([job / "adapter" / "LICENSE.txt"] if method == "lora" else [])
    assert all(copy.read_text() == f"{architecture}'s license\n" for copy in copies)


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_units_cover_every_parameter_once_and_keywords_find_attention(architecture, models):
    """HiFT's units come from the model's own API (embeddings, the list of decoder layers), not
    from Llama's names; --targets attention and mlp split each decoder layer's linear layers."""
    from transformers import AutoModelForCausalLM

    from lowmem_ft.models.units import decoder_layers, is_linear, model_units
    from lowmem_ft.targets import match_targets

    model = AutoModelForCausalLM.from_pretrained(models[architecture])
    units = model_units(model)
    assert [u.name for u in units] == ["embed", "layer.0", "layer.1", "head"]
    owned = [id(p) for unit in units for p in unit.params]
    assert sorted(owned) == sorted(id(p) for p in model.parameters())  # each exactly once
    assert all(any(p is q for q in units[0].params) for p in model.get_input_embeddings().parameters())
    assert [list(layer.parameters()) for layer in decoder_layers(model)] == [u.params for u in units[1:3]]
    linears = [name for name, module in model.named_modules() if is_linear(module)]
    attention, mlp = match_targets(linears, "attention"), match_targets(linears, "mlp")
    everything = match_targets(linears, "all-linear")
    assert attention and mlp and sorted(attention + mlp) == sorted(everything)
    assert len(everything) % 2 == 0 and all(".0." in n or ".1." in n for n in everything)


def test_sparse_increment_on_conv1d_matches_dense_gradients():
    """GPT-2's Conv1D stores its weight transposed: the sparse increment's forward is the layer's
    with W + Δ, and its gradient is the dense weight gradient at the indices, in the stored layout."""
    from transformers.pytorch_utils import Conv1D

    from lowmem_ft.engine.sparse_delta import SparseDeltaLinear

    torch.manual_seed(0)
    conv = Conv1D(6, 4)  # in 4, out 6: weight (4, 6)
    reference = Conv1D(6, 4)
    reference.load_state_dict(conv.state_dict())
    layer = SparseDeltaLinear(conv)
    indices = torch.tensor([0, 5, 7, 23])
    layer.set_entries(indices, torch.tensor([0.5, -0.25, 1.0, 0.125]))
    with torch.no_grad():
        reference.weight.view(-1)[indices] += layer.values
    x = torch.randn(3, 4, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, expected = layer(x), reference(x_ref)
    torch.testing.assert_close(out, expected)
    out.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(layer.values.grad, reference.weight.grad.view(-1)[indices])
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_qlora_on_a_conv1d_model_is_refused_in_one_line(models, files, tmp_path, capsys):
    args = ["run", models["gpt2"], files / "train.jsonl", "--out", tmp_path / "job", "--method", "lora"]
    assert cli(*args, "--base-quant", "nf4", *RUN) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "QLoRA) needs nn.Linear layers" in err, err
    assert not (tmp_path / "job").exists()


@pytest.mark.parametrize("method", ["hift", "sift"])
@pytest.mark.parametrize("architecture", ["gpt2", "opt"])
def test_streamed_run_equals_resident_on_other_layouts(architecture, method, models, files, tmp_path):
    """--stream finds the decoder layers the same way (transformer.h, model.decoder.layers)."""
    losses = []
    for stream in ([], ["--stream"]):
        job = tmp_path / f"job{len(losses)}"
        args = ["run", models[architecture], files / "train.jsonl", "--eval-data", files / "eval.jsonl"]
        assert cli(*args, "--out", job, "--method", method, *stream, *RUN) == 0
        losses.append(
            [json.loads(line).get("loss") for line in (job / "metrics.jsonl").read_text().splitlines()]
        )
    assert losses[0] == losses[1]
