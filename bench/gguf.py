"""tunepipe's GGUF export next to llama.cpp's convert_hf_to_gguf.py: speed, memory and fidelity.

    python bench/gguf.py [--convert PATH] [--types f16,q8_0]    # wall time and peak RSS, as ratios
    python bench/gguf.py --fidelity [--convert PATH]            # logit error / greedy agreement table

PATH is convert_hf_to_gguf.py, a directory holding it, or the llama-cpp-python sdist (.tar.gz), which
ships it under vendor/llama.cpp/; without --convert the script looks for an sdist in /tmp/llsdist
(`pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/llsdist`). When there is
none it says so and measures tunepipe alone.

Speed: a random llama (hidden 2048, 12 layers, 1.26 GiB of float32 weights in 3 safetensors shards,
the bundled tokenizer) is converted by each side in a fresh process, --repeat times per type (medians:
the machine is shared, single runs vary by a third); wall time and
that process's peak RSS (os.wait4's ru_maxrss) are printed with tunepipe/llama.cpp ratios, and
whether both files hold the same tensors (names, types, bytes).
Fidelity: tiny random models of every architecture, converted by both sides, then measured by the same
code (tunepipe.runtime.export.gguf_verify: llama.cpp via llama-cpp-python against the HF model in
float32). llama.cpp has no 4/5-bit writer in Python: its reference for those types is the converter's
f32 file quantized by llama.cpp's own llama_model_quantize, as its users do (llama-quantize).

llama.cpp's converter recognises a tokenizer only from a table of known models, and reads gemma and
phi3 vocabularies only from a SentencePiece tokenizer.model; for the bundled byte-level BPE tokenizer
its pre-tokenizer is set to "gpt-2" and those models read the BPE vocabulary, as tunepipe does.
"""

from __future__ import annotations

import os
import sys

if os.path.realpath(sys.path[0]) == os.path.dirname(os.path.realpath(__file__)):
    sys.path.pop(0)  # before any import: bench/tokenize.py would shadow the standard library's tokenize

import argparse
import json
import logging
import statistics
import subprocess
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # tiny_models
SDIST_DIRS = (Path("/tmp/llsdist"),)
CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
BENCH_CONFIG = {
    "hidden_size": 2048,
    "intermediate_size": 2816,
    "num_hidden_layers": 12,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "max_position_embeddings": 2048,
}
SHARD_BYTES = 500 * 2**20
FIDELITY_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")  # the rest: llama_model_quantize from f32
CHATML = {"name": "auto", "source": "tokenizer", "stop_words": [], "eos_token": "<|endoftext|>"}


# --------------------------------------------------------------------------- the converter
def find_converter(given: str | None, workdir: Path) -> Path | None:
    """convert_hf_to_gguf.py: given, or unpacked from the llama-cpp-python sdist into workdir."""
    candidates = [Path(given)] if given else sorted(p for d in SDIST_DIRS if d.is_dir() for p in d.iterdir())
    for path in candidates:
        if path.name == "convert_hf_to_gguf.py" and path.is_file():
            return path
        if path.is_dir():
            found = sorted(path.rglob("convert_hf_to_gguf.py"))
            if found:
                return found[0]
        if path.name.endswith(".tar.gz") and path.is_file():
            return unpack_converter(path, workdir)
    return None


def unpack_converter(sdist: Path, workdir: Path) -> Path | None:
    with tarfile.open(sdist) as tar:
        members = [
            m
            for m in tar.getmembers()
            if "/vendor/llama.cpp/" in m.name
            and any(m.name.split("/vendor/llama.cpp/", 1)[1].startswith(f) for f in CONVERTER_FILES)
        ]
        tar.extractall(workdir, members=members, filter="data")
    found = sorted(workdir.rglob("convert_hf_to_gguf.py"))
    return found[0] if found else None


def run_converter(convert: Path, model_dir: Path, out_file: Path, outtype: str) -> None:
    """convert_hf_to_gguf.py in this process, told that the bundled tokenizer pre-tokenizes as gpt-2."""
    import runpy

    sys.path[:0] = [str(convert.parent), str(convert.parent / "gguf-py")]
    from conversion import base, gemma, phi

    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    for model_class in (gemma.GemmaModel, gemma.Gemma2Model, phi.Phi3MiniModel):
        model_class.set_vocab = base.TextModel._set_vocab_gpt2
    sys.argv = [str(convert), str(model_dir), "--outfile", str(out_file), "--outtype", outtype]
    runpy.run_path(str(convert), run_name="__main__")


