"""`submit` and `upload` fail loudly when no run was created: an auth proxy in front of the API (a
302 to its login page, a 401, a login page served with 200), an API error (its reason kept from
the body), an answer without the created object's id, a KFP backend older than the pipeline
needs. Checked against fakes (a real KFP API server and an auth proxy need Kubernetes), driven by
the real kfp.Client, in-process; one CLI smoke test."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler

import pytest

from components.core.paths import ROOT
from pipelines.submit import Server, SubmitError, check_version, client, probe, submit, upload
from tests.helpers.project import run
from tests.helpers.servers import http_server

Answer = tuple[int, dict[str, str], bytes]
LOGIN_PAGE = b"<!DOCTYPE html><html><head><title>Log in to Your Account</title></head><body><form>Dex</form></body></html>"
HINT = "--token-file or $KF_PIPELINES_TOKEN"


def json_answer(body: dict, status: int = 200) -> Answer:
    return status, {"Content-Type": "application/json"}, json.dumps(body).encode()


@contextlib.contextmanager
def fake_server(answer: Callable[[str, str], Answer]) -> Iterator[tuple[str, list]]:
    """A loopback HTTP server (ports 18700-18799) answering every request with answer(method, path); yields its URL and the requests."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def _reply(self):
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            seen.append((self.command, self.path.split("?")[0]))
            status, headers, body = answer(self.command, self.path.split("?")[0])
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_DELETE = _reply

        def log_message(self, *args):
            pass

    with http_server(Handler) as url:
        yield url, seen


def free_port() -> int:
    for port in range(18700, 18800):
        with contextlib.suppress(OSError), socket.socket() as s:
            s.bind(("127.0.0.1", port))
            return port
    raise RuntimeError("no free port in 18700-18799")


def fake_auth_proxy_redirect(method, path) -> Answer:
    return 302, {"Location": "/dex/auth?client_id=kubeflow-oidc-authservice"}, b""


def fake_auth_proxy_unauthorized(method, path) -> Answer:
    return 401, {"Content-Type": "text/plain"}, b"Unauthorized: jwt is expired"


def fake_auth_proxy_login_page(method, path) -> Answer:
    return 200, {"Content-Type": "text/html"}, LOGIN_PAGE


def test_a_redirect_to_a_login_page_is_an_error_with_fake_auth_proxy():
    with fake_server(fake_auth_proxy_redirect) as (host, seen):
        with pytest.raises(SubmitError, match=r"redirected to /dex/auth\?client_id=kubeflow-oidc-authservice \(an auth proxy's "
                                              r"login page\?\): give a token \(--token-file or \$KF_PIPELINES_TOKEN\)"):
            probe(host, None, HINT)
    assert seen == [("GET", "/apis/v2beta1/healthz")]  # the redirect was not followed


def test_an_unauthorized_token_is_an_error_with_the_proxy_reason_with_fake_auth_proxy():
    with fake_server(fake_auth_proxy_unauthorized) as (host, _):
        with pytest.raises(SubmitError, match="refused the request: HTTP 401: Unauthorized: jwt is expired: a token was sent but not accepted"):
            probe(host, "expired-token", HINT)


def test_a_login_page_served_with_200_is_not_taken_for_the_api_with_fake_auth_proxy():
    with fake_server(fake_auth_proxy_login_page) as (host, _):
        with pytest.raises(SubmitError, match=r"answered text/html, not the API's JSON \('Log in to Your Account Dex'\): is .* "
                                              r"the API's URL\? Behind an auth proxy that is a login page: give a token"):
            probe(host, None, HINT)


def test_the_backend_version_is_checked_with_fake_kfp_api_server():
    with fake_server(lambda m, p: json_answer({"commit_sha": "abc", "tag_name": "2.5.0", "multi_user": True})) as (host, _):
        server = probe(host, "token", HINT)
    assert server == Server("2.5.0", True)
    with pytest.raises(SubmitError, match=r"the KFP backend at .* is 2.5.0; this pipeline needs >= 2.14 \(its exit handler's "
                                          "PipelineTaskFinalStatus"):
        check_version(server, "http://kfp")
    assert check_version(Server("2.17.3", False), "http://kfp") is None
    assert "does not tell its version ('unknown')" in check_version(Server("unknown", False), "http://kfp")


def fake_kfp_api(create: Answer) -> Callable[[str, str], Answer]:
    """A KFP API that knows one pipeline and version, and answers every create (POST) with `create`."""
    def answer(method, path) -> Answer:
        if path.endswith("/healthz"):
            return json_answer({"tag_name": "2.17.3", "multi_user": False})
        if method == "POST":
            return create
        if path.endswith("/versions"):
            return json_answer({"pipeline_versions": [{"pipeline_id": "pipe-1", "pipeline_version_id": "ver-1"}]})
        return json_answer({"pipelines": [{"pipeline_id": "pipe-1", "display_name": "p"}]} if "pipelines" in path else {})
    return answer


def connected(host: str):
    return client(host, "kubeflow", None, probe(host, None, HINT))


def test_an_api_error_keeps_the_server_reason_with_fake_kfp_api_server():
    error = json_answer({"error": "Failed to create a run", "code": 3, "message": "Invalid input error: experiment exp-1 is archived"},
                        status=400)
    with fake_server(fake_kfp_api(error)) as (host, _):
        with pytest.raises(SubmitError, match=r"refused the request: HTTP 400 Bad Request: Invalid input error: experiment exp-1 is archived"):
            submit(connected(host), ROOT, "run", "exp", "kubeflow", version_id="ver-1")


def test_an_answer_without_an_id_created_nothing_with_fake_kfp_api_server(tmp_path):
    with fake_server(fake_kfp_api(json_answer({}))) as (host, _):
        c = connected(host)
        with pytest.raises(SubmitError, match="answered without the experiment id: nothing was created"):
            submit(c, ROOT, "run", "exp", "kubeflow", version_id="ver-1")
        with pytest.raises(SubmitError, match="answered without the pipeline version id: nothing was created"):
            (tmp_path / "spec.yaml").write_text("{}\n")
            upload(c, tmp_path / "spec.yaml", "p", "commit-1", "kubeflow")


@pytest.mark.integration
def test_submit_behind_a_login_redirect_exits_2_before_compiling_with_fake_auth_proxy():
    with fake_server(fake_auth_proxy_redirect) as (host, _):
        result = run(["python", "-m", "pipelines", "submit", "--host", host], ROOT, check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert f"error: the Kubeflow Pipelines API at {host} redirected to /dex/auth" in result.stderr
    assert "created" not in result.stdout
