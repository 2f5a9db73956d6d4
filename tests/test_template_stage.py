"""The template stage on the bundled tiny-llama tokenizer: artifact contents, workers, packing, pt blocks,
template files (and their sandbox), errors, the light registry, and `tunepipe preview`."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")

from tunepipe.errors import UserError  # noqa: E402
from tunepipe.runtime import chat_template as ct  # noqa: E402
from tunepipe.runtime import template_registry  # noqa: E402
from tunepipe.runtime.context import StepContext  # noqa: E402
from tunepipe.runtime.stages import data, template  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
MODEL = EXAMPLES / "models" / "tiny-llama"


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory) -> dict[str, Path]:
    """Data artifacts built once: sft (identity + tiny_chat, 10% val) and pt (tiny_corpus)."""
    dirs = {}
    for name, datasets, stage in (("sft", ["identity", "tiny_chat"], "sft"), ("pt", ["tiny_corpus"], "pt")):
        out = tmp_path_factory.mktemp(f"data-{name}")
        ctx = StepContext(
            id="data",
            kind="data",
            key="k",
            params={**step_defaults("data"), "dataset": datasets, "val_size": 0.1, "stage": stage},
            inputs={},
            files={"dataset_dir": EXAMPLES / "data"},
            seed=42,
            spec_dir=EXAMPLES,
            out=out,
            work=out / "work",
            log=logging.getLogger("test"),
        )
        data.run(ctx)
        dirs[name] = out
    return dirs


def step_defaults(kind: str) -> dict:
    """Every flag a `kind` step reads, with the catalog's defaults: what the compiler passes."""
    from tunepipe.spec.catalog import load_catalog

    return {f.name: f.default for f in load_catalog().flags.values() if kind in f.used_by}


def run_template(tmp_path: Path, data_dir: Path, files: dict | None = None, **params) -> Path:
    out = tmp_path / f"tpl-{len(list(tmp_path.glob('tpl-*')))}"
    out.mkdir()
    params = {**step_defaults("template"), "template": "chatml", "cutoff_len": 128, "stage": "sft", **params}
    ctx = StepContext(
        id="template",
        kind="template",
        key="k",
        params=params,
        inputs={"data": data_dir},
        files={"model": MODEL, **(files or {})},
        seed=42,
        spec_dir=tmp_path,
        out=out,
        work=out / "work",
        log=logging.getLogger("test"),
    )
    template.run(ctx)
    return out


def load(out: Path, split: str = "train") -> dict[str, np.ndarray]:
    return {p.name.split(".")[1]: np.load(p) for p in out.glob(f"{split}.*.npy")}


def samples(arrays: dict[str, np.ndarray]) -> list[tuple[tuple, tuple]]:
    """(ids, labels) per sample; packed rows are split where the position ids restart."""
    ids, labels = arrays["input_ids"], arrays["labels"]
    if "position_ids" in arrays:
        starts = list(np.flatnonzero(arrays["position_ids"] == 0)) + [len(ids)]
    else:
        starts = arrays["offsets"].tolist()
    return [(tuple(ids[a:b].tolist()), tuple(labels[a:b].tolist())) for a, b in zip(starts, starts[1:])]


def digest(out: Path) -> dict[str, str]:
    return {
        p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file() and "work" not in p.parts
    }


def test_artifact_layout_and_labels(tmp_path, data_dirs):
    out = run_template(tmp_path, data_dirs["sft"])
    stats = json.loads((out / "stats.json").read_text())
    train = load(out)
    assert set(train) == {"input_ids", "labels", "offsets"}
    assert (
        train["input_ids"].dtype == np.int32
        and train["labels"].dtype == np.int32
        and train["offsets"].dtype == np.int64
    )
    assert stats["train"]["samples"] == 62 and stats["val"]["samples"] == 7
    assert train["offsets"][-1] == len(train["input_ids"]) == stats["train"]["tokens"]
    assert int((train["labels"] != -100).sum()) == stats["train"]["trained_tokens"]
    assert sum(stats["train"]["length_histogram"]["counts"]) == stats["train"]["rows"]
    # the first identity sample, token by token: only the answer and its <|im_end|>\n are trained
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    ids, labels = samples(train)[0]
    assert tok.decode(ids) == (
        "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n"
        "I am TinyPipe, a tiny model trained by tunepipe.<|im_end|>\n"
    )
    assert (
        tok.decode([i for i, l in zip(ids, labels) if l != -100])
        == "I am TinyPipe, a tiny model trained by tunepipe.<|im_end|>\n"
    )
    info = json.loads((out / "template.json").read_text())
    assert info["name"] == "chatml" and info["stop_words"] == ["<|im_end|>"] and info["eos_token"] == "<|endoftext|>"
    assert info["stop_token_ids"] == sorted({tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id})
    # inference prompts the way training rendered, through the saved tokenizer and its chat template
    messages = [{"role": "user", "content": "Who are you?"}]
    prompt = ct.encode_prompt(tok, info, messages)
    assert prompt == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert tok.decode(prompt) == "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n"


