"""`tunepipe import`: a LLaMA-Factory or axolotl training config → a tunepipe spec.

    import_config(path, *, spec_dir=None, run_dir=None, export=None) -> ImportResult
    import_command(config, output=None, *, force=False, export=None) -> int      # `tunepipe import`

The contract:
- The tool is recognised by its keys: LLaMA-Factory by `model_name_or_path` with `stage`,
  `finetuning_type`, `do_train`, `template` or `export_dir`; axolotl by `base_model` or
  `datasets: [{path, type}]`. Anything else, or a file that is not a YAML mapping, is a UserError
  (broken YAML: with FILE:LINE:COL). The config is read as the tools read it (PyYAML, YAML 1.1).
- Every key of the config ends up as a spec value or named, with its value, in a comment: an
  end-of-line comment where a value was renamed, converted or means something else in tunepipe;
  a list at the end of the spec for the keys kept out — those with no equivalent, those that change
  nothing in tunepipe, and those tunepipe's own validation rejects (with its message). Null values
  are listed as unset. Nothing is dropped silently.
- A flag's section is the catalog's; spec/import_map.yaml holds only renames, conversions (named:
  TRANSFORMS below), notes, and the tools' defaults where they differ from the catalog's, which are
  written into the spec so that it trains what the tool would have trained.
- Paths: the tools resolve relative paths from the directory they run in (`run_dir`, default the
  current directory). Inputs (model, adapter, dataset_dir, deepspeed ...) are also looked for beside
  the config and above it (LLaMA-Factory's examples/train_lora/x.yaml runs from the checkout's root);
  every path is written relative to the spec's directory (`spec_dir`, default the current directory).
- LLaMA-Factory's dataset_dir (its dataset_info.json) is referenced as is. axolotl `datasets` become
  entries of a dataset_info.json (LLaMA-Factory's format, which tunepipe reads) that import_command
  writes beside the spec, merged into one that is already there.
- An LLaMA-Factory export config (`llamafactory-cli export`) given with `export=` beside its training
  config adds the merge section; alone, it imports as model and template with the rest listed.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from io import StringIO
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import UserError
from .catalog import TOP_LEVEL, load_catalog
from .paths import HUB_ID, read_text

LLAMA_FACTORY, AXOLOTL = "llama_factory", "axolotl"
# Sections an imported key may land in; a flag of another section (infer, export ...) would add a
# stage the training config does not ask for, so it is listed instead.
IMPORTED_SECTIONS = (TOP_LEVEL, "model", "data", "template", "train")
# Flags whose validation errors are about the user's files or about what to train: they stay in the
# spec, and import_command reports the errors; any other flag tunepipe rejects is moved out.
KEPT_ON_ERROR = {"model_name_or_path", "adapter_name_or_path", "dataset", "stage", "finetuning_type", "template"}
# Validation rounds: a round's errors can hide the next ones (rules run once the values type-check).
MAX_ROUNDS = 6
DATASET_INFO = "dataset_info.json"
JINJA_FILE = "chat_template.jinja"
FSDP_FILE = "fsdp_config.json"


@dataclass
class KeptOut:
    key: str  # the source key; `datasets[0].split` for a field of a list entry
    value: Any
    reason: str
    kind: str = "lost"  # lost: its effect is not in the spec · same: tunepipe behaves the same without it
    #                     train: part of a train section that is kept out


@dataclass
class ImportResult:
    tool: str  # "LLaMA-Factory" or "axolotl"
    source: Path
    text: str  # the spec as YAML, with its comments and the list of what was kept out
    dataset_info: dict[str, dict] = field(default_factory=dict)  # entries for dataset_info.json beside the spec
    files: dict[str, str] = field(default_factory=dict)  # other files to write beside the spec: name -> text
    kept_out: list[KeptOut] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the user must check (a path not found, a stage kept out)


@lru_cache(maxsize=1)
def import_map() -> dict[str, Any]:
    import yaml

    text = resources.files("tunepipe.spec").joinpath("import_map.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


# ------------------------------------------------------------------------------------ reading
def read_config(path: Path) -> dict[str, Any]:
    """The config as the tools read it (PyYAML); a UserError for anything that is not a YAML mapping."""
    import yaml

    text = read_text(path, "config")
    try:
        doc = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise UserError(
            f"{where}: YAML syntax error: {exc.problem or exc.context}",
            ["fix the YAML, then run tunepipe import again"],
        ) from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path}: expected a mapping of config keys, got {type(doc).__name__}")
    return doc


LLAMA_FACTORY_MARKS = ("stage", "finetuning_type", "do_train", "template", "export_dir")


def detect(doc: dict[str, Any], path: Path) -> str:
    if isinstance(doc.get("model"), dict) and "version" in doc:
        raise UserError(f"{path}: this is a tunepipe spec already: run tunepipe validate {path}")
    if isinstance(doc.get("model"), str) and any(k in doc for k in ("peft_config", "train_dataset", "model_class")):
        raise UserError(
            f"{path}: a LLaMA-Factory v1 config (model:, peft_config:, train_dataset:): tunepipe "
            "imports the flat configs of llamafactory-cli train and export only"
        )
    axolotl_datasets = isinstance(doc.get("datasets"), list) and any(
        isinstance(d, dict) and "path" in d for d in doc["datasets"]
    )
    if "base_model" in doc or axolotl_datasets:
        return AXOLOTL
    if "model_name_or_path" in doc and any(k in doc for k in LLAMA_FACTORY_MARKS):
        return LLAMA_FACTORY
    raise UserError(
        f"{path}: not a config tunepipe can import (LLaMA-Factory or axolotl)",
        [
            "looked for LLaMA-Factory's model_name_or_path with one of " + ", ".join(LLAMA_FACTORY_MARKS),
            "and for axolotl's base_model, or datasets: [{path, type}]",
            "found: " + (", ".join(map(str, list(doc)[:12])) or "no keys"),
        ],
    )


# ------------------------------------------------------------------------------------ values
def show(value: Any) -> str:
    """A value as it would read in YAML, on one line."""
    if isinstance(value, str):
        plain = value and re.fullmatch(r"[\w./:+@<>|-]+( [\w./:+@<>|-]+)*", value)
        return value if plain else json.dumps(value, ensure_ascii=False)
    return json.dumps(value, ensure_ascii=False, default=str)


YAML11_BOOLS = {"y", "yes", "n", "no", "on", "off", "true", "false"}


def quoted(value: Any) -> Any:
    """Strings that YAML 1.1 readers (PyYAML, the tools) would take for booleans, in quotes."""
    from ruamel.yaml.scalarstring import DoubleQuotedScalarString

    return DoubleQuotedScalarString(value) if isinstance(value, str) and value.lower() in YAML11_BOOLS else value


def coerce(flag, value: Any) -> Any:
    """PyYAML reads `2e-5` as a string; the tools (and tunepipe's YAML 1.2 loader) read a number."""
    if isinstance(value, str) and flag.type in ("int", "float", "number"):
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if flag.type == "int" and number.is_integer() else number
    return value


class Importer:
    """The spec being built: flag values (flag names are unique across the catalog), their comments
    and the source keys each came from, plus what was kept out."""

    def __init__(self, tool: str, source: Path, spec_dir: Path, run_dir: Path):
        self.tool = tool
        self.rules = import_map()[tool]
        self.name = self.rules["name"]
        self.catalog = load_catalog()
        self.source = source
        self.spec_dir = spec_dir.resolve()
        self.run_dir = run_dir.resolve()
        config_dir = source.resolve().parent
        self.roots = list(dict.fromkeys([self.run_dir, config_dir, *config_dir.parents]))
        self.values: dict[str, Any] = {}
        self.comments: dict[str, list[str]] = {}
        self.origins: dict[str, list[tuple[str, Any]]] = {}
        self.kept: list[KeptOut] = []
        self.unset: list[str] = []
        self.notes: list[str] = []
        self.dataset_info: dict[str, dict] = {}
        self.files: dict[str, str] = {}
        self.merge: str | None = None  # the merge section's comment, when there is one
        self.train_out: str | None = None  # why the train section is kept out

    # -- setting flags -----------------------------------------------------------------------
    def set(self, flag: str, value: Any, key: str | None = None, raw: Any = None, note: str | None = None) -> None:
        """Set `flag`; `key`/`raw` name the source key and value it came from (None: written by the importer)."""
        self.values[flag] = value
        if key is not None:
            self.origins.setdefault(flag, []).append((key, raw))
        described = key is not None and (key != flag or raw != value)
        parts = [f"{self.name} {key}" + (f": {show(raw)}" if raw != value else "")] if described else []
        self.comments.setdefault(flag, []).extend(parts + ([note] if note else []))

    def keep(self, key: str, value: Any, reason: str, kind: str = "lost") -> None:
        for kept in self.kept:  # a key moved out twice (two rounds of validation) is listed once
            if kept.key == key and kept.value == value:
                kept.reason += f"; {reason}"
                return
        self.kept.append(KeptOut(key, value, reason, kind))

    def carry(self, key: str, value: Any) -> None:
        """One source key: renamed, converted, set as the catalog flag of its name, or kept out."""
        entry = self.rules["keys"].get(key) or {}
        if value is None:
            self.unset.append(key)
            return
        no_effect = self.rules.get("no_effect", {})
        if key in no_effect and value == no_effect[key]:
            self.keep(key, value, self.rules["kept_out"].get(key, "tunepipe behaves the same without it"), "same")
            return
        if key in self.rules["kept_out"] and not entry:
            self.keep(key, value, self.rules["kept_out"][key])
            return
        transform = entry.get("transform")
        flag = self.catalog.flags.get(entry.get("flag", key))
        if transform is None and flag is not None and flag.type == "path" and isinstance(value, str):
            transform = "output_path"  # a path the tool resolves from where it runs, like an output
        if transform:
            TRANSFORMS[transform](self, key, value, entry)
            return
        self.put(key, value, entry)

    def put(self, key: str, value: Any, entry: dict, note: str | None = None, raw: Any = None) -> None:
        """Set the flag `entry` names (default: `key`) to `value`, which `raw` (default: `value`) was in the config."""
        raw = value if raw is None else raw
        resolved = self.catalog.resolve_name(entry.get("flag", key))  # the catalog's spellings (and aliases)
        flag, negated = resolved or (entry.get("flag", key), False)
        found = self.catalog.flags.get(flag)
        if negated and isinstance(value, bool):
            value = not value
        if found is None:
            self.keep(key, raw, self.rules["kept_out"].get(key, "no tunepipe equivalent"))
            return
        if found.section not in IMPORTED_SECTIONS:
            self.keep(
                key,
                raw,
                f"a tunepipe {found.section} flag: importing a training config adds no "
                f"{found.section} stage; add the {found.section}: section to use it",
            )
            return
        values = entry.get("values") or {}
        if isinstance(value, (str, int, float, bool)) and value in values:
            value = values[value]
        value = coerce(found, value)
        if isinstance(raw, str) and raw != value and coerce(found, raw) == value:
            raw = value  # a number PyYAML left as text (2e-5): the same value, nothing to say
        if flag in self.values and self.values[flag] != value:
            first = ", ".join(k for k, _ in self.origins.get(flag, [])) or "the importer"
            self.keep(key, raw, f"conflicts with {first}, imported as {flag}: {show(self.values[flag])}")
            return
        notes = [entry["note"]] if entry.get("note") and value is not False else []  # moot when off
        if entry.get("value_note") and raw != value:
            notes.append(entry["value_note"])
        notes += [note] if note else []
        if key.replace("-", "_") in self.catalog.aliases:
            notes.append(f"{key} is a newer name of tunepipe's {flag}")
        self.set(flag, value, key, raw, "; ".join(notes) or None)

    # -- paths -------------------------------------------------------------------------------
    def locate(self, value: str, test: Callable[[Path], bool] = Path.exists) -> Path | None:
        path = Path(value).expanduser()
        candidates = [path] if path.is_absolute() else [root / path for root in self.roots]
        return next((c.resolve() for c in candidates if test(c)), None)

    def relative(self, path: Path) -> str:
        return Path(os.path.relpath(path, self.spec_dir)).as_posix()

    def from_run_dir(self, value: str) -> str:
        path = Path(value).expanduser()
        return self.relative(path if path.is_absolute() else self.run_dir / path)

    def path_value(self, value: str, hub: bool = False) -> tuple[str, bool]:
        """(how the spec names a path the config reads, whether it was found). A model or adapter
        (`hub`) that is not a local path but reads as org/name is a hub id, kept as is."""
        found = self.locate(value)
        if found is not None:
            return self.relative(found), True
        if hub and HUB_ID.fullmatch(value):
            return value, True
        return self.from_run_dir(value), False

    def not_found(self, key: str, value: str) -> str:
        note = (
            f"{value} not found from {self.run_dir} or beside {self.source.name}: {self.name} resolves "
            f"it from the directory it runs in; fix the path"
        )
        self.notes.append(f"{key}: {note}")
        return note

    # -- defaults ----------------------------------------------------------------------------
    def effective(self, flag: str) -> Any:
        """A flag as the tool sees it: the spec's value, else the tool's default, else tunepipe's."""
        if flag in self.values:
            return self.values[flag]
        for default in self.rules.get("defaults", []):
            if default["flag"] == flag and "value" in default:
                return default["value"]
        return self.catalog.flags[flag].default

    def apply_defaults(self) -> None:
        """The tool's defaults that differ from tunepipe's, for flags the config leaves unset, in the
        sections the spec has (a config without a dataset gets no data section)."""
        for default in self.rules.get("defaults", []):
            flag = self.catalog.flags[default["flag"]]
            if flag.name in self.values or not self.section_present(flag.section):
                continue
            if any(self.values.get(k) != v for k, v in (default.get("when") or {}).items()):
                continue
            if any(k not in self.values for k in default.get("when_set") or []) or any(
                k in self.values for k in default.get("unless") or []
            ):
                continue
            if "transform" in default:
                value = DEFAULT_TRANSFORMS[default["transform"]](self, default.get("arg"))
            else:
                value = default["value"]
            if value == flag.default:
                continue
            self.set(
                flag.name,
                value,
                note=f"not in the config: {default['note']} (tunepipe's default is {show(flag.default)})",
            )

    def section_present(self, section: str) -> bool:
        if section == "train" and self.train_out:
            return False
        return section == TOP_LEVEL or any(self.catalog.flags[f].section == section for f in self.values)

    # -- the result --------------------------------------------------------------------------
    def reject(self, section: str, flag: str, message: str) -> bool:
        """Move out a flag tunepipe's validation rejects; False for flags that must stay (KEPT_ON_ERROR)."""
        known = self.catalog.flags.get(flag)
        if (
            flag not in self.values
            or known is None
            or known.section != section
            or flag in KEPT_ON_ERROR
            or (known.type == "path" and isinstance(self.values[flag], str))
        ):
            return False
        del self.values[flag]
        self.comments.pop(flag, None)
        origins = self.origins.pop(flag, [])
        for key, raw in origins:
            self.keep(key, raw, f"tunepipe rejects it as {section}.{flag}: {message}")
        if not origins:
            self.notes.append(f"{section}.{flag}: the {self.name} default was not written: {message}")
        return True

    def spec_map(self):
        from ruamel.yaml.comments import CommentedMap

        doc = CommentedMap()
        doc["version"] = 1
        doc["name"] = self.values.get("name") or re.sub(r"[^\w.-]+", "-", self.source.stem)
        sections: dict[str, Any] = {}
        for flag, value in self.values.items():
            section = self.catalog.flags[flag].section
            target = doc if section == TOP_LEVEL else sections.setdefault(section, CommentedMap())
            target[flag] = quoted(value)
        for target, indent in [(doc, 0), *((m, 2) for m in sections.values())]:
            column = indent + max(len(f"{k}: {show(v)}") for k, v in target.items()) + 2
            for flag in target:
                if self.comments.get(flag):
                    text = "; ".join(dict.fromkeys(self.comments[flag]))  # several keys, one note
                    target.yaml_add_eol_comment("# " + text, flag, column=min(column, 60))
        if self.merge is not None:
            sections.setdefault("merge", CommentedMap())
        for section in self.catalog.sections:
            if section in sections:
                doc[section] = sections[section]
        if self.merge is not None:
            doc.yaml_add_eol_comment("# " + self.merge, "merge")
        return doc

    def header(self) -> list[str]:
        lines = [
            f"Imported by `tunepipe import` from {self.source.name} ({self.name}).",
            f"`# {self.name} KEY` comments say where a value came from and what differs; keys kept out "
            "of the spec are listed at the end.",
        ]
        if self.train_out:
            lines.append(f"No train section: {self.train_out}.")
        return lines + [f"Check: {note}" for note in self.notes]

    def kept_lines(self) -> list[str]:
        groups = [
            ("lost", f"{self.name} keys with no tunepipe equivalent (kept out of the spec):"),
            ("train", f"Kept out with the train section ({self.train_out}):"),
            ("same", "Kept out, no effect: tunepipe behaves the same without them:"),
        ]
        lines = []
        for kind, title in groups:
            items = [k for k in self.kept if k.kind == kind]
            if items:
                lines += ["", title] + [f"  {k.key}: {show(k.value)}  — {k.reason}" for k in items]
        if self.unset:
            lines += ["", "Unset in the config (null, nothing to import): " + ", ".join(self.unset)]
        return lines

    def text(self) -> str:
        from ruamel.yaml import YAML

        doc = self.spec_map()
        doc.yaml_set_start_comment("\n".join(self.header()))
        yaml = YAML(typ="rt")
        yaml.width = 4096
        yaml.indent(mapping=2, sequence=4, offset=2)
        out = StringIO()
        yaml.dump(doc, out)
        tail = self.kept_lines()
        return out.getvalue() + "".join(f"#{' ' if line else ''}{line}\n" for line in tail)


# ------------------------------------------------------------------------------------ transforms
def input_path(imp: Importer, key: str, value: Any, entry: dict) -> None:
    """A model, adapter or file the config reads: found locally (written relative to the spec), a hub
    id (kept as is), or not found (written as the tool would resolve it, with a note)."""
    flag = entry.get("flag", key)
    hub = flag in ("model_name_or_path", "adapter_name_or_path")
    items = value if isinstance(value, list) else [value]
    out, notes = [], []
    for item in items:
        if not isinstance(item, str):
            out.append(item)
            continue
        written, found = imp.path_value(item, hub)
        out.append(written)
        if not found:
            notes.append(imp.not_found(key, item))
    imp.put(key, out if isinstance(value, list) else out[0], entry, note="; ".join(notes) or None, raw=value)


def output_path(imp: Importer, key: str, value: Any, entry: dict) -> None:
    """A path the tool writes (or one not known to be read), resolved from the directory it runs in."""
    imp.put(key, imp.from_run_dir(value) if isinstance(value, str) else value, entry, raw=value)


def dataset_dir(imp: Importer, key: str, value: Any, entry: dict) -> None:
    """LLaMA-Factory's folder of dataset_info.json, referenced where it is."""
    if value == "ONLINE" or str(value).startswith("REMOTE:"):
        imp.keep(
            key,
            value,
            "LLaMA-Factory reads these datasets (or their dataset_info.json) from the hub; "
            "tunepipe reads a local dataset_info.json: download it and set data.dataset_dir",
        )
        imp.notes.append(f"{key}: {value}: set data.dataset_dir to a folder with the datasets' dataset_info.json")
        return
    found = imp.locate(value, lambda p: (p / DATASET_INFO).is_file()) or imp.locate(value, Path.is_dir)
    if found is None:
        imp.put(key, imp.from_run_dir(value), entry, note=imp.not_found(key, value), raw=value)
    else:
        rel = imp.relative(found)
        imp.put(key, rel, entry, note=None if rel == value else f"found at {found}", raw=value)


def default_dataset_dir(imp: Importer, default: str) -> None:
    """LLaMA-Factory reads datasets from `data` (relative to where it runs) when dataset_dir is unset."""
    dataset_dir(imp, "dataset_dir", default, {})
    imp.origins.pop("dataset_dir", None)
    comments = imp.comments.setdefault("dataset_dir", [])
    comments.insert(0, f"not in the config: {imp.name}'s default dataset_dir ({default})")


def template_name(imp: Importer, source: str) -> tuple[str, str | None]:
    """A source template name → (tunepipe template, note on what differs or None)."""
    from ..runtime.template_registry import get, template_names

    rules = imp.rules["templates"]
    notes = rules["notes"]
    name = (rules.get("rename") or {}).get(source, source)
    if name not in template_names():
        return "auto", notes["unknown"].format(source=source)
    if source.startswith("tokenizer_default_fallback_"):
        return "auto", notes["fallback"].format(source=source)
    if name in rules.get("own_format", []):
        return name, notes["own_format"].format(name=name, source=source)
    if name in rules.get("model_own", []):
        return name, notes["model_own"].format(name=name, source=source, mirrors=get(name)["mirrors"])
    return name, None


def template(imp: Importer, key: str, value: Any, entry: dict) -> None:
    if not isinstance(value, str):
        imp.keep(key, value, "expected a template name")
        return
    if value == "jinja" and imp.tool == AXOLOTL:
        imp.keep(key, value, "imported through chat_template_jinja (template_file)", "same")
        return
    name, note = template_name(imp, value)
    imp.set("template", name, key, value, note)


def jinja_template(imp: Importer, key: str, value: Any, entry: dict) -> None:
    """axolotl's own Jinja chat template (a file or the template itself) → template_file."""
    a_path = isinstance(value, str) and "\n" not in value and len(value) < 4096
    found = imp.locate(value, Path.is_file) if a_path else None
    if found is not None:
        imp.set("template_file", imp.relative(found), key, value)
    else:
        imp.files[JINJA_FILE] = value
        imp.set(
            "template_file",
            JINJA_FILE,
            key,
            "<inline Jinja>",
            f"the inline template is written to {JINJA_FILE} beside the spec",
        )
    replace_template(imp, f"{key} renders instead (template_file)")


def replace_template(imp: Importer, reason: str) -> None:
    """Move an imported template name out of the spec (listed with the reason) for another choice."""
    imp.values.pop("template", None)
    imp.comments.pop("template", None)
    for key, raw in imp.origins.pop("template", []):
        imp.keep(key, raw, reason)


def switch(imp: Importer, key: str, value: Any, entry: dict) -> None:
    """A key whose being set (true, or any value) sets a flag to `arg` (true when there is none)."""
    if value is False:
        imp.keep(key, value, f"only {key}: true has an effect", "same")
    else:
        imp.put(key, entry.get("arg", True), entry, raw=value)


def adapter(imp: Importer, key: str, value: Any, entry: dict) -> None:
    if value == "lora":
        imp.set("finetuning_type", "lora", key, value)
    elif value == "qlora":
        imp.set("finetuning_type", "lora", key, value, "axolotl qlora: LoRA on a 4-bit bitsandbytes base")
        for flag, setting in (("quantization_bit", 4), ("quantization_method", "bnb")):
            if flag not in imp.values:  # load_in_4bit: true said it already
                imp.set(flag, setting, key, value)
    else:
        imp.keep(key, value, "tunepipe's adapters are LoRA (adapter: lora or qlora)")


def quantized_load(imp: Importer, key: str, value: Any, entry: dict) -> None:
    if value is not True:
        imp.keep(key, value, f"only {key}: true has an effect", "same")
        return
    bits = entry["arg"]
    if imp.values.get("quantization_bit", bits) != bits:
        imp.keep(key, value, f"conflicts with quantization_bit: {imp.values['quantization_bit']}, set by another key")
        return
    imp.set("quantization_bit", bits, key, value)
    if "quantization_method" not in imp.values:
        imp.set("quantization_method", "bnb", key, value, f"axolotl loads in {bits} bits with bitsandbytes")


def lora_target(imp: Importer, key: str, value: Any, entry: dict) -> None:
    """lora_target_modules and lora_target_linear: true (every linear layer but the head: tunepipe's all)
    together, as axolotl combines them."""
    if key == "lora_target_linear":
        if value is not True:
            imp.keep(key, value, "only lora_target_linear: true has an effect", "same")
            return
        modules = ["all"]
    else:
        modules = [m.strip() for m in value.split(",")] if isinstance(value, str) else list(value)
    current = imp.values.get("lora_target")
    current = [current] if isinstance(current, str) else current or []
    merged = "all" if "all" in [*modules, *current] else list(dict.fromkeys([*current, *modules]))
    imp.values["lora_target"] = merged
    imp.origins.setdefault("lora_target", []).append((key, value))
    imp.comments.setdefault("lora_target", []).append(f"{imp.name} {key}: {show(value)}")


def eval_steps(imp: Importer, key: str, value: Any, entry: dict) -> None:
    """axolotl evaluates every eval_steps steps when eval_steps is set."""
    imp.put(key, value, entry)
    if "evaluation_strategy" not in imp.values:
        imp.set("evaluation_strategy", "steps", key, value, "axolotl evaluates every eval_steps when it is set")


def evals_per_epoch(imp: Importer, key: str, value: Any, entry: dict) -> None:
    if value == 1 and "evaluation_strategy" not in imp.values:
        imp.set("evaluation_strategy", "epoch", key, value)
        return
    imp.keep(
        key,
        value,
        "tunepipe evaluates once per epoch (evaluation_strategy: epoch) or every eval_steps "
        "steps: set evaluation_strategy: steps and eval_steps to the steps per epoch / N",
    )


def use_reentrant(imp: Importer, key: str, value: Any, entry: dict) -> None:
    if not isinstance(value, dict):
        imp.keep(key, value, "expected a mapping of gradient checkpointing arguments")
        return
    for name, item in value.items():
        if name == "use_reentrant" and isinstance(item, bool):
            imp.set("use_reentrant_gc", item, f"{key}.{name}", item)
        else:
            imp.keep(f"{key}.{name}", item, "no tunepipe equivalent")


def fsdp(imp: Importer, key: str, value: Any, entry: dict) -> None:
    """axolotl writes FSDP options as a list; tunepipe (like the transformers Trainer) as one string."""
    imp.put(key, " ".join(map(str, value)) if isinstance(value, list) else value, entry, raw=value)


def fsdp_config(imp: Importer, key: str, value: Any, entry: dict) -> None:
    """axolotl's FSDP options are a mapping; tunepipe's fsdp_config names a JSON file (the transformers
    Trainer's), written beside the spec."""
    if not isinstance(value, dict):
        input_path(imp, key, value, entry)
        return
    imp.files[FSDP_FILE] = json.dumps(value, indent=2, ensure_ascii=False) + "\n"
    imp.set("fsdp_config", FSDP_FILE, key, "<a mapping>", f"written to {FSDP_FILE} beside the spec")


TRANSFORMS: dict[str, Callable[[Importer, str, Any, dict], None]] = {
    "input_path": input_path,
    "output_path": output_path,
    "dataset_dir": dataset_dir,
    "template": template,
    "jinja_template": jinja_template,
    "switch": switch,
    "adapter": adapter,
    "quantized_load": quantized_load,
    "lora_target": lora_target,
    "eval_steps": eval_steps,
    "evals_per_epoch": evals_per_epoch,
    "use_reentrant": use_reentrant,
    "fsdp": fsdp,
    "fsdp_config": fsdp_config,
}
DEFAULT_TRANSFORMS: dict[str, Callable[[Importer, Any], Any]] = {
    "twice_lora_rank": lambda imp, _: 2 * imp.effective("lora_rank"),
    "copy_flag": lambda imp, flag: imp.values[flag],
}


# ------------------------------------------------------------------------------------ LLaMA-Factory
def from_llama_factory(imp: Importer, doc: dict[str, Any]) -> None:
    stage = doc.get("stage", imp.effective("stage"))
    if "export_dir" in doc and "do_train" not in doc:
        imp.train_out = "an export config: LLaMA-Factory exports a model with it and trains nothing"
    elif doc.get("do_train") is not True:
        imp.train_out = "do_train is not true: LLaMA-Factory does not train with this config"
    elif stage not in imp.catalog.flags["stage"].choices:
        imp.train_out = (
            f"LLaMA-Factory stage {stage} has no tunepipe equivalent (tunepipe trains "
            f"{' and '.join(imp.catalog.flags['stage'].choices)})"
        )
    elif doc.get("finetuning_type", "lora") not in methods(imp):
        imp.train_out = (
            f"LLaMA-Factory finetuning_type {doc['finetuning_type']} has no tunepipe equivalent "
            f"(tunepipe trains {', '.join(methods(imp))})"
        )
    for key, value in doc.items():
        imp.carry(key, value)
    if "dataset" in imp.values and "dataset_dir" not in doc:
        default_dataset_dir(imp, "data")


def methods(imp: Importer) -> list[str]:
    """The finetuning_type values that train something."""
    return [m for m in imp.catalog.flags["finetuning_type"].choices if m != "none"]


def add_export(imp: Importer, export: Path) -> None:
    """A LLaMA-Factory export config beside the training config: merge (a LoRA run) and quantize (GPTQ)
    sections. Its keys are listed under its file name: as the training config's, or what differs."""
    doc = read_config(export)
    if detect(doc, export) != LLAMA_FACTORY or "export_dir" not in doc:
        raise UserError(f"{export}: not a LLaMA-Factory export config (it has no export_dir)")
    name = f"{export.parent.name}/{export.name}"
    trains = not imp.train_out
    lora = trains and imp.values.get("finetuning_type") == "lora"
    trained = imp.values.get("output_dir")
    model = doc.get("model_name_or_path")
    quantizes_ours = trains and isinstance(model, str) and imp.from_run_dir(model) == trained  # a full run's output
    for key, value in doc.items():
        label = f"{name}: {key}"
        if value is None:
            imp.unset.append(label)
        elif key == "adapter_name_or_path":
            same = lora and isinstance(value, str) and imp.from_run_dir(value) == trained
            imp.keep(
                label,
                value,
                "the merge step merges the adapter this spec's train step trains"
                + ("" if same else f", not this one (the training config writes {show(trained)})"),
                "same" if same else "lost",
            )
        elif key == "model_name_or_path":
            base = imp.path_value(value, hub=True)[0] == imp.values.get(key)
            ours = trains and isinstance(value, str) and imp.from_run_dir(value) == trained
            imp.keep(
                label,
                value,
                "the base model, as in the training config"
                if base
                else "the model this spec's train step trains"
                if ours
                else f"differs from the training config's {key}: {show(imp.values.get(key))}",
                "same" if base or ours else "lost",
            )
        elif key == "export_size" and lora:
            imp.set("max_shard_size", f"{value}GB", label, value, "LLaMA-Factory's export_size is in GB")
        elif key == "export_quantization_bit" and quantizes_ours:
            imp.set("method", "gptq", label, value, "LLaMA-Factory quantizes its export with GPTQ")
            imp.set("bits", value, label, value)
        elif key == "export_quantization_bit":
            imp.keep(label, value, f"it quantizes {show(model)}, not a model this spec trains")
        elif key in ("template",) or key in imp.values:
            same = imp.values.get(key) in (value, template_name(imp, str(value))[0] if key == "template" else value)
            imp.keep(
                label,
                value,
                "as in the training config"
                if same
                else f"differs from the training config's {key}: {show(imp.values.get(key))}",
                "same" if same else "lost",
            )
        else:
            same = imp.rules["no_effect"].get(key, object()) == value
            imp.keep(label, value, imp.rules["kept_out"].get(key, "no tunepipe equivalent"), "same" if same else "lost")
    if lora:
        imp.merge = f"from {name}: merge the trained LoRA adapter into the base model"
    elif "adapter_name_or_path" in doc:
        imp.notes.append(
            f"{name}: no merge section: tunepipe merges the LoRA adapter its own train step "
            "trains, and this spec trains none"
        )


# ------------------------------------------------------------------------------------ axolotl
def from_axolotl(imp: Importer, doc: dict[str, Any]) -> None:
    if doc.get("rl"):
        imp.train_out = f"axolotl rl: {doc['rl']} has no tunepipe equivalent (tunepipe trains sft and pt)"
    for key in ("reward_model", "process_reward_model"):
        if doc.get(key):
            imp.train_out = f"axolotl {key}: true trains a reward model; tunepipe trains language models (sft and pt)"
    for key, value in doc.items():
        if key in ("datasets", "pretraining_dataset", "test_datasets"):
            continue
        imp.carry(key, value)
    if doc.get("test_datasets") is not None:
        imp.keep(
            "test_datasets",
            doc["test_datasets"],
            "tunepipe evaluates on a validation split of the training data (data.val_size)",
        )
    datasets = [(f"datasets[{i}]", d, False) for i, d in enumerate(doc.get("datasets") or [])]
    pretraining = doc.get("pretraining_dataset") or []
    pretraining = pretraining if isinstance(pretraining, list) else [pretraining]
    datasets += [(f"pretraining_dataset[{i}]", d, True) for i, d in enumerate(pretraining)]
    for key in ("datasets", "pretraining_dataset"):
        if key in doc and not doc[key]:
            imp.unset.append(key)
    add_axolotl_datasets(imp, datasets)
    if "dataset" not in imp.values and not imp.train_out:
        imp.train_out = "none of the config's datasets has a tunepipe equivalent (see below)"


class Dataset(NamedTuple):
    label: str  # datasets[0]
    source: dict  # the axolotl entry
    name: str  # its dataset_info.json name
    entry: dict  # its dataset_info.json entry
    kind: str  # alpaca | sharegpt | text (import_map.yaml dataset_types)
    hint: tuple | None  # (template, note, the entry's key that implies it)


def add_axolotl_datasets(imp: Importer, datasets: list[tuple[str, Any, bool]]) -> None:
    converted: list[Dataset] = []
    for label, ds, pretrain in datasets:
        if not isinstance(ds, dict) or not isinstance(ds.get("path"), str):
            imp.keep(label, ds, "expected a mapping with a path")
            continue
        result = axolotl_dataset(imp, label, ds, pretrain)
        if result is not None:
            converted.append(Dataset(label, ds, *result))
    text = [d for d in converted if d.kind == "text"]
    if text and len(text) < len(converted):
        for d in text:
            imp.keep(
                d.label,
                d.source,
                "a plain-text dataset among chat/instruction ones: tunepipe trains it with "
                "stage: pt, in a train entry of its own",
            )
        converted = [d for d in converted if d.kind != "text"]
    if (
        converted
        and all(d.kind == "alpaca" for d in converted)
        and "template" in imp.values
        and not any(k.startswith("datasets[") for k, _ in imp.origins.get("template", []))
    ):
        replace_template(
            imp,
            "axolotl renders alpaca datasets with its alpaca prompt; chat_template only "
            "serves chat_template datasets (and the saved tokenizer)",
        )
    for d in converted:
        name = unique(d.name, imp.dataset_info)
        imp.dataset_info[name] = d.entry
        imp.origins.setdefault("dataset", []).append((d.label, d.source))
        kind_name = show(d.source.get("type", "pretrain"))
        imp.comments.setdefault("dataset", []).append(f"{imp.name} {d.label}: {d.source['path']} ({kind_name})")
        if d.hint and "template" not in imp.values and "template_file" not in imp.values:
            template, note, key = d.hint
            imp.set("template", template, f"{d.label}.{key}", d.source[key], note)
    if not converted:
        return
    imp.values["dataset"] = ",".join(imp.dataset_info)
    imp.set("dataset_dir", ".", note=f"the {DATASET_INFO} tunepipe import writes beside this spec")
    if converted[0].kind == "text" and not imp.train_out:
        imp.set("stage", "pt", note="axolotl trains plain-text datasets on every token: tunepipe's pt")


def axolotl_dataset(imp: Importer, label: str, ds: dict, pretrain: bool):
    """One axolotl dataset → (entry name, dataset_info.json entry, kind, template hint) or None."""
    kinds = import_map()[AXOLOTL]["dataset_types"]
    kind_name = "pretrain" if pretrain else ds.get("type")
    used = {"path", "type"}
    hint = None
    if isinstance(kind_name, dict):  # a user-defined alpaca-like prompt: its field names
        kind, fields = "alpaca", kind_name
        entry = {
            "formatting": "alpaca",
            "columns": {
                c: fields[f]
                for c, f in (
                    ("prompt", "field_instruction"),
                    ("query", "field_input"),
                    ("response", "field_output"),
                    ("system", "field_system"),
                )
                if fields.get(f)
            },
        }
        for name, value in fields.items():
            if not name.startswith("field_") and value is not None:
                imp.keep(f"{label}.type.{name}", value, "tunepipe's template renders the prompt (template:)")
    else:
        base = re.split(r"[:.]", str(kind_name))[0] if kind_name else "alpaca"
        kind = kinds.get(kind_name) or kinds.get(base)
        if kind is None:
            imp.keep(
                label,
                ds,
                f"axolotl dataset type {kind_name} has no tunepipe equivalent "
                "(imported types: " + ", ".join(kinds) + ")",
            )
            return None
        entry, used_fields, hint = dataset_format(imp, label, kind, ds, kind_name)
        used |= used_fields
        if kind_name not in kinds:
            imp.notes.append(f"{label}: axolotl type {kind_name} imported as {kind}: its prompt differs")
    location, used_loc = dataset_location(imp, label, ds)
    entry = {**location, **entry}
    for name, value in ds.items():
        if name in used | used_loc:
            continue
        if value is None:
            imp.unset.append(f"{label}.{name}")
        elif value is False:
            imp.keep(f"{label}.{name}", value, "false: no effect", "same")
        else:
            imp.keep(f"{label}.{name}", value, imp.rules["kept_out"].get(name, "no tunepipe equivalent"))
    path = ds["path"].rstrip("/")
    name = Path(path).stem if "file_name" in location else path.rsplit("/", 1)[-1]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name + (f"_{ds['name']}" if ds.get("name") else ""))
    return name, entry, kind, hint


