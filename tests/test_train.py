"""The train stage: what each finetuning_type trains, objectives, chaining, adapters, plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_support import chain, make_ctx, pretrained, tiny_model, tokenized, train_params  # noqa: F401

from tunepipe.errors import UserError
from tunepipe.runtime.stages import train


def run_train(tmp, model, data, step_id="train", base=None, **overrides):
    ctx = make_ctx(tmp, train_params(**overrides), data=data, model=model, base=base, step_id=step_id)
    metrics = train.run(ctx)
    return ctx.out, metrics


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tokenized(tmp_path_factory.mktemp("data"), n=24, val=4)


def weights(directory):
    return load_file(directory / "model.safetensors")


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in after if not torch.equal(before[k], after[k])}


# ---------------------------------------------------------------- what trains


def test_lora_all_targets_exactly_the_linear_layers_but_the_head(tmp_path, pretrained, data):
    out, metrics = run_train(tmp_path, pretrained, data, lora_target=["all"], max_steps=3)
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    adapted = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in adapter}
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(pretrained)
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert adapted == linear and len(linear) == 14  # 7 per layer × 2 layers; lm_head is not adapted
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in adapter)
    # lora_B starts at zero: after training every adapter has learned something
    assert all(adapter[k].abs().sum() > 0 for k in adapter if "lora_B" in k)
    assert metrics["trainable_params"] == sum(v.numel() for v in adapter.values())
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 32 and config["lora_dropout"] == 0.05
    assert config["target_modules"] == sorted(config["target_modules"])  # stable bytes


def test_lora_flags_reach_the_adapter(tmp_path, data):
    model = tiny_model(tmp_path / "m", attention_bias=True)
    out, _ = run_train(
        tmp_path, model, data, lora_target=["q_proj", "v_proj"], lora_rank=4, lora_alpha=8.0, lora_dropout=0.0,
        lora_bias="all", lora_fan_in_fan_out=False, max_steps=2,
    )  # fmt: skip
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"], config["bias"]) == (4, 8.0, 0.0, "all")
    assert config["target_modules"] == ["q_proj", "v_proj"]
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    assert {k.split(".")[-3] for k in adapter if ".lora_" in k} == {"q_proj", "v_proj"}
    # lora_bias: all trains (and saves) every bias of the model, adapted layer or not
    assert "base_model.model.model.layers.0.self_attn.k_proj.bias" in adapter


def test_lora_target_unknown_module_is_a_user_error(tmp_path, pretrained, data):
    with pytest.raises(UserError, match="no module named qkv"):
        run_train(tmp_path, pretrained, data, lora_target=["qkv"])


def test_freeze_trains_exactly_the_top_layers_and_the_head(tmp_path, pretrained, data):
    before = weights(pretrained)
    out, metrics = run_train(
        tmp_path, pretrained, data, finetuning_type="freeze", freeze_trainable_layers=1, max_steps=3
    )
    after = weights(out / "model")
    trained = changed(before, after)
    expected = {k for k in before if k.startswith("model.layers.1.") or k == "lm_head.weight"}
    assert trained == expected
    assert metrics["trainable_params"] == sum(before[k].numel() for k in expected)

    out2, _ = run_train(
        tmp_path, pretrained, data, step_id="two", finetuning_type="freeze", freeze_trainable_layers=2, max_steps=3
    )
    assert changed(before, weights(out2 / "model")) == {
        k for k in before if k.startswith("model.layers.") or k == "lm_head.weight"
    }

    with pytest.raises(UserError, match="between 1 and 2"):
        run_train(tmp_path, pretrained, data, step_id="three", finetuning_type="freeze", freeze_trainable_layers=3)


def test_freeze_trains_a_tied_head(tmp_path, data):
    """With tie_word_embeddings the head is the input embedding matrix: training the head trains it."""
    tied = tiny_model(tmp_path / "tied", tie_word_embeddings=True)
    before = weights(tied)
    out, _ = run_train(tmp_path, tied, data, finetuning_type="freeze", freeze_trainable_layers=1, max_steps=2)
    assert changed(before, weights(out / "model")) == {
        k for k in before if k.startswith("model.layers.1.") or k == "model.embed_tokens.weight"
    }


def test_full_trains_every_tensor(tmp_path, pretrained, data):
    before = weights(pretrained)
    out, metrics = run_train(tmp_path, pretrained, data, finetuning_type="full", max_steps=3)
    assert changed(before, weights(out / "model")) == set(before)
    assert metrics["trainable_params"] == sum(v.numel() for v in before.values())
    assert json.loads((out / "train.json").read_text())["finetuning_type"] == "full"


def test_none_trains_nothing_and_keeps_the_model(tmp_path, pretrained, data):
    out, metrics = run_train(tmp_path, pretrained, data, finetuning_type="none")
    assert changed(weights(pretrained), weights(out / "model")) == set()
    assert metrics["trainable_params"] == 0 and "eval_loss" in metrics


# ---------------------------------------------------------------- objectives and chaining


def test_pretrain_from_scratch_then_sft_continues_it(tmp_path):
    """A spec with two train steps: pt (full, from a config only) then sft (LoRA) on its model."""
    corpus = tokenized(tmp_path / "pt-data", objective="pt", n=48, packed=128)  # rows of 128 tokens
    chat = tokenized(tmp_path / "sft-data", n=16)
    from test_train_support import TINY

    pt_out, pt = run_train(
        tmp_path, TINY, corpus, step_id="pretrain", stage="pt", finetuning_type="full", train_from_scratch=True,
        learning_rate=3e-3, max_steps=12, plot_loss=True,
    )  # fmt: skip
    history = json.loads((pt_out / "trainer_state.json").read_text())["log_history"]
    losses = [e["loss"] for e in history if "loss" in e]
    assert losses[-1] < losses[0] - 0.5  # the random model learns the corpus
    assert (pt_out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    sft_out, _ = run_train(tmp_path, None, chat, step_id="sft", base=pt_out, max_steps=4)
    info = json.loads((sft_out / "train.json").read_text())
    assert info["base"]["kind"] == "artifact" and info["stage"] == "sft"

    from tunepipe.runtime.modeling import load_trained

    merged, _ = load_trained(sft_out, artifacts=chain(sft_out))
    pretrained_weights = weights(pt_out / "model")
    merged_weights = merged.state_dict()
    moved = {k for k, v in pretrained_weights.items() if not torch.equal(v, merged_weights[k])}
    # the sft model is the pt model plus the LoRA update of its linear layers, nothing else
    assert moved and all(k.endswith("proj.weight") for k in moved)
    assert torch.equal(merged_weights["model.embed_tokens.weight"], pretrained_weights["model.embed_tokens.weight"])


def test_from_scratch_lora_keeps_its_base(tmp_path, data):
    """A LoRA adapter on a from-scratch init: the init is saved beside it, and reloads exactly."""
    from test_train_support import TINY

    from tunepipe.runtime.modeling import load_trained

    out, _ = run_train(tmp_path, TINY, data, train_from_scratch=True, max_steps=2)
    assert (out / "base" / "model.safetensors").is_file()
    model, _ = load_trained(out)
    base = load_file(out / "base" / "model.safetensors")
    assert torch.equal(model.state_dict()["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert not torch.equal(
        model.state_dict()["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"]
    )


def test_continue_from_adapters(tmp_path, pretrained, data):
    """lora_weight_path / adapter_name_or_path / adapter_folder: the last adapter is trained further,
    the ones before it are merged into the base (learning_rate 0 keeps the loaded values)."""
    first, _ = run_train(tmp_path, pretrained, data, step_id="a", max_steps=2, seed=1)
    second, _ = run_train(tmp_path, pretrained, data, step_id="b", max_steps=2, seed=2)
    a, b = first / "adapter", second / "adapter"

    out, _ = run_train(tmp_path, pretrained, data, step_id="c", lora_weight_path=str(a), learning_rate=0.0, max_steps=1)
    assert _same_adapter(out / "adapter", a)

    out, _ = run_train(
        tmp_path, pretrained, data, step_id="d", adapter_name_or_path=[str(a), str(b)], learning_rate=0.0, max_steps=1
    )
    assert _same_adapter(out / "adapter", b) and not _same_adapter(out / "adapter", a)
    assert json.loads((out / "train.json").read_text())["base"]["merged_adapters"] == [str(a)]

    folder = tmp_path / "adapters"
    folder.mkdir()
    (folder / "1-first").symlink_to(a)
    (folder / "2-second").symlink_to(b)
    out, _ = run_train(
        tmp_path, pretrained, data, step_id="e", adapter_folder="adapters", learning_rate=0.0, max_steps=1
    )
    assert _same_adapter(out / "adapter", b)
    assert json.loads((out / "train.json").read_text())["base"]["merged_adapters"] == ["adapters/1-first"]  # as written

    out, _ = run_train(
        tmp_path, pretrained, data, step_id="f", lora_weight_path=str(a), learning_rate=1e-2, max_steps=2
    )
    assert not _same_adapter(out / "adapter", a)  # and with a learning rate it trains on

    with pytest.raises(UserError, match="adapter_config.json missing"):
        run_train(tmp_path, pretrained, data, step_id="g", lora_weight_path="nowhere")


def test_lora_on_a_local_model_gives_the_same_bytes_in_any_checkout(tmp_path, pretrained, data):
    """train.json names the base model and merged adapters as the spec wrote them (relative to the
    spec), never by absolute path; load_trained finds them through model_dir / spec_dir."""
    import shutil

    from tunepipe.runtime.modeling import load_trained

    adapter, _ = run_train(tmp_path, pretrained, data, step_id="a", max_steps=1)
    outs = []
    for checkout in ("one", "two"):
        root = tmp_path / checkout
        shutil.copytree(pretrained, root / "models" / "tiny")
        for name in ("first", "second"):
            shutil.copytree(adapter / "adapter", root / "adapters" / name)
        params = dict(model_name_or_path="models/tiny", adapter_name_or_path=["adapters/first", "adapters/second"],
                      max_steps=2)  # fmt: skip
        ctx = make_ctx(
            root, train_params(**params), data=data, model=(root / "models" / "tiny").resolve(), step_id="sft"
        )
        train.run(ctx)
        outs.append(ctx.out)
    one, two = outs
    info = json.loads((one / "train.json").read_text())
    assert info["base"]["kind"] == "model" and info["base"]["path"] == "models/tiny"
    assert info["base"]["merged_adapters"] == ["adapters/first"]
    assert (one / "train.json").read_bytes() == (two / "train.json").read_bytes()
    assert (one / "adapter" / "adapter_config.json").read_bytes() == (
        two / "adapter" / "adapter_config.json"
    ).read_bytes()

    # The first checkout's model moves away: load_trained is told where the model and adapters are now.
    shutil.move(tmp_path / "one", tmp_path / "moved")
    moved = tmp_path / "moved"
    model, _ = load_trained(two, model_dir=moved / "models" / "tiny", spec_dir=moved)
    reference, _ = load_trained(two, model_dir=tmp_path / "two" / "models" / "tiny", spec_dir=tmp_path / "two")
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(model(ids).logits, reference(ids).logits)
    shutil.rmtree(tmp_path / "two" / "models")
    with pytest.raises(UserError):  # nothing recorded points at the first machine's directories
        load_trained(two, spec_dir=tmp_path / "two")


def _same_adapter(x, y) -> bool:
    tx, ty = load_file(x / "adapter_model.safetensors"), load_file(y / "adapter_model.safetensors")
    return tx.keys() == ty.keys() and all(torch.equal(tx[k], ty[k]) for k in tx)


# ---------------------------------------------------------------- artifact and plots


def test_artifact_layout_and_plots(tmp_path, pretrained, data, capsys):
    out, metrics = run_train(
        tmp_path, pretrained, data, plot_loss=True, plot_lora_matrix=True, evaluation_strategy="steps", eval_steps=2,
        max_steps=4, disable_tqdm=False,
    )  # fmt: skip
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert names == {
        "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json", "tokenizer/chat_template.jinja", "template.json", "train.json",
        "trainer_state.json", "metrics.json", "loss.png", "lora_matrix.png", "lora_matrix.json",
    }  # fmt: skip
    assert json.loads((out / "template.json").read_text())["stop_words"] == ["<|im_end|>"]
    state = json.loads((out / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "eval_loss" in e] == [2, 4, 4]  # every 2 steps + final
    assert not any("runtime" in k or "per_second" in k for e in state["log_history"] for k in e)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["steps"] == 4 and saved["eval_loss"] == metrics["eval_loss"] and "tokens_per_s" not in saved
    assert metrics["tokens_per_s"] > 0 and metrics["tokens"] > 0
    report = json.loads((out / "lora_matrix.json").read_text())
    assert len(report["modules"]) == 14 and report["dead"] == [] and report["exploding"] == []
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "tok/s" in capsys.readouterr().err  # the progress bar shows throughput


def test_lora_matrix_flags_dead_adapters(tmp_path, pretrained, data):
    out, _ = run_train(tmp_path, pretrained, data, plot_lora_matrix=True, learning_rate=0.0, max_steps=1)
    report = json.loads((out / "lora_matrix.json").read_text())
    assert len(report["dead"]) == 14  # B is still zero everywhere: nothing learned


def test_evaluation_needs_a_validation_split(tmp_path, pretrained):
    no_val = tokenized(tmp_path / "data", n=8)
    with pytest.raises(UserError, match="validation split"):
        run_train(tmp_path, pretrained, no_val, evaluation_strategy="steps")


def test_artifact_bytes_do_not_depend_on_the_step_id(tmp_path, pretrained, data):
    """The step id is not in the cache key, so no byte may depend on it (loss.png's title did)."""
    a, _ = run_train(tmp_path, pretrained, data, step_id="train.sft", max_steps=2, plot_loss=True)
    b, _ = run_train(tmp_path, pretrained, data, step_id="train.renamed", max_steps=2, plot_loss=True)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert Path("loss.png") in files and files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert [f for f in files if (a / f).read_bytes() != (b / f).read_bytes()] == []
