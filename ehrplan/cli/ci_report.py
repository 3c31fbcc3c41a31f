"""`validate --format github|junit`: the verdict on each config as GitHub workflow annotations or
as a JUnit XML report (one test case per config). Plain text builders; `output` prints them.

GitHub reads ``::error file=F,line=L,title=T::message`` lines from a step's output and pins them
on the file in the pull request (workflow commands: ``%``, CR and LF are escaped in the message,
and ``:`` and ``,`` too in properties).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from ehrplan.plan.planner import Budget, Fit
from ehrplan.plan.units import fmt_bytes


@dataclass(frozen=True)
class Verdict:
    """One config as `validate` judged it: it fits, does not fit, or could not be read."""

    item: str
    """The argument as given: a file, a run folder or a preset name."""
    file: str | None
    """The file to annotate (a run folder's config.json), None for a preset name."""
    fit: Fit | None
    """None when the config is invalid."""
    error: str | None = None
    seconds: float = 0.0

    @property
    def status(self) -> str:
        if self.fit is None:
            return "invalid"
        return "fits" if self.fit.fits else "does not fit"

    @property
    def line(self) -> int:
        """Where to pin the annotation: the line a parser or an unknown/invalid field names, else
        line 1 (the verdict is on the whole file)."""
        if self.error is None or self.file is None:
            return 1
        at = re.search(r"\bline (\d+)", self.error)
        if at:
            return int(at.group(1))
        field = re.search(r"(?:unknown field|field) '([A-Za-z_]\w*)", self.error)
        if field:
            key = re.compile(rf"^\s*\"?{field.group(1)}\"?\s*[=:]")
            try:
                lines = Path(self.file).read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError):
                return 1
            return next((n for n, text in enumerate(lines, 1) if key.match(text)), 1)
        return 1

    @property
    def message(self) -> str:
        f = self.fit
        if f is None:
            return self.error or "invalid config"
        verdict = "fits" if f.fits else "does not fit"
        short = "" if f.fits else f", short by {fmt_bytes(f.shortfall_bytes)}"
        sign = "<=" if f.fits else ">"
        return (
            f"{self.item} {verdict}: estimated {fmt_bytes(f.estimate_bytes)} ({f.precision}) "
            f"{sign} budget {fmt_bytes(f.budget_bytes)}{short}"
        )


def _escape_data(s: str) -> str:
    return s.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(s: str) -> str:
    return _escape_data(s).replace(":", "%3A").replace(",", "%2C")


def github_annotations(verdicts: list[Verdict], budget: Budget) -> str:
    """``::error`` for a config that does not fit or is invalid, ``::notice`` for one that fits,
    on line 1 of its file (a preset name gets no file)."""
    lines = []
    for v in verdicts:
        level = "notice" if v.status == "fits" else "error"
        title = {
            "fits": "fits the memory budget",
            "does not fit": "does not fit the memory budget",
            "invalid": "invalid config",
        }[v.status]
        props = [f"file={_escape_property(v.file)}", f"line={v.line}"] if v.file else []
        props.append(f"title={_escape_property(f'ehrplan: {title} ({budget.label})')}")
        lines.append(f"::{level} {','.join(props)}::{_escape_data(v.message)}")
    return "\n".join(lines)


def junit_xml(verdicts: list[Verdict], budget: Budget) -> str:
    """One test suite, one test case per config; a <failure> for does-not-fit and invalid."""
    failures = sum(v.status != "fits" for v in verdicts)
    attrs = {"name": "ehrplan validate", "tests": str(len(verdicts)), "failures": str(failures)}
    total = f"{sum(v.seconds for v in verdicts):.6f}"
    root = ET.Element("testsuites", {**attrs, "errors": "0", "time": total})
    suite = ET.SubElement(root, "testsuite", {**attrs, "errors": "0", "skipped": "0"})
    suite.set("time", total)
    props = ET.SubElement(suite, "properties")
    for name, value in (
        ("budget", budget.label),
        ("device", budget.device),
        ("budget_bytes", str(budget.budget_bytes)),
        ("headroom", str(budget.headroom)),
    ):
        ET.SubElement(props, "property", {"name": name, "value": value})
    for v in verdicts:
        case = ET.SubElement(
            suite,
            "testcase",
            {"classname": "ehrplan.validate", "name": v.item, "time": f"{v.seconds:.6f}"},
        )
        if v.file:
            case.set("file", v.file)
        if v.status == "fits":
            ET.SubElement(case, "system-out").text = v.message
        else:
            kind = "DoesNotFit" if v.status == "does not fit" else "InvalidConfig"
            failure = ET.SubElement(case, "failure", {"type": kind, "message": v.message})
            failure.text = v.message
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode")
