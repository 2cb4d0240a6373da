"""A training run's directory: the names of what a run writes there, and the policy that keeps a
user's files safe (a run replaces only what a run wrote, and only when resumed or overwritten)."""
from __future__ import annotations

import shutil
from pathlib import Path

from . import checkpoint as ckpt
from . import io

__all__ = ["TRAINER_STATE", "RAW_WEIGHTS", "TRAIN_CONFIG", "METRICS", "SAMPLES", "CURVE", "TENSORBOARD",
           "RUN_FILES", "check_run_dir", "clear_run", "existing_run", "read_history"]

# inside the checkpoint folder, beside the EMA weights users load
TRAINER_STATE = "trainer.pt"  # step, clock, learning-rate scale and the optimizer's state
RAW_WEIGHTS = "raw.safetensors"  # the weights as trained (the EMA's are the checkpoint's own)
TRAIN_CONFIG = "train_config.json"
# in the run directory
METRICS = "metrics.jsonl"
SAMPLES = "samples.png"
CURVE = "curve.png"
TENSORBOARD = "tb"
# what a run writes into its directory (and --overwrite removes; nothing else there is touched)
RUN_FILES = (ckpt.CHECKPOINT_DIR, ckpt.CHECKPOINT_DIR + ".old", METRICS, SAMPLES, CURVE, TENSORBOARD)


def _metrics_of_a_run(path: Path) -> bool:
    """Whether ``path`` is a non-empty metrics file as a run writes it (JSON objects, one per line)."""
    try:
        with open(path) as f:
            return isinstance(io.parse_json(f.readline(1 << 20)), dict)
    except (OSError, ValueError):
        return False


def existing_run(out: Path) -> str | None:
    """What in ``out`` shows that a run already lives there, or None."""
    try:
        ckpt.resolve_checkpoint_dir(out)
        return "a checkpoint"
    except ckpt.CheckpointError:
        pass
    if _metrics_of_a_run(out / METRICS):
        return f"a {METRICS}"
    return None


def check_run_dir(out, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse, before any work, what would lose work or cannot be written: ``out`` being a file,
    holding a run that is neither resumed nor explicitly overwritten, or holding under a name a
    run writes (:data:`RUN_FILES`) something glowflow did not write (a user's folder named
    ``checkpoint``, a ``samples.png`` with no run beside it): those are never replaced."""
    out = Path(out)
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: continue the run, or replace it")
    if out.exists() and not out.is_dir():
        raise ValueError(f"the run directory {out} is a file; pass a directory (it is created if missing)")
    for name in (ckpt.CHECKPOINT_DIR, ckpt.CHECKPOINT_DIR + ".old"):
        io.check_replaceable(out / name, ckpt.is_checkpoint, "a glowflow checkpoint")
    found = existing_run(out)
    if found is None:
        present = [name for name in RUN_FILES if (out / name).exists() or (out / name).is_symlink()]
        if present:
            raise io.RefusedError(f"{out} holds {', '.join(present)} but no training run glowflow wrote (no "
                                  "checkpoint, no metrics): glowflow replaces only what it wrote itself; move "
                                  "them away or choose another --out")
    elif not (resume or overwrite):
        raise ValueError(f"{out} already holds a training run ({found}); pass --resume to continue it, or "
                         "--overwrite to start over (its checkpoint, metrics and pictures are deleted)")


def clear_run(out: Path) -> None:
    """Delete what a run wrote into ``out`` (:data:`RUN_FILES`), after :func:`check_run_dir` passed."""
    for name in RUN_FILES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def read_history(path: Path, upto: int) -> list[dict]:
    """Metrics of earlier runs of this directory (kept on resume, truncated to the resumed step)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:  # a line that is not a row of this run (damaged, edited, too deeply nested) is dropped
            row = io.parse_json(line)
        except ValueError:
            continue
        step = row.get("step", 0) if isinstance(row, dict) else None
        if isinstance(step, (int, float)) and not isinstance(step, bool) and step <= upto:
            rows.append(row)
    io.atomic_write_text(path, "".join(io.json_text(r, sort_keys=False) + "\n" for r in rows))
    return rows
