"""The requirement sentences of the NBD specification, and their map onto spec/conformance.md.

The spec (doc/proto.md of NetworkBlockDevice/nbd, plus its extension-ext-header and extension-resize
branches) is not stored here: this script reads a local copy, cuts it into sentences, keeps the ones that
state a requirement (MUST, MUST NOT, SHOULD, SHOULD NOT, SHALL, SHALL NOT, REQUIRED, in capitals as RFC 2119
means them), and names each one ``source/section#n``. spec/requirements.tsv maps every such sentence to the
rows of spec/conformance.md that cover it, without quoting it: a hash of the sentence's text tells when the
spec changed under the map.

    git --git-dir=<clone> show master:doc/proto.md > master.md   (likewise ext.md, resize.md from the branches)
    python spec/requirements.py list master.md ext.md resize.md     # every sentence, with its key
    python spec/requirements.py check master.md ext.md resize.md    # the map covers every sentence exactly

The extension branches are older forks of the document: from extension-ext-header only the sentences master
does not have are counted (the extension's own text, and its wording of sentences master also states), from
extension-resize only those about RESIZE.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Sentence", "MapLine", "requirement_sentences", "all_sentences", "read_map", "MAP_PATH", "KEYWORDS"]

MAP_PATH = Path(__file__).with_name("requirements.tsv")
KEYWORDS = re.compile(r"\b(MUST NOT|MUST|SHOULD NOT|SHOULD|SHALL NOT|SHALL|REQUIRED)\b")
_HEADING = re.compile(r"^(#+)\s+(.*)$")
# A bullet that opens the description of a protocol item: "* `NBD_OPT_GO` (7)", "- bit 7, `NBD_FLAG_SEND_DF`:".
_ITEM = re.compile(r"^(\s*)[*-] (?:bit \d+, )?`(NBD_[A-Z_]+)`(?: \([^)]*\))?(?: and `(NBD_[A-Z_]+)`)?")
_BULLET = re.compile(r"^\s*(?:[*-]|\d+\.) ")
_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.")
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z`(\"'*_])")


@dataclass(frozen=True)
class Sentence:
    """One requirement sentence: where it is, what it says, and a short hash of its text."""

    source: str
    section: str
    number: int
    text: str
    keywords: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.source}/{self.section}#{self.number}"

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:10]


def _blocks(markdown: str) -> list[tuple[str, str]]:
    """(section, text) for every paragraph and list item, with the section the innermost heading or item."""
    out: list[tuple[str, str]] = []
    heading = ""
    items: list[tuple[int, str]] = []  # open protocol items: (indent of the bullet, name)
    current: list[str] = []
    current_section = ""

    def flush() -> None:
        if current:
            out.append((current_section, " ".join(current)))
            current.clear()

    for raw in markdown.splitlines():
        line = raw.rstrip()
        if not line.strip():
            flush()
            continue
        indent = len(line) - len(line.lstrip())
        match = _HEADING.match(line)
        if match:
            flush()
            heading = match.group(2).replace("`", "").strip()
            items.clear()
            current_section = heading
            continue
        while items and indent <= items[-1][0]:
            items.pop()
        item = _ITEM.match(line)
        if item:
            flush()
            name = item.group(2) if item.group(3) is None else f"{item.group(2)} and {item.group(3)}"
            if items:
                name = f"{items[-1][1]} / {name}"
            items.append((len(item.group(1)), name))
        elif _BULLET.match(line) or line.lstrip().startswith(("S: ", "C: ")):
            flush()
        if not current:
            current_section = items[-1][1] if items else heading
        current.append(line.strip())
    flush()
    return out


def _sentences(text: str) -> list[str]:
    text = re.sub(r"\s+", " ", text).strip()
    for i, abbreviation in enumerate(_ABBREVIATIONS):
        text = text.replace(abbreviation, f"\0{i}\0")
    parts = _SPLIT.split(text)
    for i, abbreviation in enumerate(_ABBREVIATIONS):
        parts = [p.replace(f"\0{i}\0", abbreviation) for p in parts]
    return parts


def _keywords(sentence: str) -> tuple[str, ...]:
    # Words in quotes are being named, not used (the Conventions' list of the RFC 2119 key words, "('MUST' etc.)").
    return tuple(KEYWORDS.findall(re.sub(r'"[^"]*"|\'[A-Z ]+\'', "", sentence)))


def requirement_sentences(markdown: str, source: str) -> list[Sentence]:
    """Every requirement sentence of one version of doc/proto.md, in document order."""
    counts: dict[str, int] = {}
    out = []
    for section, block in _blocks(markdown):
        for text in _sentences(block):
            keywords = _keywords(text)
            if not keywords:
                continue
            counts[section] = counts.get(section, 0) + 1
            out.append(Sentence(source, section, counts[section], text, keywords))
    return out


def all_sentences(master: str, extended: str, resize: str) -> list[Sentence]:
    """The sentences the conformance matrix answers for: all of master's, then extension-ext-header's that
    master lacks, then extension-resize's about RESIZE that master lacks."""
    base = requirement_sentences(master, "master")
    known = {s.text for s in base}
    ext = [s for s in requirement_sentences(extended, "ext-header") if s.text not in known]
    resize_only = [
        s
        for s in requirement_sentences(resize, "resize")
        if s.text not in known and ("RESIZE" in s.section or "resize" in s.text.lower())
    ]
    return base + ext + resize_only


