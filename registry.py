"""The tasks, by name: the one list that main.py, the pipeline, --analyze, --export and the server go through.
A new task is a module with a task.Task subclass and one line here."""
from __future__ import annotations

from task import Task
from task_cls import TASK as CLS
from task_lm import TASK as LM
from task_s2s import TASK as SEQ2SEQ

TASKS: dict[str, Task] = {t.name: t for t in (CLS, LM, SEQ2SEQ)}


def tasks_with(mode: str) -> list[str]:
    """The names of the tasks that have a CLI mode (infer, classify, generate, eval)."""
    return [name for name, t in TASKS.items() if mode in t.modes]
