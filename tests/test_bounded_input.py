"""Bad input stays bounded: a few hundred bytes of nested YAML aliases, or a Jinja template that loops,
grows strings or counts to 10**8, end in `tunepipe validate` quickly with exit 2 and a located message,
not after 30 s and gigabytes, and not with a traceback. Specs with a few anchors, and templates that
keep to the limits, work as before."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from tunepipe.runtime import template_registry
from tunepipe.spec.loader import MAX_ALIAS_NODES

MODEL = Path(__file__).resolve().parents[1] / "examples" / "models" / "tiny-llama"

# The alias bomb of the issue: every level nine times the one before; level f stands for 9**6 values.
BOMB = """version: 1
name: bomb
model: {model_name_or_path: $EXAMPLES/models/tiny-llama}
data: {dataset: identity, dataset_dir: $EXAMPLES/data}
template: {template: chatml}
train:
  finetuning_type: lora
  lora_target:
    - &a [x,x,x,x,x,x,x,x,x]
    - &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
    - &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
    - &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
    - &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
    - &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
"""
BASE = """version: 1
name: bounded
model: {model_name_or_path: $EXAMPLES/models/tiny-llama}
data: {dataset: identity, dataset_dir: $EXAMPLES/data}
"""


def validate(cli, path, *args) -> tuple[int, str, float]:
    start = time.monotonic()
    code, out, err = cli("validate", path, *args)
    return code, out + err, time.monotonic() - start


def test_an_alias_bomb_is_refused_fast_and_located(cli, write_spec):
    path = write_spec(BOMB)
    code, output, seconds = validate(cli, path)
    assert code == 2 and "Traceback" not in output
    # located at the alias that crosses the limit: levels b, c, d take 90 + 819 + 7380 nodes through
    # aliases, and the first *d of level e stands for 7381 more
    assert f"{path}:13:11: YAML aliases expand to more than {MAX_ALIAS_NODES} nodes" in output
    assert seconds < 5


def test_an_alias_inside_its_own_anchor_is_refused_and_located(cli, write_spec):
    path = write_spec(BASE + "train:\n  finetuning_type: lora\n  lora_target: &t [q_proj, *t]\n")
    code, output, _ = validate(cli, path)
    assert code == 2 and "Traceback" not in output
    assert f"{path}:7:28: alias *t is inside its own anchor &t" in output


def test_specs_sharing_blocks_through_anchors_still_work(cli, write_spec):
    spec = (
        BASE
        + """template: {template: chatml}
train:
  - &base {name: a, finetuning_type: lora, lora_target: [q_proj, v_proj], learning_rate: 1.0e-3}
  - {<<: *base, name: b, lora_rank: 4}
  - {<<: *base, name: c, lora_target: &t [k_proj, o_proj]}
  - {<<: *base, name: d, lora_target: *t}
