"""Numeric checks of the recipe's pieces against references, on a small in-process model."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from lowmem_ft.choices import SPARSE_METHODS
from lowmem_ft.config import RunConfig
from lowmem_ft.data import Example, collate
from lowmem_ft.methods import build_method
from lowmem_ft.objective import loss_sum, lr_at, target_count
from lowmem_ft.registry import METHOD_SPECS


def make_examples(n: int, vocab: int, seed: int = 0) -> list[Example]:
    """Examples of different lengths with the first half of each unlabelled (like a prompt)."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        length = 6 + 3 * i
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        labels = [-100] * (length // 2) + ids[length // 2 :]
        examples.append(Example(input_ids=ids, labels=labels))
    return examples


def grads_after(model, micro_batches, n_targets) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    for mb in micro_batches:
        total = loss_sum(model, mb, torch.device("cpu"), torch.float32)
        (total / n_targets).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_gradient_accumulation_equals_one_big_batch(small_model):
    """Micro-batches normalised by the step's target tokens give the full batch's gradient, even
    though the micro-batches hold different numbers of target tokens."""
    examples = make_examples(4, small_model.config.vocab_size)
    n_targets = sum(sum(1 for t in e.labels[1:] if t != -100) for e in examples)
    one_batch = grads_after(small_model, [collate(examples, pad_id=0)], n_targets)
    accumulated = grads_after(small_model, [collate([e], pad_id=0) for e in examples], n_targets)
    for name, grad in one_batch.items():
        torch.testing.assert_close(accumulated[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_loss_sum_matches_transformers_mean_loss(small_model):
    """Our summed, shifted loss divided by the count equals the model's own mean loss."""
    examples = make_examples(3, small_model.config.vocab_size)
    batch = collate(examples, pad_id=0)
    total = loss_sum(small_model, batch, torch.device("cpu"), torch.float32)
    count = target_count(batch)
    reference = small_model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
    ).loss
    torch.testing.assert_close(total / count, reference, rtol=1e-5, atol=1e-6)


def config(**overrides) -> RunConfig:
    return RunConfig.create(model="tiny", data=Path("x.jsonl"), **overrides)


def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = config(lr=1e-3, warmup_ratio=0.1, min_lr_ratio=0.1, schedule="cosine")
    lrs = [lr_at(step, 100, cfg) for step in range(100)]
    assert lrs[0] == pytest.approx(1e-4)  # step 1 of 10 warmup steps
    assert lrs[9] == pytest.approx(1e-3)  # warmup ends at the peak
    assert lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))  # decays monotonically
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01)  # ends at min_lr_ratio * lr


def test_lr_schedule_linear_and_constant():
    linear = config(lr=1.0, warmup_ratio=0.0, min_lr_ratio=0.0, schedule="linear")
    assert [lr_at(s, 4, linear) for s in range(4)] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    constant = config(lr=0.5, warmup_ratio=0.0, schedule="constant")
    assert {lr_at(s, 10, constant) for s in range(10)} == {0.5}


@pytest.mark.parametrize("name", sorted(set(METHOD_SPECS) - set(SPARSE_METHODS)))
def test_method_step_matches_plain_adamw_on_its_parameters(name, small_model):
    """One step of the method equals torch AdamW applied to the parameters the method trains.
    (Sparse methods train values that are not model parameters: tests/test_sift.py checks them
    against AdamW on a masked dense increment.)"""
    cfg = config(method=name, lr=1e-2, weight_decay=0.1)
    model, reference, copy_before = small_model, copy.deepcopy(small_model), copy.deepcopy(small_model)
    method = build_method(cfg)
    method.setup(model)
    method.begin_step(0)  # a method may choose what trains per step (HiFT: the first group)
    trained = {id(p) for p in method.trainable_parameters()}
    assert trained, "the method trains nothing at step 0"
    names = [n for n, p in model.named_parameters() if id(p) in trained]
    if not set(names) <= dict(reference.named_parameters()).keys():
        # The method added parameters (LoRA's adapters, initialised at random): the reference
        # starts from the model as set up, with the same adapters.
        reference, copy_before = copy.deepcopy(model), copy.deepcopy(model)
    ref_params = dict(reference.named_parameters())
    decay = [ref_params[n] for n in names if ref_params[n].ndim >= 2]
    no_decay = [ref_params[n] for n in names if ref_params[n].ndim < 2]
    ref_opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-2,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    examples = make_examples(2, model.config.vocab_size)
    batch = collate(examples, pad_id=0)
    for m, opt in ((model, method.optimizer), (reference, ref_opt)):
        total = loss_sum(m, batch, torch.device("cpu"), torch.float32)
        count = target_count(batch)
        (total / count).backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, ref_params[n], msg=n)
    assert sum(p.numel() for p in method.trainable_parameters()) == sum(ref_params[n].numel() for n in names)
    changed = {
        n for n, p in model.named_parameters() if not torch.equal(p, dict(copy_before.named_parameters())[n])
    }
    assert changed == set(names)  # only the parameters the method said it trains have moved


def test_default_learning_rate_by_method_and_model_size():
    """Without --lr: 2e-5 for full fine-tuning (and HiFT) of a 7B model, the usual value, scaled by
    1/sqrt(size) within [1e-5, 1e-3]; 10x for the methods that train a small part (LoRA's 2e-4)."""
    from lowmem_ft.config import default_lr

    assert default_lr("full", 7e9) == default_lr("hift", 7e9) == 2e-5
    assert default_lr("lora", 7e9) == default_lr("sift", 7e9) == default_lr("bitfit", 7e9) == 2e-4
    assert default_lr("full", 7e9 / 4) == 4e-5  # a model 4x smaller: twice the step
    assert default_lr("full", 70e9) == 1e-5 and default_lr("full", 1e3) == 1e-3  # the bounds
    assert default_lr("spafit", 1e3) == 1e-2
    assert default_lr("full", 5_401_856) == 7.2e-4  # the embedded model


def test_paths_given_with_a_tilde_mean_the_home_directory(tmp_path, monkeypatch):
    """`--out=~/runs/x` (and a quoted `~/data.jsonl`) reach the tool unexpanded by the shell: they
    made a directory named `~` in the current one (a trap for a later `rm -rf ~`)."""
    from pathlib import Path

    from lowmem_ft.config import RunConfig

    monkeypatch.setenv("HOME", str(tmp_path))
    config = RunConfig.create(
        model="tiny", data=Path("~/data.jsonl"), out=Path("~/runs/x"), eval_data="~/e.jsonl"
    )
    assert (config.data, config.out, config.eval_data) == (
        tmp_path / "data.jsonl",
        tmp_path / "runs" / "x",
        tmp_path / "e.jsonl",
    )
    assert RunConfig.create(model="tiny", data=Path("data/~x.jsonl")).data == Path("data/~x.jsonl")
