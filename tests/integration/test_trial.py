"""One trial on a real local Ray with real DeepSpeed (CPU, gloo).

Every worker process imports torch and DeepSpeed (seconds on a laptop, longer on a small CI machine), so
each TorchTrainer run here checks several properties at once, and the 1-worker runs go side
by side with the 2-worker one (each in a Ray task, as Tune runs trials), half a CPU per worker:
  - `resumed`: 1 worker, grouped backend, ep_size 1, its process killed at step 32 (after the
    reports of steps 25 and 30) -> resumes from the step-20 checkpoint and finishes; contiguous
    history; learns; finite metrics; MI rises; its MLflow run (logged by the Train callback of
    `ercstudy train`) holds every step once, with the values of the run that continued
  - `shards`: 1 worker on Parquet shards of real text made by prepare-data, read by the
    worker from the files -> the loss falls; then a NaN injected into the loss at step 18 ends the trial with the
    reason at the step-20 report
  - `ep`: 2 workers, grouped backend, ep_size 2 (experts split over the workers)
    -> the same loss trajectory as `resumed` (same seed and global batch): expert parallelism
    and the resume are exact through Ray Train (tests/trainables/test_parallelize.py checks both
    backends under expert parallelism on a plain two-process group, in CI)

Also: the `shards` trial's loop in this process (worker.make_trial + worker.train, no Ray Train).
On a fresh 2-core machine the module takes about 3 minutes, mostly worker process start-up.
"""


import math

import pytest
from conftest import TRIAL_METRICS

from ercstudy.trainables.config import TrialConfig

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(3600)]

STEPS = 40
BASE = {
    "model": {"vocab_size": 96, "d_model": 32, "n_layers": 2, "n_heads": 2, "seq_len": 32},
    "moe": {"num_experts": 4, "top_k": 2, "expert_dim": 32},
    "erc": {"alpha": 0.8},
    "train": {"tokens": STEPS * 16 * 32, "global_batch_size": 16, "micro_batch_size": 4, "lr": 0.005,
              "warmup_steps": 5, "report_every": 5, "checkpoint_every": 20, "seed": 3},
    "data": {"num_domains": 4, "tokens_per_domain": 16, "shared_tokens": 16},
}


def config(**sections) -> TrialConfig:
    data = {k: dict(v) for k, v in BASE.items()}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return TrialConfig.from_dict(data)


@pytest.fixture(scope="module")
def runs(ray_session, shards, tmp_path_factory):
    from ercstudy.platform.study.trial import run_trial
    from ercstudy.platform.tracking import client as tracking
    from ercstudy.platform.tracking.callbacks import MLflowTrainCallback

    storage = str(tmp_path_factory.mktemp("trials"))
    half = {"cpus_per_worker": 0.5}  # all three runs at once on the 2 CPUs of the shared Ray: 4 workers
    side_by_side = {"resumed": config(train={"crash_at_step": 32}, resources=half),
                    # killed in the evaluations of step 15, after that step's checkpoint
                    "shards": shards_config(shards, resources=half, train={"crash_at_step": 15, "crash_in": "eval"}),
                    "ep": config(resources={"num_workers": 2, "ep_size": 2, **half})}
    uri = f"sqlite:///{storage}/mlflow.db"
    c = tracking.client(uri)
    run_id = tracking.start_trial_run(c, tracking.experiment_id(c, "trials"), name="resumed", config=side_by_side["resumed"].to_dict())
    callbacks = {"resumed": [MLflowTrainCallback(uri, run_id)], "shards": [], "ep": []}
    remote = ray_session.remote(num_cpus=0, max_retries=0)(run_trial)
    pending = {name: remote.remote(cfg, name=name, storage_path=storage, callbacks=callbacks[name]) for name, cfg in side_by_side.items()}
    results = {name: ray_session.get(ref) for name, ref in pending.items()}
    results["resumed_mlflow"] = {key: [(m.step, m.value) for m in c.get_metric_history(run_id, key)]
                                 for key in ("lm_loss", "erc_loss", "system/cpu_utilization_percentage", "system/system_memory_usage_megabytes")}
    results["resumed_logged_at"] = {m.step: m.timestamp for m in c.get_metric_history(run_id, "lm_loss")}  # ms
    return results


