"""The `ercstudy` command line."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

from ercstudy import __version__
from ercstudy.trainables.validation import ConfigError

STORAGE_ENV = "ERCSTUDY_STORAGE"
DEFAULT_STORAGE = "ercstudy_results"


def default_storage() -> str:
    """--storage when not given: $ERCSTUDY_STORAGE, else ./ercstudy_results."""
    return os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE


class _StorageFlag(argparse.Action):
    """--storage, remembering that it was given: it overrides a study's own `storage:`, the default does not."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.storage_given = True


def study_storage(study, args: argparse.Namespace) -> str:
    """Where a new study lives: --storage, else the study's `storage:`, else $ERCSTUDY_STORAGE / ./ercstudy_results."""
    return args.storage if getattr(args, "storage_given", False) else (study.storage or args.storage)


def _fail(message: str, code: int = 2) -> int:
    print(f"ercstudy: error: {message}", file=sys.stderr)
    return code


def describe(cfg) -> str:
    """One paragraph on what a trial will train, computed from the config alone."""
    tokens = cfg.trained_tokens
    return (
        f"model: {cfg.num_params() / 1e6:.2f}M params, {cfg.num_active_params() / 1e6:.2f}M active, "
        f"{cfg.flops_per_token() / 1e6:.1f} MFLOP/token (train) | MoE: {cfg.moe.num_experts} experts, top-{cfg.moe.top_k}, "
        f"{cfg.num_moe_layers} MoE layers, backend {cfg.moe.backend} | ERC: "
        + (f"alpha {cfg.erc.alpha}, epsilon {cfg.erc.epsilon}, weight {cfg.erc.weight}, router_grad {cfg.erc.router_grad}" if cfg.erc.enabled else "off")
        + f"\nrun: {cfg.steps} steps x {cfg.train.global_batch_size} seqs x {cfg.model.seq_len} tokens = {tokens:,} tokens on "
        f"{cfg.resources.num_workers} worker(s) (ep_size {cfg.resources.ep_size}, grad accumulation {cfg.grad_accum}), data: {cfg.data.kind}"
    )


def cmd_train(args: argparse.Namespace) -> int:
    from ercstudy.platform.study.overrides import apply_overrides
    from ercstudy.platform.study.presets import study_file
    from ercstudy.platform.tracking import client as tracking
    from ercstudy.trainables.config import TrialConfig, read_yaml, trial_config_of
    from ercstudy.trainables.shards import DataError

    try:
        spec = apply_overrides(read_yaml(study_file(args.file)), args.overrides)
        cfg = trial_config_of(spec, source=args.file)
        cfg.check_data()
        if cfg.eval.harness.enabled:  # lm-eval tasks, their data and the tokenizer, before anything starts
            from ercstudy.trainables import lm_eval_adapter as harness

            cfg = TrialConfig.from_dict(harness.with_absolute_paths(cfg.to_dict()))
            harness.check(cfg)
        study_tracking = (spec.get("tracking") or {}) if isinstance(spec, dict) and "base" in spec else {}
        uri = tracking.resolve_uri(study_tracking.get("uri"))
        tracking.check_reachable(uri)
    except (ConfigError, DataError, tracking.TrackingError) as err:
        return _fail(str(err))
    # a study file's base trains under a name of its own: STORAGE/<stem> is the study's own directory
    name = args.name or Path(args.file).stem + ("-train" if isinstance(spec, dict) and "base" in spec else "")
    from ercstudy.platform.cluster import storage as locations

    try:
        root = locations.resolve(args.storage)
        locations.check(root)
        storage, run_dir = str(root), root / name
        exists = run_dir.exists()
    except locations.StorageError as err:
        return _fail(str(err))
    if exists and not args.resume:
        return _fail(f"run {name!r} already exists in {storage}: pass --resume to continue it, or --name NAME for a new run")
    print(describe(cfg), flush=True)
    from ercstudy.platform.cluster.ray_runtime import ray_session
    from ercstudy.platform.study import progress
    from ercstudy.platform.tracking.callbacks import MLflowTrainCallback

    # one MLflow run per trial, logged live by the Train controller; a resumed trial continues its run
    c = tracking.client(uri)
    exp_id = tracking.experiment_id(c, study_tracking.get("experiment") or name)
    found = c.search_runs([exp_id], filter_string=tracking.tag_filter(**{tracking.TRIAL_TAG: str(run_dir)}), max_results=1) if args.resume else []
    run_id = found[0].info.run_id if found else tracking.start_trial_run(
        c, exp_id, name=name, config=cfg.to_dict(), tags={tracking.TRIAL_TAG: str(run_dir)})
    print(f"MLflow: {uri} | experiment {study_tracking.get('experiment') or name!r} | run {run_id}", flush=True)
    with ray_session(verbose=args.verbose) as logs:
        print(f"Ray's logs (workers, DeepSpeed): {logs.where()}" + ("" if args.verbose else "; --verbose shows them here too"), flush=True)
        # after the routing of the driver's logs: this imports DeepSpeed, which logs as it is imported
        from ercstudy.platform.study.trial import ReportQueueCallback, run_trial

        print(f"{name}: starting {cfg.resources.num_workers} worker(s); a line every {cfg.train.report_every} steps", flush=True)
        # the workers print nothing here: the Train controller forwards each report, and this process prints it
        reports = progress.report_queue()
        logged = tracking.last_logged_step(c, run_id) if found else -1
        callbacks = [MLflowTrainCallback(uri, run_id, notes=reports, logged=logged), ReportQueueCallback(reports)]
        with progress.TrainProgress(cfg, reports):
            result = run_trial(cfg, name=name, storage_path=storage, callbacks=callbacks)
    # out of Ray now: nothing that Ray streams can follow the summary
    final = result.final
    status = tracking.trial_status(final, cfg.steps, error=result.error is not None)
    tracking.finish_trial_run(c, run_id, status, final, note=result.error or result.stop_reason or "")
    if result.error:
        return _fail(f"trial failed: {result.error} (the workers' logs: {logs.where()})", 1)
    print(f"\nfinished {name}: step {final.get('step')} | lm_loss {final.get('lm_loss', float('nan')):.4f} | "
          f"alpha* {final.get('alpha_star', float('nan')):.2f} | eps {final.get('eps_mean', float('nan')):.3f}")
    print(f"results: {result.path}\ncheckpoint: {result.checkpoint_path}\nRay's logs: {logs.where()}\n"
          f"MLflow UI: mlflow ui --backend-store-uri {uri}", flush=True)
    if result.stop_reason:
        return _fail(f"trial stopped: {result.stop_reason}", 1)
    return 0


