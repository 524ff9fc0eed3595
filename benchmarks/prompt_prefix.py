"""How much of the skill-labelling prompts a provider's prefix cache can reuse, before and after the
templates put what a stage's requests share (instructions, the subject's skill list) first.

For each training question of MATH's pool, in file order, the labelling prompt (system and user
message) is compared with the previous one of the same subject: the tokens of their common prefix
are the ones a provider that caches prompt prefixes has already seen. Tokens are GPT-4o's
(tiktoken's o200k_base, from the copy litellm bundles) when tiktoken is installed, else characters.
"Before" renders the templates of commit `--before` (git show), "after" the working tree's.
OpenAI caches only prompts of 1024 tokens or more, in steps of 128 tokens; the last column counts
what that rule keeps.

Run from the repository root: python benchmarks/prompt_prefix.py --data ../shared/data
"""

import argparse
import ast
import json
import os
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Callable

from stat_exp.teacher import prompts

TEMPLATE = "stat_exp/teacher/templates/skill_labelling.j2"


def git_show(commit: str, path: str) -> str:
    return subprocess.run(["git", "show", f"{commit}:{path}"], check=True, capture_output=True, text=True).stdout


def old_render(commit: str) -> Callable[..., list[dict[str, str]]]:
    """The labelling messages as commit `commit` rendered them (its template and system message)."""
    source = git_show(commit, "stat_exp/teacher/prompts.py")
    system = next(ast.literal_eval(node.value) for node in ast.parse(source).body
                  if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "SYSTEM")
    # The package's own Jinja2 environment, so that only the template differs.
    template = prompts._ENV.from_string(git_show(commit, TEMPLATE))
    return lambda **variables: [{"role": "system", "content": system},
                                {"role": "user", "content": template.render(**variables).strip()}]


def tokenizer() -> tuple[str, Callable[[str], list]]:
    """(unit, encode): GPT-4o's tokens when tiktoken is installed, else characters."""
    try:
        import tiktoken
    except ImportError:
        return "characters", list
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    # Points tiktoken at the encodings litellm bundles, so that nothing is downloaded.
    import litellm.litellm_core_utils.default_encoding  # noqa: F401

    return "o200k_base tokens", tiktoken.get_encoding("o200k_base").encode


def shared_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def measure(render: Callable, rows: list[dict], catalogue: dict, encode: Callable, solution: bool) -> dict:
    """Prompt units, those in a prefix shared with the subject's previous request, and those OpenAI would cache."""
    previous: dict[str, list] = defaultdict(list)
    total = shared = cacheable = 0
    for row in rows:
        subject = row["type"]
        variables = dict(subject=subject, problem=row["problem"], skills=catalogue[subject], max_skills=5)
        messages = render(**variables, **({"solution": row["solution"]} if solution else {}))
        units = [unit for message in messages for unit in encode(message["content"])]
        common = shared_prefix(units, previous[subject])
        total += len(units)
        shared += common
        cacheable += 1024 + (common - 1024) // 128 * 128 if common >= 1024 else 0
        previous[subject] = units
    return {"prompts": len(rows), "units": total, "mean": total / len(rows), "shared": shared / total,
            "cacheable": cacheable / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"), help="holds math/train.jsonl and math/skills.json")
    parser.add_argument("--before", default="e5bd87d", help="the commit whose templates are 'before'")
    args = parser.parse_args()
    catalogue = json.loads((args.data / "math" / "skills.json").read_text())
    with open(args.data / "math" / "train.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    unit, encode = tokenizer()
    results = {
        f"before ({args.before}: solution shown, question first)": measure(old_render(args.before), rows, catalogue,
                                                                           encode, solution=True),
        "after (list first, question last, no solution)": measure(
            lambda **v: prompts.render("skill_labelling", **v), rows, catalogue, encode, solution=False),
    }
    print(f"labelling MATH's training pool ({len(rows)} questions, {len(catalogue)} subjects), in {unit}")
    print(f"{'templates':<55} {'mean prompt':>11} {'shared prefix':>14} {'OpenAI-cacheable':>17}")
    for name, r in results.items():
        print(f"{name:<55} {r['mean']:11.0f} {r['shared']:14.1%} {r['cacheable']:17.1%}")


if __name__ == "__main__":
    main()
