"""Parsers of the teacher's tagged answers: clean, messy and garbage text."""

import random
import re
import string
import time
from functools import partial
from pathlib import Path

import pytest
import yaml

from stat_exp.teacher.parsers import (
    Diagnosis,
    Labels,
    ParseError,
    find_tags,
    match_skills,
    normalize_skill,
    parse_clusters,
    parse_diagnosis,
    parse_fine_skill,
    parse_labels,
    parse_questions,
    parse_solution,
)

CATALOGUE = [
    "factoring_skills",
    "quadratic_equation_skills",
    "3d_geometry_and_volume_calculation_skills",
    "ratio_and_proportion_skills",
    "sequences, series and summation",  # a name holding commas
]


# find_tags


def test_find_tags_reads_every_tag_in_order():
    text = "<skill>a</skill> text <skill> b c </skill>\n<reason>why</reason>"
    assert find_tags(text, "skill") == ["a", "b c"]
    assert find_tags(text, "reason") == ["why"]
    assert find_tags(text, "judge") == []


def test_find_tags_ignores_case_and_spaces_inside_brackets():
    assert find_tags("<SKILL>a</Skill> < skill >b</ skill > <Skill>c< / SKILL>", "skill") == ["a", "b", "c"]


def test_find_tags_keeps_a_tag_cut_off_at_the_end():
    assert find_tags("<skill>a</skill>\n<skill>factoring_sk", "skill") == ["a", "factoring_sk"]


def test_find_tags_ends_a_forgotten_closing_tag_at_the_next_tag():
    text = "<skill>a\n<skill>b</skill>\n<reason>r</reason>\n<skill>c\n<reason>s</reason>"
    assert find_tags(text, "skill") == ["a", "b", "c"]
    assert find_tags(text, "reason") == ["r", "s"]


def test_find_tags_inside_prose_and_multiline():
    text = "Sure! The skill is <skill>factoring</skill>, because\n<reason>we\nfactor</reason>. Done."
    assert find_tags(text, "skill") == ["factoring"]
    assert find_tags(text, "reason") == ["we\nfactor"]


def test_find_tags_leaves_latex_and_comparisons_alone():
    question = r"If $x<y$ and $y > 2$, find $\frac{x}{y}$ when $\{x\} = \sqrt{2}$."
    assert find_tags(f"<question>{question}</question>", "question") == [question]


def test_a_closed_tag_keeps_a_comparison_that_looks_like_a_tag():
    assert find_tags("<question>Can $a<b>c$ hold?</question>", "question") == ["Can $a<b>c$ hold?"]


def test_find_tags_does_not_match_longer_tag_names():
    assert find_tags("<skills><skill>a</skill></skills>", "skill") == ["a"]


def test_find_tags_is_linear_in_a_long_run_of_spaces():
    start = time.perf_counter()
    for text in ("<" + " " * 100_000, "<skill>x<" + " " * 100_000, "<skill>x</" + " " * 100_000):
        find_tags(text, "skill")
    assert time.perf_counter() - start < 2  # a backtracking pattern takes minutes here


@pytest.mark.parametrize("text", [None, 3, b"<skill>a</skill>", ["<skill>a</skill>"], ""])
def test_find_tags_of_no_text_is_empty(text):
    assert find_tags(text, "skill") == []


# normalize_skill and match_skills


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("factoring_skills", "factoring_skills"),
        ("Factoring Skills", "factoring_skills"),
        ("`factoring_skills`", "factoring_skills"),
        ("'factoring-skills'.", "factoring_skills"),
        ('"Factoring  -  skills"', "factoring_skills"),
        ("- factoring_skills", "factoring_skills"),
        ("* **Factoring skills**", "factoring_skills"),
        ("1. factoring_skills", "factoring_skills"),
        ("12) factoring__skills_", "factoring_skills"),
        ("3d_geometry_and_volume_calculation_skills", "3d_geometry_and_volume_calculation_skills"),
        ("3D geometry & volume calculation skills", "3d_geometry_volume_calculation_skills"),
        ("ratio/proportion", "ratio_proportion"),
        ("  \n", ""),
        ("...", ""),
    ],
)
def test_normalize_skill(name, expected):
    assert normalize_skill(name) == expected


def test_match_skills_spells_known_as_the_catalogue_and_keeps_unknown_as_written():
    catalogue = ["Factoring_Skills", "quadratic_equation_skills"]
    known, unknown = match_skills(
        ["- factoring skills", "Made Up Skill", "quadratic_equation_skills", "FACTORING_SKILLS", "made-up skill",
         "none", ""],
        catalogue,
    )
    assert known == ["Factoring_Skills", "quadratic_equation_skills"]
    assert unknown == ["Made Up Skill"]


