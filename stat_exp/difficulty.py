"""Which probe answers are difficult (STAT step 4), by one of four classifiers.

Each classifier reads probe records (one per question: `problem`, `responses`, `predictions`,
`correct`, ... as `evaluate.grade_responses` makes them) and returns one verdict per record,
in order: `{"difficult": bool, "response": int, ...details}`, where `response` is the index
of the sample the teacher should diagnose.

- `outcome`: fewer than half of the samples are correct (one sample: it is wrong).
- `consistency`: the most common normalised answer appears fewer than `min_agreement` times.
- `length`: the responses average at least `min_words` words (the paper's appendix E.1).
- `prm`: a process reward model (RLHFlow style) scores each step; the paper's rule on the scores.

`agreement` compares a classifier's verdicts with outcome's (the paper's Table 11).
"""

import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from stat_exp.config import DifficultyConfig
from stat_exp.grading import normalize_answer


Classifier = Callable[[Sequence[dict], DifficultyConfig], list[dict]]

GOOD_TOKEN = "+"  # the PRM's assistant turn after a correct step
BAD_TOKEN = "-"


def classify_outcome(records: Sequence[dict], cfg: DifficultyConfig) -> list[dict]:
    """Difficult when fewer than half of the samples are correct against the reference."""
    verdicts = []
    for record in records:
        correct = record["correct"]
        verdicts.append(
            {
                "difficult": 2 * sum(correct) < len(correct),
                "response": next((i for i, ok in enumerate(correct) if not ok), 0),
            }
        )
    return verdicts


def classify_consistency(records: Sequence[dict], cfg: DifficultyConfig) -> list[dict]:
    """Difficult when the most common answer among the samples appears fewer than `min_agreement` times."""
    too_few = [len(r["predictions"]) for r in records if len(r["predictions"]) < cfg.min_agreement]
    if too_few:
        raise ValueError(
            f"the consistency classifier needs difficulty.samples >= difficulty.min_agreement "
            f"({cfg.min_agreement}); a probe record has {min(too_few)} sample(s)"
        )
    verdicts = []
    for record in records:
        answers = [_answer_key(p) for p in record["predictions"]]
        counts = Counter(a for a in answers if a is not None)
        majority, majority_count = counts.most_common(1)[0] if counts else (None, 0)
        verdicts.append(
            {
                "difficult": majority_count < cfg.min_agreement,
                "response": next((i for i, a in enumerate(answers) if a != majority), 0),
                "majority_count": majority_count,
            }
        )
    return verdicts


def _answer_key(prediction: str | None) -> str | None:
    """The normalised answer; None when there is none (an empty box is no answer either)."""
    if prediction is None:
        return None
    return normalize_answer(prediction) or None


def classify_length(records: Sequence[dict], cfg: DifficultyConfig) -> list[dict]:
    """Difficult when the samples' responses average at least `min_words` whitespace-separated words;
    the sample to diagnose is the longest."""
    verdicts = []
    for record in records:
        words = [len(response.split()) for response in record["responses"]]
        mean = sum(words) / len(words)
        verdicts.append({"difficult": mean >= cfg.min_words, "response": words.index(max(words)),
                         "words": round(mean, 2)})
    return verdicts


def split_steps(response: str, prediction: str | None, separator: str) -> list[str]:
    """The steps the PRM scores: `response` cut at `separator` (a regex), then the final answer."""
    steps = [s.strip() for s in re.split(separator, response)]
    steps = [s for s in steps if s]
    if prediction is not None:
        steps.append(f"The final answer is \\boxed{{{prediction}}}.")
    return steps


def prm_conversation(problem: str, steps: Sequence[str]) -> list[dict]:
    """RLHFlow's layout: the problem opens the first user turn; each step is a user turn answered by '+'."""
    conversation = []
    for i, step in enumerate(steps):
        conversation.append({"role": "user", "content": f"{problem} {step}" if i == 0 else step})
        conversation.append({"role": "assistant", "content": GOOD_TOKEN})
    return conversation


def prm_scores(
    records: Sequence[dict], cfg: DifficultyConfig, model: Any = None, tokenizer: Any = None
) -> list[list[list[float]]]:
    """P('+') / (P('+') + P('-')) of every step of every sample: `[record][sample][step]`.

    One forward pass per response scores all its steps at once: step i's score is read from
    the logits at the position just before assistant turn i's '+'. `model` and `tokenizer`
    default to `cfg.prm_model` from the hub.
    """
    import torch
    from tqdm import tqdm

    from stat_exp.student.models import load_model, load_tokenizer

    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.prm_model)
    if model is None:
        model = load_model(cfg.prm_model)
    candidates = [_single_token(tokenizer, GOOD_TOKEN), _single_token(tokenizer, BAD_TOKEN)]

    encoded = []  # (record index, sample index, token ids, positions predicting each '+')
    for r, record in enumerate(records):
        for s, (response, prediction) in enumerate(zip(record["responses"], record["predictions"], strict=True)):
            steps = split_steps(response, prediction, cfg.step_separator)
            if steps:  # an empty response without an answer has nothing to score
                encoded.append((r, s, *_encode(tokenizer, record["problem"], steps, candidates[0])))
    scores: list[list[list[float]]] = [[[] for _ in r["responses"]] for r in records]
    # Longest first: similar lengths share a batch (less padding), and memory trouble shows at once.
    encoded.sort(key=lambda item: len(item[2]), reverse=True)
    # Llama 3.1's tokenizer has no pad token; what fills the padding never matters, as it is masked.
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad(), tqdm(total=len(encoded), desc="PRM scoring", unit="answer") as bar:
        for start in range(0, len(encoded), cfg.prm_batch_size):
            batch = encoded[start : start + cfg.prm_batch_size]
            width = max(len(ids) for _, _, ids, _ in batch)
            # Right padding: every real token keeps its position, and a causal model never attends forward.
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (_, _, ids, _) in enumerate(batch):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention_mask[row, : len(ids)] = 1
            logits = model(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device)).logits
            for row, (r, s, _, positions) in enumerate(batch):
                pair = logits[row, positions][:, candidates].float()
                scores[r][s] = pair.softmax(dim=-1)[:, 0].tolist()
            bar.update(len(batch))
    return scores


