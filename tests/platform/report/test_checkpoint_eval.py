"""`ercstudy eval`: lm-evaluation-harness tasks from local files on a real DeepSpeed checkpoint.

The checkpoint is written the way a trial writes it (checkpoint.save on a DeepSpeed engine,
deepspeed MoE backend: one file per expert) after a few steps on Parquet shards of real text.
"""

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import own_stderr, shakespeare_text, single_process_group

from ercstudy.platform.cli import main
from ercstudy.trainables import checkpoint as ckpt_lib
from ercstudy.trainables.config import TrialConfig

# none of the imports above needs lm-eval
lm_eval = pytest.importorskip("lm_eval", reason="the `evals` extra (lm-evaluation-harness) is not installed")

SEQ = 32  # conftest's shards
STEPS = 30


def trial_config(shards) -> TrialConfig:
    return TrialConfig.from_dict({
        "model": {"vocab_size": 320, "d_model": 32, "n_layers": 2, "n_heads": 2, "seq_len": SEQ},
        "moe": {"num_experts": 4, "top_k": 2, "expert_dim": 32, "backend": "deepspeed"},
        "train": {"tokens": STEPS * 8 * SEQ, "global_batch_size": 8, "micro_batch_size": 8, "lr": 0.01, "warmup_steps": 2},
        "data": {"kind": "parquet", "path": str(shards)},
    })


@pytest.fixture(scope="module")
def saved(shards, tmp_path_factory):
    """(checkpoint dir, the engine's model) after STEPS steps of a one-process DeepSpeed engine (gloo)."""
    import numpy as np
    import pyarrow.parquet as pq

    from ercstudy.trainables.engine import build_engine

    with single_process_group():
        cfg = trial_config(shards)
        built = build_engine(cfg, torch.device("cpu"), rank=0)
        engine, model = built.deepspeed, built.model
        rows = np.stack(pq.read_table(Path(shards) / "train").column("tokens").to_numpy(zero_copy_only=False)).astype(np.int64)
        for step in range(STEPS):
            batch = torch.from_numpy(rows[(step * 8) % (len(rows) - 8):][:8])
            out = engine(batch[:, :-1], batch[:, 1:])
            engine.backward(out.lm_loss + 0.01 * out.aux.lb_loss.mean())
            engine.step()
        directory = tmp_path_factory.mktemp("ckpt") / "checkpoint_2026-01-01_00-00-00.000000"
        directory.mkdir()
        ckpt_lib.save(directory, engine, cfg, step=STEPS, history=[], rank=0)
        yield directory, model.eval()


def test_checkpoint_holds_config_tokenizer_and_per_expert_files_and_loads_the_trained_weights(saved):
    directory, trained = saved
    names = {p.name for p in (directory / "ds").iterdir()}
    assert {"mp_rank_00_model_states.pt", "layer_0_expert_3_mp_rank_00_model_states.pt"} <= names, names
    assert {"trial_config.yaml", "tokenizer.json"} <= {p.name for p in directory.iterdir()}
    loaded = ckpt_lib.load(directory.parent)  # a run directory: its newest checkpoint
    assert loaded.path == directory and loaded.step == STEPS and loaded.tokenizer is not None
    x = torch.randint(0, 300, (2, SEQ))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x).logits, trained(x).logits)


