"""`python -m stat_exp.cache {ls,du,gc}`: see what the artifact cache holds, and prune it.

    python -m stat_exp.cache ls [--stage sft]         artifacts: stage, key, size, created, last used, runs
    python -m stat_exp.cache du                       totals per stage
    python -m stat_exp.cache gc --dry-run             what gc would remove, and why
    python -m stat_exp.cache gc [--older-than 30d] [--merged-weights]

`gc` removes artifacts that no existing run folder used (their `uses.jsonl`), with
`--older-than` also those last used longer ago, unfinished `.tmp-*` folders whose build lock
nobody holds (a killed stage's), what an interrupted gc left, and with `--merged-weights` the
merged full weights of LoRA SFT artifacts, whose adapter stays (the pipeline merges again when
vLLM or GRPO needs them). It never touches what a live run holds (the store's `build` and `use`
locks), and it renames an artifact away before deleting it, so a later run never trusts half of
one.
"""

import argparse
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from stat_exp.config import PathsConfig
from stat_exp.store import MANIFEST, TMP_PREFIX, TRASH_PREFIX, USES, acquire, discard, lock_path, read_jsonl

DEFAULT_ROOT = PathsConfig().cache_dir  # the pipeline's default paths.cache_dir
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass
class Entry:
    """One folder of a stage: a finished artifact, an unfinished `.tmp-*` build, or `.trash-*`."""

    stage: str
    key: str
    path: Path
    kind: str  # artifact | tmp | trash
    size: int
    created: float | None = None  # epoch seconds (artifacts)
    uses: list[dict] = field(default_factory=list)  # {"run", "time"} records (artifacts)

    @property
    def runs(self) -> list[str]:
        return list(dict.fromkeys(use["run"] for use in self.uses))

    @property
    def last_used(self) -> float | None:
        return max((use["time"] for use in self.uses), default=self.created)

    @property
    def referenced(self) -> bool:
        """Whether a run folder that used it still exists."""
        return any(Path(run).is_dir() for run in self.runs)


def scan(root: Path) -> list[Entry]:
    """Every artifact, unfinished build and trash folder under `root`, by stage then creation time."""
    entries = []
    for stage_dir in sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith(".")):  # .locks
        for path in sorted(p for p in stage_dir.iterdir() if p.is_dir()):
            if path.name.startswith(TMP_PREFIX):
                entries.append(Entry(stage_dir.name, path.name[len(TMP_PREFIX):], path, "tmp", folder_size(path)))
            elif path.name.startswith(TRASH_PREFIX):
                entries.append(Entry(stage_dir.name, path.name, path, "trash", folder_size(path)))
            elif (path / MANIFEST).is_file():
                manifest = json.loads((path / MANIFEST).read_text())
                created = time.mktime(time.strptime(manifest["created"], "%Y-%m-%dT%H:%M:%S"))
                uses = read_jsonl(path / USES) if (path / USES).is_file() else []
                entries.append(Entry(stage_dir.name, path.name, path, "artifact", folder_size(path), created, uses))
    return sorted(entries, key=lambda e: (e.stage, e.created or 0, e.key))


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def merged_weights(entry: Entry) -> Path | None:
    """The merged full weights of a LoRA SFT artifact that keeps its adapter, if present."""
    if entry.stage == "sft" and (entry.path / "adapter" / "adapter_config.json").is_file():
        model = entry.path / "model"
        return model if model.is_dir() else None
    return None


def parse_age(text: str) -> float:
    """'30d', '12h', '90m', '45s', '2w' (or a bare number of days) -> seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw]?)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"--older-than {text!r}: expected a number and a unit, e.g. 30d, 12h, 90m")
    return float(match[1]) * _AGE_UNITS[match[2] or "d"]


@dataclass
class Removal:
    entry: Entry
    reason: str
    part: Path | None = None  # only this folder of the artifact (its merged weights)
    size: int = 0
    removed: bool = False  # False on a dry run, or when kept after all (then `reason` says why)

    @property
    def kept(self) -> bool:
        return self.reason.startswith("kept:")


def gc(root: Path, *, older_than: float | None = None, merged: bool = False, dry_run: bool = False,
       now: float | None = None) -> list[Removal]:
    """Remove (or with `dry_run` only list) what `gc` prunes; see the module's docstring."""
    now = time.time() if now is None else now
    plan = []
    for entry in scan(root):
        if entry.kind == "trash":
            plan.append(Removal(entry, "left by an interrupted gc", size=entry.size))
        elif entry.kind == "tmp":
            plan.append(Removal(entry, "unfinished, and no process is building it", size=entry.size))
        elif reason := _why_remove(entry, older_than, now):
            plan.append(Removal(entry, reason, size=entry.size))
        elif merged and (part := merged_weights(entry)) is not None:
            plan.append(Removal(entry, "merged weights (the adapter stays)", part=part, size=folder_size(part)))
    for removal in plan:
        _remove(removal, older_than, now, dry_run)
    return plan


def _why_remove(entry: Entry, older_than: float | None, now: float) -> str | None:
    if not entry.referenced:
        return "no run folder uses it"
    if older_than is not None and entry.last_used < now - older_than:
        return f"last used {_ago(now - entry.last_used)} ago"
    return None