def test_trials_complete_and_report_every_metric_finite(runs):
    for name in ("resumed", "ep"):
        result = runs[name]
        assert result.error is None and result.stop_reason is None, (name, result)
        assert [m["step"] for m in result.history] == list(range(5, STEPS + 1, 5)), name
        for m in result.history:
            for key in TRIAL_METRICS + [f"alpha_star/layer{i}" for i in range(2)]:
                assert math.isfinite(m[key]), (name, m["step"], key, m[key])
            # the noise the ERC loss used: epsilon auto (scale 1) draws at the paper's bound
            assert m["eps_used"] == pytest.approx(m["eps_mean"], rel=1e-5), (name, m["step"])
        assert result.checkpoint_path is not None


def test_evaluation_at_the_end_is_reported_with_the_training_metrics(runs):
    history = runs["resumed"].history
    final = history[-1]
    assert all(not k.startswith("eval/") for m in history[:-1] for k in m)  # eval.every = 0: at the end only
    for key in ["eval/loss", "eval/ppl", "eval/mc_domain/acc", "eval/mc_domain/acc_norm"] + [f"eval/loss/domain{d}" for d in range(4)]:
        assert math.isfinite(final[key]), key
    assert final["eval/loss"] < history[0]["lm_loss"]


def restores(result) -> list[tuple[int, int]]:
    """(step, the checkpoint's step) of every first report after a restore."""
    return [(m["step"], m["resumed_from_step"]) for m in result.history if "resumed_from_step" in m]


def test_killed_worker_resumes_from_checkpoint_without_losing_or_repeating_steps(runs):
    result = runs["resumed"]
    # the crash at step 32 restored the checkpoint of step 20 (checkpoint_every 20); its first report is step 25's
    assert restores(result) == [(25, 20)]
    steps = [m["step"] for m in result.history]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS


def test_resumed_trajectory_matches_an_uninterrupted_run(runs):
    result = runs["resumed"]
    assert restores(result) and not restores(runs["ep"])  # one trajectory went through a restore, the other did not
    # the trajectory after the kill continues the one before it: the same as the uninterrupted `ep` run
    for resumed, reference in zip(result.history, runs["ep"].history):
        assert resumed["lm_loss"] == pytest.approx(reference["lm_loss"], rel=2e-3), resumed["step"]


def test_model_learns_the_corpus_and_routing_follows_the_domains(runs):
    history = runs["resumed"].history
    assert history[-1]["lm_loss"] < history[0]["lm_loss"] - 0.5
    assert history[-1]["domain_nmi"] > history[0]["domain_nmi"]


def test_expert_parallel_matches_a_single_worker(runs):
    for one, ep in zip(runs["resumed"].history, runs["ep"].history):
        for key in ("lm_loss", "erc_loss", "alpha_star", "lb_loss", "eps_mean"):
            assert ep[key] == pytest.approx(one[key], rel=2e-3, abs=1e-5), (one["step"], key)


def shards_config(shards, **sections) -> TrialConfig:
    """Parquet shards of real text (prepare-data), a NaN injected into the loss at step 18."""
    train = {"tokens": 20 * 16 * 32, "nan_at_step": 18, "checkpoint_every": 5, **sections.pop("train", {})}
    return config(model={"vocab_size": 320}, data={"kind": "parquet", "path": str(shards)}, train=train,
                  eval={"every": 5, "sequences": 32}, **sections)


def check_shards_trained_then_nan_stopped(history, stop_reason):
    assert [m["step"] for m in history] == [5, 10, 15, 20]
    assert history[2]["lm_loss"] < history[0]["lm_loss"] - 0.3  # real text, 300-token BPE: learning
    assert all(math.isfinite(m["domain_nmi"]) for m in history[:3])  # domains = the two input files
    assert history[2]["eval/loss"] < history[0]["eval/loss"] and {"eval/loss/early", "eval/loss/late"} <= history[2].keys()
    assert stop_reason is not None and "non-finite loss within steps 16..20" in stop_reason
    assert "stop_reason" not in history[2]


