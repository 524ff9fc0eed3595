"""Parsers of the teacher's tagged answers (`<skill>`, `<reason>`, `<judge>`, `<question>`).

Teachers write tags loosely: mixed case, spaces inside the brackets, markdown around names,
a closing tag forgotten, an answer cut off by the token limit. Skill lists come one name per
tag or several in one tag (the paper's own format: `<skill>a, b, c</skill>`), separated by
commas, semicolons or new lines, numbered or bulleted, as a JSON or Python list, quoted, in
bold, with a trailing period or an explanation after the name. The parsers read what they can
and otherwise raise `ParseError`, saying what was missing; no other exception escapes them,
whatever the text, so the client can count a failure, keep the raw text and retry.
"""

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from stat_exp.grading import extract_boxed


class ParseError(ValueError):
    """The teacher's answer lacks what the parser needs; the message says what."""


@dataclass(frozen=True)
class Labels:
    """The catalogue skills a training question needs (skill map)."""

    skills: tuple[str, ...]  # catalogue spellings, most important first, at most max_skills
    unknown: tuple[str, ...]  # names the teacher gave that are not in the catalogue, as written
    reason: str


@dataclass(frozen=True)
class Diagnosis:
    """The teacher's verdict on a student response and the skills it failed to apply."""

    judge: str  # "correct" or "incorrect"
    reason: str
    skills: tuple[str, ...]  # catalogue spellings; empty when the judge is "correct"
    unknown: tuple[str, ...]  # off-catalogue names, as written; empty when "correct"


# A tag of any name: where the content of an unclosed tag ends.
_ANY_TAG = re.compile(r"<\s*(?:/\s*)?[A-Za-z][\w-]*\s*>")
# Longer than this, a fine-grained or coarse skill "name" is prose put inside a tag.
_MAX_SKILL_CHARS = 100
# What teachers write in a skill tag to mean "no skill"; neither a known nor an unknown skill.
_NO_SKILL = frozenset({"none", "na", "n_a", "nothing", "no_skill", "no_skills"})


# List markers: `-`, `*`, `•`, `+`, `1.`, `2)`; not the digits that begin `3d_geometry`.
_LIST_MARKER = re.compile(r"^(?:[-*•+]+|\d+[.)](?!\d))\s*")


@lru_cache(maxsize=None)
def _tag_pattern(tag: str) -> re.Pattern:
    # Not `<\s*/?\s*`: two adjacent `\s*` backtrack quadratically over a long run of spaces.
    return re.compile(rf"<\s*(/\s*)?{re.escape(tag)}\s*>", re.IGNORECASE)


def _scan(text: object, tag: str) -> list[tuple[str, bool]]:
    """(content, cut_off) of every `<tag>` in `text`, in order.

    A tag left open ends where the next tag of any name begins (a forgotten closing tag), or
    else at the end of the text: then `cut_off`, as an answer stopped by the token limit is.
    Stray closing tags are ignored.
    """
    if not isinstance(text, str):
        return []
    found: list[tuple[str, bool]] = []
    start: int | None = None
    for match in _tag_pattern(tag).finditer(text):
        closing = match.group(1) is not None
        if start is not None:
            body = text[start : match.start()]
            found.append((body.strip() if closing else _before_next_tag(body), False))
            start = None
        if not closing:
            start = match.end()
    if start is not None:
        rest = text[start:]
        found.append((_before_next_tag(rest), _ANY_TAG.search(rest) is None))
    return found


def _before_next_tag(body: str) -> str:
    """The content of a tag left open: up to the next tag of any name."""
    next_tag = _ANY_TAG.search(body)
    return (body[: next_tag.start()] if next_tag else body).strip()


def find_tags(text: str, tag: str) -> list[str]:
    """The stripped contents of every `<tag>...</tag>` in `text` (case and spaces inside the
    brackets do not matter); a tag left open at the end counts. [] for a non-string."""
    return [content for content, _ in _scan(text, tag)]


def normalize_skill(name: str) -> str:
    """A skill name in snake_case: `- **Completing the square**` -> `completing_the_square`."""
    name = _LIST_MARKER.sub("", name.strip().lower())
    name = re.sub(r"[\s\-/]+", "_", name)  # word separators
    name = re.sub(r"[^\w]", "", name)  # backticks, quotes, markdown, other punctuation
    return re.sub(r"_+", "_", name).strip("_")


