"""The data stage (STAT step 6): a registry of variants, the budget, and the data card.

Every variant is a function `(inputs, variant_cfg, budget, rng) -> (pairs, stats)` under the
name `variant=` selects; all are held to the same budget of question-answer pairs, but for the
paper's MATH-Train (`train` with `whole_pool`), which is the whole training pool once.
"""

import logging
import random
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from stat_exp import select, synth
from stat_exp.config import VariantConfig
from stat_exp.skills import Catalogue

log = logging.getLogger(__name__)

VARIANTS: dict[str, Callable] = {
    "sel": select.stat_sel,
    "syn": synth.stat_syn,
    "train": select.train_baseline,
    "augment": select.augment_baseline,
    "hard": select.hard_baseline,
    "embed_sel": select.embed_sel,
    "embed_syn": synth.embed_syn,
}


@dataclass
class DataInputs:
    train: list[dict]  # the training pool
    skill_map: dict[str, list[str]]  # training question id -> its skills
    catalogue: Catalogue
    diagnoses: list[dict]  # the profile's diagnoses of difficult validation answers
    difficult: list[dict]  # the difficult validation questions (rows with their problem text)
    teacher: Callable  # () -> Teacher, made on first use


def build_training_data(inputs: DataInputs, cfg: VariantConfig, budget: int, seed: int) -> tuple[list[dict], dict]:
    """The variant's training pairs, cut to `budget`, and their data card.

    `variant.whole_pool` (the paper's MATH-Train) replaces the budget with the pool's size:
    every training question once, and the card says so (`budget_from`).
    """
    if cfg.name not in VARIANTS:
        raise ValueError(f"unknown variant {cfg.name!r}; choose one of {', '.join(sorted(VARIANTS))} or none")
    if cfg.whole_pool and cfg.name != "train":
        raise ValueError(f"variant.whole_pool is for variant=train (every training question once), not {cfg.name!r}")
    if cfg.whole_pool:
        log.info("variant train uses the whole pool: %d pairs, not data.budget (%d)", len(inputs.train), budget)
        budget = len(inputs.train)
    pairs, stats = VARIANTS[cfg.name](inputs, cfg, budget, random.Random(seed))
    card = data_card(pairs, inputs, budget) | {"variant": cfg.name, "details": stats,
                                               "budget_from": "the pool" if cfg.whole_pool else "data.budget"}
    if not card["budget_met"]:
        log.warning("variant %s made %d of the %d pairs asked for: %s", cfg.name, len(pairs), budget,
                    stats.get("exhausted") or ("no difficult question has a missing skill with training questions"
                                               if not pairs else
                                               f"raise variant.max_passes (now {cfg.max_passes}) or lower data.budget"))
    return pairs, card


def data_card(pairs: list[dict], inputs: DataInputs, budget: int) -> dict:
    from stat_exp.profile import missing_skill_profile

    return {
        "budget": budget,
        "pairs": len(pairs),
        "budget_met": len(pairs) == budget,
        "unique_questions": len({p["question"] for p in pairs}),
        "origins": dict(Counter(p["origin"] for p in pairs)),
        "skill_histogram": dict(Counter(s for p in pairs for s in p["skills"]).most_common()),
        "profile": missing_skill_profile(inputs.diagnoses),
    }