def _remove(removal: Removal, older_than: float | None, now: float, dry_run: bool) -> None:
    """Remove what `removal` names unless a live process holds it: renamed to `.trash-*` first, then deleted."""
    entry = removal.entry
    stage_dir, root = entry.path.parent, entry.path.parent.parent
    if entry.kind == "trash":
        if not dry_run:
            shutil.rmtree(entry.path)
            removal.removed = True
        return
    locks = [(lock_path(root, entry.stage, entry.key, "build"), "being built by a live run")]
    if entry.kind == "artifact":
        locks.append((lock_path(root, entry.stage, entry.key, "use"), "in use by a live run"))
    held = []
    try:
        for path, busy in locks:
            fd = acquire(path, exclusive=True, blocking=False)
            if fd is None:
                removal.reason = f"kept: {busy}"
                return
            held.append(fd)
        if entry.kind == "artifact" and removal.part is None:
            fresh = Entry(entry.stage, entry.key, entry.path, entry.kind, entry.size, entry.created,
                          read_jsonl(entry.path / USES) if (entry.path / USES).is_file() else [])
            if _why_remove(fresh, older_than, now) is None:  # a run used it since the scan, and has finished
                removal.reason = "kept: used since the scan"
                return
        if dry_run:
            return
        discard(removal.part or entry.path, stage_dir, entry.key)  # from the rename on, no run finds it (or these weights)
        if removal.part is None:
            for path, _ in locks:  # unlinked while held: a waiting process notices and relocks (store.acquire)
                path.unlink(missing_ok=True)
        removal.removed = True
    finally:
        for fd in held:
            os.close(fd)


def human_size(size: float) -> str:
    """Decimal units, as disks are sold: 6.4 GB."""
    if size < 1000:
        return f"{size:.0f} B"
    for unit in ("kB", "MB", "GB"):
        size /= 1000
        if size < 1000:
            return f"{size:.1f} {unit}"
    return f"{size / 1000:.1f} TB"


def _when(epoch: float | None) -> str:
    return "-" if epoch is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(epoch))


def _ago(seconds: float) -> str:
    for unit in ("w", "d", "h", "m"):
        if seconds >= _AGE_UNITS[unit]:
            return f"{seconds / _AGE_UNITS[unit]:.0f}{unit}"
    return f"{seconds:.0f}s"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _cmd_ls(args: argparse.Namespace) -> None:
    rows = [["stage", "key", "size", "created", "last used", "runs"]]
    for e in scan(args.root):
        if args.stage and e.stage != args.stage:
            continue
        if e.kind == "artifact":
            runs = ", ".join(_short(run) for run in e.runs) or "-"
            rows.append([e.stage, e.key, human_size(e.size), _when(e.created), _when(e.last_used), runs])
        else:
            state = "(unfinished)" if e.kind == "tmp" else "(trash)"
            rows.append([e.stage, e.path.name, human_size(e.size), "-", "-", state])
    print(_table(rows))


def _cmd_du(args: argparse.Namespace) -> None:
    totals: dict[str, list[int]] = {}
    for e in scan(args.root):
        count, size, merged = totals.setdefault(e.stage, [0, 0, 0])
        part = merged_weights(e)
        totals[e.stage] = [count + (e.kind == "artifact"), size + e.size, merged + (folder_size(part) if part else 0)]
    rows = [["stage", "artifacts", "size", "merged weights"]]
    rows += [[stage, str(n), human_size(size), human_size(merged) if merged else "-"]
             for stage, (n, size, merged) in totals.items()]
    rows.append(["total", str(sum(t[0] for t in totals.values())), human_size(sum(t[1] for t in totals.values())),
                 human_size(sum(t[2] for t in totals.values()))])
    print(_table(rows))


def _cmd_gc(args: argparse.Namespace) -> None:
    plan = gc(args.root, older_than=args.older_than, merged=args.merged_weights, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    rows = [["", "stage", "folder", "size", "why"]]
    for r in plan:
        name = r.entry.path.name + (f"/{r.part.name}" if r.part else "")
        rows.append(["kept" if r.kept else verb, r.entry.stage, name, human_size(r.size), r.reason])
    if len(rows) > 1:
        print(_table(rows))
    gone = [r for r in plan if not r.kept]
    print(f"{verb} {len(gone)} folders, {human_size(sum(r.size for r in gone))}")


def _short(run: str) -> str:
    """A run folder relative to the working directory when it is below it."""
    try:
        return str(Path(run).relative_to(Path.cwd()))
    except ValueError:
        return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stat_exp.cache", description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path(DEFAULT_ROOT), help=f"the cache (default {DEFAULT_ROOT})")
    commands = parser.add_subparsers(dest="command", required=True)
    ls = commands.add_parser("ls", help="artifacts by stage: key, size, created, last used, runs that used them")
    ls.add_argument("--stage", help="only this stage")
    ls.set_defaults(run=_cmd_ls)
    commands.add_parser("du", help="artifacts and disk per stage").set_defaults(run=_cmd_du)
    prune = commands.add_parser("gc", help="remove unused artifacts, killed stages' folders (and merged weights)")
    prune.add_argument("--older-than", type=parse_age, metavar="AGE",
                       help="also remove artifacts last used longer ago than AGE (30d, 12h, ...), used or not")
    prune.add_argument("--merged-weights", action="store_true",
                       help="also remove the merged weights of kept LoRA SFT artifacts (the adapter stays)")
    prune.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")
    prune.set_defaults(run=_cmd_gc)
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        parser.error(f"--root {args.root}: no such folder (the cache is paths.cache_dir, outputs/cache by default)")
    args.run(args)


if __name__ == "__main__":
    main()
