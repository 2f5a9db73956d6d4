"""The train stage: one recipe on transformers' Trainer, peft and accelerate.

    tokenized data ─► model (+ tokenizer, model flags) ─► none | full | freeze | lora
                   ─► Trainer (checkpoints in ctx.work, resumed after a crash)
                   ─► artifact: model/ or adapter/, tokenizer/, template.json, train.json,
                      trainer_state.json, metrics.json, loss.png, lora_matrix.png

Objectives: `sft` trains on the template stage's label-masked conversations, `pt`
on every token of (packed) plain text. A spec may chain train steps (`pt` then
`sft`): a later step gets the earlier artifact as `ctx.inputs["base"]`.

Determinism: every random draw is seeded from the spec's `seed` (model init, LoRA
init, dropout, data order); the data order is a pure function of (seed, epoch), and
the Trainer's checkpoints carry the RNG states, so on CPU a rerun — interrupted and
resumed or not — ends with bit-identical weights. The artifact holds no timestamps:
run timings go to the returned metrics (the manifest) only, TensorBoard events to
`logging_dir`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import time
from pathlib import Path

import torch
from transformers import (
    EarlyStoppingCallback,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from tunepipe.errors import UserError
from tunepipe.runtime import modeling
from tunepipe.runtime.collate import LengthGroupedSampler, PadCollator, TokenizedSplit
from tunepipe.spec import paths

# Log-history keys kept out of the artifact: wall-clock measurements, and the summary's train_loss,
# which averages over the steps of the last session only (a resumed run would differ).
SESSION_KEYS = ("runtime", "per_second", "train_loss")
# Model-section flags a LoRA artifact records so that its base can be rebuilt (modeling.load_trained).
MODEL_FLAGS = (
    "rope_scaling", "moe_aux_loss_coef", "resize_vocab", "add_tokens", "add_special_tokens",
    "use_cache", "trust_remote_code", "model_revision", "use_safetensors", "strict_dtype",
    "bf16", "fp16",
)  # fmt: skip


def run(ctx) -> dict:
    p = ctx.params
    seed = int(ctx.seed if p.get("seed") is None else p["seed"])
    finetuning = p["finetuning_type"]
    objective = p["stage"]

    # 1. Data: the template stage's tokenized splits.
    data_dir = Path(ctx.inputs["template"])
    train_set = TokenizedSplit(data_dir, "train", objective)
    eval_set = TokenizedSplit(data_dir, "val", objective) if TokenizedSplit.exists(data_dir, "val") else None
    if (p["evaluation_strategy"]) != "no" and eval_set is None:
        raise UserError("train.evaluation_strategy needs a validation split: set data.val_size > 0")
    max_length = max(train_set.lengths + (eval_set.lengths if eval_set else []) + [p["cutoff_len"]])

    # 2. Model and tokenizer, seeded: a from-scratch or LoRA init is part of the result.
    set_seed(seed)
    tokenizer = _tokenizer(ctx, data_dir)
    model, base = _model(ctx, tokenizer, max_length)

    # 3. What trains.
    written, adapters = _adapter_paths(ctx)
    resized = base.pop("resized")
    if finetuning == "lora":
        model = _lora(model, p, adapters, resized)
        base.update(merged_adapters=written[:-1], max_length=max_length)
    else:
        for adapter in adapters:
            model = modeling.merge_adapter(model, adapter)
        base["merged_adapters"] = written
        if finetuning == "freeze":
            _freeze(model, int(p["freeze_trainable_layers"]))
        elif finetuning == "full":
            model.requires_grad_(True)
        else:  # none: no parameter trains; the artifact is the (loaded or initialised) model
            model.requires_grad_(False)
    if finetuning != "none" and not p.get("strict_dtype"):
        # Trainable weights in float32 (mixed precision autocasts the compute), frozen ones stay as loaded.
        for param in model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
    trainable = sum(x.numel() for x in model.parameters() if x.requires_grad)
    ctx.log.info("finetuning_type %s: %d trainable parameters", finetuning, trainable)

    # 4. The Trainer, its checkpoints in the persistent work dir.
    checkpoints = Path(ctx.work) / "trainer"
    args = training_arguments(ctx, checkpoints, has_eval=eval_set is not None)
    callbacks = []
    if args.eval_strategy != "no" and args.load_best_model_at_end:
        callbacks.append(EarlyStoppingCallback(int(p["early_stopping_patience"]), float(p["early_stopping_threshold"])))
    trainer = RecipeTrainer(
        model=model,
        args=args,
        data_collator=PadCollator(tokenizer.pad_token_id),
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        callbacks=callbacks,
        group_by_length=bool(p.get("group_by_length")),
    )
    if not args.disable_tqdm:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(TokenProgress())

    metrics: dict = {"finetuning_type": finetuning, "stage": objective, "trainable_params": trainable}
    if finetuning != "none":
        resume = last_checkpoint(checkpoints)
        if resume:
            ctx.log.info("resuming from %s", resume)
        before = json.loads((Path(resume) / "trainer_state.json").read_text())["num_input_tokens_seen"] if resume else 0
        started = time.perf_counter()
        stop = CheckpointOnSignal()
        trainer.add_callback(stop)
        with stop.installed():
            trainer.train(resume_from_checkpoint=resume)
        if stop.signum is not None:  # saved a checkpoint at the last step: a rerun (or a requeue) resumes there
            ctx.log.info(
                "stopped by signal %d after step %d; checkpoint saved, exiting", stop.signum, trainer.state.global_step
            )
            raise SystemExit(128 + stop.signum)
        seconds = time.perf_counter() - started
        tokens = trainer.state.num_input_tokens_seen
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        metrics.update(
            train_loss=losses[-1] if losses else None,  # the last logged one: the same after a resume
            steps=trainer.state.global_step,
            epochs=trainer.state.epoch,
            tokens=tokens,
        )
        timings = {"train_runtime_s": seconds, "tokens_per_s": (tokens - before) / seconds if seconds else None}
    else:
        timings = {}
    if eval_set is not None:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]

    # 5. The artifact, written once (rank 0 of a distributed run).
    if trainer.is_world_process_zero():
        _save(ctx, trainer, tokenizer, data_dir, base, metrics)
    if args.world_size > 1:
        trainer.accelerator.wait_for_everyone()
    return {**metrics, **timings}


class CheckpointOnSignal(TrainerCallback):
    """SIGTERM (a cancel, SLURM's warning signal before a time limit or a preemption) ends training
    at the end of the current optimizer step with a checkpoint, instead of losing the steps since the
    last `save_steps`; the stage then exits non-zero, so nothing is committed, and the next run (a
    requeued job) resumes from that checkpoint to the same weights."""

    def __init__(self):
        self.signum: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.signum is not None:
            control.should_save = True
            control.should_training_stop = True
        return control

    def installed(self):
        import contextlib

        @contextlib.contextmanager
        def handler():
            previous = signal.signal(signal.SIGTERM, lambda signum, frame: setattr(self, "signum", signum))
            try:
                yield
            finally:
                signal.signal(signal.SIGTERM, previous)

        return handler()


# ---------------------------------------------------------------- model


def _tokenizer(ctx, data_dir: Path):
    """The tokenizer the data was tokenized with (added tokens included)."""
    if (data_dir / "tokenizer").is_dir():
        return modeling.load_tokenizer(data_dir / "tokenizer", ctx.params)
    return modeling.load_tokenizer(modeling.model_source(ctx), ctx.params)


def _model(ctx, tokenizer, max_length: int):
    """(model, base description for train.json). Continues an earlier train step's model
    when there is one (`inputs.base`); otherwise loads, or initialises, the model file."""
    p = ctx.params
    if "base" in ctx.inputs:
        model, _ = modeling.load_trained(
            Path(ctx.inputs["base"]),
            p,
            model_dir=ctx.files.get("model"),
            spec_dir=ctx.spec_dir,
            artifacts=ctx.artifacts,
        )
        rows = model.get_input_embeddings().weight.shape[0]
        modeling.apply_model_flags(model, p, tokenizer)
        resized = model.get_input_embeddings().weight.shape[0] != rows
        # The upstream artifact by key, not by path: the same spec gives the same bytes in any checkout.
        return model, {"kind": "artifact", "key": ctx.upstream["base"], "resized": resized}
    source = modeling.model_source(ctx)
    single = int(os.environ.get("WORLD_SIZE", "1")) == 1
    # The Trainer places the model itself; an explicit map (or force_auto_device) is for one process only.
    device_map = p.get("device_map") if single and p.get("device_map") not in (None, "auto") else None
    if single and p.get("force_auto_device"):
        device_map = "auto"
    config = modeling.load_config(source, p)
    rows = config.vocab_size
    model = modeling.load_model(
        source,
        p,
        tokenizer,
        max_length=max_length,
        from_scratch=bool(p.get("train_from_scratch")),
        device_map=device_map,
    )
    resized = model.get_input_embeddings().weight.shape[0] != rows
    if p.get("train_from_scratch"):
        return model, {"kind": "own", "path": "base", "resized": resized}
    # The spec's own string (a hub id, or a path relative to the spec), not the resolved directory:
    # the same spec gives the same bytes in any checkout. Readers get the directory from their
    # step's files["model"] (modeling.load_trained(model_dir=...)).
    return model, {"kind": "model", "path": str(p.get("model_name_or_path") or source), "resized": resized}


def _adapter_paths(ctx) -> tuple[list[str], list[str]]:
    """lora_weight_path, adapter_name_or_path (in order), then adapter_folder's adapters:
    (as written in the spec — what train.json records —, their local directories)."""
    p = ctx.params
    written: list[str] = []

    def resolve(value) -> str:
        path = paths.resolve(ctx.spec_dir, str(value))
        if not (path / "adapter_config.json").is_file():
            raise UserError(f"{value}: no LoRA adapter there (adapter_config.json missing)")
        written.append(str(value))
        return str(path)

    local = [resolve(p["lora_weight_path"])] if p.get("lora_weight_path") else []
    local += [resolve(a) for a in p.get("adapter_name_or_path") or []]
    if p.get("adapter_folder"):
        value = str(p["adapter_folder"])
        folder = paths.resolve(ctx.spec_dir, value)
        if (folder / "adapter_config.json").is_file():
            local.append(resolve(value))
        else:
            found = sorted(d.name for d in folder.glob("*") if (d / "adapter_config.json").is_file())
            if not found:
                raise UserError(f"adapter_folder {value}: no adapters in it")
            local += [resolve(f"{value.rstrip('/')}/{name}") for name in found]
    return written, local


def _lora(model, p: dict, adapters: list[str], resized: bool):
    """Wrap the model in a LoRA adapter: a new one, or the last of `adapters` continued
    (the ones before it are merged into the base first)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    for adapter in adapters[:-1]:
        model = modeling.merge_adapter(model, adapter)
    if adapters:
        return PeftModel.from_pretrained(model, adapters[-1], is_trainable=True)

    target = list(p.get("lora_target") or ["all"])
    linear = modeling.linear_module_names(model)
    if target == ["all"]:
        target = linear
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(target) - leaf_names)
    if missing:
        raise UserError(
            f"lora_target: no module named {', '.join(missing)} in this model (linear layers: {', '.join(linear)})"
        )
    modules_to_save = None
    if resized:  # new token rows must train and be saved with the adapter
        layers = model.get_input_embeddings(), model.get_output_embeddings()
        modules_to_save = sorted({modeling.module_name(model, m).rsplit(".", 1)[-1] for m in layers})
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=int(p["lora_rank"]),
        lora_alpha=float(p["lora_alpha"]),
        lora_dropout=float(p["lora_dropout"]),
        target_modules=target,
        bias=p["lora_bias"],
        fan_in_fan_out=bool(p.get("lora_fan_in_fan_out")),
        modules_to_save=modules_to_save,
    )
    return get_peft_model(model, config)


