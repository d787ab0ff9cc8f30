"""The private Ray that ercstudy starts: token authentication on, its token readable by this user only,
and the dashboard and Jobs API refuse a request without the token."""

import os
import stat
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.ray


def test_the_token_is_private_to_this_user(ray_session):
    path = os.environ["RAY_AUTH_TOKEN_PATH"]
    assert os.environ["RAY_AUTH_MODE"] == "token"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    assert len(open(path).read().strip()) == 64


@pytest.mark.parametrize("path", ["/api/jobs/", "/api/version", "/nodes?view=summary", "/api/v0/tasks"])
def test_unauthenticated_requests_are_refused(ray_session, path):
    from ercstudy.platform.cluster.ray_runtime import local_dashboard_url

    url = local_dashboard_url()
    assert url and url.startswith("http://127.0.0.1:")  # the dashboard binds loopback only
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url + path, timeout=10)
    assert refused.value.code == 401


def test_the_jobs_client_with_the_token_is_served(ray_session):
    from ray.job_submission import JobSubmissionClient

    from ercstudy.platform.cluster.ray_runtime import local_dashboard_url

    assert isinstance(JobSubmissionClient(local_dashboard_url()).list_jobs(), list)


def test_every_listener_of_the_private_ray_is_on_loopback_and_none_serves_an_unauthenticated_request(ray_session):
    """Every TCP listener of the local Ray's processes listens on loopback only (the node registered at 127.0.0.1,
    its core servers, agents, client server, workers and Prometheus endpoints included), and asked `GET /api/jobs/`
    without the token it refuses (401), is not HTTP (gRPC: its servers check the token on every call), or is one of
    the two read-only Prometheus endpoints of Ray's dashboard and autoscaler, which ignore the token."""
    import ipaddress

    import psutil

    from ercstudy.platform.cluster import ray_runtime

    assert [n["NodeManagerAddress"] for n in ray_session.nodes()] == ["127.0.0.1"]
    root = psutil.Process(ray_runtime._local.process.pid)
    listening = set()
    for proc in [root, *root.children(recursive=True)]:
        try:
            listening.update((c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN)
        except psutil.Error:
            continue
    ports = {port for _, port in listening}
    assert len(ports) >= 4, ports  # GCS, raylet, dashboard, agents at least

    def loopback(ip: str) -> bool:
        address = ipaddress.ip_address(ip)
        return (getattr(address, "ipv4_mapped", None) or address).is_loopback

    assert all(loopback(ip) for ip, _ in listening), sorted(listening)
    served = set()
    for port in sorted(ports):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/jobs/", timeout=2)
            served.add(port)
        except urllib.error.HTTPError as err:
            if err.code not in (401, 403):
                served.add(port)
        except Exception:  # not HTTP, or nothing on loopback for it
            pass
    # Ray 2.60's defaults (env AUTOSCALER_METRIC_PORT, DASHBOARD_METRIC_PORT): its Prometheus endpoints
    assert served <= {44217, 44227}, served