def dataset_format(imp: Importer, label: str, kind: str, ds: dict, type_name: str):
    """(entry fields, the dataset keys read, template hint (name, note, key) or None) of one kind."""
    if kind == "alpaca":
        name, note = template_name(imp, "alpaca")
        return {"formatting": "alpaca"}, set(), (name, note, "type")
    if kind == "text":
        column = ds.get("text_column") or ds.get("field") or "text"
        return {"formatting": "alpaca", "columns": {"prompt": column}}, {"text_column", "field"}, None
    if type_name == "sharegpt":
        entry = {"formatting": "sharegpt", "columns": {"messages": ds.get("field_messages") or "conversations"}}
        hint = template_name(imp, ds["conversation"]) + ("conversation",) if ds.get("conversation") else None
        return entry, {"field_messages", "conversation"}, hint
    # chat_template: OpenAI-style messages by default, its keys renamed by the entry
    props = ds.get("message_property_mappings") or {}
    role_tag = props.get("role") or ds.get("message_field_role") or "role"
    # axolotl takes human or user, gpt or assistant; a dataset_info.json tag names one: ShareGPT's when
    # the messages have ShareGPT's keys (from/value), else OpenAI's.
    user, assistant = ("human", "gpt") if role_tag == "from" else ("user", "assistant")
    tags = {
        "role_tag": role_tag,
        "content_tag": props.get("content") or ds.get("message_field_content") or "content",
        "user_tag": user,
        "assistant_tag": assistant,
        "system_tag": "system",
        "observation_tag": "tool",
    }
    if not ds.get("roles"):
        other = "user/assistant" if user == "human" else "human/gpt"
        imp.notes.append(
            f"{label}: roles read as {user}/{assistant}; axolotl also reads {other}, and tunepipe "
            f"drops rows that use those (map them with the entry's tags in {DATASET_INFO})"
        )
    used = {
        "field_messages",
        "message_property_mappings",
        "message_field_role",
        "message_field_content",
        "chat_template",
    }
    for role, names in (ds.get("roles") or {}).items():
        names = [names] if isinstance(names, str) else list(names)
        if f"{role}_tag" in tags and names:
            tags[f"{role}_tag"] = names[0]
            if len(names) > 1:
                imp.keep(
                    f"{label}.roles.{role}",
                    names[1:],
                    f"a role has one name in dataset_info.json tags: {names[0]} is used",
                )
    used.add("roles")
    columns = {"messages": ds.get("field_messages") or "messages"}
    if ds.get("field_tools"):
        columns["tools"] = ds["field_tools"]
        used.add("field_tools")
    hint = template_name(imp, ds["chat_template"]) + ("chat_template",) if ds.get("chat_template") else None
    return {"formatting": "sharegpt", "columns": columns, "tags": tags}, used, hint


