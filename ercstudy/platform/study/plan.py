"""A study planned once: what its spec implies, computed at the start and read by everything downstream.

The spec (spec.py) says what the researcher wrote; the plan says what it means in trials: the points
the sampler proposes, the fixed-arm points, the seeds every point and arm runs at, the trial count
(Tune's samples), ASHA's budget (the longest trial of the space), and each point's trial config,
built once. The driver, the searcher, the scheduler, the progress lines and the dry run take the plan
instead of recomputing these from the spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ercstudy.platform.study.spec import Study, arm_points, corner_points
from ercstudy.trainables.config import TrialConfig


@dataclass(frozen=True)
class StudyPlan:
    study: Study
    points: int  # points the sampler proposes: search.num_trials, at most the grid's points for the grid sampler
    arms: tuple[tuple[str, dict[str, Any]], ...]  # (arm name, params) of every fixed-arm point, lists crossed
    seeds: tuple[int, ...]  # the train.seed of each repeat: the base seed, + 1, ..., the same for every point and arm
    budget: int  # the longest trial of the space in scheduler.time_attr units (steps or tokens): ASHA's max_t
    corners: tuple[dict[str, Any], ...]  # representative points of the space (spec.corner_points), constraints applied
    _configs: dict[tuple, TrialConfig] = field(default_factory=dict, compare=False, repr=False)

    @property
    def name(self) -> str:
        return self.study.name

    @property
    def num_trials(self) -> int:
        """Trials to run (Tune's samples): every point at every seed, and every fixed arm at every seed."""
        return (self.points + len(self.arms)) * len(self.seeds)

    def count_line(self) -> str:
        """The trial count in the words every command uses: `12 trials = (4 points + 2 arm points) x 2 seeds`."""
        arms = f" + {len(self.arms)} arm point(s): {', '.join(dict.fromkeys(a for a, _ in self.arms))}" if self.arms else ""
        return f"{self.num_trials} trials = ({self.points} point(s){arms}) x {len(self.seeds)} seed(s)"

    def extreme_configs(self) -> list[TrialConfig]:
        """The trial configs of the space's corners and of every arm: what the checks before a study (its data, its
        GPU memory) read, as the largest and smallest trials it can run."""
        return [self.trial_config(p) for p in (*self.corners, *(p for _, p in self.arms))]

    def trial_config(self, params: dict[str, Any]) -> TrialConfig:
        """The trial config of one point (the base with the params set), built once per point."""
        key = config_key(params)
        if key not in self._configs:
            self._configs[key] = self.study.trial_config(params)
        return self._configs[key]


def config_key(params: dict[str, Any]) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in params.items()))


def plan_study(study: Study) -> StudyPlan:
    """The plan of a validated study (parse_study has walked its space: every corner is a valid trial config)."""
    points = study.search.num_trials
    if study.search.sampler == "grid":
        points = min(points, len(corner_points(study, limit=10**6, full=True)))
    corners = tuple(corner_points(study))
    configs = {config_key(c): study.trial_config(c) for c in corners}
    by_steps = study.scheduler.time_attr == "step"
    return StudyPlan(study=study, points=points, arms=tuple(arm_points(study)), corners=corners,
                     seeds=tuple(study.base_config.train.seed + r for r in range(study.search.repeats)),
                     budget=max(cfg.steps if by_steps else cfg.trained_tokens for cfg in configs.values()), _configs=configs)


def check_data(plan: StudyPlan) -> None:
    """Every trial's data fits it, before anything starts: the shards exist and match the model (vocabulary,
    sequence length), the batch and the held-out set (a DataError naming the key and the fix). Each distinct
    (data, model) combination among the space's corners and the arms is checked once."""
    seen = set()
    for cfg in plan.extreme_configs():
        key = (cfg.data, cfg.model.vocab_size, cfg.model.seq_len, cfg.train.global_batch_size, cfg.eval.sequences)
        if key not in seen:
            seen.add(key)
            cfg.check_data()
