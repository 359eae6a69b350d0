"""`medfedpure report --docs`: the results tables of README.md and docs/results.md, regenerated from
the results published in `docs/results/`, never typed by hand.

A study publishes its result with `medfedpure compare-defenses SPEC --out DIR --publish
docs/results/NAME.json`, an experiment its Table I / II rows with `medfedpure report --run DIR
--publish docs/results/NAME.json`; every document that holds the block

    <!-- results/NAME: generated, do not edit -->
    <!-- /results/NAME -->

gets that result's table between the markers, rendered as `compare-defenses` or `report` renders it. `--check` only compares (the test suite runs it).
"""

from __future__ import annotations

import re
from pathlib import Path

from medfedpure.reporting.markdown import read_block, replace_block
from medfedpure.reporting.rows import Comparison
from medfedpure.storage import atomic_write_text, read_json
from medfedpure.workflows.compare import candidates_table
from medfedpure.workflows.report import methods_markdown

DOCUMENTS = ("README.md", "docs/results.md")
PUBLISHED = Path("docs") / "results"
_BLOCK = re.compile(r"<!-- (results/[A-Za-z0-9_.-]+): generated, do not edit -->")


def published(root: Path | str) -> dict[str, dict]:
    """Each published result by its block name (`results/<file stem>`)."""
    folder = Path(root) / PUBLISHED
    return {f"results/{p.stem}": read_json(p) for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}


def rendered(result: dict) -> str:
    """A published result's table: a run's Table I / II rows, or a comparison's candidates."""
    if result.get("kind") == "methods":
        return methods_markdown(result)
    return candidates_table(Comparison.from_dict(result))


def regenerate_docs(root: Path | str, check: bool = False) -> list[str]:
    """Rewrite every results block of the documents under `root` from `docs/results/` (with `check`:
    write nothing); the documents that were (or would be) changed. A block naming a result that is
    not published is a ValueError naming the document and the file it needs."""
    root = Path(root)
    results = published(root)
    changed = []
    for name in DOCUMENTS:
        path = root / name
        if not path.is_file():
            continue
        text = path.read_text()
        new = text
        for block in _BLOCK.findall(text):
            if block not in results:
                raise ValueError(f"{name}: block '{block}' has no published result {PUBLISHED / block[8:]}.json")
            new = replace_block(new, block, rendered(results[block]))
        if new != text:
            changed.append(name)
            if not check:
                atomic_write_text(path, new)
    return changed


__all__ = ["DOCUMENTS", "PUBLISHED", "published", "read_block", "regenerate_docs", "rendered"]
