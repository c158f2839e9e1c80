"""spec/conformance.md stays honest: every row names tests that exist (module::test, parametrized ids allowed)
or says why it has none (N/A, Instead, Gap); no row says "not yet"; every requirement sentence in
spec/requirements.tsv points at rows that exist; and the counts at the top of the matrix are true."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from spec.requirements import read_map

ROOT = Path(__file__).resolve().parent.parent
MATRIX = ROOT / "spec" / "conformance.md"
TESTS = ROOT / "tests"
_ROW_ID = re.compile(r"^[A-Z]+\d+$")
_TEST_REF = re.compile(r"\b(test_\w+)::(\w+)(\[[^\]]*\])?")
_REASONS = ("N/A:", "Instead:", "Gap:")


@dataclass(frozen=True)
class Row:
    id: str
    text: str
    proof: str


def rows_of(markdown: str) -> list[Row]:
    """The rows of every table: the first cell is the row id, the last the proof."""
    rows = []
    for line in markdown.splitlines():
        if not line.startswith("|"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if _ROW_ID.match(cells[0]):
            rows.append(Row(cells[0], line, cells[-1]))
    return rows


@cache
def _module(name: str) -> tuple[frozenset[str], str] | None:
    """The test functions a module under tests/ defines (top level or in classes), and its source."""
    path = TESTS / f"{name}.py"
    if not path.is_file():
        return None
    source = path.read_text()
    names = {
        node.name for node in ast.walk(ast.parse(source)) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    }
    return frozenset(names), source


def _reference_problem(module: str, function: str, params: str) -> str | None:
    found = _module(module)
    if found is None:
        return f"tests/{module}.py does not exist"
    names, source = found
    if function not in names:
        return f"tests/{module}.py defines no {function}"
    # A parametrized id: each literal piece of it must appear in the module (ids come from its parameters).
    for piece in re.split(r"[*\-\[\]]", params):
        if piece.strip() and piece.strip() not in source:
            return f"{module}::{function}{params}: no parameter {piece.strip()!r} in tests/{module}.py"
    return None


def problems(markdown: str) -> list[str]:
    """Everything wrong with a conformance matrix, each with the offending row's text."""
    out = []
    seen: set[str] = set()
    for row in rows_of(markdown):
        if row.id in seen:
            out.append(f"row {row.id} appears twice")
        seen.add(row.id)
        if "not yet" in row.text.lower():
            out.append(f"row {row.id} says 'not yet': {row.text}")
        references = _TEST_REF.findall(row.proof)
        for module, function, params in references:
            problem = _reference_problem(module, function, params)
            if problem:
                out.append(f"row {row.id}: {problem}: {row.text}")
        reasons = [r for r in _REASONS if r in row.proof]
        if not references and not reasons:
            out.append(f"row {row.id} names no test and gives no reason (N/A, Instead, Gap): {row.text}")
        for reason in reasons:
            said = row.proof.split(reason, 1)[1].strip()
            if len(said) < 30:
                out.append(f"row {row.id}: '{reason}' needs a reason, not {said!r}: {row.text}")
    return out


def test_every_row_names_tests_that_exist_or_says_why_not() -> None:
    assert problems(MATRIX.read_text()) == []


def test_every_requirement_sentence_points_at_rows_that_exist() -> None:
    ids = {row.id for row in rows_of(MATRIX.read_text())}
    lines = read_map()
    assert len({line.key for line in lines}) == len(lines), "a sentence key appears twice"
    for line in lines:
        assert line.rows, f"{line.key} is mapped to no row"
        assert set(line.rows) <= ids, f"{line.key} points at rows {sorted(set(line.rows) - ids)} that do not exist"
        assert re.fullmatch(r"[0-9a-f]{10}", line.digest) and line.keywords, line


def test_the_counts_at_the_top_are_true() -> None:
    markdown = MATRIX.read_text()
    rows = rows_of(markdown)
    lines = read_map()
    not_applicable = {row.id for row in rows if row.proof.startswith("N/A:")}

    def count(source: str) -> int:
        return sum(1 for line in lines if line.key.startswith(f"{source}/"))

    expected = {
        "requirement sentences": (len(lines), count("master"), count("ext-header"), count("resize")),
        "rows": (len(rows), len({r for line in lines for r in line.rows})),
        "not applicable": (len(not_applicable), sum(1 for line in lines if set(line.rows) <= not_applicable)),
        "instead": (sum(1 for row in rows if "Instead:" in row.proof),),
        "gaps": (sum(1 for row in rows if "Gap:" in row.proof),),
    }
    for label, numbers in expected.items():
        match = re.search(rf"^- {label}: (.*)$", markdown, re.MULTILINE)
        assert match, f"no '- {label}:' line among the counts"
        stated = tuple(int(x) for x in re.findall(r"(?<![\w-])\d+(?![\w-])", match.group(1)))
        assert stated == numbers, f"'{match.group(0)}' should say {numbers}"


def test_the_check_catches_what_it_should() -> None:
    engine = "test_server::test_invalid_requests_are_answered_by_the_engine"
    proofs = [
        ("A1", "test_server::test_no_such_test"),
        ("A2", "test_no_such_module::test_x"),
        ("A3", "test_server::test_greeting_is_fixed_newstyle_with_no_zeroes; more not yet"),
        ("A4", "we think it holds"),
        ("A5", "N/A: no"),
        ("A6", f"{engine}[*-zebra crossing]"),
        ("A7", f"{engine}[*-read past the end]"),
        ("A7", "N/A: oldstyle negotiation is not offered by nbdproto at all"),
    ]
    table = ["| # | Role | Requirement | Spec section | Proof |", "|---|---|---|---|---|"]
    bad = "\n".join(table + [f"| {row} | S | Something. | Here | {proof} |" for row, proof in proofs])
    found = problems(bad)
    assert len(found) == 7, found
    for row, words in [
        ("A1", "defines no test_no_such_test"),
        ("A2", "does not exist"),
        ("A3", "not yet"),
        ("A4", "names no test"),
        ("A5", "needs a reason"),
        ("A6", "no parameter 'zebra crossing'"),
        ("A7", "appears twice"),
    ]:
        assert any(p.startswith(f"row {row}") and words in p for p in found), (row, found)
