"""Tokenized data → batches: the dataset over the template artifact, the collator, the sampler.

The template artifact stores each split as flat int32 arrays plus sample offsets
(docs/internals.md). Samples are sliced out lazily (memory-mapped), batches are
padded to their longest sample only, and `group_by_length` orders samples so that
a batch holds samples of similar length: together that removes most of the padding
that random batches of long-tailed chat data carry (bench/train.py measures it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

IGNORE = -100


class TokenizedSplit(Dataset):
    """One split (`train` or `val`) of a tokenized-data artifact.

    objective `sft` trains on the stored labels (prompt tokens masked); `pt` on
    every token. Packed rows (with position_ids) never predict a sample's first
    token from the previous sample.
    """

    def __init__(self, directory: Path, split: str, objective: str = "sft"):
        base = Path(directory) / split
        self.input_ids = np.load(f"{base}.input_ids.npy", mmap_mode="r")
        self.labels = np.load(f"{base}.labels.npy", mmap_mode="r")
        self.offsets = np.load(f"{base}.offsets.npy")
        position_file = Path(f"{base}.position_ids.npy")
        self.position_ids = np.load(position_file, mmap_mode="r") if position_file.exists() else None
        self.objective = objective
        self.lengths = np.diff(self.offsets).tolist()

    @staticmethod
    def exists(directory: Path, split: str) -> bool:
        path = Path(directory) / f"{split}.offsets.npy"
        return path.exists() and len(np.load(path)) > 1

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        input_ids = np.asarray(self.input_ids[start:end], dtype=np.int64)
        source = self.input_ids if self.objective == "pt" else self.labels
        labels = np.asarray(source[start:end], dtype=np.int64)
        item = {"input_ids": input_ids, "labels": labels}
        if self.position_ids is not None:
            positions = np.asarray(self.position_ids[start:end], dtype=np.int64)
            labels[positions == 0] = IGNORE
            item["position_ids"] = positions
        return item


class PadCollator:
    """Right-pads a batch to its longest sample.

    Plain rows get an attention_mask (the Trainer counts non-padding tokens with it;
    the train stage drops it before a causal model's forward pass, see
    stages/train.py `without_padding_mask`). Packed rows get none: transformers then
    derives a block-diagonal mask from the position_ids resets, so packed samples
    never attend to each other, and the padding tail is one more (ignored) block.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(item["input_ids"]) for item in items)
        n = len(items)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE, dtype=torch.long)
        packed = "position_ids" in items[0]
        if packed:
            position_ids = torch.arange(width).repeat(n, 1)
        else:
            attention_mask = torch.zeros((n, width), dtype=torch.long)
        for row, item in enumerate(items):
            length = len(item["input_ids"])
            input_ids[row, :length] = torch.from_numpy(item["input_ids"])
            labels[row, :length] = torch.from_numpy(item["labels"])
            if packed:
                position_ids[row, :length] = torch.from_numpy(item["position_ids"])
                position_ids[row, length:] = torch.arange(width - length)
            else:
                attention_mask[row, :length] = 1
        batch = {"input_ids": input_ids, "labels": labels}
        if packed:
            batch["position_ids"] = position_ids
        else:
            batch["attention_mask"] = attention_mask
        return batch


class LengthGroupedSampler(Sampler):
    """transformers' length grouping, reseeded from (seed, epoch) so that a resumed run
    sees exactly the order an uninterrupted one would (the stock sampler draws from the
    global RNG, whose state at an epoch start a resume cannot reproduce)."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))