def test_one_or_two_workers_give_the_same_bytes(tmp_path, data_dirs):
    for name, extra in (("sft", {}), ("sft", {"packing": True}), ("pt", {"stage": "pt"})):
        one = run_template(tmp_path, data_dirs[name], preprocessing_num_workers=1, **extra)
        two = run_template(tmp_path, data_dirs[name], preprocessing_num_workers=2, **extra)
        assert digest(one) == digest(two)


def test_packing_fills_rows_and_restarts_positions(tmp_path, data_dirs):
    plain = load(run_template(tmp_path, data_dirs["sft"], cutoff_len=64))
    packed = load(run_template(tmp_path, data_dirs["sft"], cutoff_len=64, packing=True))
    rows = np.diff(packed["offsets"])
    assert rows.max() <= 64 and len(rows) < len(np.diff(plain["offsets"]))
    assert np.array_equal(packed["input_ids"].size, plain["input_ids"].size)
    # position ids count 0.. within every packed sample, and every row starts a sample
    pos = packed["position_ids"]
    assert all(pos[a] == 0 for a in packed["offsets"][:-1])
    starts = np.flatnonzero(pos == 0)
    for a, b in zip(starts, list(starts[1:]) + [len(pos)]):
        assert pos[a:b].tolist() == list(range(b - a))
    # the same samples, ids and labels, only regrouped
    assert sorted(samples(packed)) == sorted(samples(plain))


def test_truncation_respects_cutoff_and_is_counted(tmp_path, data_dirs):
    out = run_template(tmp_path, data_dirs["sft"], cutoff_len=24)
    train, stats = load(out), json.loads((out / "stats.json").read_text())["train"]
    assert np.diff(train["offsets"]).max() <= 24
    assert stats["truncated"] > 0
    assert all(any(label != -100 for label in labels) for _, labels in samples(train))


def test_pt_concatenates_with_eos_and_cuts_blocks(tmp_path, data_dirs):
    out = run_template(tmp_path, data_dirs["pt"], stage="pt", cutoff_len=100)
    train = load(out)
    blocks = np.diff(train["offsets"])
    assert (blocks[:-1] == 100).all() and 0 < blocks[-1] <= 100
    assert np.array_equal(train["labels"], train["input_ids"])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    texts = [json.loads(line)["text"] for line in (data_dirs["pt"] / "train.jsonl").read_text().splitlines()]
    assert tok.decode(train["input_ids"][:200]).startswith(texts[0] + "<|endoftext|>" + texts[1] + "<|endoftext|>")


def test_auto_uses_the_tokenizers_chat_template(tmp_path, data_dirs):
    auto = run_template(tmp_path, data_dirs["sft"], template="auto")
    chatml = run_template(tmp_path, data_dirs["sft"], template="chatml")
    for name in ("input_ids", "labels", "offsets"):
        assert np.array_equal(load(auto)[name], load(chatml)[name])


def test_default_system_and_completion(tmp_path, data_dirs):
    from transformers import AutoTokenizer

    out = run_template(tmp_path, data_dirs["sft"], template="qwen", default_system="You are TinyPipe.")
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    ids, _ = samples(load(out))[0]
    assert tok.decode(ids).startswith("<|im_start|>system\nYou are TinyPipe.<|im_end|>\n<|im_start|>user\nWho are you?")
    out = run_template(tmp_path, data_dirs["sft"], template_type="completion")
    ids, labels = samples(load(out))[0]
    assert tok.decode(ids) == "Who are you?I am TinyPipe, a tiny model trained by tunepipe.<|endoftext|>"
    assert (
        tok.decode([i for i, l in zip(ids, labels) if l != -100])
        == "I am TinyPipe, a tiny model trained by tunepipe.<|endoftext|>"
    )


