"""The README's numbers come from committed benchmark runs: every row of its H200 result
tables is a row of a results file committed beside them, so a number typed by hand, or left
from an earlier run, fails here."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _table_rows(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.startswith("| ")]


def _as_in_readme(row: str) -> str:
    # the README writes "50 µs 95%" and "f+b" where the benchmark writes "50 µs (95%)" and "fwd+bwd"
    return re.sub(r" \((\d+%)\)", r" \1", row).replace("fwd+bwd", "f+b")


def test_readme_h200_tables_are_rows_of_the_committed_run():
    readme = (ROOT / "README.md").read_text()
    start = readme.index("### Results: NVIDIA H200")
    section = readme[start:readme.index("\n### ", start + 1)]
    rows = _table_rows(section)
    assert len(rows) >= 50  # four kernel tables and the training table
    # the top level of results/h200 holds the run the README shows (earlier runs in subfolders)
    committed = {_as_in_readme(row) for md in (ROOT / "benchmarks" / "results" / "h200").glob("*.md")
                 for row in _table_rows(md.read_text())}
    missing = [row for row in rows if row not in committed]
    assert not missing, missing


def test_readme_cpu_table_is_the_committed_cpu_run():
    """The CPU table condenses the committed run: each cell is the fp32 and the bf16 ratio
    (patched / original) of its case, shape and mode in ``results/cpu/cpu.md``."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("### Results: CPU")
    header, *rows = _table_rows(readme[start:])[:6]
    columns = [cell.strip() for cell in header.strip("|").split("|")][1:]
    ratios = {}
    for row in _table_rows((ROOT / "benchmarks" / "results" / "cpu" / "cpu.md").read_text()):
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        if len(cells) == 7 and cells[3] in ("inference", "training"):  # case, dtype, shape, mode, ..., ratio
            ratios[(cells[0], cells[1], cells[2], cells[3][:5])] = cells[6]
    assert len(rows) == 5
    for row in rows:
        case, *cells = [cell.strip() for cell in row.strip("|").split("|")]
        for column, cell in zip(columns, cells, strict=True):
            shape, mode = column.split(" ")
            expected = " / ".join(ratios[(case, dtype, shape, mode.rstrip("."))] for dtype in ("fp32", "bf16"))
            assert cell == expected, (case, column)


def test_recipe_readme_tables_are_the_committed_runs():
    """recipes/README.md shows each committed run's table whole: its title, its versions and
    data line, and its rows, as the run's results.md has them."""
    readme = (ROOT / "recipes" / "README.md").read_text()
    runs = sorted((ROOT / "recipes" / "results").glob("*/results.md"))
    assert runs
    for md in runs:
        title, _, versions, _, *table = md.read_text().splitlines()
        shown = readme.index(title.replace("# ", "### ", 1))  # the README nests it one level down
        assert readme[shown:].splitlines()[2] == versions, md
        assert "\n".join(line for line in table if line.startswith("|")) in readme, md