def cmd_prepare_data(args: argparse.Namespace) -> int:
    from ercstudy.platform.data.prepare import prepare_data
    from ercstudy.trainables.shards import DataError

    try:
        meta = prepare_data(
            args.inputs, args.out, vocab_size=args.vocab_size, seq_len=args.seq_len, eval_fraction=args.eval_fraction,
            text_field=args.text_field, domain_field=args.domain_field, max_domains=args.max_domains,
            tokenizer=args.tokenizer, eos_token=args.eos_token, rows_per_shard=args.rows_per_shard, seed=args.seed,
            workers=args.workers, address=args.address,
        )
    except DataError as err:
        return _fail(str(err))
    print(f"use it in a trial config:\n  data: {{kind: parquet, path: {args.out}}}\n  model: {{vocab_size: >= {meta.vocab_size}, seq_len: <= {args.seq_len}}}")
    return 0


def _load_study(args: argparse.Namespace):
    from ercstudy.platform.study.presets import study_file
    from ercstudy.platform.study.spec import load_study

    return load_study(study_file(args.spec), getattr(args, "overrides", None) or ())


def cmd_presets(args: argparse.Namespace) -> int:
    from ercstudy.platform.study.presets import description, presets

    for name, path in presets().items():
        print(f"{name:<16} {description(path)}")
    print("run one by name (`ercstudy run quickstart`), or copy it and edit: `ercstudy config quickstart > my_study.yaml`")
    return 0


def _planned_study(args: argparse.Namespace, *, data: bool = True):
    """The study file with its overrides, validated and planned, and (data) its data checked: what validate and run
    refuse before anything starts (ConfigError, DataError); dry-run plans a study whose data is not made yet."""
    from ercstudy.platform.study.plan import check_data, plan_study

    plan = plan_study(_load_study(args))
    if data:
        check_data(plan)
    return plan


