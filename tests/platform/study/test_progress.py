"""The study's terminal progress (study/progress.py ProgressCallback): one screen whatever the trial count."""

import types

import yaml

from ercstudy.platform.study.plan import plan_study
from ercstudy.platform.study.progress import ProgressCallback
from ercstudy.platform.study.spec import parse_study


def trial(i: int, status: str, step: int | None, loss: float | None):
    result = {} if step is None else {"step": step, "total_steps": 60, **({"eval/loss": loss} if loss is not None else {})}
    return types.SimpleNamespace(trial_id=f"t_{i:05d}", status=status, last_result=result,
                                 config={"params": {"erc.alpha": 0.5 + i / 100, "moe.top_k": 2}})


def test_forty_trials_fit_one_screen_with_the_best_so_far(capsys):
    spec = yaml.safe_load(open("search_spaces/quickstart.yaml"))
    spec["search"]["num_trials"] = 40
    callback = ProgressCallback(plan_study(parse_study(spec)), every_s=0)
    trials = ([trial(i, "TERMINATED", 60, 3.0 - i / 100) for i in range(10)]  # finished, t_00009 best (2.91)
              + [trial(i, "RUNNING", 30, 3.5) for i in range(10, 30)] + [trial(i, "PENDING", None, None) for i in range(30, 36)])
    for t in trials[:10]:
        callback.on_trial_complete(0, trials, t)
    capsys.readouterr()
    callback.on_step_end(0, trials)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) <= 24  # one terminal screen
    assert "10/40 trials done, 20 running, 10 pending, best eval/loss 2.91 (t_00009)" in lines[0]
    assert sum("RUNNING" in line for line in lines) == ProgressCallback.RUNNING_SHOWN
    assert "... and 8 more running" in lines[1 + ProgressCallback.RUNNING_SHOWN]
    assert [line.split()[0] for line in lines[-3:]] == ["t_00007", "t_00008", "t_00009"]  # the last finished
