"""Thousands of malformed specs: `validate` answers each with exit 0 or 2 and a message, never a traceback."""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml
from conftest import EXAMPLES, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunepipe.spec import load_catalog

CATALOG = load_catalog()
SECTIONS = [s for s in CATALOG.sections if s != "pipeline"]
FLAG_NAMES = sorted(CATALOG.flags) + sorted(CATALOG.negations)
VALID = (EXAMPLES / "quickstart.yaml").read_text(encoding="utf-8")
FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["no", "yes", "on", "0x1F", "1e999", "~", "-1", "🦙", "ａｂｃ", "${x}", "null"]),
)
keys = st.one_of(
    st.sampled_from(FLAG_NAMES),
    st.sampled_from(SECTIONS),
    st.text(min_size=1, max_size=20),
    st.sampled_from([f.replace("_", "-") for f in FLAG_NAMES[:40]]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=12,
)


def check(text: str | bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spec.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        code, _, err = run_cli("validate", path)
    assert code in (0, 2), (code, err)
    assert "Traceback" not in err
    if code == 2:
        assert "error:" in err


@FUZZ
@given(st.text(max_size=300))
def test_arbitrary_text(text):
    check(text)


@FUZZ
@given(st.binary(max_size=200))
def test_arbitrary_bytes(data):
    check(data)


@FUZZ
@given(st.dictionaries(keys, values, max_size=6))
def test_random_structures(doc):
    check(yaml.safe_dump(doc, allow_unicode=True))


@FUZZ
@given(st.sampled_from(SECTIONS), keys, values)
def test_one_bad_flag_in_a_valid_spec(section, key, value):
    doc = yaml.safe_load(VALID)
    target = doc.setdefault(section, {})
    if isinstance(target, list):
        target = target[-1]
    if target is None:
        doc[section] = target = {}
    target[key] = value
    check(
        yaml.safe_dump(doc, allow_unicode=True)
        .replace("models/tiny-llama", str(EXAMPLES / "models/tiny-llama"))
        .replace("dataset_dir: data", f"dataset_dir: {EXAMPLES / 'data'}")
    )


@FUZZ
@given(
    st.integers(min_value=0, max_value=len(VALID) - 1),
    st.sampled_from([":", "\t", "- ", "{", "]", "&a", "*b", "\n  ", "'"]),
)
def test_broken_yaml(position, junk):
    check(VALID[:position] + junk + VALID[position:])


def test_edge_files():
    for text in [
        "",
        "\n",
        "---\n",
        "[]",
        "42",
        "null",
        "~",
        "--- !!python/object:os.system\n",
        "a: &x [*x]\n",
        "train: [" * 2000,
        "model: {model_name_or_path: 1}\n" * 3,
        "\ufeffversion: 1\n",
    ]:
        check(text)