def dataset_location(imp: Importer, label: str, ds: dict) -> tuple[dict, set[str]]:
    """file_name (a local file or folder, relative to the spec's folder, which is dataset_dir) or hf_hub_url."""
    path = ds["path"]
    found = imp.locate(path)
    used = {"name", "split", "ds_type", "data_files"}
    extra = {k: ds[k] for k in ("name", "split") if ds.get(k)}
    location = {"subset": extra["name"]} if "name" in extra else {}
    if "split" in extra:
        location["split"] = extra["split"]
    files = ds.get("data_files")
    if found is not None:
        target = found / files if isinstance(files, str) and found.is_dir() else found
        rel = imp.relative(target)
        if rel.startswith(".."):
            imp.notes.append(
                f"{label}: {target} lies outside the spec's folder; tunepipe reads dataset files "
                "inside dataset_dir only: write the spec beside the data (-o DIR/spec.yaml)"
            )
        location["file_name"] = rel
    else:
        location["hf_hub_url"] = path
    if files is not None and not (found is not None and isinstance(files, str) and found.is_dir()):
        imp.keep(
            f"{label}.data_files", files, "dataset_info.json names one file or folder (file_name) or a hub dataset"
        )
    if ds.get("ds_type") is not None:
        imp.keep(
            f"{label}.ds_type", ds["ds_type"], "tunepipe reads json, jsonl, csv and parquet by their suffix", "same"
        )
    return location, used


