"""The README's quality figures are generated: every number in its quality tables, and every dB figure
anywhere in it, is in docs/quality.md, which benchmarks/bench_quality.py writes."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- quality:([\w-]+) -->\n(.*?)<!-- /quality:\1 -->", re.S)
NUMBER = re.compile(r"\d[\d,]*\.\d+|\d{1,3}(?:,\d{3})+")
DECIBELS = re.compile(r"(\d+(?:\.\d+)?)\s*dB")


def test_readme_quality_tables_are_docs_quality_md():
    readme = (ROOT / "README.md").read_text()
    doc = (ROOT / "docs" / "quality.md").read_text()
    blocks = dict(BLOCK.findall(readme))
    assert {"comfy-formats", "mixes", "gguf-levels", "svdquant-lora"} <= set(blocks)
    for name, table in blocks.items():
        assert table.strip(), f"README's quality:{name} block is empty: run benchmarks/bench_quality.py --readme"
        assert f"<!-- table:{name} -->\n{table}" in doc, f"README's quality:{name} table is not docs/quality.md's"
        missing = [n for n in NUMBER.findall(table) if n not in doc]
        assert not missing, f"quality:{name} has numbers docs/quality.md lacks: {missing[:5]}"


def test_no_hand_typed_decibels_in_the_readme():
    readme = BLOCK.sub("", (ROOT / "README.md").read_text())
    doc = (ROOT / "docs" / "quality.md").read_text()
    typed = [m for m in DECIBELS.findall(readme) if m not in doc]
    assert not typed, f"README states dB figures that no benchmark wrote into docs/quality.md: {typed}"


def test_quality_md_says_how_it_was_made():
    doc = (ROOT / "docs" / "quality.md").read_text()
    assert "benchmarks/bench_quality.py" in doc and "commit " in doc and "95% interval" in doc
