"""The built-in chat templates (templates.yaml), as data. Light: no torch, no transformers.

Used by `tunepipe templates`, by spec validation (`template_names()`) and by runtime/chat_template.py.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

# Every slot a template may define, and its default.
SLOTS: dict[str, Any] = {
    "prefix": "",
    "system": "{{content}}",
    "system_in_user": False,
    "user": "{{content}}",
    "assistant_header": "",
    "last_assistant_prefix": "",
    "assistant": "{{content}}",
    "suffix": "",
    "tools": "You have access to the following tools:{{tools}}",
    "tool_call": "{{content}}",
    "function": None,
    "observation": None,
    "default_system": "",
    "stop_words": [],
    "strip_content": False,
}
META = ("description", "mirrors")
# `template: auto` is not a registry entry: it means the tokenizer's own chat_template.
AUTO = "auto"


@functools.lru_cache(maxsize=1)
def _registry() -> dict[str, dict[str, Any]]:
    import yaml  # here: validate and plan of a spec that names no template never pay for it

    text = resources.files("tunepipe.runtime").joinpath("templates.yaml").read_text(encoding="utf-8")
    data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # C loader: validate stays fast
    return {name: dict(entry) for name, entry in data.items()}


def template_names() -> list[str]:
    """Valid values of the `template` flag: the registry's names plus `auto`."""
    return [AUTO, *sorted(_registry())]


def get(name: str) -> dict[str, Any] | None:
    """A registry template with every slot filled in (defaults applied), or None if unknown."""
    entry = _registry().get(name)
    if entry is None:
        return None
    return {
        "name": name,
        **SLOTS,
        **{k: v for k, v in entry.items() if k not in META},
        **{k: entry.get(k) for k in META},
    }


def unknown_keys(entry: dict[str, Any]) -> list[str]:
    return sorted(k for k in entry if k not in SLOTS and k not in META and k != "name")


def list_templates() -> list[dict[str, Any]]:
    """One row per template for `tunepipe templates`: name, description, mirrors, default system, stop words."""
    rows = [
        {
            "name": AUTO,
            "description": "the tokenizer's own chat_template (apply_chat_template)",
            "mirrors": None,
            "default_system": "",
            "stop_words": [],
        }
    ]
    for name in sorted(_registry()):
        t = get(name)
        rows.append(
            {
                "name": name,
                "description": t["description"] or "",
                "mirrors": t["mirrors"],
                "default_system": t["default_system"],
                "stop_words": list(t["stop_words"]),
            }
        )
    return rows


# ---------------------------------------------------------------- template files
YAML_SUFFIXES = (".yaml", ".yml", ".json")


def slot_problems(entry: dict[str, Any], where: str) -> list[str]:
    """Unknown keys and mistyped slots of a YAML template: each slot takes the type of its default
    in SLOTS (text; true/false; a list of strings for stop_words; text or null where the default
    is null); `description` and `mirrors` are text."""
    problems = []
    bad = unknown_keys(entry)
    if bad:
        problems.append(f"{where}: unknown template keys {', '.join(bad)} (known: {', '.join(SLOTS)})")
    for key, value in entry.items():
        if key not in SLOTS and key not in META:
            continue
        default = SLOTS.get(key)
        if isinstance(default, bool):
            ok, want = isinstance(value, bool), "true or false"
        elif isinstance(default, list):
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
            want = "a list of strings"
        elif default is None or key in META:
            ok, want = value is None or isinstance(value, str), "a string (or null)"
        else:
            ok, want = isinstance(value, str), "a string"
        if not ok:
            problems.append(f"{where}: slot {key} must be {want}, got {type(value).__name__} {value!r}")
    return problems


def read_template_file(path) -> tuple[Any, list[str]]:
    """(content, problems) of a `template_file`: the slot mapping of a YAML/JSON file, the text of
    a Jinja one; content is None when the file cannot be used. Light: no Jinja compilation here."""
    from pathlib import Path

    path = Path(path)
    where = str(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        return None, [f"{where}: cannot read the template file ({e.strerror or e})"]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, [f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); save it as UTF-8"]
    if path.suffix not in YAML_SUFFIXES:
        return text, []
    from tunepipe.spec.loader import AliasExpansionError, bounded_yaml

    try:
        entry = bounded_yaml("safe").load(text)
    except AliasExpansionError as e:  # a few bytes of nested aliases standing for millions of values
        return None, [f"{where}:{e.problem_mark.line + 1}:{e.problem_mark.column + 1}: {e.problem}"]
    except Exception as e:  # ruamel's parser and scanner errors have no common public base
        return None, [f"{where}: not valid YAML/JSON ({e})"]
    if not isinstance(entry, dict):
        return None, [f"{where}: a template file holds a mapping of slots (see templates.yaml)"]
    problems = slot_problems(entry, where)
    return (None if problems else dict(entry)), problems


def check_template_file(path) -> list[str]:
    """Problems with a `template_file`, for spec validation: unreadable or non-UTF-8, YAML that does
    not parse or whose slots are unknown or mistyped, Jinja with a syntax error or that breaks the
    sandbox (its limits, Python internals) on a sample conversation. Light: imports neither torch nor
    transformers (only jinja2)."""
    content, problems = read_template_file(path)
    if problems or not isinstance(content, str):
        return problems
    return jinja_problems(content, str(path))


# A sample conversation rendered at validation: a template that breaks the sandbox on this breaks it
# on any data. Other errors (raise_exception on a role it does not take, ...) depend on the data, and
# the template stage reports them with the sample that caused them.
SAMPLE_MESSAGES = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": "An assistant."},
]