@dataclass(frozen=True)
class MapLine:
    """One line of spec/requirements.tsv: a sentence's key and hash, its keywords, and the rows covering it."""

    key: str
    digest: str
    keywords: str
    rows: tuple[str, ...]


def read_map(path: Path = MAP_PATH) -> list[MapLine]:
    """The lines of the sentence map (a header line, then key, hash, keywords, rows separated by tabs)."""
    lines = []
    for number, raw in enumerate(path.read_text().splitlines()[1:], start=2):
        fields = raw.split("\t")
        if len(fields) != 4:
            raise ValueError(f"{path}:{number}: expected 4 tab-separated fields, got {len(fields)}")
        key, digest, keywords, rows = fields
        lines.append(MapLine(key, digest, keywords, tuple(r.strip() for r in rows.split(",") if r.strip())))
    return lines


def _load(paths: list[str]) -> list[Sentence]:
    master, extended, resize = (Path(p).read_text() for p in paths)
    return all_sentences(master, extended, resize)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["list", "check", "template"])
    parser.add_argument("files", nargs=3, metavar="proto.md", help="master, extension-ext-header, extension-resize")
    args = parser.parse_args(argv)
    sentences = _load(args.files)
    if args.command == "list":
        for s in sentences:
            print(f"{s.key}\t{s.digest}\t{' '.join(s.keywords)}\n    {s.text}")
        return 0
    if args.command == "template":
        rows = {line.key: line for line in read_map()} if MAP_PATH.exists() else {}
        print("key\thash\tkeywords\trows")
        for s in sentences:
            old = rows.get(s.key)
            print(f"{s.key}\t{s.digest}\t{' '.join(s.keywords)}\t{','.join(old.rows) if old else ''}")
        return 0
    mapped = {line.key: line for line in read_map()}
    problems = []
    for s in sentences:
        line = mapped.pop(s.key, None)
        if line is None:
            problems.append(f"not in the map: {s.key}: {s.text}")
        elif line.digest != s.digest:
            problems.append(f"changed since it was mapped: {s.key}: {s.text}")
        elif not line.rows:
            problems.append(f"mapped to no row: {s.key}: {s.text}")
    problems += [f"in the map but not in the spec: {key}" for key in mapped]
    print("\n".join(problems) if problems else f"{len(sentences)} requirement sentences, every one mapped")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