def test_prepared_shards_train_and_a_nan_stops_the_trial_with_the_reason(runs):
    result = runs["shards"]
    assert result.error is None, result.error
    check_shards_trained_then_nan_stopped(result.history, result.stop_reason)


def test_a_worker_killed_in_its_evaluations_resumes_from_that_steps_checkpoint(runs):
    """Step 15's checkpoint was saved before its evaluations, which were killed: the restarted group restored step 15
    itself (not step 10's), ran the evaluations, and reported step 15 once."""
    result = runs["shards"]
    assert restores(result) == [(15, 15)]
    assert [m["step"] for m in result.history] == [5, 10, 15, 20]
    assert math.isfinite(result.history[2]["eval/loss"])


def test_prepared_shards_stream_through_the_training_loop_until_a_nan_stops_it(shards, tmp_path):
    """The worker's own loop (worker.make_trial + worker.train) in this process, on one rank:
    prepare-data's shards train, and a NaN ends the trial at its next report with the reason,
    without a checkpoint of the non-finite state. A checkpoint due with evaluations is saved before them."""
    import torch
    from conftest import single_process_group

    from ercstudy.trainables import checkpoint as checkpoint_lib
    from ercstudy.trainables.worker import make_trial, restore, train

    cfg = shards_config(shards, train={"async_checkpoint": False})
    reports, saved = [], tmp_path / "checkpoints"

    def report(trial, metrics, *, checkpoint: bool) -> None:
        reports.append((metrics.get("step"), metrics.get("checkpoint_of_step"), checkpoint))
        if checkpoint:
            checkpoint_lib.save(saved / str(trial.step), trial.engine, trial.cfg, step=trial.step, history=trial.history,
                                rank=0, unevaluated=trial.unevaluated)

    with single_process_group():
        trial = make_trial(cfg, rank=0, world=1, device=torch.device("cpu"))
        train(trial, report)
        # each step due a checkpoint and evaluations saves first, in a report of its own; the NaN step saves nothing
        assert reports == [(None, 5, True), (5, None, False), (None, 10, True), (10, None, False),
                           (None, 15, True), (15, None, False), (20, None, False)]
        check_shards_trained_then_nan_stopped(trial.history, trial.history[-1].get("stop_reason"))
        # restored from step 15's checkpoint (taken before its evaluations), a worker evaluates step 15 first
        resumed = make_trial(cfg, rank=0, world=1, device=torch.device("cpu"))
        restore(resumed, str(saved / "15"))
        train(resumed, lambda trial, metrics, *, checkpoint: None)
    assert [m["step"] for m in resumed.history] == [5, 10, 15, 20]
    assert resumed.history[2]["resumed_from_step"] == 15
    assert resumed.history[2]["eval/loss"] == pytest.approx(trial.history[2]["eval/loss"], rel=1e-9)


def test_mlflow_holds_every_step_once_live_and_the_restart_repeats_them_exactly(runs):
    """The worker was killed after reporting steps 25 and 30 (past the step-20 checkpoint): those reached MLflow as
    they came (live), the restarted group reported them again, and MLflow has each step once. Resume is exact on CPU:
    the values logged first are the ones the run that continued reported."""
    history = runs["resumed"].history
    for key, logged in runs["resumed_mlflow"].items():
        assert sorted(step for step, _ in logged) == list(range(5, STEPS + 1, 5)), (key, logged)
        if not key.startswith("system/"):  # the machine's load is no part of the trajectory
            assert dict(logged) == {m["step"]: pytest.approx(m[key], rel=1e-12, abs=1e-15) for m in history}, key
    # live: steps 25 and 30 were in MLflow before the worker died at step 32, seconds before the restarted group
    # (a new process, its imports, the restore) reported step 35; held until the step-40 checkpoint they would
    # have been logged with 35 within milliseconds
    at = runs["resumed_logged_at"]
    assert at[35] - at[30] > 2000, at
