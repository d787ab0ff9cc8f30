"""Expert parallelism with real DeepSpeed engines on two CPU processes (gloo), both MoE backends.

Two processes (torch.multiprocessing, no Ray: Ray Train only supplies the same process group)
run the trial's own training loop (`worker.make_trial` + `worker.train`, as a Ray Train worker
does) four times on one process group, for the same seed and global batch:
  grouped ep_size 1 (data parallel), grouped ep_size 2, deepspeed ep_size 1, deepspeed ep_size 2
and then, for grouped ep_size 2, a resume from its step-4 checkpoint, and the logits of the
trained expert-parallel model on one batch (the forward is a collective).
The Ray Train path of an expert-parallel trial is in test_train.py.
"""

import math
import os
import sys

import pytest
import torch
from conftest import TRIAL_METRICS

from ercstudy.netutil import free_port
from ercstudy.trainables.config import TrialConfig

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1800),
]

STEPS = 8
RUNS = {  # name -> (backend, ep_size)
    "grouped_ep1": ("grouped", 1),
    "grouped_ep2": ("grouped", 2),
    "deepspeed_ep1": ("deepspeed", 1),
    "deepspeed_ep2": ("deepspeed", 2),
}
COMPARED = ["lm_loss", "lb_loss", "z_loss", "erc_loss", "alpha_star", "eps_mean", "diag_dominance", "router_cos",
            "load_entropy", "grad_norm", "domain_nmi", "eval/loss"]


def config(backend: str, ep_size: int) -> TrialConfig:
    return TrialConfig.from_dict({
        "model": {"vocab_size": 96, "d_model": 32, "n_layers": 2, "n_heads": 2, "seq_len": 32},
        "moe": {"num_experts": 4, "top_k": 2, "expert_dim": 32, "backend": backend},
        "erc": {"alpha": 0.8},
        "train": {"tokens": STEPS * 16 * 32, "global_batch_size": 16, "micro_batch_size": 4, "lr": 0.01,
                  "warmup_steps": 2, "report_every": 2, "checkpoint_every": 4, "seed": 3},
        "eval": {"sequences": 16},
        "data": {"num_domains": 4, "tokens_per_domain": 16, "shared_tokens": 16},
        "resources": {"num_workers": 2, "ep_size": ep_size},
    })


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One of the two processes: every run in RUNS, then the resume and the logits of grouped_ep2."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import torch.distributed as dist

    from ercstudy.trainables import checkpoint as checkpoint_lib
    from ercstudy.trainables.checkpoint_writer import HostSnapshotEngine, wait_written
    from ercstudy.trainables.worker import make_trial, restore, train

    # one intra-op thread per rank: the two ranks share 2 cores with the rest of the suite, and torch's default
    # threads per rank spin against each other at every collective (this test: 22 s alone with them, 12 s without)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cpu = torch.device("cpu")
    histories = {}

    def no_report(trial, metrics, *, checkpoint: bool) -> None:
        pass

    writes = []

    def save_checkpoints(trial, metrics, *, checkpoint: bool) -> None:
        if checkpoint:  # a collective: every rank writes its experts
            directory = os.path.join(out_dir, "grouped_ep2", f"step{trial.step}")
            if not isinstance(trial.engine.checkpoint_engine, HostSnapshotEngine):
                trial.engine.checkpoint_engine = HostSnapshotEngine()
            checkpoint_lib.save(directory, trial.engine, trial.cfg, step=trial.step, history=trial.history, rank=rank)
            # written behind the training that follows: the files must still hold this step's state
            writes.extend(trial.engine.checkpoint_engine.take_pending())

    for name, (backend, ep) in RUNS.items():
        trial = make_trial(config(backend, ep), rank=rank, world=world, device=cpu)
        train(trial, save_checkpoints if name == "grouped_ep2" else no_report)
        histories[name] = trial.history
        if name == "grouped_ep2":
            batch = trial.data.micro_batch(0, 0).tokens  # [4, 33] on each rank: the forward is a collective
            with torch.no_grad():
                logits = trial.model(batch[:, :-1]).logits
            torch.save({"tokens": batch, "logits": logits}, os.path.join(out_dir, f"logits_rank{rank}.pt"))

    wait_written(writes)
    dist.barrier()
    resumed = make_trial(config("grouped", 2), rank=rank, world=world, device=cpu)
    restore(resumed, os.path.join(out_dir, "grouped_ep2", "step4"))
    train(resumed, no_report)
    histories["grouped_ep2_resumed"] = resumed.history
    histories["bf16_norms"] = {backend: bf16_clip_norm(backend, rank, world, cpu) for backend in ("grouped", "deepspeed")}
    histories["ep_syncs"] = dict(expert_parallel_syncs(rank, world, cpu))
    histories["schedule"] = timed_schedule(rank, world, cpu)
    if rank == 0:
        torch.save(histories, os.path.join(out_dir, "histories.pt"))
    dist.barrier()
    # Everything is written. Leave without tearing down: destroying the gloo subgroups (DeepSpeed's
    # expert groups, one set per engine) can abort a rank ("terminate called without an active
    # exception") after all the work is done, which would fail the test for nothing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def timed_schedule(rank: int, world: int, device) -> list[bool]:
    """A time-based checkpoint schedule whose clocks disagree: rank 0's is past the interval, rank 1's is not.
    Rank 0 decides for both (the save is a collective): both save, then neither until the interval passes again."""
    import time

    from ercstudy.trainables.checkpoint_writer import CheckpointSchedule

    cfg = config("grouped", 2).train
    timed = type(cfg)(**{**cfg.__dict__, "checkpoint_every": None, "checkpoint_minutes": 1.0})
    schedule = CheckpointSchedule(timed, last_step=100, device=device, world=world)
    if rank == 0:
        schedule.since = time.monotonic() - 120.0
    first = schedule.due(10)
    schedule.saved()
    mine = [first, schedule.due(20), schedule.due(100)]
    everyone = [None] * world
    torch.distributed.all_gather_object(everyone, mine)
    return everyone