# What separates the names of a list written on one line.
_SEPARATOR = re.compile(r"[,;]")
# Where a name's explanation begins, `name: why` or `name - why`; or where a label ends, `Skills: name`.
_EXPLANATION = re.compile(r":|\s[-\u2013\u2014]\s")
# Where names written as `a and b` or `a & b` part.
_AND = re.compile(r"(?:^|\s)(?:and|&)\s", re.IGNORECASE)
# A remark in brackets after a name, closed or cut off: `factoring_skills (to split the quadratic)`.
_REMARK = re.compile(r"\([^()]*\)?")
# Quotes, brackets, markdown and a full stop around an unknown name, trimmed (with a list marker) to show it.
_WRAPPERS = "\"'`*_[](){}.,;:"


def match_skills(names: Iterable[str], catalogue: Sequence[str]) -> tuple[list[str], list[str]]:
    """(known, unknown): the catalogue skills that `names` (tag contents, each one name or a list
    of them) name, spelled as in the catalogue and deduplicated in teacher order; and the other
    names, as written (markup trimmed), deduplicated. Empty names and "none" are neither.

    A content is matched whole first, then by its parts, so a catalogue name that itself holds
    a comma ("sequences, series and summation") is found whole inside a comma-separated list.
    """
    by_normal: dict[str, str] = {}
    for skill in catalogue:
        by_normal.setdefault(normalize_skill(skill), skill)
    # The most separators a catalogue name holds: how many parts may join back into one name.
    span = 1 + max((len(_SEPARATOR.findall(skill)) for skill in catalogue), default=0)
    known: list[str] = []
    unknown: list[str] = []
    seen: set[str] = set()

    def add(name: str) -> None:
        normal = normalize_skill(name)
        if not normal or normal in _NO_SKILL or normal in seen:
            return
        seen.add(normal)
        if normal in by_normal:
            known.append(by_normal[normal])
        else:
            unknown.append(_LIST_MARKER.sub("", name.strip()).strip(_WRAPPERS).strip())

    for content in names:
        if normalize_skill(content) in by_normal:
            add(content)
            continue
        for line in content.splitlines():
            for name in _names_in_line(line, by_normal, span):
                add(name)
    return known, unknown


def _names_in_line(line: str, by_normal: dict[str, str], span: int) -> list[str]:
    """The names on one line of a skill list, in order.

    The line splits at commas and semicolons into parts; the longest run of parts (up to
    `span`) that is a catalogue name is one name; so are the pieces of a part joined by "and"
    when each is one. A part with a colon or a spaced dash is a name and its explanation, which
    runs to the end of the line, unless only what follows is a catalogue name (`Skills: name`).
    A remark in brackets is dropped. Any other part is one name.
    """
    parts = _SEPARATOR.split(line)
    names: list[str] = []
    start = 0
    while start < len(parts):
        stop = next((stop for stop in range(min(len(parts), start + span), start, -1)
                     if normalize_skill(",".join(parts[start:stop])) in by_normal), None)
        if stop is not None:
            names.append(",".join(parts[start:stop]))
            start = stop
            continue
        part = _REMARK.sub("", parts[start])
        start += 1
        joined = [piece for piece in _AND.split(part) if piece.strip()]
        if joined != [part] and all(normalize_skill(piece) in by_normal for piece in joined):
            names += joined  # `a and b`, or the last of `a, b, and c`
            continue
        explained = _EXPLANATION.search(part)
        if explained is None:
            names.append(part)
            continue
        head, tail = part[: explained.start()], part[explained.end() :]
        if normalize_skill(head) not in by_normal and normalize_skill(tail) in by_normal:
            names.append(tail)  # `Skills: name`
            continue
        names.append(head)
        break  # the rest of the line explains `head`
    return names


def _skill_names(text: str) -> list[str]:
    """Normalized, deduplicated names in the `<skill>` tags, when short enough to be names."""
    names: list[str] = []
    for content in find_tags(text, "skill"):
        name = normalize_skill(content)
        if name and name not in _NO_SKILL and len(name) <= _MAX_SKILL_CHARS and name not in names:
            names.append(name)
    return names


