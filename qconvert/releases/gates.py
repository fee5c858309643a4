"""Release gates: what an output must measure before its release may be published.

A recipe's output may state gates on verify's figures:

    gate = [
      { figure = "latents.psnr_db", min = 30 },                 # at least 30 dB
      { figure = "pixels.lpips", max = 0.05 },                  # at most 0.05
      { figure = "latents.psnr_db", max_gap = 2, to = "fp8" },  # loses at most 2 dB to the fp8 output
    ]

Each is judged on the 95% interval's bound, never the mean alone: ``min``
holds when the interval's low end is at least the bound, ``max`` when its
high end is at most it.  ``max_gap`` is paired: on every sample (prompt x
seed, the same noise for both outputs) the other output's figure minus this
one's (for a figure where higher is better; this one's minus the other's
where lower is), and the gap's interval's high end must be at most the
bound.  Pairing cancels what the prompts contribute, so a consistent small
gap is measured as one.  Weight figures have no samples; their gate reads the
value.  A figure the report lacks (pixels without a VAE, LPIPS without its
package) fails its gate: a gate never passes for want of a measurement.

``recipe run`` records each gate's verdict in the output's manifest entry and
exits 1 when one fails; ``publish`` refuses such a release (``--force``
publishes, and the card says so).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from qconvert.core.checkpoint import read_json_file
from qconvert.core.errors import QConvertError
from qconvert.running.report import FIGURES, REPORT_LIMITS, SAMPLED, finite
from qconvert.running.stats import paired_gap, summary

BETTER = dict(FIGURES) | {f"latents.{k}": "higher" for k in ("cosine",)}
KINDS = ("min", "max", "max_gap")
KEYS = {"figure", "to", *KINDS}
MAX_GATES = 32


@dataclass(frozen=True)
class Gate:
    figure: str
    kind: str  # min, max or max_gap
    bound: float
    to: str | None = None  # max_gap: the other output

    def describe(self) -> str:
        if self.kind == "max_gap":
            return f"{self.figure} loses at most {self.bound:g} to {self.to}"
        return f"{self.figure} {'at least' if self.kind == 'min' else 'at most'} {self.bound:g}"

    def to_json(self) -> dict:
        return {"figure": self.figure, self.kind: self.bound, **({"to": self.to} if self.to else {})}


def parse(raw) -> tuple[Gate, ...] | str:
    """A recipe output's ``gate`` value, or what is wrong with it."""
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list) or not raw or len(raw) > MAX_GATES:
        return f"gate must be a table or a list of 1 to {MAX_GATES} tables like {{ figure = \"latents.psnr_db\", " \
               "min = 30 }"
    gates = []
    for item in raw:
        gate = _one(item)
        if isinstance(gate, str):
            return gate
        gates.append(gate)
    return tuple(gates)


def _one(item) -> Gate | str:
    if not isinstance(item, dict):
        return "each gate is a table like { figure = \"latents.psnr_db\", min = 30 }"
    unknown = sorted(k for k in item if k not in KEYS)
    if unknown:
        return f"gate has no key {unknown[0]!r} (a gate has figure, one of min, max, max_gap, and to with max_gap)"
    figure = item.get("figure")
    if not isinstance(figure, str) or figure not in BETTER:
        return f"gate figure {str(figure)[:60]!r}: choose {', '.join(sorted(BETTER))}"
    kinds = [k for k in KINDS if k in item]
    if len(kinds) != 1:
        return f"gate on {figure}: give exactly one of min, max, max_gap"
    kind, bound = kinds[0], item[kinds[0]]
    if not isinstance(bound, (int, float)) or isinstance(bound, bool) or not math.isfinite(bound):
        return f"gate on {figure}: {kind} must be a finite number"
    better = BETTER[figure]
    if kind == "min" and better == "lower":
        return f"gate on {figure}: lower is better, so bound it with max (min would pass the worst files)"
    if kind == "max" and better == "higher":
        return f"gate on {figure}: higher is better, so bound it with min (max would pass the worst files)"
    to = item.get("to")
    if (kind == "max_gap") != (to is not None):
        return f"gate on {figure}: max_gap names the output it is measured against with to = \"NAME\" (and only " \
               "max_gap does)"
    if kind == "max_gap":
        if not isinstance(to, str):
            return f"gate on {figure}: to must be an output's name"
        if figure.split(".")[0] not in SAMPLED:
            return f"gate on {figure}: a gap is paired over samples; weight figures have none (use min or max)"
        if bound < 0:
            return f"gate on {figure}: max_gap must be 0 or more"
    return Gate(figure, kind, float(bound), to)


def reference_problem(gate: Gate, output, others: dict) -> str | None:
    """Why ``gate`` of ``output`` cannot be judged against the output it names (None: it can)."""
    other = others.get(gate.to)
    if other is None:
        return f"gate to = {gate.to!r}: no such output (the recipe has {', '.join(sorted(others))})"
    if other.name == output.name:
        return f"gate to = {gate.to!r}: an output's gap to itself is 0"
    if tuple(other.loras) != tuple(output.loras):
        return f"gate to = {gate.to!r}: {gate.to} is another model (LoRAs {list(other.loras) or 'none'} against " \
               f"{list(output.loras) or 'none'}); a gap is measured between files of one model"
    if other.verify_settings() != output.verify_settings():
        return f"gate to = {gate.to!r}: {gate.to} is verified with other settings; a paired gap needs the same " \
               "prompts, seeds and sampling (set them in [verify], not per output)"
    if other.verify_settings().get("enabled") is False or output.verify_settings().get("enabled") is False:
        return f"gate to = {gate.to!r}: both outputs must be verified"
    return None