def test_template_files_yaml_and_jinja(tmp_path, data_dirs):
    from transformers import AutoTokenizer

    slots = tmp_path / "mine.yaml"
    slots.write_text('user: "Q: {{content}}\\n"\nassistant_header: "A:"\nassistant: " {{content}}{{eos_token}}\\n"\n')
    out = run_template(tmp_path, data_dirs["sft"], files={"template_file": slots}, template="auto")
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    ids, labels = samples(load(out))[0]
    assert tok.decode(ids) == "Q: Who are you?\nA: I am TinyPipe, a tiny model trained by tunepipe.<|endoftext|>\n"
    assert json.loads((out / "template.json").read_text())["name"] == "mine"

    jinja = tmp_path / "mine.jinja"
    jinja.write_text(
        "{% for m in messages %}{% if m['role'] == 'user' %}<<{{ m['content'] }}>>{% else %}"
        "{{ m['content'] + eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}{% endif %}"
    )
    out = run_template(tmp_path, data_dirs["sft"], files={"template_file": jinja})
    ids, labels = samples(load(out))[0]
    assert tok.decode(ids) == "<<Who are you?>>I am TinyPipe, a tiny model trained by tunepipe.<|endoftext|>"
    assert (
        tok.decode([i for i, l in zip(ids, labels) if l != -100])
        == "I am TinyPipe, a tiny model trained by tunepipe.<|endoftext|>"
    )