def _first_reason(text: str) -> str:
    return next((reason for reason in find_tags(text, "reason") if reason), "")


def _named(unknown: Sequence[str]) -> str:
    """The off-catalogue names for an error message, a few of them."""
    if not unknown:
        return ""
    shown = ", ".join(repr(name[:60]) for name in unknown[:5])
    more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
    return f"; named instead: {shown}{more}"


def parse_fine_skill(text: str) -> str:
    """The one fine-grained skill of a skill-extraction answer, normalized."""
    names = _skill_names(text)
    if not names:
        raise ParseError("no <skill> tag with a skill name")
    return names[0]


def parse_clusters(text: str) -> list[str]:
    """The coarse skills of a skill-clustering answer, normalized and deduplicated."""
    names = _skill_names(text)
    if not names:
        raise ParseError("no <skill> tag with a coarse skill name")
    return names


def parse_labels(text: str, catalogue: Sequence[str], max_skills: int = 5) -> Labels:
    """The catalogue skills of a skill-labelling answer: the first `max_skills` known ones."""
    if max_skills < 1:
        raise ValueError(f"max_skills must be >= 1, got {max_skills}")
    known, unknown = match_skills(find_tags(text, "skill"), catalogue)
    if not known:
        raise ParseError(f"no <skill> from the catalogue{_named(unknown)}")
    return Labels(tuple(known[:max_skills]), tuple(unknown), _first_reason(text))


_POSITIVE = frozenset({"correct", "right", "true", "valid"})
_NEGATIVE = frozenset({"incorrect", "wrong", "false", "invalid", "flawed", "erroneous"})
_NEGATORS = frozenset({"not", "partially", "partly", "mostly"})  # `not correct`, `partially correct`


def _verdict(judge: str) -> str | None:
    """"correct" or "incorrect" when the words of a `<judge>` say one of them and only one."""
    verdicts = set()
    negated = False
    for word in re.findall(r"[a-z']+", judge.lower().replace("\u2019", "'")):
        if word in _NEGATORS or word.endswith("n't"):
            negated = True  # until the next verdict word: `not the correct answer`
        elif word in _POSITIVE:
            verdicts.add("incorrect" if negated else "correct")
            negated = False
        elif word in _NEGATIVE:
            verdicts.add("incorrect")
            negated = False
    # Both, as in an echoed `correct|incorrect`, is no verdict.
    return verdicts.pop() if len(verdicts) == 1 else None


def parse_diagnosis(text: str, catalogue: Sequence[str]) -> Diagnosis:
    """The judge, reason and missing catalogue skills of a diagnosis answer."""
    judge = next((v for v in map(_verdict, find_tags(text, "judge")) if v is not None), None)
    if judge is None:
        raise ParseError("no readable <judge> (correct or incorrect)")
    reason = _first_reason(text)
    if judge == "correct":
        return Diagnosis(judge, reason, (), ())  # a correct response misses no skill
    known, unknown = match_skills(find_tags(text, "skill"), catalogue)
    if not known:
        raise ParseError(f"judge is incorrect but no <skill> from the catalogue is named{_named(unknown)}")
    return Diagnosis(judge, reason, tuple(known), tuple(unknown))


def parse_questions(text: str, count: int | None = None) -> list[str]:
    """The new questions of a synthesis answer: non-empty, deduplicated, the first `count`.

    A `<question>` left open at the very end is dropped: it was most likely cut off by the
    token limit, and a truncated question still reads like a question.
    """
    if count is not None and count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    questions: list[str] = []
    seen: set[str] = set()
    for question, cut_off in _scan(text, "question"):
        key = " ".join(question.split())
        # Placeholders such as `...` have no letter or digit.
        if cut_off or key in seen or not re.search(r"[^\W_]", key):
            continue
        seen.add(key)
        questions.append(question)
    if not questions:
        raise ParseError("no complete, non-empty <question> tag")
    return questions[:count] if count is not None else questions


def parse_solution(text: str) -> str:
    """A solution answer, stripped, when its last `\\boxed{}` holds a final answer."""
    if not isinstance(text, str) or not extract_boxed(text):
        raise ParseError("no final \\boxed{} answer")
    return text.strip()