def llama_quantize(source: Path, dest: Path, type: str) -> None:
    import ctypes

    import gguf
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(gguf.LlamaFileType[f"MOSTLY_{type.upper()}"])
    if llama_cpp.llama_model_quantize(str(source).encode(), str(dest).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize {source} → {type} failed")


def run_ours(model_dir: Path, out: Path, type: str) -> None:
    from tunepipe.runtime.export import gguf as gguf_export

    out.mkdir(parents=True, exist_ok=True)
    gguf_export.export(model_dir, out, type=type, template=CHATML, log=logging.getLogger("bench"))


# Runs a command and writes its wall time and peak RSS to a file. It is a fresh, small interpreter on
# purpose: Linux counts into a child's ru_maxrss the resident size of the process it was forked from
# (the memory image exec replaces), so forking the measured child from this bench process, which holds
# the model it built, would report the bench's own size.
LAUNCHER = """import os, sys, time
started = time.perf_counter()
pid = os.spawnv(os.P_NOWAIT, sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(f"{time.perf_counter() - started} {usage.ru_maxrss} {status}")
"""


def measured(args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of `python bench/gguf.py ARGS` as its own process."""
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "log", "w+") as log:
        result = Path(tmp) / "result"
        subprocess.run(
            [sys.executable, "-c", LAUNCHER, str(result), sys.executable, __file__, *args],
            stdout=log,
            stderr=log,
            check=True,
        )
        elapsed, maxrss, status = result.read_text().split()
        if int(status):
            log.seek(0)
            raise RuntimeError(f"bench child {args} failed with status {status}:\n{log.read()[-3000:]}")
    return float(elapsed), int(maxrss) / 1024


# ------------------------------------------------------------------------------------- speed
def build_bench_model(path: Path) -> int:
    """A random llama of BENCH_CONFIG saved as sharded safetensors; returns its weight bytes."""
    import shutil

    import torch
    import transformers
    from safetensors.torch import save_file
    from tiny_models import TOKENIZER, TOKENIZER_FILES, tiny_config

    config = tiny_config("llama")
    for key, value in BENCH_CONFIG.items():
        setattr(config, key, value)
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in transformers.AutoModelForCausalLM.from_config(config).state_dict().items()}
    groups, size = [[]], 0  # tensor names per shard, each shard about SHARD_BYTES
    for name, shape in shapes.items():
        if size >= SHARD_BYTES:
            groups, size = [*groups, []], 0
        groups[-1].append(name)
        size += shape.numel() * 4
    generator = torch.Generator().manual_seed(0)
    path.mkdir(parents=True)
    weight_map, total = {}, 0
    for i, names in enumerate(groups, 1):  # one shard in memory at a time
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        shard = {name: 0.02 * torch.randn(shapes[name], generator=generator) for name in names}
        save_file(shard, path / file, metadata={"format": "pt"})
        total += sum(t.numel() * 4 for t in shard.values())
        weight_map.update(dict.fromkeys(names, file))
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    config.save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copyfile(TOKENIZER / name, path / name)
    return total


def speed(convert: Path | None, types: list[str], workdir: Path, repeat: int) -> None:
    model_dir = workdir / "model"
    weights = build_bench_model(model_dir)
    print(
        f"model: llama {BENCH_CONFIG['hidden_size']}×{BENCH_CONFIG['num_hidden_layers']} layers, "
        f"{weights / 2**30:.2f} GiB float32 in {len(list(model_dir.glob('*.safetensors')))} shards; "
        f"median of {repeat} runs per side, taken in turns"
    )
    if convert is None:
        print(
            "convert_hf_to_gguf.py not found (pass --convert PATH or put the llama-cpp-python sdist in "
            "/tmp/llsdist): measuring tunepipe alone"
        )
    print(
        f"{'type':6} {'tunepipe s':>11} {'llama.cpp s':>12} {'time ×':>7} {'tunepipe MiB':>13} "
        f"{'llama.cpp MiB':>14} {'RSS ×':>6}"
    )
    for type in types:
        ours_out, ref_out = workdir / f"ours-{type}", workdir / f"ref-{type}.gguf"
        runs: dict[str, list[tuple[float, float]]] = {"ours": [], "ref": []}
        for _ in range(repeat):
            runs["ours"].append(measured(["--child-ours", str(model_dir), str(ours_out), type]))
            if convert is not None:
                runs["ref"].append(measured(["--child-convert", str(convert), str(model_dir), str(ref_out), type]))
        ours = [statistics.median(r[k] for r in runs["ours"]) for k in (0, 1)]
        if convert is None:
            print(f"{type:6} {ours[0]:11.1f} {'-':>12} {'-':>7} {ours[1]:13.0f} {'-':>14} {'-':>6}")
            continue
        theirs = [statistics.median(r[k] for r in runs["ref"]) for k in (0, 1)]
        same = same_tensors(ours_out / "model.gguf", ref_out)
        print(
            f"{type:6} {ours[0]:11.1f} {theirs[0]:12.1f} {ours[0] / theirs[0]:7.2f} {ours[1]:13.0f} "
            f"{theirs[1]:14.0f} {ours[1] / theirs[1]:6.2f}   tensors {'identical' if same else 'DIFFER'}"
        )
        (ours_out / "model.gguf").unlink()
        ref_out.unlink()


def same_tensors(a: Path, b: Path) -> bool:
    """Both files hold the same tensors: names, types, shapes and bytes."""
    import gguf
    import numpy as np

    left = {t.name: t for t in gguf.GGUFReader(a).tensors}
    right = {t.name: t for t in gguf.GGUFReader(b).tensors}
    return left.keys() == right.keys() and all(
        left[n].tensor_type == right[n].tensor_type
        and list(left[n].shape) == list(right[n].shape)
        and np.array_equal(left[n].data, right[n].data)
        for n in left
    )


# ---------------------------------------------------------------------------------- fidelity
def fidelity(convert: Path | None, workdir: Path, archs: list[str]) -> None:
    import random

    from tiny_models import ARCHS, make_tiny_model

    from tunepipe.runtime.export import gguf_verify

    log = logging.getLogger("bench")
    rng = random.Random(0)
    probes = [[rng.randrange(3, 1417) for _ in range(rng.randrange(12, 25))] for _ in range(4)]
    print(
        "max relative logit error / greedy agreement over "
        f"{sum(map(len, probes)) + 8 * len(probes)} positions (4 probes + 8-token continuations)"
    )
    print(f"{'arch':8} {'type':6} {'tunepipe rel':>13} {'agree':>6}   {'llama.cpp rel':>13} {'agree':>6}")
    for i, arch in enumerate(archs):
        if arch not in ARCHS:
            raise SystemExit(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
        # a neutral directory name: llama.cpp's converter names the file after it, and llama.cpp applies
        # Phi-3's token rules to any model whose name contains "phi3" (then fails on this vocabulary)
        model_dir = make_tiny_model(arch, workdir / f"model{i}", tie=arch.startswith("gemma"))
        for type in FIDELITY_TYPES:
            ours_dir = workdir / f"{arch}-{type}"
            run_ours(model_dir, ours_dir, type)
            ours = gguf_verify.verify(ours_dir / "model.gguf", model_dir, probes, template=CHATML, log=log)
            line = f"{arch:8} {type:6} {ours['max_rel_logit_error']:13.2e} {ours['greedy_agreement']:6.3f}"
            if convert is not None:
                ref = reference_file(convert, model_dir, workdir, arch, type)
                theirs = gguf_verify.verify(ref, model_dir, probes, template=CHATML, log=log)
                line += f"   {theirs['max_rel_logit_error']:13.2e} {theirs['greedy_agreement']:6.3f}"
            print(line, flush=True)


def reference_file(convert: Path, model_dir: Path, workdir: Path, arch: str, type: str) -> Path:
    out = workdir / f"ref-{arch}-{type}.gguf"
    if type in CONVERTER_TYPES:
        measured(["--child-convert", str(convert), str(model_dir), str(out), type])
    else:
        f32 = reference_file(convert, model_dir, workdir, arch, "f32")
        llama_quantize(f32, out, type)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--convert", help="convert_hf_to_gguf.py, its directory, or the llama-cpp-python sdist")
    parser.add_argument("--types", default="f16,q8_0", help="types to time (default f16,q8_0)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per side and type; medians are printed")
    parser.add_argument("--fidelity", action="store_true", help="the logit-error table on tiny models instead")
    parser.add_argument("--archs", default=None, help="architectures for --fidelity (default: all)")
    parser.add_argument("--child-ours", nargs=3, metavar=("MODEL", "OUT", "TYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--child-convert", nargs=4, metavar=("CONVERT", "MODEL", "OUT", "TYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.child_ours:
        model, out, type = args.child_ours
        run_ours(Path(model), Path(out), type)
        return 0
    if args.child_convert:
        convert, model, out, type = args.child_convert
        run_converter(Path(convert), Path(model), Path(out), type)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        workdir = Path(tmp)
        convert = find_converter(args.convert, workdir / "llama.cpp")
        if args.fidelity:
            from tiny_models import ARCHS

            fidelity(convert, workdir, args.archs.split(",") if args.archs else list(ARCHS))
        else:
            speed(convert, args.types.split(","), workdir, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