def test_sandbox_stops_templates_reaching_python_internals(tmp_path, data_dirs):
    evil = tmp_path / "evil.jinja"
    evil.write_text(
        "{{ messages.__class__.__mro__[1].__subclasses__() }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(UserError, match="evil.jinja: the template tried to reach Python internals"):
        run_template(tmp_path, data_dirs["sft"], files={"template_file": evil})
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}\n{{ m['content'] }")
    with pytest.raises(UserError, match="broken.jinja:2: Jinja syntax error"):
        run_template(tmp_path, data_dirs["sft"], files={"template_file": broken})
    bad_keys = tmp_path / "bad.yaml"
    bad_keys.write_text("usr: '{{content}}'\n")
    with pytest.raises(UserError, match="unknown template keys usr"):
        run_template(tmp_path, data_dirs["sft"], files={"template_file": bad_keys})


def test_bad_template_files_are_user_errors_naming_file_and_slot(tmp_path, data_dirs):
    """A mistyped slot or a file that is not UTF-8 is a UserError (exit 2) naming the file (and
    slot), not a TypeError / UnicodeDecodeError from deep inside the stage."""
    from tunepipe.runtime.template_registry import check_template_file

    stop = tmp_path / "stop.yaml"
    stop.write_text("user: '{{content}}'\nstop_words: 5\n")
    with pytest.raises(UserError, match=r"stop.yaml: slot stop_words must be a list of strings, got int 5"):
        run_template(tmp_path, data_dirs["sft"], files={"template_file": stop})
    items = tmp_path / "items.yaml"
    items.write_text("stop_words: ['<|im_end|>', 3]\nstrip_content: 'yes please'\nuser: [a]\nfunction: null\n")
    with pytest.raises(UserError, match="items.yaml: slot stop_words must be a list of strings") as err:
        run_template(tmp_path, data_dirs["sft"], files={"template_file": items})
    rest = " ".join(err.value.details)
    assert "slot strip_content must be true or false" in rest and "slot user must be a string" in rest
    assert "function" not in rest  # null is what function's default is
    latin = tmp_path / "latin.jinja"
    latin.write_bytes("{% for m in messages %}{{ m['content'] }} é{% endfor %}".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin.jinja: not UTF-8 text \(byte 0xe9"):
        run_template(tmp_path, data_dirs["sft"], files={"template_file": latin})

    # The same checks, light, for `validate`: problems as text, no exception.
    assert check_template_file(stop) == [f"{stop}: slot stop_words must be a list of strings, got int 5"]
    assert len(check_template_file(items)) == 3
    assert check_template_file(latin)[0].startswith(f"{latin}: not UTF-8 text")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}\n{{ m['content'] }")
    assert check_template_file(broken) == [f"{broken}:2: Jinja syntax error: unexpected '}}'"]
    assert check_template_file(tmp_path / "missing.jinja")[0].startswith(f"{tmp_path / 'missing.jinja'}: cannot read")
    good = tmp_path / "good.yaml"
    good.write_text('user: "Q: {{content}}\\n"\nstop_words: ["</s>"]\nsystem_in_user: true\n')
    assert check_template_file(good) == []
    code = (
        "import sys; from tunepipe.runtime.template_registry import check_template_file as c; "
        f"assert c({str(broken)!r}) and not c({str(good)!r}); "
        "assert not {'torch', 'transformers', 'numpy'} & set(sys.modules), sorted(sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0


def test_template_errors(tmp_path, data_dirs):
    with pytest.raises(UserError, match="unknown template 'chatgpt'") as err:
        run_template(tmp_path, data_dirs["sft"], template="chatgpt")
    assert "qwen" in " ".join(err.value.details)
    # llama3's stop word is not in tiny-llama's vocabulary: adding it needs a bigger embedding
    with pytest.raises(
        UserError, match="grows to 1418 tokens .added <.eot_id.>. but the model's embedding holds 1417"
    ) as err:
        run_template(tmp_path, data_dirs["sft"], template="llama3")
    assert "resize_vocab" in " ".join(err.value.details)
    out = run_template(tmp_path, data_dirs["sft"], template="llama3", resize_vocab=True)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["added_tokens"] == ["<|eot_id|>"] and stats["vocab_size"] == 1418


def test_registry_is_light_and_listed():
    code = (
        "import sys; from tunepipe.runtime import template_registry as r; rows = r.list_templates(); "
        "print(len(rows), 'torch' in sys.modules, 'transformers' in sys.modules, 'numpy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) >= 21 and out[1:] == ["False", "False", "False"]
    rows = {r["name"]: r for r in template_registry.list_templates()}
    assert rows["qwen"]["default_system"].startswith("You are Qwen") and rows["llama3"]["stop_words"] == ["<|eot_id|>"]
    assert "auto" in template_registry.template_names() and "chatml" in template_registry.template_names()


def test_preview_shows_trained_and_masked_tokens():
    from rich.console import Console

    from tunepipe.preview import preview
    from tunepipe.spec import load_spec

    spec = load_spec(EXAMPLES / "quickstart.yaml")
    buffer = io.StringIO()
    preview(spec.data, EXAMPLES, 2, Console(file=buffer, no_color=True, width=120))
    text = buffer.getvalue()
    assert "template.sft · template chatml · sample 1 of" in text
    assert "<|im_start|>user↵\nWho are you?<|im_end|>↵\n<|im_start|>assistant↵\n⟦I am TinyPipe" in text
    assert "trained by tunepipe.<|im_end|>↵\n⟧" in text


def test_preview_tokenizes_as_the_template_stage_does():
    """preview goes through template.prepare + tokenize_split: packing shows packed rows, and a
    stop word the vocabulary lacks fails preview as it would fail the template step."""
    import copy

    from rich.console import Console

    from tunepipe.preview import preview
    from tunepipe.spec import load_spec

    spec = load_spec(EXAMPLES / "quickstart.yaml").data
    packed = copy.deepcopy(spec)
    packed["template"]["packing"] = True
    buffer = io.StringIO()
    preview(packed, EXAMPLES, 1, Console(file=buffer, no_color=True, width=160))
    text = buffer.getvalue()
    assert "template.sft · template chatml · row 1 (samples packed into 128-token rows)" in text
    assert text.count("<|im_start|>user") >= 2  # several conversations in the one row shown

    llama3 = copy.deepcopy(spec)
    llama3["template"]["template"] = "llama3"
    with pytest.raises(UserError, match="grows to 1418 tokens"):
        preview(llama3, EXAMPLES, 1, Console(file=io.StringIO(), no_color=True, width=160))


# ------------------------------------------------------------------ the tokenizer, without torch
TEXT = "<|im_start|>user\nWho made you?  Numbers 12345 and ünïcode…<|im_end|>\n<|endoftext|>"


def _tokenizer_dir(tmp_path: Path, tokenizer_class: str | None, model_type: str) -> Path:
    d = tmp_path / f"{tokenizer_class or 'unnamed'}-{model_type}"
    d.mkdir()
    for name in ("tokenizer.json", "chat_template.jinja"):
        (d / name).write_bytes((MODEL / name).read_bytes())
    config = json.loads((MODEL / "tokenizer_config.json").read_text())
    config.pop("tokenizer_class")
    if tokenizer_class:
        config["tokenizer_class"] = tokenizer_class
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    (d / "config.json").write_text(json.dumps({"model_type": model_type}))
    return d


# Each rule of AutoTokenizer's choice: the named class, the model type's registered class overriding a
# hub class, model types whose hub class is wrong (qwen2), LlamaTokenizer over a byte-level BPE, no class.
@pytest.mark.parametrize(
    "tokenizer_class,model_type",
    [
        ("TokenizersBackend", "llama"),
        ("TokenizersBackend", "qwen2"),
        ("PreTrainedTokenizerFast", "llama"),
        ("PreTrainedTokenizerFast", "gemma"),
        ("Qwen2Tokenizer", "qwen2"),
        ("Qwen2TokenizerFast", "qwen3"),
        ("Qwen2Tokenizer", "llama"),
        ("LlamaTokenizer", "llama"),
        ("LlamaTokenizerFast", "mistral"),
        ("GPT2Tokenizer", "gpt2"),
        ("GemmaTokenizer", "phi3"),
        (None, "llama"),
    ],
)
def test_tokenizer_loads_as_autotokenizer_does(tmp_path, tokenizer_class, model_type):
    """The template stage's loader (no AutoTokenizer, no torch) gives AutoTokenizer's tokenizer: the
    same class (transformers 5 rebuilds a named class's pre-tokenizer, so the ids depend on it), the
    same ids and special tokens, and the same saved files."""
    from transformers import AutoTokenizer

    from tunepipe.runtime.autotokenizer import autotokenizer_class

    d = _tokenizer_dir(tmp_path, tokenizer_class, model_type)
    ours, theirs = template.load_tokenizer(step_defaults("template"), d), AutoTokenizer.from_pretrained(d)
    assert type(ours) is type(theirs)
    assert (autotokenizer_class(d) is None) == (tokenizer_class is None)
    assert ours(TEXT, add_special_tokens=False)["input_ids"] == theirs(TEXT, add_special_tokens=False)["input_ids"]
    assert ours(TEXT)["input_ids"] == theirs(TEXT)["input_ids"]
    assert (ours.eos_token, ours.pad_token, ours.bos_token, len(ours)) == (
        theirs.eos_token,
        theirs.pad_token,
        theirs.bos_token,
        len(theirs),
    )
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "theirs" / name).read_bytes()


def test_template_step_imports_no_torch(tmp_path, data_dirs):
    """The template stage's whole work (tokenizer, render, tokenize, arrays, save) in a fresh process
    imports neither torch nor transformers' modeling or configuration code."""
    script = f"""
import json, logging, sys
from pathlib import Path
sys.path.insert(0, {str(REPO / "tests")!r})
from test_template_stage import step_defaults
from tunepipe.runtime.context import StepContext
from tunepipe.runtime.stages import template
out = Path({str(tmp_path / "out")!r}); out.mkdir()
params = {{**step_defaults("template"), "template": "qwen", "cutoff_len": 64, "stage": "sft"}}
ctx = StepContext(id="template", kind="template", key="k", params=params, inputs={{"data": {str(data_dirs["sft"])!r}}},
                  files={{"model": {str(MODEL)!r}}}, seed=0, spec_dir=Path("."), out=out, work=out / "w",
                  log=logging.getLogger("t"))
template.run(ctx)
heavy = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "transformers.modeling",
               "transformers.configuration_utils", "transformers.models.auto")))
print(json.dumps(heavy))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
    assert np.load(tmp_path / "out" / "train.input_ids.npy").size > 0


def test_nfc_text_skips_the_nfc_normalizer_with_the_same_ids(tmp_path):
    """Qwen2's tokenizer normalizes to NFC; batches of text already in NFC are encoded without the
    normalizer (faster), a batch holding decomposed text with it: the ids and labels are the same."""
    d = _tokenizer_dir(tmp_path, "Qwen2Tokenizer", "qwen2")
    tokenizer = template.load_tokenizer(step_defaults("template"), d)
    assert type(tokenizer.backend_tokenizer.normalizer).__name__ == "NFC"
    renderer, _ = ct.resolve({"template": "qwen"}, tokenizer, None)
    records = [
        {"messages": [{"role": "user", "content": f"Q{i} café"}, {"role": "assistant", "content": f"A{i} naïve"}]}
        for i in range(40)
    ]
    records[25]["messages"][1]["content"] = "decomposed: cafe\u0301"  # NFC changes this text
    fast = ct.encode(tokenizer, renderer, records, 64, batch_size=10)  # 4 batches, one not in NFC
    plain = ct.encode(tokenizer, renderer, records, 64, batch_size=100)  # fewer records than a batch: no copy
    assert [e.input_ids.tolist() for e in fast] == [e.input_ids.tolist() for e in plain]
    assert [e.labels.tolist() for e in fast] == [e.labels.tolist() for e in plain]
    assert ct._without_nfc(tokenizer.backend_tokenizer) is not None


@pytest.mark.parametrize("packing", [False, True])
def test_build_sft_gathers_what_the_per_sample_definition_gives(packing):
    """build_sft works on the samples back to back (ct.Encodings) with index arithmetic; its arrays and
    stats equal the definition sample by sample: samples without a trained token dropped (empty ones
    too), the others in order or packed best-fit, positions restarting per sample."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(300):
        n = int(rng.integers(0, 40)) if i % 17 else 0
        ids = rng.integers(0, 1000, n).astype(np.int32)
        labels = np.where(rng.random(n) < (0.0 if i % 5 == 0 else 0.6), ids, ct.IGNORE).astype(np.int32)
        samples.append(ct.Encoded(ids, labels, bool(i % 7 == 0)))
    arrays, stats = template.build_sft(ct.Encodings.of(samples), 64, packing)

    kept = [e for e in samples if (e.labels != ct.IGNORE).any()]
    lengths = [len(e.input_ids) for e in kept]
    rows = template.pack(lengths, 64) if packing else [[i] for i in range(len(kept))]
    order = [kept[i] for row in rows for i in row]
    expected = {
        "input_ids": np.concatenate([e.input_ids for e in order]).astype(np.int32),
        "labels": np.concatenate([e.labels for e in order]).astype(np.int32),
        "offsets": np.cumsum([0] + [sum(lengths[i] for i in row) for row in rows]).astype(np.int64),
    }
    if packing:
        expected["position_ids"] = np.concatenate([np.arange(len(e.input_ids)) for e in order]).astype(np.int32)
    assert arrays.keys() == expected.keys()
    for name, array in expected.items():
        assert arrays[name].dtype == array.dtype and arrays[name].tolist() == array.tolist(), name
    assert 0 < len(kept) < len(samples) and stats == {
        "samples": 300,
        "rows": len(rows),
        "tokens": sum(lengths),
        "trained_tokens": int(sum((e.labels != ct.IGNORE).sum() for e in kept)),
        "truncated": sum(e.truncated for e in samples),
        "dropped": 300 - len(kept),
        "length_histogram": template.histogram(lengths, 64),
    }


@pytest.mark.parametrize(
    ("sizes", "shards", "bounds"),
    [
        ([1] * 10, 2, [(0, 5), (5, 10)]),
        ([1] * 10, 3, [(0, 4), (4, 7), (7, 10)]),
        ([100, 1, 1, 1], 2, [(0, 1), (1, 4)]),  # by work, not by count
        ([1, 1, 1, 97], 2, [(0, 3), (3, 4)]),
        ([1] * 7 + [100], 3, [(0, 6), (6, 7), (7, 8)]),  # no shard empty, even when one item is most work
        ([5, 5], 2, [(0, 1), (1, 2)]),
    ],
)
def test_shards_hold_equal_work_in_order(sizes, shards, bounds):
    assert template.shard_bounds(sizes, shards) == bounds