def instances(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_adapter_log_likelihoods_equal_the_model_by_hand(saved):
    from ercstudy.platform.report.checkpoint_eval import model_class

    directory, _ = saved
    lm = model_class()(str(directory), batch_size=3)
    pairs = [("ROMEO:\nWhat say", " you"), ("First Citizen:\nWe are accounted poor", " citizens, the patricians good."),
             ("", "KING"), ("To be", " or not to be, that is the question: whether 'tis nobler in the mind to suffer" * 2)]
    got = lm.loglikelihood(instances("loglikelihood", pairs))
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        if context:
            ctx, cont = lm._encode_pair(context, continuation)
        else:
            ctx, cont = [lm.eot_token_id], lm.tok_encode(continuation)
        row = (ctx + cont)[-(SEQ + 1):]
        n = min(len(cont), len(row) - 1)
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(torch.tensor([row[:-1]])).logits[0].float(), -1)
        target = torch.tensor(row[1:])
        picked = logp[torch.arange(len(target)), target][-n:]
        assert logprob == pytest.approx(picked.sum().item(), rel=1e-5, abs=1e-4)
        assert greedy == bool((logp.argmax(-1)[-n:] == target[-n:]).all())
    # rolling: a text that fits the context is scored once, conditioned on the end-of-document token
    text = "First Citizen:\nBefore we proceed"
    ids = lm.tok_encode(text)
    assert len(ids) < SEQ
    (rolling,) = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(text,)]))
    row = [lm.eot_token_id] + ids
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(torch.tensor([row[:-1]])).logits[0].float(), -1)
    assert rolling == pytest.approx(logp[torch.arange(len(ids)), torch.tensor(ids)].sum().item(), rel=1e-5)
    # a text longer than the context: every token scored once, in windows
    long = " ".join([text] * 12)
    (long_rolling,) = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(long,)]))
    assert len(lm.tok_encode(long)) > 3 * SEQ and long_rolling < rolling < 0


