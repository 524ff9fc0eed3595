"""Training that survives being killed: SFT and GRPO checkpoint into their stage's unfinished folder.

A transformers Trainer checkpoint (`checkpoint-<step>/`) holds the model or adapter, the optimizer,
the scheduler, the RNG states and the trainer state (the step, hence the data position). The
store keeps a stage's unfinished folder when its compute fails or is killed and computes the
rerun in the same folder, so the rerun finds the last checkpoint and continues from it.
"""

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"  # the folder, inside the stage's output folder, that the trainer saves into
_STEP = re.compile(r"^checkpoint-(\d+)$")


def last_checkpoint(folder: Path) -> Path | None:
    """The latest complete checkpoint in `folder`, or None.

    The trainer writes `trainer_state.json` last, so a checkpoint without a readable one was cut
    short by the kill and is passed over.
    """
    complete = []
    for path in folder.glob("checkpoint-*") if folder.is_dir() else ():
        match = _STEP.match(path.name)
        if match and _readable(path / "trainer_state.json"):
            complete.append((int(match.group(1)), path))
    return max(complete)[1] if complete else None


def train_resumably(trainer: Any, folder: Path) -> Any:
    """`trainer.train()`, resumed from the last complete checkpoint in `folder` when there is one."""
    checkpoint = last_checkpoint(folder)
    if checkpoint is not None:
        step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
        logger.info("resumed from step %d (%s)", step, checkpoint)
    return trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)


def drop_checkpoints(trainer: Any, folder: Path) -> None:
    """Removes the checkpoints once training is done: the finished artifact holds only its results."""
    trainer.accelerator.wait_for_everyone()
    if trainer.accelerator.is_main_process and folder.exists():
        shutil.rmtree(folder)


def _readable(path: Path) -> bool:
    try:
        json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return True