def jinja_problems(source: str, where: str) -> list[str]:
    """A Jinja template's syntax errors, compiled by the sandboxed environment chat templates run in,
    and the sandbox violations of rendering the sample conversation (whole, and as a prompt)."""
    import jinja2

    try:
        template = sandbox_env().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        return [f"{where}:{e.lineno}: Jinja syntax error: {e.message}"]
    for messages, generation_prompt in ((SAMPLE_MESSAGES, False), (SAMPLE_MESSAGES[:-1], True)):
        try:
            render(
                template,
                messages=messages,
                tools=None,
                add_generation_prompt=generation_prompt,
                bos_token="<s>",
                eos_token="</s>",
            )
        except Exception as e:  # noqa: BLE001 - only sandbox violations are the template's fault on any data
            violation = sandbox_violation(e, where)
            if violation is not None:
                return [violation.message]
    return []


# ---------------------------------------------------------------- the Jinja sandbox
# A user's Jinja chat template (a `template_file`) runs in jinja2's immutable sandbox, which keeps it
# from Python internals, and within these limits: a chat template renders one conversation, so
# anything near them is a bug in the template (`range(10**8)`, a string doubled in a loop), not a long
# conversation.
MAX_RANGE = 10_000  # items in one range()
MAX_LENGTH = 10_000_000  # characters of the output, and of any string or list the template builds
MAX_INT_BITS = 4096  # size of an integer the template computes (10**1233 or so)
MAX_RENDER_SECONDS = 2.0  # wall time of one render
LIMITS = (
    f"the sandbox allows ranges of {MAX_RANGE} items, strings and lists of {MAX_LENGTH} characters, "
    f"integers of {MAX_INT_BITS} bits and {MAX_RENDER_SECONDS:g} s per rendered conversation"
)


class TemplateLimitError(Exception):
    """A template went past one of the sandbox limits; the message says which."""