def cmd_validate(args: argparse.Namespace) -> int:
    from ercstudy.trainables.shards import DataError

    try:
        plan = _planned_study(args)
    except (ConfigError, DataError) as err:
        return _fail(str(err))
    study = plan.study
    params = ", ".join(study.search.params)
    print(f"{args.spec}: ok | study {study.name}: {plan.count_line()}; {study.search.sampler} over {params}; "
          f"objective {', '.join(f'{o.metric} ({o.mode})' for o in study.objectives)}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """The resolved config: a study file's (its base as the whole trial config) or a trial config's, defaults
    included, as YAML that `run` / `train` take as it is."""
    import yaml

    from ercstudy.platform.study.overrides import apply_overrides
    from ercstudy.platform.study.presets import study_file
    from ercstudy.platform.study.spec import parse_study, resolved_spec
    from ercstudy.trainables.config import read_yaml, trial_config_of

    if args.reference:
        from ercstudy.platform.study.reference import reference

        print(reference(), end="")
        return 0
    if not args.file:
        return _fail("config: give a study or trial config file (or --reference)")
    try:
        data = apply_overrides(read_yaml(study_file(args.file)), args.overrides)
        if isinstance(data, dict) and "base" in data:
            out = resolved_spec(parse_study(data, source=args.file, overrides=tuple(args.overrides)))
        else:
            out = trial_config_of(data, source=args.file).to_dict()
    except ConfigError as err:
        return _fail(str(err))
    header = f"# {args.file}" + (f" with {' '.join(args.overrides)}" if args.overrides else "") + ", resolved by ercstudy config\n"
    print(header + yaml.safe_dump(out, sort_keys=False), end="")
    return 0


def default_device() -> str:
    """`ercstudy eval`'s device when none is given: the GPU where there is one, as lm_eval's own default."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _local_devices() -> tuple[int, int]:
    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:
        pass
    return os.cpu_count() or 1, gpus


def cmd_dry_run(args: argparse.Namespace) -> int:
    from ercstudy.platform.study.dry_run import dry_run_lines
    from ercstudy.trainables.shards import DataError

    try:
        plan = _planned_study(args, data=False)
    except (ConfigError, DataError) as err:
        return _fail(str(err))
    cpus, gpus = _local_devices()
    print(f"study {plan.name} ({args.spec}): distinct model shapes in the space")
    print("\n".join(dry_run_lines(plan, cpus=cpus, gpus=gpus)))
    return 0


def _run(study, args: argparse.Namespace, *, resume: bool) -> int:
    from ercstudy.platform.study.driver import StudyError, run_study
    from ercstudy.platform.tracking.client import TrackingError

    try:
        board = run_study(study, storage=args.storage if resume else study_storage(study, args), address=args.address,
                          resume=resume, verbose=args.verbose)
    except (StudyError, TrackingError, ConfigError) as err:
        return _fail(str(err))
    return 0 if any(r["status"] == "completed" for r in board) else 1


def cmd_run(args: argparse.Namespace) -> int:
    from ercstudy.trainables.shards import DataError

    try:
        study = _planned_study(args).study
    except (ConfigError, DataError) as err:
        return _fail(str(err))
    return _run(study, args, resume=False)


def cmd_resume(args: argparse.Namespace) -> int:
    from ercstudy.platform.study.driver import StudyError, load_saved_study

    try:
        study, _ = load_saved_study(args.storage, args.name)
    except (StudyError, ConfigError) as err:
        return _fail(str(err))
    return _run(study, args, resume=True)


def cmd_submit(args: argparse.Namespace) -> int:
    from ray.job_submission import JobSubmissionClient

    try:
        study = _load_study(args)
    except ConfigError as err:
        return _fail(str(err))
    spec = os.path.relpath(os.path.abspath(args.spec), os.getcwd())
    if spec.startswith(".."):
        return _fail(f"{args.spec}: submit from the directory that holds the study (it is shipped as the job's working_dir)")
    from ercstudy.platform.data.prepare import check_cluster_data
    from ercstudy.trainables.shards import DataError

    try:  # the data stays where it lives: the workers read it there
        check_cluster_data(((study.spec or {}).get("base", {}).get("data") or {}).get("path"), working_dir=os.getcwd())
    except DataError as err:
        return _fail(str(err))
    from ercstudy.platform.cluster import storage as locations

    storage = study_storage(study, args)
    try:  # the job runs in a temporary copy of this directory, and its trials on any node: shared storage only
        storage = str(locations.resolve(storage, multi_node=True))
    except locations.StorageError as err:
        return _fail(str(err))
    entrypoint = " ".join(["ercstudy run", shlex.quote(spec), *map(shlex.quote, study.overrides), "--storage", shlex.quote(storage)])
    from ercstudy.platform.cluster.ray_runtime import use_token_if_available

    use_token_if_available()  # a token-authenticated cluster (cluster.yaml) refuses the Jobs API without it
    # A head that has just started serves the Jobs API a few seconds before its job agent is up, and answers
    # "No available agent to submit job" meanwhile: wait for it (3 minutes at most), say so once.
    deadline, said = time.monotonic() + 180, False
    while True:
        try:
            client = JobSubmissionClient(args.address)
            job_id = client.submit_job(
                entrypoint=entrypoint,
                submission_id=args.job_id,
                runtime_env={"working_dir": ".", "excludes": [".git", ".venv*", "ercstudy_results", "mlflow.db", "*.egg-info", "/data"]},
                metadata={"ercstudy.study": study.name},
            )
            break
        except Exception as err:  # connection refused, bad address, duplicate id
            if "No available agent" in str(err) and time.monotonic() < deadline:
                if not said:
                    print(f"ercstudy: the job agent of {args.address} is not up yet; retrying for up to 3 minutes", file=sys.stderr, flush=True)
                    said = True
                time.sleep(2)
                continue
            return _fail(f"could not submit to {args.address}: {str(err).splitlines()[0]}")
    print(f"submitted study {study.name} as Ray job {job_id} to {args.address}\n"
          f"follow it:  ray job logs --follow --address {args.address} {job_id}\n"
          f"status:     ray job status --address {args.address} {job_id}\n"
          f"stop it:    ray job stop --address {args.address} {job_id}\n"
          f"results:    {storage}/{study.name} (ercstudy report {study.name} --storage {storage}); MLflow: the cluster's MLFLOW_TRACKING_URI "
          f"(or the study's tracking.uri)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    import dataclasses

    from ercstudy.platform.report.study_report import write_report
    from ercstudy.platform.study.driver import StudyError, load_saved_study
    from ercstudy.platform.study.optuna_store import OptunaStoreError
    from ercstudy.platform.tracking import client as tracking

    try:
        study, state = load_saved_study(args.storage, args.name)
        if args.tracking_uri:  # the study's server as this machine reaches it (a tunnel from a laptop, a new server)
            state = dataclasses.replace(state, tracking_uri=tracking.resolve_uri(args.tracking_uri))
        tracking.check_reachable(state.tracking_uri, timeout_s=args.timeout)  # seconds, not MLflow's minutes of retries
        tracking.fail_fast()
        out = write_report(study, state, args.out or None, storage=args.storage, budget=args.budget)
    except (StudyError, ConfigError, tracking.TrackingError, OptunaStoreError) as err:
        return _fail(str(err))
    print(f"report written to {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ercstudy.platform.report import checkpoint_eval as harness
    from ercstudy.trainables.checkpoint import CheckpointError

    tasks = [t for t in args.tasks.split(",") if t]
    if not tasks:
        return _fail("--tasks: give at least one lm-eval task name")
    if args.include_path and not Path(args.include_path).is_dir():
        return _fail(f"--include-path: {args.include_path}: no such directory")
    if args.mlflow_run:  # an unreachable store or an unknown run is reported before the evaluation
        from ercstudy.platform.tracking import client as tracking

        try:
            from mlflow.tracking import MlflowClient

            uri = tracking.resolve_uri(args.tracking_uri)
            tracking.check_reachable(uri)
            if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
                return _fail(f"--mlflow-run {args.mlflow_run}: no MLflow store at {uri} (give --tracking-uri or MLFLOW_TRACKING_URI)")
            MlflowClient(uri).get_run(args.mlflow_run)
        except Exception as err:
            return _fail(f"--mlflow-run {args.mlflow_run}: {str(err).splitlines()[0]}")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local task files only: never wait on the network
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ercstudy.platform.cluster import storage as locations

    try:
        where = locations.find_checkpoint(args.checkpoint, args.storage)
        with where.local_copy() as local:  # a checkpoint on remote storage: a temporary copy, deleted after
            results = harness.run_harness(str(local), tasks, include_path=args.include_path, config=args.config,
                                          limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                                          device=args.device or default_device(), seed=args.seed)
    except (harness.HarnessError, CheckpointError, locations.StorageError) as err:
        return _fail(str(err))
    from lm_eval.utils import make_table

    print(make_table(results))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2, default=str))
        print(f"results: {args.output}")
    if args.mlflow_run:
        uri = harness.log_to_mlflow(results, args.mlflow_run, uri=args.tracking_uri)
        print(f"logged to MLflow run {args.mlflow_run} ({uri}): {len(harness.flat_metrics(results))} metrics under harness/")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ercstudy", description="MoE studies with the expert-router coupling (ERC) loss.")
    parser.add_argument("--version", action="version", version=f"ercstudy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    overrides = dict(nargs="*", metavar="KEY=VALUE", default=[],
                     help="set values of the file, by dotted path: base.erc.alpha=0.5 search.num_trials=8 "
                          "search.params.moe.num_experts=[8,16] (values read as YAML)")
    train = sub.add_parser("train", help="run one trial (no Tune) on the local embedded Ray or RAY_ADDRESS")
    train.add_argument("file", help="a trial config YAML, or a study YAML whose `base:` is one")
    train.add_argument("overrides", **overrides)
    train.add_argument("--name", help="run name (default: the file's stem, STEM-train for a study file); the run directory is STORAGE/NAME")
    storage_default = f"default: ${STORAGE_ENV}, else ./{DEFAULT_STORAGE}"
    verbose = "also show Ray's and DeepSpeed's output (workers, Train, Tune) here; it always goes to Ray's log files"
    train.add_argument("--storage", default=default_storage(), help=f"results directory ({storage_default})")
    train.add_argument("--resume", action="store_true", help="continue an interrupted run of the same name from its last checkpoint")
    train.add_argument("--verbose", action="store_true", help=verbose)
    train.set_defaults(func=cmd_train)

    prep = sub.add_parser("prepare-data", help="tokenize text files (or a Parquet text column) into Parquet token shards")
    prep.add_argument("inputs", nargs="+", help="text (.txt, .md: documents separated by blank lines), JSONL (.jsonl), Parquet, or "
                                                "`datasets.save_to_disk` folders, each optionally .gz/.bz2/.xz/.zst; directories or globs "
                                                "of them (quote them: 'corpus/**/*.jsonl.gz'); paths or URIs (s3://..., gs://...); "
                                                "each file is one domain unless --domain-field")
    prep.add_argument("--out", required=True, help="output directory or URI (s3://BUCKET/PREFIX, ...); must be new or empty")
    prep.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size, trained on the inputs (default: 4096)")
    prep.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence (default: 256)")
    prep.add_argument("--eval-fraction", type=float, default=0.05, help="share of each file's documents held out, whole, for evaluation (default: 0.05)")
    prep.add_argument("--text-field", "--column", dest="text_field", default="text", help="the document's field of JSONL records or column of Parquet/Arrow (default: text)")
    prep.add_argument("--domain-field", help="take each document's domain from this field (e.g. source, pile_set_name) instead of its file")
    prep.add_argument("--max-domains", type=int, default=64, help="domains the metrics track: the most frequent ones; the rest pooled as 'other' (default: 64)")
    prep.add_argument("--tokenizer", help="a pretrained Hugging Face tokenizer.json (a file or a folder holding one; a path or URI) instead of training a BPE")
    prep.add_argument("--eos-token", help="the tokenizer's end-of-text token (default: the first of <|endoftext|>, </s>, <|end_of_text|>, <eos> it has)")
    prep.add_argument("--rows-per-shard", type=int, default=8192, help="sequences per Parquet file (default: 8192)")
    prep.add_argument("--seed", type=int, default=0, help="seed of the shuffle and the train/eval split (default: 0)")
    prep.add_argument("--workers", type=int, help="tokenizing tasks at once (default: one per CPU of the Ray); 0: in this "
                                              "process, without Ray. The shards are the same whatever the number")
    prep.add_argument("--address", help="run on the Ray cluster at this address (default: RAY_ADDRESS, else a private local "
                                        "Ray); inputs and --out must then be URIs or paths every node mounts")
    prep.set_defaults(func=cmd_prepare_data)

    for name, func, text in (("validate", cmd_validate, "check a study file (no Ray started); errors exit 2"),
                             ("dry-run", cmd_dry_run, "validate, then show the model shapes, budgets and memory of the space")):
        p = sub.add_parser(name, help=text)
        p.add_argument("spec", help="a study YAML, or a preset's name (ercstudy presets)")
        p.add_argument("overrides", **overrides)
        p.set_defaults(func=func)
    presets = sub.add_parser("presets", help="list the study presets that come with ercstudy (run one by name)")
    presets.set_defaults(func=cmd_presets)
    config = sub.add_parser("config", help="print the resolved study or trial config, defaults included, as YAML that run/train take")
    config.add_argument("file", nargs="?", help="a study YAML, a preset's name, or a trial config YAML")
    config.add_argument("--reference", action="store_true", help="print the reference of every config field instead (docs/config.md)")
    config.add_argument("overrides", **overrides)
    config.set_defaults(func=cmd_config)
    address = "Ray cluster address (default: RAY_ADDRESS, else a local embedded Ray)"
    storage = f"results directory ({storage_default}); the study lives in STORAGE/NAME"
    run = sub.add_parser("run", help="run a study: Tune + Optuna (+ ASHA) over TorchTrainer trials, tracked in MLflow")
    run.add_argument("spec", help="a study YAML, or a preset's name (ercstudy presets)")
    run.add_argument("overrides", **overrides)
    run.add_argument("--address", help=address)
    run.add_argument("--storage", default=default_storage(), action=_StorageFlag,
                     help=f"{storage}; a URI (s3://bucket/prefix, gs://...) or a path every node mounts; overrides the study's storage:")
    run.add_argument("--verbose", action="store_true", help=verbose)
    run.set_defaults(func=cmd_run)
    resume = sub.add_parser("resume", help="continue an interrupted study: finished trials kept, unfinished ones from their checkpoints")
    resume.add_argument("name", help="the study's name")
    resume.add_argument("--address", help=address)
    resume.add_argument("--storage", default=default_storage(), help=storage)
    resume.add_argument("--verbose", action="store_true", help=verbose)
    resume.set_defaults(func=cmd_resume)
    submit = sub.add_parser("submit", help="submit `ercstudy run SPEC` to a Ray cluster as a Ray job (this directory shipped)")
    submit.add_argument("spec", help="a study YAML, inside the current directory")
    submit.add_argument("overrides", **overrides)
    submit.add_argument("--address", required=True, help="the cluster's dashboard, e.g. http://HEAD:8265 (after `ray dashboard cluster.yaml`)")
    submit.add_argument("--storage", default=default_storage(), action=_StorageFlag,
                        help=f"where the study lives ({storage_default}, or the study's storage:): a URI (s3://bucket/prefix, "
                             "gs://...) or an absolute path every node mounts (NFS)")
    submit.add_argument("--job-id", help="submission id (default: Ray picks one)")
    submit.set_defaults(func=cmd_submit)
    report = sub.add_parser("report", help="leaderboard, plots and scaling fits of a study, written to files and its MLflow parent run")
    report.add_argument("name", help="the study's name")
    report.add_argument("--storage", default=default_storage(), help=storage)
    report.add_argument("--out", help="output directory (default: STORAGE/NAME/report)")
    report.add_argument("--tracking-uri", help="the study's MLflow server as this machine reaches it (default: the one "
                                               "the study ran with, in STORAGE/NAME/study.json), e.g. http://127.0.0.1:5000 through a tunnel")
    report.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the tracking server to answer (default: 10)")
    report.add_argument("--budget", type=float, metavar="FLOPS",
                        help="a compute budget (e.g. 1e21 FLOPs): the scaling fits predict the loss there (Chinchilla: "
                             "the compute-optimal N/D split)")
    report.set_defaults(func=cmd_report)
    ev = sub.add_parser("eval", help="run lm-evaluation-harness tasks on a checkpoint (extra `evals`), optionally logged to MLflow")
    ev.add_argument("checkpoint", help="a checkpoint directory or URI (checkpoint_*/), a run directory or URI (its newest "
                                       "checkpoint), or STUDY/TRIAL (that trial's newest checkpoint in --storage)")
    ev.add_argument("--storage", default=default_storage(), help=f"where STUDY/TRIAL is looked up ({storage_default})")
    ev.add_argument("--tasks", required=True, help="comma-separated lm-eval task names, e.g. arc_easy_local,hellaswag_local")
    ev.add_argument("--include-path", "--include_path", help="directory of local lm-eval task YAMLs (dataset_path: json + local data_files)")
    ev.add_argument("--config", help="the trial config (only for checkpoints that do not hold trial_config.yaml)")
    ev.add_argument("--limit", type=float, help="examples per task (an int), or a fraction of each task")
    ev.add_argument("--num-fewshot", "--num_fewshot", type=int, help="few-shot examples (default: each task's own)")
    ev.add_argument("--batch-size", "--batch_size", type=int, default=16, help="rows per forward (default: 16)")
    ev.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda where there is a GPU, else cpu)")
    ev.add_argument("--seed", type=int, default=0, help="seed of few-shot sampling (default: 0)")
    ev.add_argument("--output", "--output_path", "--output-path", dest="output", help="write lm-eval's results JSON here")
    ev.add_argument("--mlflow-run", "--mlflow_run", help="log the results to this MLflow run (e.g. the trial's child run)")
    ev.add_argument("--tracking-uri", "--tracking_uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
    ev.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