def unique(name: str, taken: dict) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}_{n}", n + 1
    return candidate


# ------------------------------------------------------------------------------------ the API
def import_config(
    path: Path, *, spec_dir: Path | None = None, run_dir: Path | None = None, export: Path | None = None
) -> ImportResult:
    """Convert a LLaMA-Factory or axolotl config into tunepipe spec text (see the module docstring)."""
    path = Path(path)
    doc = read_config(path)
    tool = detect(doc, path)
    imp = Importer(tool, path, Path(spec_dir or Path.cwd()), Path(run_dir or Path.cwd()))
    if tool == LLAMA_FACTORY:
        from_llama_factory(imp, doc)
        if export is not None:
            add_export(imp, Path(export))
        elif "export_dir" in doc:
            imp.notes.append(
                f"an export config: import it together with its training config "
                f"(tunepipe import TRAIN.yaml --export {path.name}) to get a merge section"
            )
    else:
        if export is not None:
            raise UserError("--export takes a LLaMA-Factory export config (axolotl merges with `axolotl merge-lora`)")
        from_axolotl(imp, doc)
    warmup_steps_win(imp)
    if imp.train_out:
        for flag in [f for f in imp.values if imp.catalog.flags[f].section == "train"]:
            for key, raw in imp.origins.pop(flag, []):
                imp.keep(key, raw, f"train.{flag} in tunepipe", "train")
                imp.notes = [n for n in imp.notes if not n.startswith(f"{key}: ")]  # about a value not in the spec
            del imp.values[flag]
    imp.apply_defaults()
    settle(imp)
    return ImportResult(
        tool=imp.name,
        source=path,
        text=imp.text(),
        dataset_info=imp.dataset_info,
        files=imp.files,
        kept_out=imp.kept,
        notes=imp.notes,
    )


