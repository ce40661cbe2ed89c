"""README figures are the result files' figures (issue 18 item 12: the README said 245× while
``bench/results/sim_mooncake.json`` said otherwise).

A measured figure in the README carries a marker right after it naming where it comes from:
``0.94×<!-- result: sim_mooncake.metrics.kvaware_ttft_mean_over_oracle -->`` — the file
``bench/results/sim_mooncake.json`` and the path of keys inside it.  The check: each marked figure equals the
file's value rounded to the figure's own decimals, and every ratio (a number written ``N×``) carries a marker.
Re-running a benchmark that moves a figure fails this test until the README says the new value."""

from __future__ import annotations

import json
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MARKED = re.compile(r"(?P<figure>[-+]?\d[\d,]*(?:\.\d+)?)\s?(?:×|%|ms|s)?<!-- result: (?P<ref>[\w-]+(?:\.[\w-]+)+) -->")
RATIO = re.compile(r"\d(?:\.\d+)?×")


def resolve(ref: str) -> float:
    name, *keys = ref.split(".")
    value: object = json.loads((ROOT / "bench" / "results" / f"{name}.json").read_text())
    for key in keys:
        assert isinstance(value, dict) and key in value, f"{ref}: no key {key!r}"
        value = value[key]
    assert isinstance(value, (int, float)), f"{ref} is {value!r}, not a number"
    return float(value)


def matches(figure: str, value: float) -> bool:
    """``figure`` is ``value`` rounded to as many decimals as the figure shows (half a unit either way)."""
    decimals = len(figure.split(".", 1)[1]) if "." in figure else 0
    return abs(float(figure.replace(",", "")) - value) <= 0.5 * 10 ** -decimals + 1e-9


@pytest.mark.parametrize(("figure", "ref"), [(m["figure"], m["ref"]) for m in MARKED.finditer(README)])
def test_marked_figure_matches_its_result_file(figure: str, ref: str) -> None:
    value = resolve(ref)
    assert matches(figure, value), f"README says {figure}, bench/results/{ref.split('.')[0]}.json says {value}"


def test_every_ratio_cites_its_result_file() -> None:
    bare = [m.group() for m in RATIO.finditer(README) if not README.startswith("<!-- result: ", m.end())]
    assert not bare, f"ratios without a <!-- result: ... --> marker: {bare}"
    assert len(MARKED.findall(README)) >= 9


def test_the_check_catches_drift() -> None:
    assert matches("0.81", 0.805) and matches("81", 80.9) and matches("4.3", 4.35)
    assert not matches("245", 80.9) and not matches("0.94", 0.93)
