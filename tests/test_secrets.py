"""Credentials in a spec are used by the run and never recorded: MLflow params, the spec.yaml
artifact and printed spec, the Ray job's metadata, and the error lines trainyard prints."""

from __future__ import annotations

from trainyard.cluster.secrets import redact, redact_override, redact_text
from trainyard.pipelines.config.spec import RunSpec
from trainyard.pipelines.jobs.submit import job_metadata

SECRET = "wJalrXUtnFEMIK7MDENG"


def test_credentials_in_uris_and_secret_named_keys_are_masked():
    assert redact_text(f"s3://AKIAEXAMPLE:{SECRET}@bucket/x.csv") == "s3://***@bucket/x.csv"
    assert redact_text(f"https://{SECRET}@host/x") == "https://***@host/x"
    url = f"https://h/x.csv?X-Amz-Signature={SECRET}&part=2&token={SECRET}"
    assert redact_text(url) == "https://h/x.csv?X-Amz-Signature=***&part=2&token=***"
    assert redact_text("plain/path/x.csv") == "plain/path/x.csv"
    assert redact({"api_key": SECRET, "n": 3, "inner": {"password": SECRET}}) == {
        "api_key": "***",
        "n": 3,
        "inner": {"password": "***"},
    }
    assert redact_override(f"data.args.auth_token={SECRET}") == "data.args.auth_token=***"
    # A tokenizer is a vocabulary's name, not a token: the text spec's is recorded as it is.
    assert redact({"tokenizer": "bytes", "tokens": SECRET}) == {
        "tokenizer": "bytes",
        "tokens": "***",
    }


def test_the_recorded_spec_holds_no_credential_the_run_still_gets():
    spec = RunSpec.from_dict(
        {
            "pipeline": "custom",
            "data": {"dataset": "mine:Data", "args": {"root": f"s3://K:{SECRET}@b/x"}},
            "model": {"name": "mine:Net", "args": {"hf_token": SECRET}},
        }
    )
    recorded = [spec.to_yaml(), *map(str, spec.flat().values())]  # spec.yaml, MLflow params
    assert not any(SECRET in text for text in recorded)
    assert "s3://***@b/x" in spec.to_yaml() and spec.flat()["model.args"] == {"hf_token": "***"}
    assert SECRET in str(spec.to_dict())  # what the workers get: the run uses it
    overrides = [f"data.path=s3://K:{SECRET}@b/x", f"model.args.api_key={SECRET}"]
    assert SECRET not in str(job_metadata("configs/x.yaml", overrides))


def test_submitted_overrides_with_credentials_travel_in_a_package_of_their_own(
    tmp_path, monkeypatch
):
    """What `trainyard submit` sends: an entrypoint without the values, and the package its
    driver reads them from (the e2e job test runs it on a cluster)."""
    from trainyard.pipelines.config.overrides import (
        holds_credentials,
        overrides_package,
        read_overrides,
    )
    from trainyard.pipelines.jobs.submit import entrypoint

    overrides = ["train.epochs=3", f"data.path=s3://K:{SECRET}@b/x"]
    assert holds_credentials(overrides) and not holds_credentials(overrides[:1])
    package = overrides_package(overrides, tmp_path)
    command = entrypoint("configs/digits.yaml", overrides, project=".", set_from=package.name)
    assert SECRET not in command and command.endswith(f"--set-from {package.name}")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert read_overrides(package.name) == overrides


def test_error_lines_mask_credentials(capsys):
    from conftest import train_command as main

    ref = f"data.preprocess=https://K:{SECRET}@host/x:fn"  # a mistake that echoes the value
    assert main(["configs/digits.yaml", "--set", ref]) == 2
    err = capsys.readouterr().err
    assert "cannot import 'https://***@host/x:fn'" in err and SECRET not in err


def test_the_ray_token_file_is_made_private(tmp_path, monkeypatch):
    from trainyard.cluster.auth import protect_token

    token = tmp_path / "auth_token"
    token.write_text("t" * 32)
    token.chmod(0o644)  # as Ray writes it under the usual umask
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    protect_token()
    assert token.stat().st_mode & 0o777 == 0o600