def _freeze(model, layers: int) -> None:
    """Train only the top `layers` decoder layers and the output head."""
    prefix, total = modeling.decoder_layers(model)
    if not 1 <= layers <= total:
        raise UserError(f"freeze_trainable_layers must be between 1 and {total} (the model's layers), got {layers}")
    top = tuple(f"{prefix}.{i}." for i in range(total - layers, total))
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(top))
    # By module, not name: a head tied to the input embeddings is listed under their name only.
    model.get_output_embeddings().requires_grad_(True)


# ---------------------------------------------------------------- trainer


def training_arguments(ctx, output_dir: Path, has_eval: bool) -> TrainingArguments:
    """Every training flag of the seed, mapped onto transformers 5's TrainingArguments."""
    p = ctx.params
    seed = int(ctx.seed if p.get("seed") is None else p["seed"])
    use_cpu = bool(p.get("no_cuda")) or not torch.cuda.is_available()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    ratio = float(p["warmup_ratio"])
    if ratio >= 1:
        raise UserError(f"warmup_ratio must be below 1, got {ratio}")
    report_to = p["report_to"]
    if report_to in ("tensorboard", "all"):
        # transformers 5 has no logging_dir argument; its TensorBoard callback reads this variable.
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(logging_dir(ctx))
    eval_strategy = p["evaluation_strategy"]
    gc = bool(p.get("gradient_checkpointing")) and not p.get("disable_gradient_checkpointing")
    arguments = dict(
        output_dir=str(output_dir),
        seed=seed,
        data_seed=seed,
        full_determinism=use_cpu,  # free on CPU; on GPUs it would force slow deterministic kernels
        use_cpu=use_cpu,
        ddp_backend="gloo" if use_cpu and distributed else None,
        # optimisation
        learning_rate=float(p["learning_rate"]),
        num_train_epochs=float(p["num_train_epochs"]),
        max_steps=int(p["max_steps"]),
        per_device_train_batch_size=int(p["per_device_train_batch_size"]),
        per_device_eval_batch_size=int(p["per_device_eval_batch_size"]),
        gradient_accumulation_steps=int(p["gradient_accumulation_steps"]),
        lr_scheduler_type=p["lr_scheduler_type"],
        # the seed: warmup_ratio wins over warmup_steps; transformers reads a float < 1 as a ratio
        warmup_steps=ratio if ratio > 0 else int(p["warmup_steps"]),
        weight_decay=float(p["weight_decay"]),
        adam_beta1=float(p["adam_beta1"]),
        adam_beta2=float(p["adam_beta2"]),
        adam_epsilon=float(p["adam_epsilon"]),
        max_grad_norm=float(p["max_grad_norm"]),
        # precision, memory, kernels
        bf16=bool(p.get("bf16")),
        fp16=bool(p.get("fp16")),
        tf32=True if p.get("tf32") else None,
        activation_checkpointing=gc,
        activation_checkpointing_kwargs={"use_reentrant": bool(p["use_reentrant_gc"])} if gc else None,
        torch_compile=bool(p.get("torch_compile")),
        use_liger_kernel=bool(p.get("enable_liger_kernel")),
        # logging
        logging_steps=int(p["logging_steps"]),
        logging_first_step=True,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=bool(p.get("disable_tqdm")),
        report_to=report_to if report_to in ("none", "all") else [report_to],
        run_name=p.get("run_name") or ctx.id,
        # evaluation and checkpoints
        eval_strategy=eval_strategy if has_eval else "no",
        eval_steps=int(p["eval_steps"]),
        save_strategy="steps",
        save_steps=int(p["save_steps"]),
        save_total_limit=p.get("save_total_limit"),
        load_best_model_at_end=bool(p.get("load_best_model_at_end")) and has_eval,
        metric_for_best_model=p["metric_for_best_model"],
        greater_is_better=bool(p.get("greater_is_better")),
        # data loading and distribution
        dataloader_num_workers=int(p["dataloader_num_workers"]),
        dataloader_pin_memory=bool(p["dataloader_pin_memory"]) and not use_cpu,
        remove_unused_columns=False,
        label_names=["labels"],
        debug="tpu_metrics_debug" if p.get("tpu_metrics_debug") else "",
        ddp_timeout=int(p["ddp_timeout"]),
        ddp_find_unused_parameters=bool(p.get("ddp_find_unused_parameters")),
        deepspeed=_config_file(ctx, "deepspeed"),
        fsdp=p.get("fsdp") or None,
        fsdp_config=_config_file(ctx, "fsdp_config"),
    )
    try:
        return TrainingArguments(**arguments)
    except ValueError as exc:  # transformers' own cross-checks (fsdp options, save/eval step multiples…)
        raise UserError(f"train step {ctx.id}: {exc}") from exc


