"""AutoTokenizer's choice of tokenizer class for a local model directory, made without importing torch.

`transformers.AutoTokenizer` lives in a module whose imports (model configurations, rope utilities)
pull in torch: 3–4 s before the first token, in a step that only tokenizes. The class matters:
transformers 5 rebuilds a named class's normalizer and pre-tokenizer from the class rather than from
tokenizer.json, so the ids depend on it. The choice itself depends on two JSON files and three tables
of literal data in AutoTokenizer's module (model type → class, model types whose hub class is wrong,
model ids that need the generic backend). No library exposes those without the import, so this module
reads them from the installed transformers' source with `ast` — no code of that module runs — and
applies AutoTokenizer.from_pretrained's rules for the local case without remote code.

Anything outside that case (remote code, gguf, no class named, tables that no longer parse) gives
None and the caller uses AutoTokenizer itself. tests/test_template_stage.py checks the choice against
AutoTokenizer's on (class, model type) pairs that exercise each rule.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import json
from pathlib import Path
from typing import Any

GENERIC = ("TokenizersBackend", "PythonBackend", "PreTrainedTokenizerFast")


@functools.cache
def _tables() -> tuple[dict[str, str | None], set[str], list[str]] | None:
    """(TOKENIZER_MAPPING_NAMES, MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS, MODEL_IDS_TO_TOKENIZERS_BACKEND)
    as tokenization_auto defines them with the packages installed here; None if the source changed shape."""
    import importlib.util

    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(spec.submodule_search_locations[0]) / "models" / "auto" / "tokenization_auto.py"
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"))
        found = {}
        for node in tree.body:
            target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
            if isinstance(target, ast.Name) and getattr(node, "value", None) is not None:
                found[target.id] = node.value
        pairs = found["TOKENIZER_MAPPING_NAMES"].args[0].elts  # OrderedDict[...]([ (type, class), ... ])
        mapping = {ast.literal_eval(k): _class_name(v) for k, v in (p.elts for p in pairs)}
        incorrect = set(ast.literal_eval(found["MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS"]))
        ids = list(ast.literal_eval(found["MODEL_IDS_TO_TOKENIZERS_BACKEND"]))
    except (OSError, SyntaxError, KeyError, AttributeError, IndexError, TypeError, ValueError):
        return None
    for model_type in incorrect:  # as the module does right after the set
        mapping.setdefault(model_type, "TokenizersBackend")
    return mapping, incorrect, ids


def _class_name(node: ast.expr) -> str | None:
    """A mapping value: "X", None, or `A if is_<package>_available() else B` (nested)."""
    import importlib.util

    while isinstance(node, ast.IfExp):
        test = node.test
        if not (isinstance(test, ast.Call) and isinstance(test.func, ast.Name) and not test.args):
            raise ValueError("unexpected condition")
        package = test.func.id.removeprefix("is_").removesuffix("_available")
        node = node.body if importlib.util.find_spec(package) is not None else node.orelse
    return ast.literal_eval(node)


def _class(name: str):
    """tokenizer_class_from_name for the classes transformers ships (its lazy top-level module
    imports just that tokenizer's file)."""
    import transformers

    if name in ("BloomTokenizer", "BloomTokenizerFast"):
        name = "TokenizersBackend"
    cls = getattr(transformers, name, None)
    if cls is None and name.endswith("Fast"):
        cls = getattr(transformers, name[:-4], None)
    return cls if isinstance(cls, type) else None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def autotokenizer_class(model_dir: Path | str):
    """The class `AutoTokenizer.from_pretrained(model_dir)` instantiates, or None when only it can tell."""
    model_dir = Path(model_dir)
    tables = _tables()
    tokenizer_config = _read_json(model_dir / "tokenizer_config.json")
    config = _read_json(model_dir / "config.json")
    if tables is None or tokenizer_config is None or config is None or "auto_map" in tokenizer_config:
        return None
    if not (model_dir / "tokenizer.json").is_file() or "gguf_file" in tokenizer_config:
        return None
    mapping, incorrect, ids = tables
    model_type, model_name = config.get("model_type"), config.get("model_name")
    backend = _class("TokenizersBackend")

    if any(fnmatch.fnmatch(str(model_dir).lower(), pattern) for pattern in ids):
        return backend
    hub_class = tokenizer_config.get("tokenizer_class") or config.get("tokenizer_class")
    if not isinstance(hub_class, str):
        return None  # AutoTokenizer goes by the model type's config class: leave it to it
    registered = (mapping.get(model_type) or "").removesuffix("Fast")
    if (
        hub_class.removesuffix("Fast") == "LlamaTokenizer"
        and registered != "MistralCommonBackend"
        and model_type not in incorrect
        and model_name not in incorrect
        and '"ByteLevel"' in (model_dir / "tokenizer.json").read_text(encoding="utf-8")
    ):
        return backend
    if model_type and registered and registered != hub_class.removesuffix("Fast"):
        if registered not in GENERIC + ("MistralCommonBackend",):
            name = registered if (model_type in incorrect or model_name in incorrect) else hub_class
            cls = _class(name)
            if cls is not None and cls.__name__ not in GENERIC:
                return cls
        if registered == "MistralCommonBackend":
            return None
        return backend
    named = tokenizer_config.get("tokenizer_class")
    if not isinstance(named, str):
        return None
    cls = _class(named.removesuffix("Fast")) or _class(named)
    if cls is None or cls.__name__ == "PythonBackend":
        return backend
    return cls
