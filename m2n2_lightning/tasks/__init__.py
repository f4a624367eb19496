"""Tasks as the fitness of a merge: each gives per-example scores in [0, 1] (m2n2_lightning/tasks/base.py)."""

from m2n2_lightning.tasks.base import Task, TaskData, TaskSet

__all__ = ["Task", "TaskData", "TaskSet"]
