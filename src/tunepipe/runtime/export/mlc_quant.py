"""MLC-LLM's group quantization (`q4f16_1`, `q4f32_1`, …) in numpy, for the MLC export and a quantize step.

    q_weight, q_scale = quantize_group(w, bits=4, group_size=32, dtype="float16")
    w_hat = dequantize_group(q_weight, q_scale, bits=4, group_size=32, k=w.shape[-1])

The layout is mlc-llm's `GroupQuantize` with `linear_weight_layout="NK"` (python/mlc_llm/quantization/
group_quantization.py and utils.py), which mlc-llm applies to every Linear weight [out, in] and the
embedding [vocab, hidden], grouping along the last axis:

- the weight is first cast to the model dtype (`dtype`), and all arithmetic below runs in that dtype;
- per group of `group_size` consecutive elements: scale = max|w| / max_int, max_int = 2**(bits-1) - 1;
- code = clip(round(w / scale + max_int), 0, 2 * max_int) (round half to even), dequantized as
  (code - max_int) * scale — symmetric, zero point max_int;
- 32 // bits codes per uint32, element r of a word in bits [r*bits, (r+1)*bits) (lowest first);
- a last axis that is not a multiple of `group_size` is padded: padding codes are 0 and q_weight
  has ceil(k / group_size) * group_size / (32 // bits) words per row.

mlc-llm computes this with a TVM kernel of its own package (not on PyPI); this is the same formula
written with numpy, checked bit for bit against that kernel (tests/test_export_mlc.py holds values
it produced), including a group of zeros: scale 0 and codes 0 (mlc-llm's kernel clips its 0/0 to 0),
which dequantizes to exactly 0.
"""

from __future__ import annotations

import numpy as np

from tunepipe.errors import UserError

STORAGE_BITS = 32  # mlc-llm packs into uint32


def _check(bits: int, group_size: int) -> int:
    """Codes per uint32 word, after checking that (bits, group_size) is a layout mlc-llm defines."""
    if bits not in (3, 4, 8):
        raise UserError(
            f"group quantization bits must be 3, 4 or 8, not {bits!r}",
            ["mlc-llm's group quantization stores int3, int4 or int8 codes"],
        )
    per_word = STORAGE_BITS // bits
    if group_size <= 0 or group_size % per_word:
        raise UserError(
            f"group_size {group_size!r} must be a positive multiple of {per_word}",
            [f"{per_word} codes of {bits} bits fill one uint32 word; a group holds whole words"],
        )
    return per_word


def quantize_group(
    weight: np.ndarray, *, bits: int = 4, group_size: int = 32, dtype: str = "float16"
) -> tuple[np.ndarray, np.ndarray]:
    """(q_weight uint32 [..., words], q_scale `dtype` [..., groups]) of `weight`, grouped on its last axis."""
    per_word = _check(bits, group_size)
    max_int = np.array(2 ** (bits - 1) - 1, dtype=dtype)
    w = np.asarray(weight).astype(dtype)
    k = w.shape[-1]
    groups = -(-k // group_size)
    padded = np.zeros((*w.shape[:-1], groups * group_size), dtype=dtype)
    padded[..., :k] = w
    grouped = padded.reshape(*w.shape[:-1], groups, group_size)
    scale = (np.abs(grouped).max(axis=-1) / max_int).astype(dtype)
    safe = np.where(scale == 0, np.array(1, dtype=dtype), scale)[..., None]
    codes = np.clip(np.rint(grouped / safe + max_int), 0, 2 * max_int)
    codes = np.where(scale[..., None] == 0, 0, codes).astype(np.uint32)
    codes = codes.reshape(*w.shape[:-1], groups * group_size)
    codes[..., k:] = 0  # mlc-llm packs padding as zero bits
    words = codes.reshape(*w.shape[:-1], -1, per_word)
    shifts = (np.arange(per_word, dtype=np.uint32) * bits).astype(np.uint32)
    q_weight = np.bitwise_or.reduce(words << shifts, axis=-1).astype(np.uint32)
    return q_weight, scale


def dequantize_group(
    q_weight: np.ndarray, q_scale: np.ndarray, *, bits: int = 4, group_size: int = 32, k: int | None = None
) -> np.ndarray:
    """The weight that (q_weight, q_scale) stand for, in q_scale's dtype; `k` trims the padded last axis."""
    per_word = _check(bits, group_size)
    dtype = q_scale.dtype
    max_int = np.array(2 ** (bits - 1) - 1, dtype=dtype)
    shifts = (np.arange(per_word, dtype=np.uint32) * bits).astype(np.uint32)
    codes = (np.asarray(q_weight, dtype=np.uint32)[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    codes = codes.reshape(*q_weight.shape[:-1], -1)
    scales = np.repeat(q_scale, group_size, axis=-1)[..., : codes.shape[-1]]
    weight = (codes.astype(dtype) - max_int) * scales
    return weight if k is None else weight[..., :k]