def local_tasks(root: Path, shakespeare: str) -> Path:
    """Two lm-eval tasks from local JSONL: next-line multiple choice, and rolling perplexity."""
    lines = [ln for ln in shakespeare.splitlines() if len(ln) > 20][:400]
    rng = random.Random(0)
    items = []
    for i in range(0, 120, 3):
        wrong = rng.sample([ln for j, ln in enumerate(lines) if abs(j - i) > 2], 3)
        choices = [lines[i + 1]] + wrong
        rng.shuffle(choices)
        items.append({"context": lines[i], "choices": choices, "gold": choices.index(lines[i + 1])})
    tasks = root / "tasks"
    tasks.mkdir()
    (root / "mc.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    (root / "ppl.jsonl").write_text("".join(json.dumps({"text": "\n".join(lines[i:i + 6])}) + "\n" for i in range(0, 60, 6)))
    (tasks / "shakespeare_mc.yaml").write_text(
        f"task: shakespeare_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: gold\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (tasks / "shakespeare_ppl.yaml").write_text(
        f"task: shakespeare_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'ppl.jsonl'}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    return tasks


def test_ercstudy_eval_runs_local_tasks_scores_like_the_training_scorer_and_logs_to_mlflow(saved, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from ercstudy.platform.report.checkpoint_eval import model_class
    from ercstudy.trainables.evals import MCItem, choice_logprobs, mc_correct

    directory, _ = saved
    tasks = local_tasks(tmp_path, shakespeare_text())
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("harness")).info.run_id
    out = tmp_path / "results.json"
    assert main(["eval", str(directory), "--tasks", "shakespeare_mc,shakespeare_ppl", "--include-path", str(tasks),
                 "--mlflow-run", run_id, "--tracking-uri", uri, "--output_path", str(out), "--batch_size", "8"]) == 0  # lm_eval's spellings
    printed = capsys.readouterr().out
    assert "shakespeare_mc" in printed and f"logged to MLflow run {run_id}" in printed
    results = json.loads(out.read_text())["results"]
    # lm-eval's accuracy is the one our in-training scorer gives on the same (context, " " + choice) tokens
    lm = model_class()(str(directory))
    items = []
    for line in (tmp_path / "mc.jsonl").read_text().splitlines():
        rec = json.loads(line)
        encoded = [lm._encode_pair(rec["context"], " " + c) for c in rec["choices"]]
        items.append(MCItem(encoded[0][0], [cont for _, cont in encoded], rec["gold"], [len(c) for c in rec["choices"]]))
    acc, acc_norm = mc_correct(choice_logprobs(lm.model, items, seq_len=SEQ, batch_size=16, device=torch.device("cpu")), items)
    assert results["shakespeare_mc"]["acc,none"] == pytest.approx(acc.mean().item())
    assert results["shakespeare_mc"]["acc_norm,none"] == pytest.approx(acc_norm.mean().item())
    # a 30-step model: about 4 nats per BPE token, several tokens per word
    assert 1 < results["shakespeare_ppl"]["bits_per_byte,none"] < 8 and results["shakespeare_ppl"]["word_perplexity,none"] > 1
    metrics = client.get_run(run_id).data.metrics
    assert metrics["harness/shakespeare_mc/acc"] == pytest.approx(acc.mean().item())
    assert {"harness/shakespeare_mc/acc_norm", "harness/shakespeare_ppl/word_perplexity", "harness/shakespeare_ppl/bits_per_byte"} <= metrics.keys()
    assert [m.step for m in client.get_metric_history(run_id, "harness/shakespeare_mc/acc")] == [STEPS]
    assert f"harness/results_step{STEPS}.json" in {a.path for a in client.list_artifacts(run_id, "harness")}


def test_eval_refuses_bad_input_in_one_line(saved, tmp_path, capsys):
    import shutil

    import yaml

    directory, _ = saved
    tasks = local_tasks(tmp_path, "a line that is long enough to be kept\n" * 500)
    synthetic = tmp_path / "synthetic"
    shutil.copytree(directory, synthetic)
    cfg = yaml.safe_load((synthetic / "trial_config.yaml").read_text())
    cfg["data"] = {"kind": "synthetic"}
    (synthetic / "trial_config.yaml").write_text(yaml.safe_dump(cfg))
    (synthetic / "tokenizer.json").unlink()
    cases = [
        ([str(tmp_path / "nowhere"), "--tasks", "shakespeare_mc"], "no such checkpoint directory"),
        ([str(tmp_path), "--tasks", "shakespeare_mc"], "neither a checkpoint"),
        ([str(synthetic), "--tasks", "shakespeare_mc", "--include-path", str(tasks)], "no text tokenizer"),
        ([str(directory), "--tasks", "shakespeare_mc", "--mlflow-run", "0" * 32, "--tracking-uri", f"sqlite:///{tmp_path}/m.db"], "--mlflow-run"),
    ]
    for args, expected in cases:
        assert main(["eval", *args]) == 2, args
        err = own_stderr(capsys.readouterr().err)
        assert err.startswith("ercstudy: error:") and expected in err and len(err.splitlines()) == 1, err


def test_shipped_local_task_configs_are_lm_eval_tasks():
    from lm_eval.tasks import TaskManager

    repo = Path(__file__).resolve().parents[3]
    assert {"arc_easy_local", "boolq_local"} <= set(TaskManager(include_path=str(repo / "evals" / "tasks"), include_defaults=False).all_tasks)


class Payload:
    """What a hostile checkpoint could carry: unpickling it would call its __reduce__ target."""

    def __reduce__(self):
        return (print, ("this ran while loading a checkpoint",))


def test_a_checkpoint_carrying_a_pickled_object_is_refused(saved, tmp_path, capsys):
    import shutil

    directory, _ = saved
    hostile = tmp_path / "checkpoint_hostile"
    shutil.copytree(directory, hostile)
    states_file = hostile / "ds" / "mp_rank_00_model_states.pt"
    states = torch.load(states_file, weights_only=True)
    states["client_state_extra"] = Payload()
    torch.save(states, states_file)
    assert main(["eval", str(hostile), "--tasks", "shakespeare_mc"]) == 2
    out, err = capsys.readouterr()
    err = own_stderr(err)
    assert "this ran while loading" not in out + err
    assert err.startswith("ercstudy: error:") and "refused: it holds Python objects" in err and len(err.splitlines()) == 1, err


def test_eval_takes_lm_evals_own_flag_spellings_and_the_gpu_by_default():
    import torch

    from ercstudy.platform.cli import build_parser, default_device

    parser = build_parser()
    ours = parser.parse_args(["eval", "c", "--tasks", "t", "--num-fewshot", "5", "--output", "o.json", "--batch-size", "4",
                              "--include-path", "tasks"])
    theirs = parser.parse_args(["eval", "c", "--tasks", "t", "--num_fewshot", "5", "--output_path", "o.json", "--batch_size", "4",
                                "--include_path", "tasks"])
    assert vars(ours) == vars(theirs) and ours.device is None
    assert default_device() == ("cuda" if torch.cuda.is_available() else "cpu")