def test_an_unknown_name_is_shown_without_its_markup():
    assert match_skills(["- **Made Up Skill**.", "`other_skill`"], CATALOGUE) == ([], ["Made Up Skill", "other_skill"])


def test_match_skills_reads_every_name_of_a_list_line():
    # An unknown name, then known ones: the line is read to its end.
    assert match_skills(["solving_systems, factoring_skills"], CATALOGUE) == (["factoring_skills"], ["solving_systems"])
    # `a and b` of two known names, then more names.
    assert match_skills(["factoring_skills and quadratic_equation_skills, ratio_and_proportion_skills"], CATALOGUE) == (
        ["factoring_skills", "quadratic_equation_skills", "ratio_and_proportion_skills"], [])
    # `and` inside a name that is not two known names leaves the name whole.
    assert match_skills(["factoring_skills, solving and checking"], CATALOGUE) == (
        ["factoring_skills"], ["solving and checking"])


def test_list_parts_join_into_one_name_only_as_far_as_catalogue_names_hold_separators():
    catalogue = ["counting", "probability", "algebra", "counting_probability"]  # no name holds a comma
    assert match_skills(["counting, probability, algebra"], catalogue) == (["counting", "probability", "algebra"], [])
    assert match_skills(["counting"], []) == ([], ["counting"])  # an empty catalogue knows no name


def test_match_skills_finds_a_one_part_name_with_brackets_in_a_list():
    # A catalogue name holding a comma makes runs of two parts possible; a one-part name with
    # brackets is still matched whole, not read as a name and a remark.
    catalogue = ["sequences, series and summation", "counting (combinatorics)"]
    assert match_skills(["counting (combinatorics), factoring"], catalogue) == (
        ["counting (combinatorics)"], ["factoring"])


# parse_fine_skill and parse_clusters


def test_parse_fine_skill():
    text = "<skill>Completing the Square</skill>\n<reason>It needs it.</reason>"
    assert parse_fine_skill(text) == "completing_the_square"
    # A placeholder echoed from the prompt is skipped.
    assert parse_fine_skill("<skill>...</skill> <skill>`vieta_formulas`</skill>") == "vieta_formulas"
    assert parse_fine_skill("<skill>modular_arithm") == "modular_arithm"


@pytest.mark.parametrize(
    "text",
    ["", None, "The skill is factoring.", "<skill>", "<skill></skill>", "<skill>none</skill>",
     "<skill>" + "a very long sentence " * 10 + "</skill>"],
)
def test_parse_fine_skill_without_a_name(text):
    with pytest.raises(ParseError, match="<skill>"):
        parse_fine_skill(text)


def test_a_skill_name_of_up_to_100_characters_is_a_name():
    name = "a" * 100
    assert parse_fine_skill(f"<skill>{name}</skill>") == name
    with pytest.raises(ParseError, match=r"^no <skill> tag with a skill name$"):
        parse_fine_skill(f"<skill>{name}a</skill>")


def test_parse_clusters_normalizes_and_deduplicates():
    text = """Here are the groups.
<skill>Polynomial Skills</skill>
<members>polynomial_division, vieta_formulas</members>
<skill>`counting_skills`</skill><members>stars_and_bars</members>
<skill>polynomial-skills</skill>
<skill>geometry_skills"""
    assert parse_clusters(text) == ["polynomial_skills", "counting_skills", "geometry_skills"]


def test_parse_clusters_without_skills():
    with pytest.raises(ParseError, match=r"^no <skill> tag with a coarse skill name$"):
        parse_clusters("<members>a, b</members>")


# parse_labels


def test_parse_labels_well_formed():
    text = "<skill>factoring_skills</skill>\n<skill>quadratic_equation_skills</skill>\n"
    text += "<reason>Factor, then solve.</reason>"
    assert parse_labels(text, CATALOGUE) == Labels(
        ("factoring_skills", "quadratic_equation_skills"), (), "Factor, then solve."
    )


def test_parse_labels_messy():
    text = """I think the skills are:
< Skill >- **Factoring skills**</skill >
<SKILL>1. quadratic equation skills</SKILL>
<skill>factoring_skills</skill>
<skill>clever_tricks</skill>
<reason>because"""
    labels = parse_labels(text, CATALOGUE)
    assert labels.skills == ("factoring_skills", "quadratic_equation_skills")
    assert labels.unknown == ("clever_tricks",)
    assert labels.reason == "because"


