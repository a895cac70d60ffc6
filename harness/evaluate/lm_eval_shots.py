"""lm-eval's TaskManager with the experiment's per-task few-shot counts, shared by both lm-eval
backends: the HF one in this process (``lm_eval_adapter``) and the vLLM one, which runs in
``.venv-vllm`` (``lm_eval_vllm_worker.py`` loads this file by its path). So this module imports
nothing but lm-eval, and that only inside its functions.
"""

from __future__ import annotations


def set_shots(loaded: dict, shots: dict[str, int], where: str = "eval.num_fewshot") -> None:
    """Set the few-shot count of the tasks ``shots`` names in lm-eval's loaded tasks
    (``TaskManager.load``'s dict): a task's own name, or a group's name for each of its
    tasks (a task's own entry wins). A name that is neither a loaded task nor a group is
    an error (KeyError naming ``where``): it would silently change nothing."""
    tasks, groups = loaded["tasks"], loaded.get("groups", {})
    unknown = sorted(set(shots) - set(tasks) - set(groups))
    if unknown:
        raise KeyError(f"{where}: {', '.join(map(repr, unknown))} is not one of the tasks or groups evaluated "
                       f"({', '.join(sorted(set(tasks) | set(groups)))})")
    for name, n in shots.items():
        if name in groups:
            for task in groups[name].get_all_tasks():
                if task.task_name not in shots:
                    task.set_config(key="num_fewshot", value=n)
    for name, n in shots.items():
        if name in tasks:
            tasks[name].set_config(key="num_fewshot", value=n)


def task_manager(include: list[str], builtin: bool, shots, where: str):
    """lm-eval's TaskManager over ``include`` (and the built-in tasks when ``builtin``); with
    per-task shots (a dict: a table), one whose ``load`` sets them on the tasks it loads, so
    that ``simple_evaluate`` (given num_fewshot=None) runs everything else exactly as the
    command line does."""
    from lm_eval.tasks import TaskManager

    if not isinstance(shots, dict):
        return TaskManager(include_path=include or None, include_defaults=builtin)

    class ShotsTaskManager(TaskManager):
        def load(self, task_list):
            loaded = super().load(task_list)
            set_shots(loaded, shots, where)
            return loaded

    return ShotsTaskManager(include_path=include or None, include_defaults=builtin)
