"""The resolved spec → a Plan: the steps of the DAG, in topological order, each with its cache key.

Steps and ids (docs/internals.md): `data → template → train → merge → quantize → export → verify`,
plus `infer`. A kind that occurs once has the kind as id; several get `kind.name`:

- `data`/`template`: one pair per distinct data configuration of the train entries (a train entry's
  `data:` mapping overrides spec["data"]). Entries that read the same data share one pair. With
  several pairs, each is named after the first train entry that reads it: `data.pretrain`.
- `train`: one per train entry, chained: each one after the first continues from the previous one
  (input role `base`). Named by the entry's `name`, else its `stage`: `train.pt`, `train.sft`.
- `merge` when the section is present; `quantize.<type>` per quantize entry; `export.<format>` per
  export entry (reading the merge output, else the last train output, or with `quantized: <name>`
  that quantize step); `verify.<format>` per export; `infer` when the section is present.

A step's params are every catalog flag whose `used_by` names its kind, each read from the flag's home
section as seen from that step (its own train/quantize/export entry; the train entry it belongs to;
the last train entry for steps after training). Only `affects: artifact` flags enter the key, and of
those, path-valued ones enter as the content digest of what they point to, never as the path.

    key = sha256(canonical JSON of {kind, stage version, key params, upstream keys by role,
                                    input digests by role: {relative name: sha256}})
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..spec.naming import entry_names, step_ids, verify_id
from ..spec.paths import is_hub_id, resolve
from ..stage_table import stage, unused_imports
from ..store import default_cache_dir
from .digest import MEMO_NAME, DigestMemo

# Flags whose value is a local path *or* a hub id; every artifact flag of type `path` is an input too.
PATH_OR_HUB_ID = {"model_name_or_path": "model", "adapter_name_or_path": "adapter"}
# Where the user wants a step's result copied; read only from the step's own section.
DELIVERY_FLAGS = ("output_dir", "export_dir")
# Input roles `chain.<i>`: the earlier train artifacts a trained model is built on (a LoRA adapter's
# base, its base's base …). Declared so that stage code receives every artifact it reads; left out
# of the key, which already holds them through the direct upstream's key.
CHAIN = "chain."


@dataclass
class Step:
    id: str
    kind: str
    key: str
    params: dict[str, Any]  # every flag the step reads, artifact and runtime
    key_params: dict[str, Any]  # the artifact-only subset, path flags left out (see `digests`)
    deps: list[str]  # step ids, in input-role order
    inputs: dict[str, str]  # role -> upstream step id
    files: dict[str, Path]  # role -> absolute local input path
    digests: dict[str, dict[str, str]]  # role -> {relative name: sha256}, or {"hub": id}
    upstream: dict[str, str]  # role -> upstream key (every declared input, chain roles included)
    executor: dict[str, Any]
    stage_version: int
    deliver: Path | None = None  # where the user asked for this step's result (output_dir/export_dir)
    without: tuple[str, ...] = ()  # installed packages its worker hides: it never uses them (stage_table)

    @property
    def key_inputs(self) -> dict[str, str]:
        """role -> upstream step id of the inputs that enter the key (all but the implied chain)."""
        return {role: dep for role, dep in self.inputs.items() if not role.startswith(CHAIN)}


@dataclass
class Plan:
    name: str
    spec_path: Path
    cache_dir: Path
    seed: int | None
    steps: list[Step] = field(default_factory=list)
    points: list = field(default_factory=list)  # a sweep's (point, {its step id: id here}); empty otherwise
    remote: str | None = None  # the spec's cache.remote, as written
    push: str = "on-success"  # the spec's cache.push
    # step id -> its index in `steps`, rebuilt when it no longer matches: `step()` is asked for every
    # step (and its inputs) by the runner, the lock and the summary; a scan each time is quadratic.
    _positions: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def spec_dir(self) -> Path:
        return self.spec_path.parent

    @property
    def lock_path(self) -> Path:
        return self.spec_dir / "tunepipe.lock"

    def step(self, step_id: str) -> Step:
        index = self._positions.get(step_id)
        if index is None or index >= len(self.steps) or self.steps[index].id != step_id:
            self._positions = {}
            for i, step in enumerate(self.steps):
                self._positions.setdefault(step.id, i)  # the first step of an id, as a scan finds it
            index = self._positions.get(step_id)
            if index is None:
                raise KeyError(step_id)
        return self.steps[index]

    def ancestors(self, step_id: str) -> set[str]:
        seen: set[str] = set()
        stack = list(self.step(step_id).deps)
        while stack:
            dep = stack.pop()
            if dep not in seen:
                seen.add(dep)
                stack.extend(self.step(dep).deps)
        return seen


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def compile_plan(
    spec: dict[str, Any],
    spec_path: Path,
    *,
    catalog=None,
    cache_dir: Path | None = None,
    executor_override: str | None = None,
    memo: DigestMemo | None = None,
) -> Plan:
    """Compile a resolved spec (docs/internals.md) into a Plan. Pure Python; reads input files to digest them.

    `executor_override` (`run --executor`) replaces every step's executor kind, before the keys are
    computed: a train step's `world_size` follows the executor that will really run it. `memo`: the
    input digests of several compiles at once (a sweep's points: each input read once), saved by
    the caller; by default the cache directory's own, saved here.
    """
    if catalog is None:
        from ..spec.catalog import load_catalog

        catalog = load_catalog()
    spec_path = Path(spec_path).resolve()
    cache_dir = plan_cache_dir(spec_path, cache_dir)
    own_memo = memo is None
    if own_memo:
        memo = DigestMemo(cache_dir / MEMO_NAME)
    cache = spec.get("cache") or {}
    plan = Plan(
        name=spec.get("name") or spec_path.stem,
        spec_path=spec_path,
        cache_dir=cache_dir,
        seed=spec.get("seed"),
        remote=cache.get("remote"),
        push=cache.get("push") or "on-success",
    )
    _Compiler(spec, plan, catalog, memo, executor_override).build()
    if own_memo:
        memo.save()
    return plan


def plan_cache_dir(spec_path: Path, cache_dir: Path | None = None) -> Path:
    """The artifact store a spec's plan uses: `cache_dir` when given, else the spec's default."""
    return Path(cache_dir) if cache_dir is not None else default_cache_dir(Path(spec_path).resolve().parent)


class _Compiler:
    def __init__(
        self, spec: dict[str, Any], plan: Plan, catalog, memo: DigestMemo, executor_override: str | None = None
    ):
        self.spec = spec
        self.executor_override = executor_override
        self.plan = plan
        self.memo = memo
        self.chains: dict[str, list[str]] = {}  # train step id -> the earlier train steps it builds on
        self.flags_by_kind = catalog.flags_by_kind

    def build(self) -> None:
        spec = self.spec
        trains = spec.get("train") or []
        last_train = trains[-1] if trains else {}

        template_for_entry = self.data_steps(trains)

        train_steps: list[Step] = []
        train_ids = step_ids("train", entry_names("train", trains))
        for i, entry in enumerate(trains):
            inputs = {"template": template_for_entry[i].id}
            if train_steps:
                inputs.update(self.model_inputs("base", train_steps[-1]))
            sections = {"data": self.data_config(entry), "train": entry}
            step = self.add("train", train_ids[i], sections, inputs, entry)
            self.chains[step.id] = [s.id for s in train_steps]
            train_steps.append(step)

        model_step = train_steps[-1] if train_steps else None
        merge = spec.get("merge")
        if (
            merge is None
            and (spec.get("quantize") or spec.get("export"))
            and last_train.get("finetuning_type") == "lora"
        ):
            merge = {}  # exporting a LoRA adapter means exporting it merged: an implicit merge step
        if merge is not None:
            inputs = self.model_inputs("train", model_step) if model_step else {}
            model_step = self.add("merge", "merge", {"train": last_train}, inputs, merge)

        probes = template_for_entry[-1] if template_for_entry else None  # the pipeline's own tokenized data
        quantize_entries = spec.get("quantize") or []
        quantize_names = entry_names("quantize", quantize_entries)
        quantize_steps = {}
        for name, step_id, entry in zip(quantize_names, step_ids("quantize", quantize_names), quantize_entries):
            source = self.require(model_step, step_id)
            inputs = self.model_inputs("model", source)
            if entry.get("method") == "gptq" and probes is not None:  # calibrated on the pipeline's own data
                inputs["calibration"] = probes.id
            sections = {"train": last_train, "quantize": entry}
            quantize_step = self.add("quantize", step_id, sections, inputs, entry)
            quantize_steps[name] = (quantize_step, entry)
            verify_inputs = {"quantized": quantize_step.id, **self.model_inputs("reference", source)}
            if probes is not None:
                verify_inputs["probes"] = probes.id
            self.add("verify", verify_id(step_id), sections, verify_inputs, entry)

        export_entries = spec.get("export") or []
        export_names = entry_names("export", export_entries)
        exports: dict[str, Step] = {}  # format -> its first export step
        for step_id, entry in zip(step_ids("export", export_names), export_entries):
            sections = {"train": last_train, "export": entry}
            if entry.get("quantized"):
                quantize_step, sections["quantize"] = self.quantize_for(entry["quantized"], quantize_steps, step_id)
                source, inputs = quantize_step, {"quantize": quantize_step.id}
            else:
                source = self.require(model_step, step_id)
                inputs = self.model_inputs("model", source)
            export_step = self.add("export", step_id, sections, inputs, entry)
            exports.setdefault(entry.get("format"), export_step)
            if entry.get("verify") is False:
                continue
            verify_sections = {**sections, "verify": spec.get("verify") or {}}
            verify_inputs = {"export": export_step.id, **self.model_inputs("reference", source)}
            if probes is not None:
                verify_inputs["probes"] = probes.id
            self.add("verify", verify_id(step_id), verify_sections, verify_inputs, entry)

        if spec.get("infer") is not None:
            inputs = self.model_inputs("model", self.require(model_step, "infer"))
            if spec["infer"].get("infer_backend") == "llama-cpp":  # answered from the GGUF export, in llama.cpp
                if "gguf" not in exports:
                    raise UserError("infer_backend llama-cpp answers from a GGUF export: add export: [{format: gguf}]")
                inputs["gguf"] = exports["gguf"].id
            self.add("infer", "infer", {"train": last_train}, inputs, spec["infer"])

    def model_inputs(self, role: str, step: Step) -> dict[str, str]:
        """`{role: step}` plus the train chain `step` is built on (roles `chain.<i>`)."""
        inputs = {role: step.id}
        for i, earlier in enumerate(self.chains.get(step.id, [])):
            if earlier not in inputs.values():
                inputs[f"{CHAIN}{i}"] = earlier
        return inputs

    # -- data and template ---------------------------------------------------------------------
    def data_config(self, entry: dict[str, Any]) -> dict[str, Any]:
        return {**(self.spec.get("data") or {}), **(entry.get("data") or {})}

    def data_steps(self, trains: list[dict[str, Any]]) -> list[Step]:
        """One data + template pair per distinct configuration; returns each train entry's template step."""
        if not trains and self.spec.get("data") is None:
            return []
        signatures = []  # per train entry: what its data and template steps would read
        first_reader: dict[str, dict] = {}  # signature -> the first entry that reads it (names the pair)
        for entry in trains or [{}]:
            sections = {"data": self.data_config(entry), "train": entry}
            signature = canonical_json([self.params("data", sections), self.params("template", sections)])
            signatures.append(signature)
            first_reader.setdefault(signature, entry)
        names = entry_names("train", list(first_reader.values()))
        template_steps = {}
        for (signature, entry), name in zip(first_reader.items(), names):
            suffix = "" if len(first_reader) == 1 else f".{name}"
            sections = {"data": self.data_config(entry), "train": entry}
            data = self.add("data", "data" + suffix, sections, {}, self.spec.get("data"))
            template_steps[signature] = self.add(
                "template", "template" + suffix, sections, {"data": data.id}, self.spec.get("template")
            )
        return [template_steps[signature] for signature in signatures]

    # -- one step ------------------------------------------------------------------------------
    def sections(self, extra: dict[str, Any]) -> dict[str, Any]:
        spec = self.spec
        return {
            "pipeline": spec,
            "model": spec.get("model") or {},
            "data": spec.get("data") or {},
            "template": spec.get("template") or {},
            "merge": spec.get("merge") or {},
            "infer": spec.get("infer") or {},
            "verify": spec.get("verify") or {},
            **extra,
        }

    def params(self, kind: str, extra_sections: dict[str, Any]) -> dict[str, Any]:
        sections = self.sections(extra_sections)
        values = {}
        for flag in self.flags_by_kind.get(kind, []):
            home = sections.get(flag.section) or {}
            values[flag.name] = _normalise(flag, home.get(flag.name, flag.default))
        return dict(sorted(values.items()))

    def add(self, kind: str, step_id: str, extra_sections: dict, inputs: dict[str, str], own: dict | None) -> Step:
        own = own or {}
        params = self.params(kind, extra_sections)
        key_params, files, digests = {}, {}, {}
        for flag in self.flags_by_kind.get(kind, []):
            value = params[flag.name]
            if flag.affects != "artifact":
                continue
            if flag.name in PATH_OR_HUB_ID or flag.type == "path":
                if kind == "data" and flag.name == "dataset_dir" and value in (None, "", []):
                    value = "."  # the data stage's rule: no dataset_dir means the spec's directory
                if value not in (None, "", []):
                    role = PATH_OR_HUB_ID.get(flag.name, flag.name)
                    self.digest_input(kind, flag, role, value, params, files, digests)
                continue
            key_params[flag.name] = value
        executor = {**(self.spec.get("executor") or {}), **(own.get("executor") or {})}
        if self.executor_override:
            executor["kind"] = self.executor_override
        if kind == "train":
            # Executor flags are runtime, but the number of processes sets the global batch size and
            # so the weights: the world size is part of a train step's key.
            key_params["world_size"] = world_size(executor)
        upstream = {role: self.plan.step(dep).key for role, dep in inputs.items()}
        version = stage(kind).version_for(params)
        key_upstream = {role: key for role, key in upstream.items() if not role.startswith(CHAIN)}
        material = {
            "kind": kind,
            "stage_version": version,
            "params": key_params,
            "upstream": key_upstream,
            "inputs": digests,
        }
        step = Step(
            id=step_id,
            kind=kind,
            key=hashlib.sha256(canonical_json(material).encode()).hexdigest(),
            params=params,
            key_params=key_params,
            deps=list(dict.fromkeys(inputs.values())),
            inputs=inputs,
            files=files,
            digests=digests,
            upstream=upstream,
            executor=executor,
            stage_version=version,
            deliver=self.delivery(kind, own),
            without=unused_imports(kind, params, [self.plan.step(dep).kind for dep in inputs.values()]),
        )
        self.plan.steps.append(step)
        return step

    def digest_input(self, kind, flag, role, value, params, files, digests) -> None:
        spec_dir = self.plan.spec_dir
        values = value if isinstance(value, list) else [value]
        for i, item in enumerate(values):
            item_role = role if len(values) == 1 else f"{role}.{i}"
            found = self.memo.locate(resolve(spec_dir, str(item)))
            if found is None:
                if flag.name in PATH_OR_HUB_ID and is_hub_id(spec_dir, str(item)):
                    digests[item_role] = {"hub": str(item)}  # a hub id: its name (and revision param) is the input
                    continue
                raise UserError(
                    f"{flag.section}.{flag.name}: {item}: no such file or directory (needed by step {kind})"
                )
            path, is_file = found
            files[item_role] = path
            if is_file:
                digests[item_role] = {path.name: self.memo.file(path)}
            elif role == "dataset_dir":
                digests[item_role] = self.memo.dataset_tree(path, params.get("dataset"))
            else:
                digests[item_role] = self.memo.tree(path)

    def delivery(self, kind: str, own: dict[str, Any]) -> Path | None:
        for name in DELIVERY_FLAGS:
            if own.get(name) and any(f.name == name and f.section == kind for f in self.flags_by_kind.get(kind, [])):
                return resolve(self.plan.spec_dir, str(own[name])).resolve()
        return None

    def require(self, model_step: Step | None, step_id: str) -> Step:
        if model_step is None:
            raise UserError(f"{step_id} needs a model to work on: add a train or merge section")
        return model_step

    def quantize_for(self, name: str, quantize_steps: dict, step_id: str) -> tuple[Step, dict]:
        for quantize_name, (step, entry) in quantize_steps.items():
            if name in (quantize_name, step.id):
                return step, entry
        known = ", ".join(quantize_steps) or "none"
        raise UserError(f"{step_id}: quantized: {name} names no quantize entry (known: {known})")


def world_size(executor: dict[str, Any]) -> int:
    if executor.get("kind", "local") == "local":
        return 1
    return int(executor.get("nproc_per_node") or 1) * int(executor.get("nnodes") or 1)


def _normalise(flag, value: Any) -> Any:
    # 3 and 3.0 are the same learning rate: one spelling in the key.
    if flag.type in ("float", "number") and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value