def sandbox_env():
    """The environment user templates run in (see above); render them with `render`."""
    import json

    from tunepipe.errors import UserError

    def raise_exception(message):
        raise UserError(f"chat template raised: {message}")

    env = _sandbox_class()(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False)
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys
    )
    env.filters = {name: _limited(env, f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = raise_exception
    env.globals["range"] = _range
    return env


def render(template, **context) -> str:
    """A template compiled by `sandbox_env()`, rendered within the limits (TemplateLimitError past them)."""
    import time

    env = template.environment
    env.deadline = time.monotonic() + MAX_RENDER_SECONDS
    try:
        chunks, length = [], 0
        for chunk in template.generate(**context):
            length += len(chunk)
            if length > MAX_LENGTH:
                raise TemplateLimitError(f"the output is longer than {MAX_LENGTH} characters")
            env.tick()
            chunks.append(chunk)
        return "".join(chunks)
    finally:
        env.deadline = None


def sandbox_violation(error: Exception, where: str):
    """The UserError for an exception that is a sandbox violation (a limit, endless recursion, Python
    internals): the template's fault on any data. None for other exceptions."""
    from jinja2.exceptions import SecurityError

    from tunepipe.errors import UserError

    if isinstance(error, TemplateLimitError):
        return UserError(f"{where}: template error: {error}", [LIMITS])
    if isinstance(error, RecursionError):
        return UserError(f"{where}: template error: it recursed too deeply (a macro that calls itself without end?)")
    if isinstance(error, SecurityError):
        return UserError(
            f"{where}: the template tried to reach Python internals, which the sandbox forbids ({error})",
            ["a chat template may only use the messages, tools and special tokens it is given"],
        )
    return None


def _range(*args) -> range:
    """range() for templates: at most MAX_RANGE items."""
    items = range(*args)
    try:
        too_many = len(items) > MAX_RANGE
    except OverflowError:  # more items than a C integer counts
        too_many = True
    if too_many:
        shown = ", ".join(map(str, args))
        raise TemplateLimitError(f"range({shown}) has more than {MAX_RANGE} items")
    return items


def _check_length(length: int) -> None:
    if length > MAX_LENGTH:
        raise TemplateLimitError(f"a string or list of {length} items (more than {MAX_LENGTH})")


def _check_bits(bits: int) -> None:
    if bits > MAX_INT_BITS:
        raise TemplateLimitError(f"an integer of about {bits} bits (more than {MAX_INT_BITS})")


def _check_value(value):
    """`value` itself, unless it is a string, list or integer beyond the limits."""
    if isinstance(value, (str, list, tuple, dict, set)):
        _check_length(len(value))
    elif isinstance(value, int):
        _check_bits(value.bit_length())
    return value


def _check_operands(operator: str, left, right) -> None:
    """Refuse `left operator right` before computing it when its size is known to pass a limit."""
    sequence = (str, list, tuple)
    if operator == "*" and isinstance(left, int) and isinstance(right, sequence):
        left, right = right, left
    if operator == "*" and isinstance(left, sequence) and isinstance(right, int):
        _check_length(len(left) * right)
    elif operator == "+" and isinstance(left, sequence) and isinstance(right, sequence):
        _check_length(len(left) + len(right))
    elif isinstance(left, int) and isinstance(right, int):
        if operator == "*":
            _check_bits(left.bit_length() + right.bit_length())
        elif operator == "**" and right > 0 and abs(left) > 1:
            _check_bits(abs(left).bit_length() * right)


def _limited(env, f):
    """A filter that keeps to the limits: the clock checked, the result's size checked."""

    @functools.wraps(f)  # keeps jinja2's pass_context / pass_environment marks
    def filter_within_limits(*args, **kwargs):
        env.tick()
        return _check_value(f(*args, **kwargs))

    return filter_within_limits


@functools.lru_cache(maxsize=1)
def _sandbox_class():
    """jinja2's ImmutableSandboxedEnvironment with the limits; built on first use, so that validating a
    spec without a template_file never imports jinja2.

    The limits hang on the sandbox's own hooks (every call, attribute and item access, and the
    operators it intercepts) and on two rewrites of the parsed template: each for-loop iterates
    through a checking iterator, and each `~` concatenation goes through a checking join. The
    clock is read at each of them: a template loops, calls or outputs to spend time."""
    import time

    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.visitor import NodeTransformer

    class Guarded:
        """A loop's iterable, read with the clock checked at each item (len() kept for loop.length)."""

        def __init__(self, env, iterable):
            self.env, self.iterable = env, iterable

        def __iter__(self):
            for item in self.iterable:
                self.env.tick()
                yield item

        def __len__(self):
            return len(self.iterable)

    class GuardLoops(NodeTransformer):
        def visit_For(self, node):
            self.generic_visit(node)
            node.iter = nodes.Filter(node.iter, "_tunepipe_loop", [], [], None, None, lineno=node.lineno)
            return node

        def visit_Concat(self, node):
            self.generic_visit(node)
            return nodes.Filter(
                nodes.List(node.nodes, lineno=node.lineno), "_tunepipe_concat", [], [], None, None, lineno=node.lineno
            )

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"+", "*", "**", "%"})
        deadline: float | None = None  # set by render()

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.filters["_tunepipe_loop"] = lambda iterable: Guarded(self, iterable)
            self.filters["_tunepipe_concat"] = lambda parts: "".join(map(str, parts))  # `~`, as jinja2 joins it

        def _generate(self, source, name, filename, defer_init=False):  # jinja2's hook for compiling a tree
            source = GuardLoops().visit(source)
            source.set_environment(self)
            return super()._generate(source, name, filename, defer_init)

        def tick(self) -> None:
            if self.deadline is not None and time.monotonic() > self.deadline:
                raise TemplateLimitError(f"rendering one conversation took more than {MAX_RENDER_SECONDS:g} s")

        def call(self, context, obj, /, *args, **kwargs):  # positional: a template may pass obj=… itself
            self.tick()
            return _check_value(super().call(context, obj, *args, **kwargs))

        def call_binop(self, context, operator, left, right):
            self.tick()
            _check_operands(operator, left, right)
            return _check_value(super().call_binop(context, operator, left, right))

        def getattr(self, obj, attribute):
            self.tick()
            return super().getattr(obj, attribute)

        def getitem(self, obj, argument):
            self.tick()
            return super().getitem(obj, argument)

    return BoundedSandbox
