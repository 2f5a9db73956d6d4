"""What makes the train step fast without changing what it learns (bench/train.py measures the speed):

- length grouping: batches of similar lengths, so little padding, and still every sample once per
  epoch in a seeded random order;
- packing: several samples per row with position ids restarting at 0 and a block-diagonal mask
  (transformers derives it from the resets): each sample's loss is the one it has alone;
- right-padded batches reach a causal model without their padding mask: the same loss, and the
  attention kernel's causal fast path.
No timings here: only content.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_train_support import make_ctx, tiny_model, tokenized, train_params

from tunepipe.runtime.collate import LengthGroupedSampler, PadCollator, TokenizedSplit
from tunepipe.runtime.stages import train
from tunepipe.runtime.stages.train import without_padding_mask

BATCH = 8


def long_tailed_lengths(n: int = 1200, seed: int = 0) -> list[int]:
    """Chat-like lengths: lognormal, mostly short, a few at the 1024 cutoff."""
    rng = np.random.default_rng(seed)
    return [int(x) for x in np.clip(rng.lognormal(5.0, 0.9, n), 8, 1024)]


def padding_fraction(lengths: list[int], order: list[int], batch: int) -> float:
    batches = [order[i : i + batch] for i in range(0, len(order), batch)]
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1 - sum(lengths) / padded


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def load(model_dir, attn: str):
    """The model as the train step runs it (the Trainer sets use_cache from TrainingArguments: off), without
    dropout. With a KV cache transformers would not derive the packed rows' block mask (masking_utils)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn).eval()
    model.config.use_cache = False
    return model


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross entropy of each position's label predicted from the position before (0 where masked)."""
    loss = torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="none")
    return torch.cat([torch.zeros(1), loss])


# ---------------------------------------------------------------- length grouping


def test_length_grouping_cuts_padding_and_sees_every_sample_once_per_epoch():
    lengths = long_tailed_lengths()
    sampler = LengthGroupedSampler(lengths, BATCH, seed=3)
    epochs = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        epochs.append(list(sampler))
    for order in epochs:
        assert sorted(order) == list(range(len(lengths)))  # a permutation: every sample exactly once
        assert padding_fraction(lengths, order, BATCH) < 0.1  # 6% here
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    random_order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(3)).tolist()
    assert padding_fraction(lengths, random_order, BATCH) > 0.5  # what LF's random batches carry
    # Still random across the epoch: a batch's neighbours are not its neighbours in length order.
    means = [np.mean([lengths[i] for i in epochs[0][k : k + BATCH]]) for k in range(0, len(lengths), BATCH)]
    assert not (np.all(np.diff(means) <= 0) or np.all(np.diff(means) >= 0))


# ---------------------------------------------------------------- packing


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_give_each_sample_its_unpacked_loss(tmp_path, model_dir, attn):
    packed = TokenizedSplit(tokenized(tmp_path / "packed", model_dir, n=12, packed=96), "train", "sft")
    plain = TokenizedSplit(tokenized(tmp_path / "plain", model_dir, n=12), "train", "sft")
    model = load(model_dir, attn)
    alone = {}
    with torch.no_grad():
        for item in (plain[i] for i in range(len(plain))):
            logits = model(input_ids=torch.from_numpy(item["input_ids"])[None]).logits[0]
            losses = token_losses(logits, torch.from_numpy(item["labels"]))
            alone[tuple(item["input_ids"].tolist())] = losses
        batch = PadCollator(0)([packed[i] for i in range(len(packed))])
        assert "attention_mask" not in batch  # the block mask comes from the position_ids resets
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        leaked = model(input_ids=batch["input_ids"]).logits  # the same rows without the resets
    compared = leaks = 0
    for row in range(len(packed)):
        positions = batch["position_ids"][row]
        length = len(packed[row]["input_ids"])
        starts = torch.nonzero(positions[:length] == 0).flatten().tolist() + [length]
        assert len(starts) > 2 or row == len(packed) - 1  # rows hold several conversations
        labels = batch["labels"][row]
        packed_losses = token_losses(logits[row], labels)
        leaked_losses = token_losses(leaked[row], labels)
        for s, e in zip(starts, starts[1:]):
            sample = tuple(batch["input_ids"][row, s:e].tolist())
            torch.testing.assert_close(packed_losses[s:e], alone[sample], atol=1e-5, rtol=0)
            compared += 1
            leaks += s > 0 and (leaked_losses[s:e] - alone[sample]).abs().max() > 1e-3
    assert compared == len(plain)  # every conversation found in exactly one packed row
    assert leaks > 0  # without the block mask later samples attend to earlier ones: other losses


def test_the_train_step_trains_packed_rows_with_the_block_mask(tmp_path, model_dir):
    """The first logged loss (LoRA's B starts at zero: the base model's) over one batch of every
    packed row is the loss of the samples apart, not that of rows whose samples see each other."""
    data = tokenized(tmp_path / "packed", model_dir, n=12, packed=96)
    split = TokenizedSplit(data, "train", "sft")
    params = train_params(max_steps=1, per_device_train_batch_size=len(split), attn_implementation="sdpa")
    metrics = train.run(make_ctx(tmp_path, params, data=data, model=model_dir))
    batch = PadCollator(0)([split[i] for i in range(len(split))])
    model = load(model_dir, "sdpa")
    with torch.no_grad():
        apart = model(**batch).loss.item()
        model.config.use_cache = True  # a cache turns transformers' packed-sequence mask off
        together = model(**batch).loss.item()
    assert abs(apart - together) > 1e-3
    assert metrics["train_loss"] == pytest.approx(apart, abs=1e-4)


# ---------------------------------------------------------------- the padding mask


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_right_padded_batch_without_its_mask_has_the_same_loss(tmp_path, model_dir, attn):
    split = TokenizedSplit(tokenized(tmp_path / "plain", model_dir, n=8), "train", "sft")
    batch = PadCollator(0)([split[i] for i in range(len(split))])
    assert (batch["attention_mask"] == 0).any()  # the batch is padded
    model = load(model_dir, attn)
    inputs = without_padding_mask(model, batch)
    assert "attention_mask" not in inputs and set(inputs) == {"input_ids", "labels"}
    with torch.no_grad():
        masked, unmasked = model(**batch), model(**inputs)
    torch.testing.assert_close(unmasked.loss, masked.loss, atol=1e-5, rtol=0)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(unmasked.logits[real], masked.logits[real], atol=1e-4, rtol=0)


def test_padding_mask_stays_when_it_is_more_than_right_padding(model_dir):
    model = load(model_dir, "sdpa")
    left = {
        "input_ids": torch.ones(2, 4, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]]),
    }
    assert without_padding_mask(model, left) is left
    right = {
        "input_ids": torch.ones(2, 4, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]),
    }
    assert "attention_mask" not in without_padding_mask(model, right)
    model.config.output_router_logits = True  # MoE load balancing excludes padding through the mask
    assert without_padding_mask(model, right) is right
    flash = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"))
    assert without_padding_mask(flash, right) is right  # its varlen kernel skips the padding with the mask
