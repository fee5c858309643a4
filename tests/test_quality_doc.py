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


def _rows(doc: str, table: str) -> dict:
    """{first cell: (bytes, mean, low, high)} of a docs/quality.md table of files."""
    body = doc.split(f"<!-- table:{table} -->\n", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in body.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        m = re.match(r"([\d.]+) \(([\d.]+)–([\d.]+)\)", cells[2])
        rows[cells[0]] = (int(cells[1].replace(",", "")), *map(float, m.groups()))
    return rows


def test_recorded_mixes_beat_the_uniform_files_nearest_them():
    """As measured by bench_quality.py (recorded in docs/quality.md, so regenerating it re-checks the claim): on
    the tiny and the full-width model, each default mix beats the largest uniform file no bigger (NVFP4 or W4A8)
    and the uniform file nearest its size either way (W6A8 above the larger mix), with non-overlapping 95%
    intervals."""
    doc = (ROOT / "docs" / "quality.md").read_text()
    for table in ("mixes", "full-width-mixes"):
        rows = _rows(doc, table)
        mixes = {k: v for k, v in rows.items() if k.startswith("mix") and "native (default)" in k}
        assert len(mixes) == 2, table
        for name, (size, _, low, _) in mixes.items():
            below = max((v for k, v in rows.items() if not k.startswith("mix") and v[0] <= size), key=lambda v: v[0])
            assert below[0] >= rows["NVFP4"][0] and low > below[3], (table, name)
            nearest = min((v for k, v in rows.items() if not k.startswith("mix")), key=lambda v: abs(v[0] - size))
            assert low > nearest[3], (table, name, nearest)
