"""The README and docs/: every link resolves inside the repository, and the figures and ranges
they state are the ones the code and the benchmark files hold."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", page.read_text(), re.MULTILINE)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_resolves_inside_the_repository(page):
    checked = 0
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.is_relative_to(ROOT), f"{page.name}: {target} points outside the repository"
        assert dest.exists(), f"{page.name}: {target} does not exist"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{page.name}: {target}: no such heading in {dest.name}"
        checked += 1
    assert checked or page.name != "README.md"


def test_nothing_points_at_files_outside_the_repository():
    sources = [*PAGES, *sorted((ROOT / "src").rglob("*.py"))]
    bad = [str(p.relative_to(ROOT)) for p in sources if "shared/reference" in p.read_text()]
    assert not bad, bad
    assert (ROOT / "docs" / "method.md").is_file()


def test_the_overlap_figures_are_the_benchmark_files_and_stated_once():
    """docs/communication.md states the overlapping hook's step time against the synchronous one
    as benchmarks/hooks.json holds it (medians of per-round ratios); the README links there."""
    from qoda.bench.hooks import summarize

    res = json.loads((ROOT / "benchmarks" / "hooks.json").read_text())["results"]
    by_link = {r["link"].split(" (")[0]: summarize(r["rounds"]) for r in res}

    def ratio(link: str, mode: str) -> str:
        return f"{by_link[link][f'qoda_{mode}_overlap']['vs_sync']:.2f}x"

    text = " ".join((ROOT / "docs" / "communication.md").read_text().split())
    assert (f"overlapping is {ratio('100 Mbit/s', 'allgather')} (allgather) / {ratio('100 Mbit/s', 'two_phase')} "
            f"(two-phase) of the synchronous step at 100 Mbit/s, {ratio('1000 Mbit/s', 'allgather')} / "
            f"{ratio('1000 Mbit/s', 'two_phase')} at 1000 Mbit/s and {ratio('127.0.0.1', 'allgather')} / "
            f"{ratio('127.0.0.1', 'two_phase')} on 127.0.0.1") in text  # fmt: skip
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert not re.search(r"\d\.\d+x the synchronous", readme)
    assert "docs/communication.md#overlapping-hook-measured-step-time" in readme
