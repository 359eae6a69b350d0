"""One markdown table renderer, one way to write a share as a percentage, and the marked blocks of a
document that a command regenerates."""

from __future__ import annotations

import re


def table(header: list[str], rows: list[list]) -> str:
    """A GitHub markdown table; a cell that is None is left empty."""
    def cell(value) -> str:
        return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def percent(x: float | None, digits: int = 1) -> str:
    """A share (0.92) as a percentage ('92.0'); 'n/a' where there is none."""
    return "n/a" if x is None else f"{100 * x:.{digits}f}"


def with_interval(x: float | None, ci: list | None, digits: int = 1) -> str:
    """'92.0 [85.0, 96.5]': a share and its interval as percentages (without the interval where there is none)."""
    return percent(x, digits) + (f" [{percent(ci[0], digits)}, {percent(ci[1], digits)}]" if ci else "")


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}: generated, do not edit -->", f"<!-- /{name} -->"


def replace_block(text: str, name: str, block: str) -> str:
    """`text` with what stands between the markers of `name` replaced by `block`; ValueError
    naming the block when its markers are missing."""
    start, end = _markers(name)
    pattern = re.compile(re.escape(start) + r"\n(?:.*?\n)??" + re.escape(end), re.S)  # empty when first added
    if not pattern.search(text):
        raise ValueError(f"no '{start}' ... '{end}' block to regenerate")
    return pattern.sub(lambda _: f"{start}\n{block}\n{end}", text, count=1)


def read_block(text: str, name: str) -> str | None:
    start, end = _markers(name)
    found = re.search(re.escape(start) + r"\n(?:(.*?)\n)??" + re.escape(end), text, re.S)
    return (found.group(1) or "") if found else None