# ------------------------------------------------------------------ judging

def _samples(report: dict) -> list:
    samples = report.get("samples")
    return [s for s in samples if isinstance(s, dict)] if isinstance(samples, list) else []


def _per_sample(report: dict, figure: str) -> list | None:
    """The figure on each sample (an exact sample's PSNR, null in JSON, as infinity); None when not measured."""
    section, key = figure.split(".")
    values = []
    for s in _samples(report):
        part = s.get(section)
        if not isinstance(part, dict) or key not in part:
            return None
        value = part[key]
        if value is None and key == "psnr_db":
            value = math.inf
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
            return None
        values.append(float(value))
    return values or None


def _keys(report: dict) -> list:
    return [(s.get("prompt"), s.get("seed")) for s in _samples(report)]


def judge(gate: Gate, report: dict | None, other: dict | None = None) -> dict:
    """The gate's verdict: {gate, passed, mean, interval, why}."""
    verdict = {**gate.to_json(), "gate": gate.describe(), "passed": False, "mean": None, "interval": None}
    if report is None:
        return {**verdict, "why": "no verify report"}
    section = gate.figure.split(".")[0]
    if section not in SAMPLED:  # a weight or block figure: one value
        part = report.get(section)
        value = part.get(gate.figure.split(".")[1]) if isinstance(part, dict) else None
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
            return {**verdict, "why": f"{gate.figure} not measured"}
        ok = value >= gate.bound if gate.kind == "min" else value <= gate.bound
        return {**verdict, "passed": bool(ok), "mean": value, "why": None if ok else f"{value:.6g}"}
    values = _per_sample(report, gate.figure)
    if values is None:
        skipped = report.get("pixels_skipped") if section == "pixels" else None
        why = skipped if isinstance(skipped, str) else "no per-sample figures"
        return {**verdict, "why": f"{gate.figure} not measured ({why})"}
    if gate.kind == "max_gap":
        if other is None:
            return {**verdict, "why": f"{gate.to} has no verify report"}
        theirs = _per_sample(other, gate.figure)
        if theirs is None or _keys(other) != _keys(report) or other.get("settings") != report.get("settings"):
            return {**verdict, "why": f"{gate.to}'s report was measured on other samples or settings; verify both "
                                      "again"}
        loss = paired_gap(theirs, values) if BETTER[gate.figure] == "higher" else paired_gap(values, theirs)
        ok = loss["high"] <= gate.bound
        return {**verdict, "passed": bool(ok), "mean": loss["mean"], "interval": [loss["low"], loss["high"]],
                "why": None if ok else f"the gap's 95% interval reaches {loss['high']:.4g}"}
    s = summary(values)
    ok = s["low"] >= gate.bound if gate.kind == "min" else s["high"] <= gate.bound
    edge = s["low"] if gate.kind == "min" else s["high"]
    return {**verdict, "passed": bool(ok), "mean": s["mean"], "interval": [s["low"], s["high"]],
            "why": None if ok else f"the 95% interval reaches {edge:.4g}"}


def read_report(folder: Path, entry: dict | None) -> dict | None:
    """An entry's report.json, or None (no report recorded, or the file gone)."""
    if not entry or not entry.get("report"):
        return None
    path = Path(folder) / entry["report"] / "report.json"
    if not path.is_file():
        return None
    try:
        data = read_json_file(path, REPORT_LIMITS)  # a hostile file like any other
    except QConvertError:
        return None
    return data if isinstance(data, dict) else None


def judge_release(outputs, folder: Path, record: dict) -> list[str]:
    """Judge every gate of the recipe's ``outputs`` on the reports in ``folder``; each verdict goes into its
    output's manifest entry (``gates``).  Returns a line for each failed gate."""
    failed = []
    reports = {o.name: read_report(folder, record["outputs"].get(o.name)) for o in outputs}
    for o in outputs:
        entry = record["outputs"].get(o.name)
        if entry is None:
            continue
        verdicts = [judge(g, reports[o.name], reports.get(g.to) if g.to else None) for g in o.gates]
        if verdicts:
            entry["gates"] = finite(verdicts)
        else:
            entry.pop("gates", None)
        failed += [f"{o.name}: {v['gate']}: {v['why']}" for v in verdicts if not v["passed"]]
    return failed


def publish_problems(m: dict) -> list[str]:
    """What keeps a release from being published: failed gates, outputs without a verify report."""
    problems = []
    for name, e in m["outputs"].items():
        if not e.get("report"):
            problems.append(f"{name} has no verify report")
    return problems + [f"gate failed: {line}" for line in failed(m)]


def failed(record: dict) -> list[str]:
    """A line for each failed gate recorded in a manifest."""
    return [f"{name}: {g.get('gate')}: {g.get('why')}" for name, e in record["outputs"].items()
            for g in e.get("gates") or [] if g.get("passed") is not True]
