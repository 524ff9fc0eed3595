"""The teacher's prompts: one Jinja2 template per task under `templates/`, rendered to chat messages.

Autoescaping is off so that LaTeX (`\\frac{a}{b}`, `x < y`) reaches the teacher untouched, and
undefined variables are errors, so a prompt is never sent with a hole in it.
"""

from functools import cache

import jinja2
from jinja2 import meta

KINDS = (
    "skill_extraction",
    "skill_clustering",
    "skill_labelling",
    "diagnosis",
    "synthesis",
    "solution",
    "rewrite",
)

SYSTEM = (
    "You are an expert mathematics teacher who analyses problems and solutions and writes new "
    "problems to train a student model. Write mathematics in LaTeX. When the instructions ask "
    "for tags such as <skill>...</skill>, open and close every tag, and use exactly the tag names "
    "given."
)

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("stat_exp.teacher", "templates"),
    undefined=jinja2.StrictUndefined,
    autoescape=False,
    keep_trailing_newline=False,
    trim_blocks=True,  # `{% for %}` lines leave no blank lines behind
    lstrip_blocks=True,
)


def template_source(kind: str) -> str:
    """The template text of `kind`: stages hash it into their cache keys, so an edited prompt is re-asked."""
    return _ENV.loader.get_source(_ENV, _template_name(kind))[0]


@cache
def template_variables(kind: str) -> frozenset[str]:
    """The names `kind`'s template reads (those with a default included)."""
    return frozenset(meta.find_undeclared_variables(_ENV.parse(template_source(kind))))


def render(kind: str, **variables: object) -> list[dict[str, str]]:
    """The chat messages (system, then user) that ask the teacher for `kind`.

    Raises ValueError for an unknown kind or a variable the template does not read (a
    misspelled optional one would otherwise be ignored), and jinja2's UndefinedError, naming
    it, for a missing one.
    """
    known = template_variables(kind)
    extra = sorted(set(variables) - known)
    if extra:
        raise ValueError(f"prompt {kind!r} reads no {', '.join(extra)}; it reads {', '.join(sorted(known))}")
    user = _ENV.get_template(_template_name(kind)).render(**variables).strip()
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def _template_name(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown prompt kind {kind!r}; choose one of {', '.join(KINDS)}")
    return f"{kind}.j2"
