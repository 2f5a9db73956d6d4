"""One module per stage. This file stays light: the compiler reads STAGE_VERSIONS without torch.

Bump a stage's version when the bytes it produces for the same inputs change.
"""

STAGE_VERSIONS: dict[str, int] = {
    "data": 1,
    "template": 1,
    "train": 4,
    "merge": 1,
    "quantize": 1,
    "export": 1,
    "verify": 1,
    "infer": 1,
}
