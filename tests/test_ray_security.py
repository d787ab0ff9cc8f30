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
    from ercstudy.platform.ray_runtime import local_dashboard_url

    url = local_dashboard_url()
    assert url and url.startswith("http://127.0.0.1:")  # the dashboard binds loopback only
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url + path, timeout=10)
    assert refused.value.code == 401


def test_the_jobs_client_with_the_token_is_served(ray_session):
    from ray.job_submission import JobSubmissionClient

    from ercstudy.platform.ray_runtime import local_dashboard_url

    assert isinstance(JobSubmissionClient(local_dashboard_url()).list_jobs(), list)