def bf16_clip_norm(backend: str, rank: int, world: int, device) -> tuple[float, float, float]:
    """One bf16 step at ep_size 2: (DeepSpeed's clip norm, the norm of every gradient by hand, the
    norm of the non-expert gradients alone). Expert shards are summed over the expert-parallel group."""
    import torch.distributed as dist
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.utils import safe_get_full_grad

    from ercstudy.trainables.step import Window, train_step
    from ercstudy.trainables.worker import make_trial

    cfg = TrialConfig.from_dict({**config(backend, 2).to_dict(), "train": {**config(backend, 2).to_dict()["train"], "precision": "bf16"}})
    trial = make_trial(cfg, rank=rank, world=world, device=device)
    seen = {}
    step = trial.engine.step

    def measure():
        if trial.engine.is_gradient_accumulation_boundary():
            dense = expert = 0.0
            for p in trial.model.parameters():
                sq = safe_get_full_grad(p).double().square().sum().item()
                if is_moe_param(p):
                    expert += sq
                else:
                    dense += sq
            total = torch.tensor([expert], dtype=torch.float64)
            dist.all_reduce(total, group=trial.ep_group)
            seen["all"], seen["dense"] = math.sqrt(dense + total.item()), math.sqrt(dense)
        step()

    trial.engine.step = measure
    trial.step = 1
    train_step(trial, Window.empty(cfg, device, trial.data.num_domains), measure_grad_norm=False)
    return float(trial.engine.get_global_grad_norm()), seen["all"], seen["dense"]


