"""The report of bench/mutation.sh: per module, how many mutants mutmut made, killed, and which survived.

The score is the share killed of the mutants that can be: all but those listed as equivalent (and any not
run, which a complete run leaves none of).

Reads mutmut's cache (``.mutmut-cache``, SQLite) in the checkout copy the run used, and
bench/mutation-equivalent.txt: the mutants that no test can kill because the program behaves the same with
them, each with why. A survivor listed there is counted as equivalent; every other one is printed with its
change, and the run fails.

    python bench/mutation_report.py COPY EQUIVALENTS MODULE...
"""

from __future__ import annotations

import dataclasses
import difflib
import pathlib
import sqlite3
import sys

from mutmut import Context, RelativeMutationID, mutate

KILLED = {"ok_killed", "ok_suspicious", "bad_timeout"}  # a test failed, or hung (pytest-timeout or mutmut's limit)


@dataclasses.dataclass(frozen=True)
class Change:
    module: str
    line_number: int
    before: str
    after: str

    def key(self) -> tuple[str, str, str]:
        return self.module, self.before.strip(), self.after.strip()


def equivalents(path: pathlib.Path) -> dict[tuple[str, str, str], str]:
    """Blocks separated by blank lines: the module's path, ``- `` the line, ``+ `` the mutant, then why."""
    found: dict[tuple[str, str, str], str] = {}
    for block in path.read_text().split("\n\n"):
        lines = [line for line in block.splitlines() if not line.startswith("#")]
        if not lines:
            continue
        module, before, after, *why = lines
        if not (before.startswith("- ") and after.startswith("+ ") and why):
            raise SystemExit(f"{path}: malformed entry:\n{block}")
        found[(module.strip(), before[2:].strip(), after[2:].strip())] = " ".join(w.strip() for w in why)
    return found


def changes(copy: pathlib.Path, module: str, mutants: list[tuple[str, int, int]]) -> list[Change]:
    source = (copy / module).read_text()
    made = []
    for line, index, line_number in mutants:
        context = Context(source=source, filename=module, mutation_id=RelativeMutationID(line, index, line_number))
        mutated, _ = mutate(context)
        diff = [d for d in difflib.ndiff(source.splitlines(), mutated.splitlines()) if d[:2] in ("- ", "+ ")]
        before = line  # the mutated line, as mutmut recorded it
        after = next((d[2:] for d in diff if d.startswith("+ ")), None)
        if after is None:  # the line removed (a decorator): named with the line after it, which says whose
            lines = source.splitlines()
            after = "(line removed)"
            before = f"{line.strip()} {lines[line_number + 1].strip() if line_number + 1 < len(lines) else ''}"
        made.append(Change(module, line_number + 1, before, after))
    return made


def main() -> int:
    copy, listed, modules = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3:]
    known = equivalents(listed)
    db = sqlite3.connect(copy / ".mutmut-cache")
    rows = []
    unexplained: list[Change] = []
    used: set[tuple[str, str, str]] = set()
    for module in modules:
        found = db.execute(
            "SELECT Line.line, Mutant.`index`, Line.line_number, Mutant.status FROM Mutant"
            " JOIN Line ON Mutant.line = Line.id JOIN SourceFile ON Line.sourcefile = SourceFile.id"
            " WHERE SourceFile.filename = ? ORDER BY Line.line_number, Mutant.`index`",
            (module,),
        ).fetchall()
        statuses = [status for *_, status in found]
        killed = sum(status in KILLED for status in statuses)
        untested = sum(status in ("untested", "skipped") for status in statuses)
        survivors = changes(copy, module, [(line, i, n) for line, i, n, status in found if status == "bad_survived"])
        equivalent = [change for change in survivors if change.key() in known]
        used.update(change.key() for change in equivalent)
        unexplained += [change for change in survivors if change.key() not in known]
        rows.append((module, len(found), killed, len(survivors), len(equivalent), untested))
    rows.append(("all", *(sum(row[i] for row in rows) for i in range(1, 6))))  # type: ignore[arg-type]
    print("| module | mutants | killed | survived | of them equivalent | not run | killed of the others |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for module, total, killed, survived, equivalent, untested in rows:
        score = killed / ((total - equivalent - untested) or 1)
        print(f"| {module} | {total} | {killed} | {survived} | {equivalent} | {untested} | {score:.1%} |")
    for change in unexplained:
        print(f"\nSURVIVED {change.module}:{change.line_number}\n- {change.before.strip()}\n+ {change.after.strip()}")
    stale = [key for key in known if key[0] in modules and key not in used]
    for module, before, after in stale:
        print(f"\n(listed as equivalent, no longer a survivor) {module}\n- {before}\n+ {after}")
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