def _single_token(tokenizer: Any, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"the PRM's tokenizer encodes {text!r} as {len(ids)} tokens, not one")
    return ids[0]


def _encode(tokenizer: Any, problem: str, steps: Sequence[str], good_id: int) -> tuple[list[int], list[int]]:
    """The conversation's token ids, and for each step the position whose logits predict its '+'."""
    conversation = prm_conversation(problem, steps)
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    positions = []
    for i in range(len(steps)):
        # The conversation up to assistant turn i's content: its length is where that '+' sits.
        prefix = tokenizer.apply_chat_template(conversation[: 2 * i + 1], tokenize=False, add_generation_prompt=True)
        plus = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
        if not text.startswith(prefix) or plus >= len(ids) or ids[plus] != good_id:
            raise ValueError(f"cannot find assistant turn {i}'s {GOOD_TOKEN!r} token in the PRM's chat template")
        positions.append(plus - 1)
    return ids, positions


def prm_rule(step_scores: Sequence[float], tau1: float, tau2: float) -> bool:
    """The paper's rule: last step <= tau1, or mean <= tau1, or an earlier step <= tau2.

    A response with no steps (empty, no answer) has nothing to vouch for it: difficult.
    """
    if not step_scores:
        return True
    last, earlier = step_scores[-1], step_scores[:-1]
    mean = sum(step_scores) / len(step_scores)
    return last <= tau1 or mean <= tau1 or any(score <= tau2 for score in earlier)


def prm_verdicts(scores: Sequence[Sequence[Sequence[float]]], cfg: DifficultyConfig) -> list[dict]:
    """Verdicts from `prm_scores`' output. With k samples, each is judged by `prm_rule` and the
    question is difficult when more than half of them are (one sample: that sample's verdict);
    the sample to diagnose is the one with the lowest step score (no steps counts as lowest)."""
    verdicts = []
    for samples in scores:
        difficult = [prm_rule(steps, cfg.tau1, cfg.tau2) for steps in samples]
        lowest = min(range(len(samples)), key=lambda s: min(samples[s], default=float("-inf")))
        verdicts.append(
            {
                "difficult": 2 * sum(difficult) > len(difficult),
                "response": lowest,
                "step_scores": [round(score, 4) for score in samples[lowest]],
                "min_score": round(min(samples[lowest]), 4) if samples[lowest] else None,
                "difficult_samples": sum(difficult),
            }
        )
    return verdicts


def classify_prm(
    records: Sequence[dict], cfg: DifficultyConfig, model: Any = None, tokenizer: Any = None
) -> list[dict]:
    """Scores every sample with the PRM (`cfg.prm_model` unless `model`/`tokenizer` are given), then judges."""
    return prm_verdicts(prm_scores(records, cfg, model=model, tokenizer=tokenizer), cfg)


CLASSIFIERS: dict[str, Classifier] = {
    "prm": classify_prm,
    "outcome": classify_outcome,
    "consistency": classify_consistency,
    "length": classify_length,
}


def classify(records: Sequence[dict], cfg: DifficultyConfig) -> list[dict]:
    """One verdict per record by the classifier `cfg.name`."""
    if cfg.name not in CLASSIFIERS:
        raise ValueError(f"unknown difficulty classifier {cfg.name!r}; choose one of {', '.join(CLASSIFIERS)}")
    return CLASSIFIERS[cfg.name](records, cfg)


def agreement(verdicts: Sequence[dict], outcome_verdicts: Sequence[dict]) -> dict:
    """Precision and recall of `verdicts`' difficult answers, taking outcome's as the truth.

    A ratio with a zero denominator (nothing flagged, or nothing wrong) is None.
    """
    if len(verdicts) != len(outcome_verdicts):
        raise ValueError(f"{len(verdicts)} verdicts but {len(outcome_verdicts)} outcome verdicts")
    pairs = [(v["difficult"], o["difficult"]) for v, o in zip(verdicts, outcome_verdicts)]
    tp = sum(v and o for v, o in pairs)
    fp = sum(v and not o for v, o in pairs)
    fn = sum(o and not v for v, o in pairs)
    return {
        "precision": round(tp / (tp + fp), 4) if tp + fp else None,
        "recall": round(tp / (tp + fn), 4) if tp + fn else None,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "difficult": tp + fp,
        "outcome_difficult": tp + fn,
    }