def test_an_mlflow_server_with_auth_lets_in_only_clients_with_the_login(tmp_path):
    """`trainyard mlflow-server --auth` (what ray_cluster.yaml runs on the head): no login, no
    data; a client with MLFLOW_TRACKING_USERNAME/PASSWORD in its environment (as every node's
    Ray processes have) logs as usual."""
    import os
    import signal
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    from mlflow.tracking import MlflowClient

    from trainyard.cluster.local import free_port
    from trainyard.cluster.mlflow_server import wait_healthy

    trainyard = [sys.executable, "-m", "trainyard.pipelines"]
    env_file = tmp_path / "mlflow.env"  # what ray_cluster.yaml mounts on every node
    subprocess.run([*trainyard, "mlflow-login", "--file", str(env_file)], check=True, timeout=60)
    assert env_file.stat().st_mode & 0o777 == 0o600
    login = dict(line.split("=", 1) for line in env_file.read_text().split())
    assert set(login) == {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
    cli = [*trainyard, "mlflow-server", "--auth", "--dir", str(tmp_path)]
    bare = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    refused = subprocess.run(cli, env=bare, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--auth: set MLFLOW_TRACKING_USERNAME" in refused.stderr
    port = free_port()
    server = subprocess.Popen(
        [*cli, "--port", str(port)],
        env=bare | login,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, timeout_s=90)
        assert (tmp_path / "basic_auth.ini").stat().st_mode & 0o777 == 0o600
        try:
            urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/search?max_results=1")
            raise AssertionError("the server answered a request without a login")
        except urllib.error.HTTPError as e:
            assert e.code == 401
        os.environ.update(login)
        try:
            client = MlflowClient(url)
            run = client.create_run(client.create_experiment("behind-a-login"))
            client.log_metric(run.info.run_id, "loss", 0.5)
            assert client.get_run(run.info.run_id).data.metrics == {"loss": 0.5}
            # `trainyard doctor` (and submit, which runs its MLflow check first) names a wrong
            # login in its own line.
            from trainyard.pipelines.jobs.doctor import bounded, mlflow_ready

            os.environ["MLFLOW_TRACKING_PASSWORD"] = "not-the-password"
            check = bounded("mlflow", lambda: mlflow_ready(None, url), 30)
            assert not check.ok and "refused the login" in check.detail, check
        finally:
            for key in login:
                os.environ.pop(key)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_a_model_is_trusted_only_with_its_files_as_signed_with_this_key(tmp_path, monkeypatch):
    import pytest

    from trainyard.cluster import signing

    monkeypatch.delenv(signing.KEY_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    model = tmp_path / "model"
    (model / "code").mkdir(parents=True)
    (model / "MLmodel").write_text("metadata: {tokenizer: bytes}\n")
    (model / "code" / "tok.py").write_text("x = 1\n")
    signing.sign(model)
    key = tmp_path / "home" / ".trainyard" / "model.key"
    assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_text().strip()) == 64
    signing.verify(model)

    def refused(because: str) -> None:
        with pytest.raises(signing.UntrustedModel, match=because):
            signing.verify(model)

    (model / "MLmodel").write_text("metadata: {tokenizer: 'os:system'}\n")
    refused("files changed since it was signed: MLmodel")
    (model / "MLmodel").write_text("metadata: {tokenizer: bytes}\n")
    (model / "code" / "evil.py").write_text("import os\n")
    refused("files added since it was signed: code/evil.py")
    (model / "code" / "evil.py").unlink()
    signing.verify(model)
    monkeypatch.setenv(signing.KEY_ENV, "someone else's key")
    refused("its signature is not from this key")
    signing.sign(model)  # a store writer with their own key cannot pass for ours
    monkeypatch.delenv(signing.KEY_ENV)
    refused("its signature is not from this key")
    (model / signing.SIGNATURE_FILE).unlink()
    refused("it is not signed")
