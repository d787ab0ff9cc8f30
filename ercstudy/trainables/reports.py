"""What a worker reports: the one contract between the planes.

Every `ray.train.report` of a trial's rank 0 is a flat dict: the metrics of one optimizer step
(losses, specialization, throughput, eval and lm-eval metrics: each a float, logged to MLflow under
its own name) plus the keys below, which the control plane reads to drive the trial (the
searcher, ASHA, the progress lines, the MLflow runs). Both planes name them from here, never as
string literals.
"""

STEP = "step"  # the optimizer step this report closes (1-based); ASHA's time attribute "step"
TOTAL_STEPS = "total_steps"  # the trial's planned steps: a report at TOTAL_STEPS is its last
STOP_REASON = "stop_reason"  # present when the trial stops itself (a non-finite loss): why, as a sentence
RESUMED_FROM_STEP = "resumed_from_step"  # in the first report after a restore: the checkpoint's step
RESTORED_HISTORY = "restored_history"  # beside RESUMED_FROM_STEP: the reports the restored checkpoint holds
COUPLING_MATRIX = "coupling_matrix"  # at eval steps: M per MoE layer, [L][n][n] (heatmaps, not a metric)
HARNESS_RESULTS = "harness_results"  # lm-eval's results JSON, a string (an artifact, not a metric)
HARNESS_ERROR = "harness_error"  # why the lm-eval evaluation at this step failed, a string (the trial goes on)
TRIAL_ID = "trial_id"  # set by Tune on every result it keeps
CHECKPOINT_OF_STEP = "checkpoint_of_step"  # alone in a report: the checkpoint of a step saved before its evaluations
CHECKPOINT_PATH = "checkpoint_path"  # a forwarded report's checkpoint, as Ray's TuneReportCallback names it

NOT_METRICS = (COUPLING_MATRIX, STOP_REASON, CHECKPOINT_PATH, RESUMED_FROM_STEP)  # keys MLflow never logs as metrics


def checkpoint_only(report: dict) -> bool:
    """A report that carries a checkpoint and no metrics: the step's own report, evaluations included, follows it."""
    return CHECKPOINT_OF_STEP in report and STEP not in report