def expert_parallel_syncs(rank: int, world: int, device, steps: int = 2):
    """Host syncs over `steps` whole steps of grouped ep_size 2 (tests/trainables/test_step.py counts them)."""
    from test_step import SyncCounter

    from ercstudy.trainables.step import Window, train_step
    from ercstudy.trainables.worker import make_trial

    trial = make_trial(config("grouped", 2), rank=rank, world=world, device=device)
    window = Window.empty(trial.cfg, device, trial.data.num_domains)
    trial.step = 1
    train_step(trial, window, measure_grad_norm=False)
    with SyncCounter() as counter:
        for _ in range(steps):
            trial.step += 1
            train_step(trial, window, measure_grad_norm=False)
    counter.calls.pop("torch/optim/optimizer.py", None)  # AdamW's CPU step counters
    return counter.calls


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ep")
    mp.spawn(worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return out, torch.load(out / "histories.pt", weights_only=False)


def test_two_worker_runs_complete_and_report_every_metric_finite(runs):
    _, histories = runs
    for name, history in histories.items():
        if name in ("bf16_norms", "ep_syncs", "schedule"):
            continue
        assert [m["step"] for m in history] == list(range(2, STEPS + 1, 2)), name
        for m in history:
            for key in TRIAL_METRICS + ["alpha_star/layer0", "alpha_star/layer1"]:
                assert math.isfinite(m[key]), (name, m["step"], key)
        assert math.isfinite(history[-1]["eval/loss"]), name
    for name in RUNS:
        assert histories[name][-1]["lm_loss"] < histories[name][0]["lm_loss"], name


@pytest.mark.parametrize("backend", ["grouped", "deepspeed"])
def test_expert_parallel_matches_ep_size_1(runs, backend):
    _, histories = runs
    for one, ep in zip(histories[f"{backend}_ep1"], histories[f"{backend}_ep2"], strict=True):
        for key in COMPARED:
            if key in one:
                assert ep[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), (backend, one["step"], key)  # seen: 2e-6


def test_both_backends_train_the_same_model(runs):
    _, histories = runs
    for grouped, ds in zip(histories["grouped_ep2"], histories["deepspeed_ep2"], strict=True):
        for key in ("lm_loss", "erc_loss", "alpha_star", "eval/loss"):
            if key in grouped:
                assert ds[key] == pytest.approx(grouped[key], rel=1e-4, abs=1e-6), (grouped["step"], key)


def test_expert_parallel_checkpoint_resumes_exactly(runs):
    _, histories = runs
    uninterrupted, resumed = histories["grouped_ep2"], histories["grouped_ep2_resumed"]
    assert [m["step"] for m in resumed] == [m["step"] for m in uninterrupted]
    for a, b in zip(uninterrupted[2:], resumed[2:]):  # the steps trained again after the step-4 checkpoint
        for key in ("lm_loss", "erc_loss", "grad_norm", "alpha_star"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)


def test_a_timed_checkpoint_schedule_follows_rank_0s_clock(runs):
    _, histories = runs
    assert histories["schedule"] == [[True, False, True]] * 2  # rank 0's decision on both; the last step always saves


def test_expert_parallel_checkpoint_loads_as_one_model(runs):
    """The step-8 checkpoint of grouped ep_size 2 (one file per global expert) loads without a process
    group into an ep_size 1 model that computes what the two ranks computed together."""
    from ercstudy.trainables import checkpoint

    out, _ = runs
    ckpt = out / "grouped_ep2" / f"step{STEPS}"
    assert sorted(p.name for p in (ckpt / "ds").glob("layer_*_expert_*")) == sorted(
        f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt" for layer in range(2) for e in range(4))
    loaded = checkpoint.load(ckpt)
    assert loaded.step == STEPS and loaded.cfg.resources.ep_size == 2
    for rank in range(2):
        saved = torch.load(out / f"logits_rank{rank}.pt")
        with torch.no_grad():
            logits = loaded.model(saved["tokens"][:, :-1]).logits
        torch.testing.assert_close(logits, saved["logits"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["grouped", "deepspeed"])
def test_bf16_clips_by_the_norm_of_every_gradient_under_expert_parallelism(runs, backend):
    _, histories = runs
    clip_norm, everything, dense = histories["bf16_norms"][backend]
    gap = everything - dense  # what the experts' gradients add
    assert gap > 1e-4
    assert clip_norm == pytest.approx(everything, abs=gap / 20)


def test_expert_parallel_syncs_once_per_moe_layer_and_micro_batch(runs):
    """The exchange of split sizes (one .tolist() per MoE layer and micro-batch forward), and DeepSpeed's clipping's
    two per step as in any fp32 step (tests/trainables/test_step.py), and nothing else."""
    _, histories = runs
    cfg = config("grouped", 2)
    expected = cfg.num_moe_layers * cfg.grad_accum * 2  # 2 steps
    assert histories["ep_syncs"] == {"ercstudy/trainables/parallelize.py": expected, "deepspeed/runtime/utils.py": 2 * 2}
