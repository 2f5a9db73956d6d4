"""Peak RSS and wall time of tunepipe's streaming LoRA merge against peft's merge_and_unload.

    python bench/merge.py [--hidden 2048] [--layers 12] [--intermediate 2816] [--vocab 16384]
                          [--rank 16] [--shard-size 1GB] [--dir DIR]

One random Llama built from a config (default ≈ 400M parameters, 1.6 GB of float32 weights),
saved sharded, and one rank-16 LoRA adapter on every linear layer but the head (lora_B random,
so the merge changes every adapted tensor). Then, each in its own process, one after the other
(the base model in the page cache for both, dirty pages flushed before each):

  peft        AutoModelForCausalLM.from_pretrained + PeftModel.from_pretrained(...).merge_and_unload()
              + save_pretrained: what LLaMA-Factory's export does
  streaming   tunepipe.runtime.merge.merge_lora: tensor by tensor over the safetensors shards

Wall time is the child's, from start to exit (imports included); peak RSS is the child's
ru_maxrss (os.wait4). The two outputs are then compared tensor by tensor (max |Δ| relative to
the tensor's magnitude, in float32 epsilons). Bar: RSS ≤ 0.3× and time ≤ 1.0× of peft's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BAR_RSS, BAR_TIME = 0.3, 1.0


# ---------------------------------------------------------------- children


def setup(directory: Path, args) -> None:
    """The random base model (sharded safetensors) and a LoRA adapter with a random B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128, num_key_value_heads=args.hidden // 512,
        max_position_embeddings=2048, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory / "base", max_shard_size=args.shard_size)
    targets = sorted(
        {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"}
    )
    peft_model = get_peft_model(
        model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets, task_type="CAUSAL_LM")
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.01 * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(directory / "adapter")


def run_peft(directory: Path, args) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory / "base", dtype=torch.float32)
    model = PeftModel.from_pretrained(model, directory / "adapter").merge_and_unload()
    model.save_pretrained(directory / "peft", max_shard_size=args.shard_size)


def run_streaming(directory: Path, args) -> None:
    from transformers.utils.hub import convert_file_size_to_int

    from tunepipe.runtime.merge import merge_lora

    shard_size = convert_file_size_to_int(args.shard_size)
    merge_lora(directory / "base", [directory / "adapter"], directory / "streaming", shard_size=shard_size)


CHILDREN = {"setup": setup, "peft": run_peft, "streaming": run_streaming}


# ---------------------------------------------------------------- parent


def child(role: str, directory: Path, argv: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one child process running `role`."""
    os.sync()  # the previous child's dirty pages are not this one's to write
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, __file__, "--child", role, "--dir", str(directory), *argv])
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{role} failed with status {os.waitstatus_to_exitcode(status)}")
    return wall, usage.ru_maxrss * 1024  # KiB on Linux


def compare(a: Path, b: Path) -> tuple[int, float]:
    """(tensors compared, max |Δ| / (max|x|·eps)) over two merged directories, one tensor at a time."""
    import torch
    from safetensors import safe_open

    from tunepipe.runtime.merge import _base_tensors

    left, right = _base_tensors(a), _base_tensors(b)
    if sorted(left) != sorted(right):
        raise SystemExit(f"different tensors: {sorted(set(left) ^ set(right))[:5]}")
    worst = 0.0
    for name in sorted(left):
        with safe_open(left[name][0], "pt") as f, safe_open(right[name][0], "pt") as g:
            x, y = f.get_tensor(name).float(), g.get_tensor(name).float()
        scale = max(x.abs().max().item(), 1.0) * torch.finfo(torch.float32).eps
        worst = max(worst, (x - y).abs().max().item() / scale)
    return len(left), worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--shard-size", default="1GB")
    parser.add_argument("--dir", type=Path, help="work directory (default: a temporary one, removed after)")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        CHILDREN[args.child](args.dir, args)
        return
    argv = [f"--{k}={v}" for k, v in (("hidden", args.hidden), ("layers", args.layers), ("intermediate", args.intermediate),
                                       ("vocab", args.vocab), ("rank", args.rank), ("shard-size", args.shard_size))]  # fmt: skip
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        directory = Path(tmp)
        child("setup", directory, argv)
        size = sum(f.stat().st_size for f in (directory / "base").glob("*.safetensors"))
        print(f"model: {size / 1e9:.2f} GB of float32 weights in {len(list((directory / 'base').glob('*.safetensors')))} shards, "
              f"LoRA rank {args.rank} on every linear layer (load average {os.getloadavg()[0]:.1f})")  # fmt: skip
        peft_wall, peft_rss = child("peft", directory, argv)
        ours_wall, ours_rss = child("streaming", directory, argv)
        tensors, error = compare(directory / "streaming", directory / "peft")
        rss_ratio, time_ratio = ours_rss / peft_rss, ours_wall / peft_wall
        print(f"{'':24}{'wall s':>10}{'peak RSS MB':>14}")
        print(f"{'peft merge_and_unload':24}{peft_wall:10.1f}{peft_rss / 2**20:14.0f}")
        print(f"{'tunepipe streaming':24}{ours_wall:10.1f}{ours_rss / 2**20:14.0f}")
        print(f"ratios: RSS {rss_ratio:.2f}× (bar ≤ {BAR_RSS}×), time {time_ratio:.2f}× (bar ≤ {BAR_TIME}×)")
        print(f"merged tensors: {tensors} compared, max |Δ| = {error:.2f} float32 eps of the tensor's magnitude")
        print(json.dumps({"peft": {"wall_s": peft_wall, "rss_bytes": peft_rss}, "streaming": {"wall_s": ours_wall, "rss_bytes": ours_rss},
                          "rss_ratio": rss_ratio, "time_ratio": time_ratio, "max_error_eps": error, "model_bytes": size}))  # fmt: skip
        ok = rss_ratio <= BAR_RSS and time_ratio <= BAR_TIME and error <= 1.0
        sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
