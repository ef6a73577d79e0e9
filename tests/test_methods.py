"""Every method through the same checks, on the embedded model and the real CLI.

For each row of METHODS a few optimizer steps run end to end, and:

- the trainable-parameter count equals a formula written out here from the tiny model's shape
  (hidden 256, MLP 688, k/v 128, 6 layers), not computed by the code under test;
- only the entries the method may move have moved: the merged or exported model is compared,
  tensor by tensor, with the base;
- a run stopped by Ctrl-C at step 2 and resumed ends bit-identical to one that was not stopped;
- the exported (or merged) model, reloaded with transformers, gives the evaluation loss the run
  measured on its final weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli import cli
from test_resume import assert_same_result, record, signal_at_step

from lowmem_ft.selections import layer_index

H, MLP, KV, LAYERS = 256, 688, 128, 6
LINEARS = {  # (out, in) of each linear layer of a decoder layer
    "self_attn.q_proj": (H, H),
    "self_attn.k_proj": (KV, H),
    "self_attn.v_proj": (KV, H),
    "self_attn.o_proj": (H, H),
    "mlp.gate_proj": (MLP, H),
    "mlp.up_proj": (MLP, H),
    "mlp.down_proj": (H, MLP),
}
ATTENTION = [n for n in LINEARS if n.startswith("self_attn")]
ALL_PARAMS = 5_401_856  # embedding (tied head) 4096·256, 6 layers, final norm
NORMS = 2 * H  # input and post-attention RMSNorm weights of one layer


def lora_values(rank: int, names: list[str], layers: int) -> int:
    return rank * layers * sum(sum(LINEARS[n]) for n in names)


def sparse_values(rate: float) -> int:
    return LAYERS * sum(math.ceil(rate * out * inp) for out, inp in LINEARS.values())


def is_linear(name: str, names=tuple(LINEARS)) -> bool:
    return layer_index(name) is not None and name.endswith(".weight") and any(f".{n}." in name for n in names)


def is_norm(name: str) -> bool:
    return "norm.weight" in name


def in_layers(name: str, layers) -> bool:
    return layer_index(name) in layers


def anything(name: str) -> bool:
    return True


def bitfit_layers_2_5(name: str) -> bool:  # and the final norm, which is outside the layers
    return (is_norm(name) and layer_index(name) not in (0, 1)) or (
        name.endswith(".bias") and in_layers(name, range(2, 6))
    )


def spafit(variant: str):
    terms = (2, 3) if variant == "I" else (2, 3, 4, 5)
    return lambda n: (
        (is_norm(n) and in_layers(n, terms)) or (is_linear(n, ATTENTION) and in_layers(n, (4, 5)))
    )


# The micro-batch is fixed at 2, which fits without activation checkpointing: half the rows force it,
# so that both paths run for the frozen-input methods (LoRA, SPAFIT, BitFit with frozen layers).
CKPT = "--gradient-checkpointing"
# name: (options, trainable values, may this tensor change?, result)
METHODS = {
    "full": (["--method", "full", "--lr", "1e-3"], ALL_PARAMS, anything, "model"),
    "hift": (["--method", "hift", "--units-per-group", "2", "--lr", "1e-3", CKPT], ALL_PARAMS, anything,
             "model"),
    "sift": (["--method", "sift", "--sparsity", "0.05"], sparse_values(0.05), is_linear, "delta"),
    "random": (["--method", "random", "--sparsity", "0.05"], sparse_values(0.05), is_linear, "delta"),
    "magnitude": (["--method", "magnitude", "--sparsity", "0.05", CKPT], sparse_values(0.05), is_linear,
                  "delta"),
    "bitfit": (["--method", "bitfit", "--lr", "1e-2"], LAYERS * NORMS + H, is_norm, "model"),
    "bitfit-added-biases-layers-2-5": (
        ["--method", "bitfit", "--lr", "1e-2", "--add-biases", "--freeze-layers", "0-1", CKPT],
        4 * NORMS + H + 4 * sum(out for out, _ in LINEARS.values()),
        bitfit_layers_2_5,
        "model",
    ),
    "lora": (["--method", "lora", "--lora-rank", "4"], lora_values(4, list(LINEARS), LAYERS), is_linear,
             "adapter"),
    "qlora-attention": (
        ["--method", "lora", "--lora-rank", "4", "--base-quant", "nf4", "--targets", "attention", CKPT],
        lora_values(4, ATTENTION, LAYERS),
        lambda n: is_linear(n, ATTENTION),
        "adapter",
    ),
    "spafit-I": (
        ["--method", "spafit", "--cutoffs", "2,4", "--lora-rank", "4", CKPT],
        2 * NORMS + lora_values(4, ATTENTION, 2),
        spafit("I"),
        "model",
    ),
    "spafit-II": (
        ["--method", "spafit", "--cutoffs", "2,4", "--lora-rank", "4", "--variant", "II"],
        4 * NORMS + lora_values(4, ATTENTION, 2),
        spafit("II"),
        "model",
    ),
}  # fmt: skip
COMMON = [
    "--max-steps", "4", "--batch-size", "4", "--micro-batch-size", "2", "--seq-len", "64",
    "--eval-every", "0", "--save-every", "2", "--save-dtype", "fp32", "--lr", "1e-2", "-q",
]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("data")
    rows = [{"prompt": f"What is {i} plus {i}?", "completion": f" It is {2 * i}."} for i in range(32)]
    train, evaluation = root / "train.jsonl", root / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:24]))
    evaluation.write_text("".join(json.dumps(r) + "\n" for r in rows[24:]))
    return train, evaluation


def result_model(capsys, job: Path, kind: str, tmp_path: Path) -> Path:
    """A Hugging Face directory of the job's result: its model, or its delta/adapter merged."""
    if kind == "model":
        return job / "model"
    code, shown, err = cli(capsys, "export", job)  # what it holds, before merging
    assert code == 0 and shown.startswith(kind) and "\nbase       " in shown, err
    merged = tmp_path / f"{job.name}-merged"
    code, _, err = cli(capsys, "export", job, "--merge", "--out", merged, "--save-dtype", "fp32")
    assert code == 0, err
    return merged