"""
    )
    code, output, _ = validate(cli, write_spec(spec), "--print")
    assert code == 0, output
    train = {entry["name"]: entry for entry in yaml.safe_load(output)["train"]}
    assert [train[n]["learning_rate"] for n in "abcd"] == [1.0e-3] * 4
    assert train["b"]["lora_rank"] == 4 and train["a"]["lora_rank"] == 8
    assert train["b"]["lora_target"] == ["q_proj", "v_proj"] and train["d"]["lora_target"] == ["k_proj", "o_proj"]


def template_spec(write_spec, source: str, name: str = "chat.jinja") -> str:
    write_spec(source, name)
    return write_spec(
        BASE + f"template: {{template_file: {name}}}\ntrain: {{finetuning_type: lora, lora_target: all}}\n"
    )


def test_an_alias_bomb_in_a_yaml_template_file_is_refused_and_located(cli, write_spec):
    """A slot holding the bomb was once reported in full: a 25 MB error message."""
    levels = "".join(f"{b}: &{b} [{', '.join(['*' + a] * 9)}]\n" for a, b in zip("abcdef", "bcdefg"))
    path = template_spec(
        write_spec, "user: '{{content}}'\na: &a [x,x,x,x,x,x,x,x,x]\n" + levels + "description: *g\n", "slots.yaml"
    )
    code, output, seconds = validate(cli, path)
    assert code == 2 and "Traceback" not in output and len(output) < 1000
    assert f"{path.parent / 'slots.yaml'}:6:8: YAML aliases expand to more than {MAX_ALIAS_NODES} nodes" in output
    assert seconds < 5


@pytest.mark.parametrize(
    "source, message, seconds",
    [
        (
            "{% for i in range(10**8) %}x{% endfor %}{% for m in messages %}{{ m['content'] }}{% endfor %}",
            "template error: range(100000000) has more than 10000 items",
            5,
        ),
        ("{{ 'x' * 10**9 }}", "template error: a string or list of 1000000000 items (more than 10000000)", 5),
        (
            "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
            "template error: a string or list of 16777216 items (more than 10000000)",
            5,
        ),
        ("{{ 7 ** 1000000 }}", "template error: an integer of about 3000000 bits (more than 4096)", 5),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "template error: it recursed too deeply", 5),
        # a loop that outputs nothing and calls nothing is stopped by the clock (2 s a render)
        (
            "{% for i in range(9999) %}{% for j in range(9999) %}{% endfor %}{% endfor %}",
            "template error: rendering one conversation took more than 2 s",
            8,
        ),
    ],
    ids=["range", "repeat", "doubling", "power", "recursion", "time"],
)
def test_a_template_past_the_sandbox_limits_fails_validate(cli, write_spec, source, message, seconds):
    path = template_spec(write_spec, source)
    code, output, took = validate(cli, path)
    assert code == 2 and "Traceback" not in output
    assert f"{path}:5:12: template.template_file: {path.parent / 'chat.jinja'}: {message}" in output
    assert took < seconds


def test_data_dependent_template_errors_are_left_to_the_template_stage(cli, write_spec):
    """validate renders a sample conversation only to find what fails on any data; a template that
    refuses a role (as Gemma's refuses system prompts) may be right for the user's data."""
    path = template_spec(
        write_spec,
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}"
        "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}",
    )
    code, output, _ = validate(cli, path)
    assert code == 0, output


def test_templates_within_the_limits_render_as_in_jinjas_own_sandbox():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    source = (
        "{%- set ns = namespace(n=0) -%}{% macro turn(m) %}<{{ m.role }}>{{ m['content'] | trim }}{% endmacro %}"
        "{% for m in messages if m.role != 'tool' %}{{ loop.index }}/{{ loop.length }}{{ turn(m) ~ '|' }}"
        "{% if loop.last %}{{ eos_token * 2 }}{% endif %}{% set ns.n = ns.n + m.content|length %}{% endfor %}"
        "{{ ns.n }} {{ range(3)|list|join(',') }} {{ (messages|map(attribute='role')|list)[1:] }} {{ 2 ** 10 }}"
        "{% for k, v in {'a': 1}.items() %}{{ k }}={{ v }}{% else %}none{% endfor %}{{ '%s!' % 'x' }}"
    )
    context = {
        "messages": [
            {"role": "user", "content": " hi "},
            {"role": "tool", "content": "x"},
            {"role": "assistant", "content": "yo"},
        ],
        "eos_token": "</s>",
    }
    expected = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(source).render(**context)
    bounded = template_registry.sandbox_env().from_string(source)
    assert template_registry.render(bounded, **context) == expected
    assert expected.startswith("1/2<user>hi|2/2<assistant>yo|</s></s>6 0,1,2 ['tool', 'assistant'] 1024a=1x!")


def test_the_template_stage_reports_a_limit_as_a_template_error(tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from tunepipe.errors import UserError
    from tunepipe.runtime import chat_template as ct

    template_file = tmp_path / "counting.jinja"
    template_file.write_text(
        "{% for m in messages %}{{ m['content'] }}{% for i in range(10**8) %}{% endfor %}{% endfor %}"
    )
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    renderer, _ = ct.resolve({"template": "auto", "template_type": "default"}, tokenizer, template_file)
    start = time.monotonic()
    with pytest.raises(UserError, match=rf"^{template_file}: template error: range\(100000000\) has more than 10000"):
        ct.encode(
            tokenizer,
            renderer,
            [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
            cutoff_len=64,
        )
    assert time.monotonic() - start < 5


@pytest.mark.parametrize(
    "args, message",
    [
        (["--learning-rate"], "--learning-rate: train.learning_rate: --learning-rate needs a value (a number >= 0)"),
        (
            ["--no-use-cache", "maybe"],
            "--no-use-cache maybe: model.use_cache: --no-use-cache maybe is a switch: expected true or false, got 'maybe'",
        ),
    ],
)
def test_override_values_that_cannot_be_used_keep_their_messages(cli, write_spec, args, message):
    code, output, _ = validate(
        cli, write_spec(BASE + "template: {template: chatml}\ntrain: {finetuning_type: lora}\n"), *args
    )
    assert code == 2 and message in output
