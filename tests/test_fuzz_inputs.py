"""Fuzzing: whatever bytes a user's files hold, readers and the config loader either work or
explain the problem in our own error; they never crash with anything else."""

import json

import yaml
from conftest import PYDOCS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorafit.config import RunConfig
from lorafit.config_files import load_config
from lorafit.data.documents import Problems
from lorafit.data.readers import read_file
from lorafit.errors import LorafitError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SUFFIXES = [".txt", ".md", ".html", ".htm", ".jsonl", ".pdf"]
REAL_HTML = (PYDOCS / "tutorial" / "classes.html").read_bytes()

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


def read_all(path) -> tuple[list, Problems]:
    problems = Problems()
    return list(read_file(path, "text", problems)), problems


@FUZZ
@given(data=st.binary(max_size=2000), suffix=st.sampled_from(SUFFIXES))
def test_random_bytes_are_read_or_reported(tmp_path, data, suffix):
    path = tmp_path / f"f{suffix}"
    path.write_bytes(data)
    docs, problems = read_all(path)
    assert all(isinstance(d.text, str) for d in docs)
    assert all(p.where.startswith(str(path)) and p.reason == "unreadable" for p in problems.items)


@FUZZ
@given(cut=st.integers(min_value=0, max_value=len(REAL_HTML)))
def test_truncated_html_still_reads(tmp_path, cut):
    path = tmp_path / "page.html"
    path.write_bytes(REAL_HTML[:cut])
    docs, problems = read_all(path)
    assert len(docs) + len(problems.items) == 1


@FUZZ
@given(records=st.lists(json_values, max_size=6), garbage=st.binary(max_size=40))
def test_jsonl_lines_of_any_shape(tmp_path, records, garbage):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join([json.dumps(r).encode() for r in records] + [garbage]))
    docs, problems = read_all(path)
    assert all(p.where.startswith(f"{path}:") for p in problems.items)
    good = sum(isinstance(r, dict) and isinstance(r.get("text"), str) for r in records)
    assert len(docs) >= good


@FUZZ
@given(text=st.text(max_size=300))
def test_random_yaml_text_loads_or_is_a_clear_error(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        assert isinstance(load_config(path), RunConfig)
    except LorafitError as exc:
        # Our own message, naming the file, on one line of advice (no repr of a Python object).
        message = str(exc)
        assert str(path) in message and "Traceback" not in message and "object at 0x" not in message, message


@FUZZ
@given(
    raw=st.dictionaries(
        st.sampled_from(["model", "data", "lora", "train", "eval", "out", "x"]), json_values, max_size=5
    )
)
def test_random_config_structures_load_or_name_the_problem(tmp_path, raw):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    try:
        assert isinstance(load_config(path), RunConfig)
    except LorafitError as exc:
        assert str(path) in str(exc)