def eval_loss_of(model_dir: Path, eval_path: Path) -> float:
    """The evaluation loss of a saved model, reloaded with transformers, as the run computes it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowmem_ft.data import eval_batches, read_jsonl, tokenize_records
    from lowmem_ft.objective import loss_sum, target_count

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    records, fmt, _ = read_jsonl(eval_path)
    examples, _ = tokenize_records(records, fmt, tokenizer, 64)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in eval_batches(examples, 2, tokenizer.pad_token_id):
            total += loss_sum(model, batch, torch.device("cpu"), torch.float32).item()
            count += target_count(batch)
    return total / count


@pytest.mark.parametrize("name", list(METHODS))
def test_method_table(name, tmp_path, capsys, monkeypatch, data, tiny_dir):
    options, trainable, may_change, kind = METHODS[name]
    train_path, eval_path = data
    args = ["tiny", train_path, "--eval-data", eval_path, *COMMON, *options]
    reference, job = tmp_path / "reference", tmp_path / "job"
    code, out, err = cli(capsys, "run", *args, "--out", reference)
    assert code == 0, err

    # The count is the formula's, in the job record, the plan and the run header.
    assert record(reference)["trainable_parameters"] == trainable
    plan = json.loads((reference / "plan.json").read_text())
    assert plan["trainable_params"] == trainable
    assert f"{trainable:,} trainable" in out

    # Only what may change has changed, and (dense methods) all of it has.
    result = result_model(capsys, reference, kind, tmp_path)
    base = load_file(tiny_dir / "model.safetensors")
    trained = load_file(result / "model.safetensors")
    changed = set()
    for tensor_name, value in trained.items():
        before = base.get(tensor_name, torch.zeros_like(value)).float()  # added biases start at zero
        if not torch.equal(value, before):
            changed.add(tensor_name)
            assert may_change(tensor_name), f"{tensor_name} changed"
            if kind == "delta":  # at most the entries of the mask, per weight
                moved = int((value != before).sum())
                assert moved <= math.ceil(0.05 * value.numel()), tensor_name
    if kind == "delta":
        assert changed and all(is_linear(n) for n in changed)
    else:
        assert changed == {n for n in trained if may_change(n)}

    # The saved result, reloaded with transformers, is the model the run evaluated last. (A QLoRA
    # adapter trained on NF4 weights is merged into the original ones: close, not equal.)
    final = record(reference)["eval_loss"]
    reloaded = eval_loss_of(result, eval_path)
    assert reloaded == pytest.approx(final, rel=2e-2 if "qlora" in name else 1e-5)

    # Stopped at step 2 and resumed: the same trajectory and result, bit for bit.
    with monkeypatch.context() as patch:
        signal_at_step(patch, 2)
        assert cli(capsys, "run", *args, "--out", job)[0] == 130
    code, _, err = cli(capsys, "resume", job, "-q")
    assert code == 0, err
    assert_same_result(job, reference)