def test_parse_labels_keeps_the_first_max_skills():
    text = "".join(f"<skill>{s}</skill>" for s in reversed(CATALOGUE))
    assert parse_labels(text, CATALOGUE, max_skills=2).skills == tuple(reversed(CATALOGUE))[:2]
    assert parse_labels(text, CATALOGUE).skills == tuple(reversed(CATALOGUE))
    assert parse_labels(text, CATALOGUE, max_skills=1).skills == (CATALOGUE[-1],)
    six = [f"skill_{i}" for i in range(6)]
    assert parse_labels("".join(f"<skill>{s}</skill>" for s in six), six).skills == tuple(six[:5])  # the default


def test_parse_labels_without_a_reason_has_an_empty_one():
    assert parse_labels("<skill>factoring_skills</skill>", CATALOGUE).reason == ""


def test_parse_labels_without_a_known_skill_names_the_unknown_ones():
    with pytest.raises(ParseError, match="catalogue.*'clever_tricks'"):
        parse_labels("<skill>clever_tricks</skill><reason>r</reason>", CATALOGUE)
    with pytest.raises(ParseError, match="catalogue"):
        parse_labels("factoring_skills", CATALOGUE)


@pytest.mark.parametrize(
    ("unknown", "message"),
    [
        ([], "no <skill> from the catalogue"),
        (["u1", "u2", "u3", "u4", "u5"], "no <skill> from the catalogue; named instead: 'u1', 'u2', 'u3', 'u4', 'u5'"),
        # At most five names, each cut to 60 characters, and how many more.
        (["u1", "u2", "u3", "u4", "u5", "u6"],
         "no <skill> from the catalogue; named instead: 'u1', 'u2', 'u3', 'u4', 'u5' and 1 more"),
        (["x" * 61, "u2", "u3", "u4", "u5", "u6", "u7"],
         f"no <skill> from the catalogue; named instead: '{'x' * 60}', 'u2', 'u3', 'u4', 'u5' and 2 more"),
    ],
)
def test_the_parse_error_names_a_few_of_the_unknown_skills(unknown, message):
    text = "".join(f"<skill>{name}</skill>" for name in unknown) or "<skill>none</skill>"
    with pytest.raises(ParseError) as error:
        parse_labels(text, CATALOGUE)
    assert str(error.value) == message


def test_parse_labels_rejects_a_bad_max_skills():
    with pytest.raises(ValueError, match="max_skills"):
        parse_labels("<skill>factoring_skills</skill>", CATALOGUE, max_skills=0)


# Answers as real teachers write them (tests/data/teacher_answers.yaml), each with its expected parse

ANSWERS = yaml.safe_load((Path(__file__).parent / "data" / "teacher_answers.yaml").read_text(encoding="utf-8"))


def test_the_answer_file_covers_both_parsers():
    kinds = [answer["parser"] for answer in ANSWERS["answers"]]
    assert len(kinds) >= 30 and kinds.count("labels") >= 10 and kinds.count("diagnosis") >= 10
    assert len({answer["id"] for answer in ANSWERS["answers"]}) == len(kinds)


@pytest.mark.parametrize("answer", ANSWERS["answers"], ids=lambda answer: answer["id"])
def test_real_teacher_answers(answer):
    catalogue = ANSWERS["catalogues"][answer["catalogue"]]
    if answer["parser"] == "labels":
        parse = partial(parse_labels, catalogue=catalogue, max_skills=answer.get("max_skills", 5))
    else:
        parse = partial(parse_diagnosis, catalogue=catalogue)
    if "error" in answer:
        with pytest.raises(ParseError, match=re.escape(answer["error"])):
            parse(answer["text"])
        return
    parsed = parse(answer["text"])
    expect = answer["expect"]
    assert list(parsed.skills) == expect["skills"]
    assert list(parsed.unknown) == expect["unknown"]
    if answer["parser"] == "diagnosis":
        assert parsed.judge == expect["judge"]


def test_a_catalogue_name_holding_commas_is_never_split():
    catalogue = ["sequences, series and summation", "sequences", "series and summation"]
    assert parse_labels("<skill>Sequences, series and summation</skill>", catalogue).skills == (catalogue[0],)
    assert parse_labels("<skill>sequences; series and summation</skill>", catalogue).skills == (catalogue[0],)
    # The parts are names only where the whole is not.
    assert parse_labels("<skill>series and summation, sequences</skill>", catalogue).skills == (catalogue[2], catalogue[1])


def test_an_explanation_after_a_name_is_no_name():
    text = "<skill>1. factoring_skills: to split $x^2-5x+6$, then solve\n2. sign_rules - as in $(-1)^3$, twice</skill>"
    labels = parse_labels(text, CATALOGUE)
    assert labels.skills == ("factoring_skills",) and labels.unknown == ("sign_rules",)