def warmup_steps_win(imp: Importer) -> None:
    """Both tools train with the transformers Trainer, where warmup_steps > 0 wins over warmup_ratio;
    in tunepipe warmup_ratio wins: keep the steps."""
    if (imp.values.get("warmup_steps") or 0) > 0 and imp.values.get("warmup_ratio"):
        for key, raw in imp.origins.pop("warmup_ratio", []):
            imp.keep(
                key,
                raw,
                f"the transformers Trainer ignores it when warmup_steps is set "
                f"({imp.values['warmup_steps']}); tunepipe would let it win",
            )
        del imp.values["warmup_ratio"]
        imp.comments.pop("warmup_ratio", None)


def settle(imp: Importer) -> None:
    """Validate the spec as tunepipe will and move out every flag it rejects, with its message (a
    round's errors can hide the next round's). Errors on inputs stay: they depend on where the spec
    is written, and import_command reports them there."""
    from .loader import SpecError, load_spec

    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "spec.yaml"
        for _ in range(MAX_ROUNDS):
            probe.write_text(imp.text(), encoding="utf-8")
            try:
                load_spec(probe)
                return
            except SpecError as exc:
                moved = False
                for diagnostic in exc.diagnostics:
                    section, _, flag = diagnostic.path.partition(".")
                    if diagnostic.severity == "error" and imp.reject(section, flag, diagnostic.message):
                        moved = True
                if not moved:
                    return


