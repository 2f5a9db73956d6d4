"""Each model and training flag of the seed takes effect (or is refused with a clear error)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from test_train_support import TINY, make_ctx, pretrained, tiny_model, tokenized, train_params  # noqa: F401
from transformers import AutoTokenizer

from tunepipe.errors import UserError
from tunepipe.runtime import modeling
from tunepipe.runtime.stages import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tokenized(tmp_path_factory.mktemp("data"), n=24, val=4)


def args_for(tmp_path, has_eval=True, **overrides):
    ctx = make_ctx(tmp_path, train_params(**overrides), data=None)
    return train.training_arguments(ctx, tmp_path / "trainer", has_eval=has_eval)


def run_train(tmp, model, data, step_id="train", **overrides):
    ctx = make_ctx(tmp, train_params(**overrides), data=data, model=model, step_id=step_id)
    return ctx.out, train.run(ctx)


def load(source, tokenizer=None, **flags):
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(source)
    return modeling.load_model(str(source), train_params(**flags), tokenizer)


# ---------------------------------------------------------------- training flags → TrainingArguments


def test_training_flags_reach_training_arguments(tmp_path):
    args = args_for(
        tmp_path, learning_rate=3e-4, num_train_epochs=2.5, max_steps=17, per_device_train_batch_size=3,
        per_device_eval_batch_size=5, gradient_accumulation_steps=4, lr_scheduler_type="cosine_with_restarts",
        weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6, max_grad_norm=0.5,
        logging_steps=7, save_steps=9, save_total_limit=2, evaluation_strategy="steps", eval_steps=3,
        load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True,
        report_to="none", run_name="my-run", disable_tqdm=True, dataloader_num_workers=3,
        dataloader_pin_memory=False, ddp_timeout=99, ddp_find_unused_parameters=True, seed=123,
        no_cuda=True, fsdp="full_shard auto_wrap", tpu_metrics_debug=True,
    )  # fmt: skip
    assert (args.learning_rate, args.num_train_epochs, args.max_steps) == (3e-4, 2.5, 17)
    assert (args.per_device_train_batch_size, args.per_device_eval_batch_size, args.gradient_accumulation_steps) == (
        3,
        5,
        4,
    )
    assert args.lr_scheduler_type == "cosine_with_restarts"
    assert (args.weight_decay, args.adam_beta1, args.adam_beta2, args.adam_epsilon, args.max_grad_norm) == (
        0.1,
        0.8,
        0.95,
        1e-6,
        0.5,
    )
    assert (args.logging_steps, args.save_steps, args.save_total_limit) == (7, 9, 2)
    assert (args.eval_strategy, args.eval_steps, args.load_best_model_at_end) == ("steps", 3, True)
    assert (args.metric_for_best_model, args.greater_is_better) == ("eval_loss", True)
    assert (args.report_to, args.run_name, args.disable_tqdm) == ([], "my-run", True)
    assert (args.dataloader_num_workers, args.dataloader_pin_memory) == (3, False)
    assert (args.ddp_timeout, args.ddp_find_unused_parameters) == (99, True)
    assert (args.seed, args.data_seed, args.use_cpu, args.full_determinism) == (123, 123, True, True)
    assert args.debug == ["tpu_metrics_debug"]
    # the seed's fsdp string is translated by transformers into its fsdp_config (FSDP2)
    assert args.fsdp is True and args.fsdp_config["reshard_after_forward"] is True
    with pytest.raises(UserError, match="only available with FSDP1"):
        args_for(tmp_path, fsdp="hybrid_shard")


def test_warmup_ratio_wins_over_warmup_steps(tmp_path):
    assert args_for(tmp_path, warmup_ratio=0.1, warmup_steps=5).warmup_steps == 0.1  # < 1: a ratio
    assert args_for(tmp_path, warmup_ratio=0.0, warmup_steps=5).warmup_steps == 5
    assert args_for(tmp_path, warmup_ratio=0.25, max_steps=8).get_warmup_steps(8) == 2
    with pytest.raises(UserError, match="warmup_ratio"):
        args_for(tmp_path, warmup_ratio=1.0)


def test_gradient_checkpointing_flags(tmp_path):
    args = args_for(tmp_path, gradient_checkpointing=True, use_reentrant_gc=False)
    assert args.activation_checkpointing and args.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert args_for(tmp_path, gradient_checkpointing=True).activation_checkpointing_kwargs == {"use_reentrant": True}
    assert not args_for(
        tmp_path, gradient_checkpointing=True, disable_gradient_checkpointing=True
    ).activation_checkpointing
    assert not args_for(tmp_path).activation_checkpointing


def test_evaluation_is_off_without_a_validation_split(tmp_path):
    args = args_for(tmp_path, has_eval=False, evaluation_strategy="no", load_best_model_at_end=True)
    assert args.eval_strategy == "no" and not args.load_best_model_at_end


def test_deepspeed_and_fsdp_config_files_are_checked(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="deepspeed: no such file"):
        args_for(tmp_path, deepspeed="ds.json")
    with pytest.raises(UserError, match="fsdp_config: .*bad.json is not a valid JSON file"):
        args_for(tmp_path, fsdp="full_shard", fsdp_config="bad.json")
    (tmp_path / "latin.json").write_bytes('{"a": "é"}'.encode("latin-1"))  # was a UnicodeDecodeError traceback
    with pytest.raises(UserError, match="deepspeed: .*latin.json is not a valid JSON file"):
        args_for(tmp_path, deepspeed="latin.json")
    (tmp_path / "fsdp.json").write_text(json.dumps({"min_num_params": 1000}))
    args = args_for(tmp_path, fsdp="full_shard", fsdp_config="fsdp.json")
    assert args.fsdp_config["min_num_params"] == 1000  # relative to the spec, read by transformers


# ---------------------------------------------------------------- training flags, by their effect


def test_bf16_autocast_with_upcast_layernorm_and_reentrant_checkpointing(tmp_path, pretrained, data):
    """bf16 on CPU: frozen weights load in bfloat16, norms stay float32 (upcast_layernorm), the LoRA
    weights train in float32; reentrant gradient checkpointing works through the frozen embeddings."""
    out, metrics = run_train(
        tmp_path, pretrained, data, bf16=True, upcast_layernorm=True, gradient_checkpointing=True,
        use_reentrant_gc=True, max_steps=3, plot_lora_matrix=True,
    )  # fmt: skip
    assert math.isfinite(metrics["train_loss"])
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in adapter.values()} == {torch.float32}
    report = json.loads((out / "lora_matrix.json").read_text())
    assert report["dead"] == []  # gradients reached every adapter through the checkpointed layers

    model = load(pretrained, bf16=True, upcast_layernorm=True)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes["model.norm.weight"] == dtypes["model.layers.0.input_layernorm.weight"] == torch.float32
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == torch.bfloat16


def test_fp16_autocast_trains_on_cpu(tmp_path, pretrained, data):
    out, metrics = run_train(tmp_path, pretrained, data, fp16=True, max_steps=2)
    assert math.isfinite(metrics["train_loss"])
    model = load(pretrained, fp16=True)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float16  # frozen weights in half


def test_save_total_limit_keeps_the_newest_checkpoints(tmp_path, pretrained, data):
    ctx = make_ctx(tmp_path, train_params(save_steps=1, save_total_limit=2, max_steps=4), data=data, model=pretrained)
    train.run(ctx)
    assert sorted(p.name for p in (ctx.work / "trainer").iterdir()) == ["checkpoint-3", "checkpoint-4"]
    assert not any("checkpoint" in p.as_posix() for p in ctx.out.rglob("*"))  # never in the artifact


def test_lora_all_and_fan_in_fan_out_on_conv1d_layers(tmp_path, data):
    """GPT-2 keeps its linear layers as Conv1D with (in, out) weights: `all` covers them and
    lora_fan_in_fan_out is how peft must read them."""
    import shutil

    from transformers import AutoModelForCausalLM, GPT2Config

    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=1417, n_positions=512, eos_token_id=0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gpt2")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TINY / name, tmp_path / "gpt2" / name)
    out, _ = run_train(tmp_path, tmp_path / "gpt2", data, lora_fan_in_fan_out=True, max_steps=2)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    assert config["target_modules"] == ["c_attn", "c_fc", "c_proj"]
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert adapter["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (8, 32)
    assert adapter["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (96, 8)


def test_early_stopping_and_best_model(tmp_path, pretrained, data):
    """Eval every step; an impossible improvement threshold stops training after `patience` evals
    without improvement; greater_is_better picks the highest eval loss as the best."""
    out, metrics = run_train(
        tmp_path, pretrained, data, evaluation_strategy="steps", eval_steps=1, save_steps=1, max_steps=12,
        load_best_model_at_end=True, early_stopping_patience=2, early_stopping_threshold=100.0,
        greater_is_better=True, metric_for_best_model="loss", learning_rate=1e-2,
    )  # fmt: skip
    state = json.loads((out / "trainer_state.json").read_text())
    evals = [e["eval_loss"] for e in state["log_history"] if "eval_loss" in e][:-1]  # the last is the final evaluate()
    assert metrics["steps"] == 3 and len(evals) == 3  # first eval sets the best, two more without a 100-point gain
    assert state["best_metric"] == max(evals) and state["best_global_step"] == 1 + evals.index(max(evals))
    assert metrics["eval_loss"] == pytest.approx(max(evals))  # the best (highest loss) checkpoint was loaded


def test_tensorboard_events_go_to_logging_dir_not_the_artifact(tmp_path, pretrained, data):
    out, _ = run_train(
        tmp_path, pretrained, data, report_to="tensorboard", logging_dir="tb", max_steps=2, step_id="train.sft"
    )
    events = list((tmp_path / "tb" / "train.sft").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert not any("tfevents" in p.name for p in out.rglob("*"))


def test_seed_changes_init_and_data_order(tmp_path, pretrained, data):
    first, _ = run_train(tmp_path, pretrained, data, step_id="a", seed=1, max_steps=2)
    again, _ = run_train(tmp_path, pretrained, data, step_id="b", seed=1, max_steps=2)
    other, _ = run_train(tmp_path, pretrained, data, step_id="c", seed=2, max_steps=2)
    read = lambda out: (out / "adapter" / "adapter_model.safetensors").read_bytes()  # noqa: E731
    assert read(first) == read(again) != read(other)


@pytest.mark.slow
def test_torch_compile_trains_and_saves_plain_names(tmp_path, pretrained, data):
    out, metrics = run_train(tmp_path, pretrained, data, torch_compile=True, max_steps=2)
    assert metrics["steps"] == 2
    assert not any("_orig_mod" in k for k in load_file(out / "adapter" / "adapter_model.safetensors"))


# ---------------------------------------------------------------- model flags


def test_rope_scaling_extends_the_context(tmp_path):
    model_dir = tiny_model(tmp_path / "m", max_position_embeddings=32)
    plain = load(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    scaled = modeling.load_model(str(model_dir), train_params(rope_scaling="linear"), tokenizer, max_length=100)
    assert scaled.config.rope_parameters["rope_type"] == "linear"
    assert scaled.config.rope_parameters["factor"] == 4.0 and scaled.config.max_position_embeddings == 128
    ids = torch.arange(40)[None]
    assert not torch.allclose(plain(ids).logits, scaled(ids).logits)
    llama3 = modeling.load_model(str(model_dir), train_params(rope_scaling="llama3"), tokenizer, max_length=100)
    assert llama3.config.rope_parameters["original_max_position_embeddings"] == 32
    scaled.save_pretrained(tmp_path / "saved")
    rescaled = modeling.load_model(
        str(tmp_path / "saved"), train_params(rope_scaling="linear"), tokenizer, max_length=100
    )
    assert rescaled.config.rope_parameters["factor"] == 4.0  # a scaled model is not scaled twice


@pytest.mark.parametrize(
    "flags, expected",
    [({}, "eager"), ({"attn_implementation": "sdpa"}, "sdpa"), ({"flash_attn": "sdpa"}, "sdpa"),
     ({"flash_attn": "disabled", "attn_implementation": "sdpa"}, "eager")],
)  # fmt: skip
def test_attention_implementation(pretrained, flags, expected):
    assert load(pretrained, **flags).config._attn_implementation == expected


def test_upcast_lmhead_output(pretrained):
    ids = torch.arange(5)[None]
    assert load(pretrained, bf16=True)(ids).logits.dtype == torch.bfloat16
    assert load(pretrained, bf16=True, upcast_lmhead_output=True)(ids).logits.dtype == torch.float32


def test_strict_dtype_keeps_the_config_dtype(tmp_path):
    model_dir = tiny_model(tmp_path / "m")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    assert load(model_dir).model.embed_tokens.weight.dtype == torch.float32
    assert load(model_dir, strict_dtype=True).model.embed_tokens.weight.dtype == torch.bfloat16


def test_moe_aux_loss_coef(tmp_path):
    from transformers import AutoModelForCausalLM, MixtralConfig

    config = MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, vocab_size=1417, num_local_experts=2, num_experts_per_tok=1)  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "moe")
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    model = modeling.load_model(str(tmp_path / "moe"), train_params(moe_aux_loss_coef=0.5), tokenizer)
    assert model.config.router_aux_loss_coef == 0.5 and model.config.output_router_logits
    ids = torch.arange(8)[None]
    out = model(input_ids=ids, labels=ids)
    plain = modeling.load_model(str(tmp_path / "moe"), train_params(), tokenizer)(input_ids=ids, labels=ids)
    assert out.loss.item() == pytest.approx(plain.loss.item() + 0.5 * out.aux_loss.item(), rel=1e-5)
    with pytest.raises(UserError, match="not a mixture-of-experts"):
        modeling.load_config(str(TINY), {"moe_aux_loss_coef": 0.1})


def test_train_from_scratch_is_seeded_random_init(tmp_path, data):
    a, _ = run_train(tmp_path, TINY, data, step_id="a", train_from_scratch=True, finetuning_type="none", seed=3)
    b, _ = run_train(tmp_path, TINY, data, step_id="b", train_from_scratch=True, finetuning_type="none", seed=3)
    c, _ = run_train(tmp_path, TINY, data, step_id="c", train_from_scratch=True, finetuning_type="none", seed=4)
    weights = lambda out: (out / "model" / "model.safetensors").read_bytes()  # noqa: E731
    assert weights(a) == weights(b) != weights(c)


def test_added_tokens_resize_the_vocabulary(tmp_path, pretrained):
    tokenizer = modeling.load_tokenizer(pretrained, {"add_tokens": ["tunepipe"], "add_special_tokens": ["<|tool|>"]})
    assert len(tokenizer) == 1419 and tokenizer.convert_tokens_to_ids("<|tool|>") == 1418
    assert tokenizer("tunepipe")["input_ids"] == [1417]
    model = modeling.load_model(str(pretrained), train_params(add_tokens=["tunepipe"], resize_vocab=True), tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == 1472  # 1419 padded to a multiple of 64
    with pytest.raises(UserError, match="resize_vocab"):
        modeling.load_model(str(pretrained), train_params(), tokenizer)


def test_resized_vocabulary_trains_and_reloads_with_lora(tmp_path, pretrained):
    data = tokenized(tmp_path / "data", pretrained, n=8, add_special_tokens=["<|tool|>"], resize_vocab=True)
    out, _ = run_train(tmp_path, pretrained, data, resize_vocab=True, max_steps=2)
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    # the grown embedding and head train in full (modules_to_save) and are saved with the adapter
    assert adapter["base_model.model.model.embed_tokens.weight"].shape == (1472, 64)
    assert adapter["base_model.model.lm_head.weight"].shape == (1472, 64)
    model, tok = modeling.load_trained(out)
    assert model.get_input_embeddings().weight.shape[0] == 1472 and len(tok) == 1418


def test_tokenizer_flags(pretrained):
    text = "hi <|im_end|>"
    whole = modeling.load_tokenizer(pretrained, {})(text)["input_ids"]
    split = modeling.load_tokenizer(pretrained, {"split_special_tokens": True})(text)["input_ids"]
    assert 2 in whole and 2 not in split  # <|im_end|> is id 2 unless split into characters
    slow = modeling.load_tokenizer(pretrained, {"use_fast_tokenizer": False})
    assert slow(text)["input_ids"] == whole  # tokenizer.json only: the one (fast) backend either way


def test_use_cache_is_saved_in_the_model_config(tmp_path, pretrained, data):
    out, _ = run_train(tmp_path, pretrained, data, finetuning_type="full", use_cache=False, max_steps=1)
    assert json.loads((out / "model" / "config.json").read_text())["use_cache"] is False


def test_device_map_reaches_from_pretrained_for_one_process(tmp_path, pretrained, data, monkeypatch):
    """device_map (and force_auto_device) place a single-process model; under DDP the Trainer places
    each replica itself, so the map is not passed. (transformers sets no hf_device_map for a map onto
    one device, so the call is what a CPU host can observe.)"""
    from transformers import AutoModelForCausalLM

    seen = []
    original = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: seen.append(k.get("device_map")) or original(*a, **k))  # fmt: skip
    run_train(tmp_path, pretrained, data, step_id="a", device_map="cpu", finetuning_type="none")
    run_train(tmp_path, pretrained, data, step_id="b", force_auto_device=True, finetuning_type="none")
    run_train(tmp_path, pretrained, data, step_id="c", finetuning_type="none")  # auto: the Trainer places it
    monkeypatch.setenv("WORLD_SIZE", "2")
    train._model(make_ctx(tmp_path, train_params(device_map="cpu"), data=data, model=pretrained),
                 AutoTokenizer.from_pretrained(pretrained), 64)  # fmt: skip
    assert seen == ["cpu", "auto", None, None]


def test_weights_are_always_safetensors(tmp_path, pretrained, data):
    """transformers 5 dropped pickled checkpoints (save_pretrained has no safe_serialization) and always
    loads directly into place (low_cpu_mem_usage): both flags are accepted, the result is the same."""
    a, _ = run_train(tmp_path, pretrained, data, step_id="a", finetuning_type="full", save_safetensors=False,
                     low_cpu_mem_usage=False, max_steps=1)  # fmt: skip
    b, _ = run_train(
        tmp_path, pretrained, data, step_id="b", finetuning_type="full", save_safetensors=True, max_steps=1
    )
    assert sorted(p.name for p in (a / "model").iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    assert (a / "model" / "model.safetensors").read_bytes() == (b / "model" / "model.safetensors").read_bytes()


def test_use_safetensors_refuses_pickled_weights(tmp_path):
    model_dir = tiny_model(tmp_path / "m")
    state = load_file(model_dir / "model.safetensors")
    torch.save(state, model_dir / "pytorch_model.bin")
    (model_dir / "model.safetensors").unlink()
    assert load(model_dir, tokenizer=AutoTokenizer.from_pretrained(TINY)) is not None
    with pytest.raises(UserError, match="cannot load the model"):
        load(model_dir, tokenizer=AutoTokenizer.from_pretrained(TINY), use_safetensors=True)


def test_unreachable_hub_model_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network here: fail at once
    with pytest.raises(UserError, match="not a local directory and could not be fetched"):
        modeling.load_config("some-org/some-model", {"model_revision": "main", "cache_dir": str(tmp_path)})


def test_cutoff_len_sets_the_rope_scaling_factor(tmp_path, pretrained, data):
    """train reads cutoff_len (the context the model is trained for): the RoPE factor is
    ceil(cutoff_len / max_position_embeddings), recorded in train.json and replayed on load."""
    out, _ = run_train(tmp_path, pretrained, data, rope_scaling="linear", cutoff_len=1200, max_steps=1)
    info = json.loads((out / "train.json").read_text())
    assert info["base"]["max_length"] == 1200 and info["model_flags"]["rope_scaling"] == "linear"
    model, _ = modeling.load_trained(out)
    assert model.config.rope_parameters["factor"] == 3.0 and model.config.max_position_embeddings == 1536
    # within the model's 512 positions nothing is scaled (the data alone is far shorter)
    out, _ = run_train(tmp_path, pretrained, data, step_id="short", rope_scaling="linear", cutoff_len=512, max_steps=1)
    assert modeling.load_trained(out)[0].config.rope_parameters["factor"] == 1.0


def test_warmup_steps_take_effect_when_warmup_ratio_is_zero(tmp_path, pretrained, data):
    """The resolved spec sets warmup_ratio 0 when only warmup_steps was given: the learning rate then
    ramps up over warmup_steps steps (and a non-zero ratio still wins)."""
    assert args_for(tmp_path, warmup_ratio=0.0, warmup_steps=4).get_warmup_steps(100) == 4
    assert args_for(tmp_path, warmup_ratio=0.5, warmup_steps=4).get_warmup_steps(100) == 50

    def lrs(step_id, **flags):
        out, _ = run_train(tmp_path, pretrained, data, step_id=step_id, learning_rate=1e-2, max_steps=5,
                           lr_scheduler_type="constant_with_warmup", **flags)  # fmt: skip
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        return [e["learning_rate"] for e in history if "learning_rate" in e]

    warm = lrs("warm", warmup_ratio=0.0, warmup_steps=4)
    assert warm[:4] == sorted(warm[:4]) and warm[0] < 5e-3 and warm[-1] == pytest.approx(1e-2)
    assert lrs("cold", warmup_ratio=0.0, warmup_steps=0)[0] == pytest.approx(1e-2)