# parse_diagnosis


def test_parse_diagnosis_incorrect():
    text = """<reason>The response drops the negative root.</reason>
<judge>incorrect</judge>
<skill>quadratic_equation_skills</skill>
<skill>Factoring skills</skill>
<skill>quadratic_equation_skills</skill>
<skill>sign_tracking</skill>"""
    assert parse_diagnosis(text, CATALOGUE) == Diagnosis(
        "incorrect",
        "The response drops the negative root.",
        ("quadratic_equation_skills", "factoring_skills"),
        ("sign_tracking",),
    )


def test_parse_diagnosis_correct_names_no_skill():
    text = "<judge>Correct</judge><reason>All steps hold.</reason><skill>factoring_skills</skill>"
    assert parse_diagnosis(text, CATALOGUE) == Diagnosis("correct", "All steps hold.", (), ())
    assert parse_diagnosis("<judge>correct</judge>", CATALOGUE) == Diagnosis("correct", "", (), ())


@pytest.mark.parametrize(
    ("judge", "expected"),
    [
        ("incorrect", "incorrect"),
        ("Incorrect.", "incorrect"),
        ("**INCORRECT**", "incorrect"),
        ("wrong", "incorrect"),
        ("False", "incorrect"),
        ("not correct", "incorrect"),
        ("The response isn\u2019t correct", "incorrect"),
        ("partially correct", "incorrect"),
        ("It is not the correct answer", "incorrect"),
        ("The response is incorrect.", "incorrect"),
        ("correct", "correct"),
        ("Right", "correct"),
        ("true", "correct"),
        ("The response is correct.", "correct"),
        ("Correct: the final answer is correct.", "correct"),  # a verdict word ends a negation, not starts one
    ],
)
def test_parse_diagnosis_reads_the_judge(judge, expected):
    text = f"<judge>{judge}</judge><reason>r</reason><skill>factoring_skills</skill>"
    assert parse_diagnosis(text, CATALOGUE).judge == expected


@pytest.mark.parametrize("judge", ["", "maybe", "correct|incorrect", "incorrect|correct", "correct or incorrect",
                                   "..."])
def test_parse_diagnosis_without_a_readable_judge(judge):
    with pytest.raises(ParseError, match=r"^no readable <judge> \(correct or incorrect\)$"):
        parse_diagnosis(f"<judge>{judge}</judge><skill>factoring_skills</skill>", CATALOGUE)


def test_parse_diagnosis_takes_the_first_readable_judge():
    text = "<judge>...</judge><judge>wrong</judge><judge>correct</judge><skill>factoring_skills</skill>"
    assert parse_diagnosis(text, CATALOGUE).judge == "incorrect"


def test_parse_diagnosis_incorrect_without_a_known_skill():
    with pytest.raises(ParseError, match="no <skill> from the catalogue.*'sign_tracking'"):
        parse_diagnosis("<judge>incorrect</judge><skill>sign_tracking</skill>", CATALOGUE)
    with pytest.raises(ParseError, match="no <skill>"):
        parse_diagnosis("<judge>incorrect</judge><skill>none</skill>", CATALOGUE)


# parse_questions


def test_parse_questions():
    text = r"""<reason>The skill is about factoring.</reason>
<draft>Try $x^2-5x+6$... <question> is not used here.</draft>
<question>
Factor $x^2 - 5x + 6$ and find the sum of its roots.
</question>
<QUESTION>Find all $x$ with $\frac{x^2-1}{x+1} = 3$.</QUESTION>
<question>Factor  $x^2 - 5x + 6$ and find the sum of its roots.</question>
<question>...</question>
<question></question>"""
    questions = parse_questions(text)
    assert questions[1:] == [
        "Factor $x^2 - 5x + 6$ and find the sum of its roots.",
        r"Find all $x$ with $\frac{x^2-1}{x+1} = 3$.",
    ]
    assert questions[0] == "is not used here."  # a tag in the draft reads like any other
    assert parse_questions(text, count=2) == questions[:2]


def test_parse_questions_reads_on_after_a_duplicate_or_a_placeholder():
    text = "<question>What is $1+1$?</question><question>What is  $1+1$?</question><question>. . .</question>"
    text += "<question>What is $2+2$?</question>"
    assert parse_questions(text) == ["What is $1+1$?", "What is $2+2$?"]


