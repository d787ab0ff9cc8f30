"""The study's link into the MLflow UI opens on its runs sorted by the objective (client.runs_page)."""

import urllib.parse

from ercstudy.platform.tracking import client as tracking


def test_the_runs_page_sorts_by_the_objective_in_the_orders_mlflow_accepts(tmp_path):
    page = tracking.runs_page("7", "eval/loss", "min")
    path, query = page.split("?")
    assert path == "#/experiments/7/runs"
    order = dict(urllib.parse.parse_qsl(query))
    assert order == {"orderByKey": "metrics.`eval/loss`", "orderByAsc": "true"}
    assert dict(urllib.parse.parse_qsl(tracking.runs_page("7", "harness/acc", "max").split("?")[1]))["orderByAsc"] == "false"
    # the UI sends the key to the search API as "<key> ASC|DESC": a real store sorts by it, best first
    c = tracking.client(tracking.resolve_uri(f"sqlite:///{tmp_path}/mlflow.db"))
    exp = c.create_experiment("e")
    for value in (3.0, 1.0, 2.0):
        run = c.create_run(exp).info.run_id
        c.log_metric(run, "eval/loss", value)
    runs = c.search_runs([exp], order_by=[f"{order['orderByKey']} ASC"])
    assert [r.data.metrics["eval/loss"] for r in runs] == [1.0, 2.0, 3.0]
