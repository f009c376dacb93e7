"""Tasks, one module each, registered by name: ``find_task(cfg.task)`` is the task object.

A task of your own is one module: subclass :class:`Task`, decorate it with
:func:`register_task`, import the module before building the plan (docs/development.md).
"""

from kaggle_tta.tasks.base import TASKS, Task, TaskOutput, choose, find_task, register_task

# The built-in tasks register themselves on import (numpy and polars only: no torch here).
from kaggle_tta.tasks import classification, detection, regression, segmentation  # noqa: E402,F401  isort: skip

__all__ = ["TASKS", "Task", "TaskOutput", "choose", "find_task", "register_task"]