def test_parse_questions_drops_a_question_cut_off_at_the_end():
    text = "<question>What is $1+1$?</question>\n<question>What is the largest prime factor of"
    assert parse_questions(text) == ["What is $1+1$?"]
    with pytest.raises(ParseError, match="<question>"):
        parse_questions("<question>What is the largest prime factor of")


def test_parse_questions_keeps_a_question_whose_closing_tag_was_forgotten():
    text = "<question>What is $1+1$?\n<question>What is $2+2$?</question>"
    assert parse_questions(text) == ["What is $1+1$?", "What is $2+2$?"]


def test_parse_questions_rejects_a_bad_count():
    with pytest.raises(ValueError, match="count"):
        parse_questions("<question>What is $1+1$?</question>", count=0)


@pytest.mark.parametrize("text", [None, "", "What is 1+1?", "<question>...</question>", "<question>"])
def test_parse_questions_without_questions(text):
    with pytest.raises(ParseError, match=r"^no complete, non-empty <question> tag$"):
        parse_questions(text)


# parse_solution


def test_parse_solution():
    text = "We have $x = 2$, so the answer is $\\boxed{\\frac{1}{2}}$.\n"
    assert parse_solution(text) == text.strip()


@pytest.mark.parametrize("text", [None, "", "The answer is 4.", "so \\boxed{\\frac{1}{2}", "\\boxed{}", "\\boxed{ }"])
def test_parse_solution_without_a_final_answer(text):
    with pytest.raises(ParseError, match=r"^no final \\boxed\{\} answer$"):
        parse_solution(text)


# Garbage never raises anything but ParseError

PARSERS = {
    "fine_skill": parse_fine_skill,
    "clusters": parse_clusters,
    "labels": partial(parse_labels, catalogue=CATALOGUE),
    "diagnosis": partial(parse_diagnosis, catalogue=CATALOGUE),
    "questions": parse_questions,
    "solution": parse_solution,
}

PIECES = [
    "<skill>", "</skill>", "< Skill >", "</ skill >", "<judge>", "</judge>", "<reason>", "</reason>",
    "<question>", "</question>", "<members>", "<", ">", "/", "\\boxed{", "\\fbox", "{", "}", "\\", "$",
    "correct", "incorrect", "not", "factoring_skills", "- ", "1. ", "`", "'", "\n", " ", "\u2019",
    "\x00", "\ufffd", "\U0001f600", "é", "_",
    # skill lists: separators, brackets, markdown, explanations, a name holding commas
    ",", ", ", ";", "[", "]", '"', "**", ": ", " - ", "(", ")", " and ", "quadratic equation skills",
    "sequences, series and summation", "sequences", "none",
]


def random_texts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = string.printable + "\u00e9\u2019\u2022\u00a0\x00"
    texts = []
    for _ in range(count):
        if rng.random() < 0.5:
            texts.append("".join(rng.choice(PIECES) for _ in range(rng.randint(0, 40))))
        else:
            texts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200))))
    # Random bytes decoded as a model's output might be.
    texts += [bytes(rng.getrandbits(8) for _ in range(300)).decode("utf-8", errors="replace") for _ in range(20)]
    return texts


GARBAGE = [None, "", " ", "<skill>", "</skill>", "<skill></skill>", "<>", "< / >", 42, b"\xff\xfe",
           bytes(range(256)).decode("latin-1")]


@pytest.mark.parametrize("name", PARSERS)
def test_parsers_reject_garbage_with_parse_error(name):
    for text in GARBAGE:
        with pytest.raises(ParseError):
            PARSERS[name](text)


def well_typed(name: str, result: object) -> bool:
    """Whether a parser's result has its promised shape."""
    if name == "fine_skill":
        return isinstance(result, str) and result == normalize_skill(result) != ""
    if name in ("clusters", "questions"):
        return isinstance(result, list) and result != [] and all(isinstance(r, str) and r for r in result)
    if name == "labels":
        return isinstance(result, Labels) and 0 < len(result.skills) <= 5 and set(result.skills) <= set(CATALOGUE)
    if name == "diagnosis":
        judged = isinstance(result, Diagnosis) and result.judge in ("correct", "incorrect")
        return judged and set(result.skills) <= set(CATALOGUE)
    return isinstance(result, str) and ("boxed" in result or "fbox" in result)


@pytest.mark.parametrize("name", PARSERS)
def test_parsers_return_or_raise_parse_error_on_random_text(name):
    parsed = 0
    for text in random_texts(3000):
        try:
            result = PARSERS[name](text)
        except ParseError:
            continue
        assert well_typed(name, result), (text, result)
        parsed += 1
    # The pieces are tags and names, so some random texts do parse: the loop tests both paths.
    assert parsed > 0