def logging_dir(ctx) -> Path:
    """TensorBoard events: logs, not artifact bytes. Relative paths are relative to the spec."""
    return paths.resolve(ctx.spec_dir, str(ctx.params["logging_dir"])) / ctx.id


def _config_file(ctx, flag: str) -> str | None:
    """deepspeed / fsdp_config: a JSON file, checked before it reaches accelerate — by the same
    function the runner's preflight uses, so a step fails here exactly when preflight would."""

    value = ctx.params.get(flag)
    if not value:
        return None
    problems = paths.config_file_problems(flag, value, ctx.spec_dir)
    if problems:
        raise UserError(problems[0])
    return str(paths.resolve(ctx.spec_dir, str(value)))


class RecipeTrainer(Trainer):
    """The stock Trainer with two changes: the length-grouped sampler is ours (seeded per epoch, see
    collate.py), and right-padded batches reach a causal model without their padding mask."""

    def __init__(self, *args, group_by_length: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.group_by_length = group_by_length

    def compute_loss(self, model, inputs, *args, **kwargs):
        return super().compute_loss(model, without_padding_mask(self.model, inputs), *args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.group_by_length:
            batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return LengthGroupedSampler(dataset.lengths, batch, self.args.data_seed)
        return super()._get_train_sampler(train_dataset)


def without_padding_mask(model, inputs: dict) -> dict:
    """The batch without its attention_mask when the mask only marks right padding of a causal model.

    In a causal model a real token never attends to the padding after it, so the loss on the real
    tokens is the same without the mask, and the attention gets no mask to build and apply: sdpa
    takes its causal fast path (the Trainer has already counted the non-padding tokens from the
    mask). The mask stays when it feeds more than attention: MoE routing statistics
    (output_router_logits), flash-attention kernels (they skip the padding's compute with it), or
    padding on the left.
    """
    mask = inputs.get("attention_mask")
    config = model.config
    if (
        mask is None
        or mask.dim() != 2
        or getattr(config, "output_router_logits", False)
        or "flash" in str(getattr(config, "_attn_implementation", ""))
    ):
        return inputs
    lengths = mask.sum(dim=1, keepdim=True)
    right_padded = torch.equal(mask.bool(), torch.arange(mask.shape[1], device=mask.device) < lengths)
    return {k: v for k, v in inputs.items() if k != "attention_mask"} if right_padded else inputs


class TokenProgress(ProgressCallback):
    """The progress bar with the last loss and the non-padding tokens/s."""

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self._mark = (time.perf_counter(), state.num_input_tokens_seen)
        self._loss = None

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        if self.training_bar is not None:
            now, tokens = time.perf_counter(), state.num_input_tokens_seen
            rate = (tokens - self._mark[1]) / max(now - self._mark[0], 1e-9)
            self._mark = (now, tokens)
            postfix = {"tok/s": f"{rate:,.0f}"}
            if self._loss is not None:
                postfix["loss"] = f"{self._loss:.4f}"
            self.training_bar.set_postfix(postfix, refresh=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        """A line per `logging_steps` (loss, learning rate, epoch), as the Trainer's own bar prints."""
        if logs and "loss" in logs:
            self._loss = logs["loss"]
        super().on_log(args, state, control, logs=logs, **kwargs)


def last_checkpoint(directory: Path) -> str | None:
    """The newest complete checkpoint. A kill during a save leaves a directory without
    trainer_state.json (the Trainer writes it last): such leftovers are removed."""
    if not directory.is_dir():
        return None
    complete = []
    for path in directory.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        try:
            json.loads((path / "trainer_state.json").read_text())
            complete.append(path)
        except (OSError, json.JSONDecodeError):
            shutil.rmtree(path, ignore_errors=True)
    return str(max(complete, key=lambda x: int(x.name.rsplit("-", 1)[1]))) if complete else None


# ---------------------------------------------------------------- artifact


def _save(ctx, trainer: Trainer, tokenizer, data_dir: Path, base: dict, metrics: dict) -> None:
    from peft import PeftModel

    p, out = ctx.params, Path(ctx.out)
    model = trainer.model
    model.config.use_cache = bool(p["use_cache"])  # training may have turned it off
    info = {"finetuning_type": p["finetuning_type"], "stage": p["stage"]}
    if isinstance(model, PeftModel):
        # A stable base name instead of an absolute path: the same spec gives the same bytes anywhere.
        config = model.peft_config["default"]
        config.base_model_name_or_path = str(p.get("model_name_or_path") or base.get("path") or base.get("key"))
        if isinstance(config.target_modules, set):  # its order varies per process: save it sorted
            config.target_modules = sorted(config.target_modules)
        # A grown vocabulary is saved through modules_to_save; peft's default ("auto") would look the
        # base config up, on the Hub when the base is not a local directory.
        model.save_pretrained(out / "adapter", save_embedding_layers=False)
        (out / "adapter" / "README.md").unlink(missing_ok=True)  # peft's model-card stub
        if p.get("plot_lora_matrix"):
            from tunepipe.runtime import plots  # matplotlib: ~1 s to import, only for a plot

            plots.plot_lora_matrix(model, out / "lora_matrix.png", out / "lora_matrix.json")
        if base["kind"] == "own":  # a from-scratch init exists nowhere else: keep it beside the adapter
            model.unload().save_pretrained(out / "base")
        info.update(base=base, model_flags={k: p.get(k) for k in MODEL_FLAGS})
        quantized = modeling.quantization_record(p)
        if quantized is not None:  # QLoRA provenance; merge and infer use the full-precision base
            info["quantized_base"] = quantized
    else:
        model.save_pretrained(out / "model")
        info["base"] = base
        if p.get("plot_lora_matrix"):
            ctx.log.warning(
                "plot_lora_matrix: finetuning_type is %s, there are no LoRA matrices to plot", info["finetuning_type"]
            )
    tokenizer.save_pretrained(out / "tokenizer")
    if (data_dir / "template.json").is_file():
        shutil.copyfile(data_dir / "template.json", out / "template.json")
    (out / "train.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")

    state = dataclasses.asdict(trainer.state)
    state["best_model_checkpoint"] = None  # a path in the work dir, which is gone after the commit
    state["log_history"] = [
        {k: v for k, v in entry.items() if not any(t in k for t in SESSION_KEYS)} for entry in state["log_history"]
    ]
    (out / "trainer_state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    if p.get("plot_loss"):
        from tunepipe.runtime import plots

        # Titled by what is in the cache key (never the step id: renaming an entry keeps the key).
        plots.plot_loss(
            state["log_history"], out / "loss.png", title=f"loss ({info['stage']}, {info['finetuning_type']})"
        )