def import_command(config: Path, output: Path | None = None, *, force: bool = False, export: Path | None = None) -> int:
    """`tunepipe import CONFIG [-o SPEC] [--export EXPORT] [--force]`: print the spec (or write it to
    SPEC), write dataset_info.json (axolotl) and any template file beside it, then validate it there.
    Refuses to overwrite a file without force. Returns 0 when the spec validates, 2 when it does not
    yet (its errors are printed: a path to fix, usually)."""
    from .loader import SpecError, load_spec

    spec_dir = (Path(output).parent if output else Path.cwd()).resolve()
    result = import_config(Path(config), spec_dir=spec_dir, export=export)
    writes = planned_writes(result, spec_dir, Path(output) if output else None, force)
    spec_dir.mkdir(parents=True, exist_ok=True)
    for target, text in writes.items():
        target.write_text(text, encoding="utf-8")
    if output is None:
        sys.stdout.write(result.text)
    err = sys.stderr
    kept = sum(k.kind != "same" for k in result.kept_out)
    lost = (
        f"{kept} key{'s' if kept != 1 else ''} kept out (listed at the end of the spec)"
        if kept
        else "every key carried over"
    )
    print(f"imported {config} ({result.tool})" + (f" into {output}" if output else "") + f"; {lost}", file=err)
    for target in writes:
        if target != (Path(output).resolve() if output else None):
            print(f"wrote {target}", file=err)
    for note in result.notes:
        print(f"check: {note}", file=err)
    if output is None:  # validated where its relative paths point: the current directory
        handle, name = tempfile.mkstemp(suffix=".yaml", prefix=".tunepipe-import-", dir=spec_dir)
        os.close(handle)
        probe = Path(name)
        probe.write_text(result.text, encoding="utf-8")
    else:
        probe = Path(output)
    try:
        load_spec(probe)
    except SpecError as exc:
        print("the spec does not validate yet; fix these, then run tunepipe validate:", file=err)
        for line in exc.details:
            print("  " + (line if output else line.replace(str(probe), "<spec>")), file=err)
        return exc.exit_code
    finally:
        if output is None:
            probe.unlink(missing_ok=True)
    return 0


