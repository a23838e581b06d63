"""Every rule a comment cites is in the repository: each "spec x.y" section, quirk "Qn" and training quirk "Tn"
cited in the code's comments and strings, or in the docs, has a heading in docs/spec.md, and every heading
there is cited somewhere (a rule nothing relies on is dead text).

In Python files only comments and strings count (a variable named like a quirk is not a citation). A run of
sections after one "spec" counts whole: "spec 1.4 steps 1-2, 1.7, 8" cites 1.4, 1.7 and 8 (step numbers are
not sections), "spec 1.2-1.4" cites 1.2, 1.3 and 1.4, and "Q1-Q3" cites Q1, Q2 and Q3. A text that is not a
citation but reads like one (a GPU model such as a "T4") belongs in NOT_CITATIONS below."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "docs" / "spec.md"
FOLDERS = ("evotok_cli", "plugins", "tests", "benchmarks", "examples", "docs")
NOT_CITATIONS: set[str] = set()  # ids written for another reason, e.g. "T4" naming a GPU

SECTION = r"\d+(?:\.\d+)*"
RUN = re.compile(rf"\bspec\s+({SECTION}(?:\s+steps?\s+\d+(?:-\d+)?|\s*(?:,|-|\band\b)\s*{SECTION})*)")
STEPS = re.compile(r"\s+steps?\s+\d+(?:-\d+)?")
QUIRKS = re.compile(r"\b([QT])(\d+)(?:-\1(\d+))?\b")
F_PREFIX = re.compile(r"[rbu]*f", re.I)  # an f-string before Python 3.12 is one token, its {fields} are code
FIELD = re.compile(r"\{[^{}]*\}")
HEADING = re.compile(rf"^#{{2,4}} ((?:spec {SECTION})|[QT]\d+) — ", re.M)


def _expand(lo: str, hi: str) -> list[str]:
    """"1.2", "1.4" -> 1.2, 1.3, 1.4 (a range within one parent section); anything else: both ends."""
    *head_lo, last_lo = lo.split(".")
    *head_hi, last_hi = hi.split(".")
    if head_lo != head_hi or int(last_hi) < int(last_lo):
        return [lo, hi]
    return [".".join([*head_lo, str(n)]) for n in range(int(last_lo), int(last_hi) + 1)]


def cited_in(text: str) -> set[str]:
    """The ids a piece of prose cites."""
    found: set[str] = set()
    for run in RUN.findall(text):
        items = re.split(r"\s*(?:,|\band\b)\s*", STEPS.sub("", run))
        for item in filter(None, (i.strip().rstrip(".") for i in items)):
            ends = item.split("-")
            sections = _expand(ends[0], ends[1]) if len(ends) == 2 else ends
            found.update(f"spec {s.rstrip('.')}" for s in sections if s)
    for letter, lo, hi in QUIRKS.findall(text):
        found.update(f"{letter}{n}" for n in range(int(lo), int(hi or lo) + 1))
    return found - NOT_CITATIONS


def prose(path: Path) -> str:
    """What a file says in words: a Python file's comments and strings, or a whole Markdown file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".py":
        return text
    kinds = (tokenize.COMMENT, tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING))
    words = [FIELD.sub("", t.string) if t.type == tokenize.STRING and F_PREFIX.match(t.string) else t.string
             for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type in kinds]
    return "\n".join(words)


def citations() -> dict[str, list[str]]:
    """id -> the files that cite it."""
    files = [p for folder in FOLDERS for p in sorted((ROOT / folder).rglob("*"))
             if p.suffix in (".py", ".md") and p.is_file() and p != SPEC and p != Path(__file__).resolve()]
    files.append(ROOT / "README.md")
    out: dict[str, list[str]] = {}
    for path in files:
        for cited in cited_in(prose(path)):
            out.setdefault(cited, []).append(str(path.relative_to(ROOT)))
    return out


def headings() -> list[str]:
    return HEADING.findall(SPEC.read_text(encoding="utf-8"))


def test_the_citation_reader():
    assert cited_in("(spec 1.4 steps 1-2, 1.7, 8), by `candidates`") == {"spec 1.4", "spec 1.7", "spec 8"}
    assert cited_in("Commit (spec 1.4 step 4, 1.5, 6.2, 6.4 step 4), by") == {
        "spec 1.4", "spec 1.5", "spec 6.2", "spec 6.4"}
    assert cited_in("step by step (spec 1.2-1.5, quirks Q1-Q3) and") == {
        "spec 1.2", "spec 1.3", "spec 1.4", "spec 1.5", "Q1", "Q2", "Q3"}
    assert cited_in("D2F (spec 6.4 and 8). See spec 6.5. (spec 6.1's training note), T2") == {
        "spec 6.4", "spec 8", "spec 6.5", "spec 6.1", "T2"}
    assert cited_in("a family spec (bias, heads), docs/spec.md, Qwen2, QT1, T12x") == set()


def test_prose_skips_names_in_code(tmp_path):
    path = tmp_path / "m.py"
    path.write_text('Q0 = "blocks.0.q_proj"  # quirk Q6\nT1 = 3\nf"{Q0}.weight"\n"""spec 2.3 step 4"""\n')
    assert cited_in(prose(path)) == {"Q6", "spec 2.3"}


def test_spec_has_one_heading_per_id():
    ids = headings()
    assert ids, "docs/spec.md has no '### spec x.y — title' / '#### Qn — title' headings"
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


def test_every_cited_rule_is_in_docs_spec():
    missing = {i: files for i, files in citations().items() if i not in set(headings())}
    assert not missing, "cited but not in docs/spec.md (add a heading there, or fix the citation): " + "; ".join(
        f"{i} in {', '.join(files)}" for i, files in sorted(missing.items()))


def test_every_rule_in_docs_spec_is_cited():
    unused = sorted(set(headings()) - set(citations()))
    assert not unused, f"docs/spec.md holds rules nothing cites: {', '.join(unused)}"