def planned_writes(result: ImportResult, spec_dir: Path, output: Path | None, force: bool) -> dict[Path, str]:
    """Every file import_command writes, checked before any is written: an existing file is kept
    unless force (dataset_info.json is merged into: only entries of the same name conflict)."""
    writes: dict[Path, str] = {}
    if output is not None:
        writes[output.resolve()] = result.text
    for name, text in result.files.items():
        writes[spec_dir / name] = text
    spec_path = output.resolve() if output is not None else None
    problems = (
        []
        if force
        else [
            f"{p} exists"
            for p, text in writes.items()
            if p.exists() and (p == spec_path or p.read_text(encoding="utf-8") != text)
        ]
    )
    if result.dataset_info:
        info_path = spec_dir / DATASET_INFO
        try:
            info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
        except ValueError as exc:
            raise UserError(f"{info_path}: not valid JSON ({exc}); fix it or move it away") from None
        if not isinstance(info, dict):
            raise UserError(f"{info_path}: expected a JSON object of dataset entries")
        clashes = [n for n, e in result.dataset_info.items() if n in info and info[n] != e]
        problems += [f"{info_path} has a different entry {n!r}" for n in clashes if not force]
        writes[info_path] = json.dumps({**info, **result.dataset_info}, indent=2, ensure_ascii=False) + "\n"
    if problems:
        raise UserError("tunepipe import does not overwrite files: pass --force to replace them", problems)
    return writes
