"""Ray Jobs on a real local cluster started with `ray start --head` on loopback (not the in-process one)."""

import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import pytest
import yaml

from bench import free_port
from jobs.cli import main
from jobs.devtools.samples import invoice_pdf
from jobs.submit import job_client, wait
from pipeline.tables import committed_runs, read_answers
from tests.conftest import assert_sample_statuses

PASSWORDS_ENV, PDF_PASSWORD = "DOCQA_TEST_PDF_PASSWORDS", "cluster-secret-5e1d"


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A head node in its own process group, with token authentication (conftest sets RAY_AUTH_MODE=token
    and the session's token file); its dashboard address is what `docqa submit` talks to."""
    temp_dir = tmp_path_factory.mktemp("ray")
    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    environment.pop("RAY_ADDRESS", None)
    # The cluster's secret (as a KubeRay secret would set it on every node): the PDF passwords, one a line.
    environment[PASSWORDS_ENV] = f"not-this-one\n{PDF_PASSWORD}"
    # A port probed free can be taken before the head binds it: the head then exits, or waits for a GCS that
    # never starts (seen with --port taken); either way it is stopped and started again on other ports.
    for _ in range(3):
        started = _start_head(temp_dir, environment)
        if started is not None:
            break
    else:
        raise RuntimeError("the Ray head did not come up in three attempts, each on freshly probed ports")
    head, address = started
    yield address
    os.killpg(head.pid, signal.SIGTERM)
    head.wait(timeout=60)


def _start_head(temp_dir: Path, environment: dict[str, str]) -> tuple[subprocess.Popen, str] | None:
    """A head on freshly probed ports and its dashboard address once it answers; None (the head stopped) if
    it exited or did not answer within 60 s."""
    from ray.job_submission import JobSubmissionClient

    dashboard_port = free_port()
    head = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={free_port()}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            # Ports of their own: the session's in-process Ray instance may be running beside this cluster.
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            "--num-cpus=2",
            "--include-dashboard=true",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            JobSubmissionClient(address).list_jobs()
            return head, address
        except Exception:  # noqa: BLE001 - any failure means "not up yet"
            if head.poll() is not None:
                return None
            if time.monotonic() > deadline:
                os.killpg(head.pid, signal.SIGTERM)
                head.wait(timeout=60)
                return None
            time.sleep(1)


def _job(tmp_path: Path, inputs: Path, model: Path) -> Path:
    path = tmp_path / "job.yaml"
    config = {
        "input": str(inputs),
        "output": str(tmp_path / "out"),
        "model": {"id": str(model)},
        "questions": [{"id": "total", "text": "Total?", "pages": "last", "max_new_tokens": 3}],
        "render": {"image_splitting": False},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _nightly(address: str, model: Path, sample_pdfs: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """A copy of the samples as input, and the `docqa submit --nightly` arguments of a job over it."""
    inputs = tmp_path / "pdfs"
    shutil.copytree(sample_pdfs, inputs)
    job = _job(tmp_path, inputs, model)
    return inputs, ["submit", "--address", address, "--config", str(job), "--nightly"]


@pytest.mark.slow
def test_submit_nightly_then_only_new_and_changed_documents(
    ray_cluster: str, tiny_model: Path, sample_pdfs: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    from ray.job_submission import JobSubmissionClient

    inputs, submit = _nightly(ray_cluster, tiny_model, sample_pdfs, tmp_path)

    assert main([*submit, "--date", "2026-11-20", "--wait"]) == 0
    lines = capsys.readouterr().out.splitlines()
    submission_id, final = lines[0], lines[-1]
    assert (submission_id, final) == ("docqa-nightly-2026-11-20", "SUCCEEDED")
    # --wait shows the job's own output while it waits: its progress lines with totals, then its summary.
    waited = "\n".join(lines[1:-1])
    assert f"documents {len(list(inputs.iterdir()))}/{len(list(inputs.iterdir()))} · pages" in waited
    assert "run nightly-2026-11-20 committed" in waited
    assert main(["status", submission_id, "--address", ray_cluster]) == 0
    assert capsys.readouterr().out.strip() == "SUCCEEDED"
    assert main(["logs", submission_id, "--address", ray_cluster]) == 0
    assert "run nightly-2026-11-20 committed" in capsys.readouterr().out
    jobs_before = len(JobSubmissionClient(ray_cluster).list_jobs())
    assert main([*submit, "--date", "2026-11-20"]) == 0  # the scheduler fires twice: nothing new is submitted
    assert capsys.readouterr().out.strip() == submission_id
    assert len(JobSubmissionClient(ray_cluster).list_jobs()) == jobs_before
    first = read_answers(str(tmp_path / "out"), "nightly-2026-11-20")
    assert_sample_statuses(first.to_pylist(), inputs)

    (inputs / "new.pdf").write_bytes(invoice_pdf(101, 2, (612, 792)))
    changed = inputs / "invoice-002.pdf"
    changed.write_bytes(invoice_pdf(102, 1, (612, 792)))
    monkeypatch.chdir(tmp_path)  # a relative input is resolved before submitting: the job reads the same folder
    # The night's first attempt fails (its input folder is not there); the scheduler fires again.
    assert main([*submit, "--date", "2026-11-21", "--input", "not-mounted", "--wait"]) == 1
    failed = capsys.readouterr().out.splitlines()
    assert (failed[0], failed[-1]) == ("docqa-nightly-2026-11-21", "FAILED")
    assert f"input {tmp_path / 'not-mounted'} does not exist" in "\n".join(failed)
    assert main([*submit, "--date", "2026-11-21", "--input", "pdfs", "--wait"]) == 0
    again = capsys.readouterr().out.splitlines()
    assert (again[0], again[-1]) == ("docqa-nightly-2026-11-21-attempt-2", "SUCCEEDED")
    second = read_answers(str(tmp_path / "out"), "nightly-2026-11-21")
    assert sorted(set(second.column("document").to_pylist())) == sorted([str(inputs / "new.pdf"), str(changed)])
    [record] = [r for r in committed_runs(str(tmp_path / "out")) if r["run_id"] == "nightly-2026-11-21"]
    assert record["incremental"]["unchanged_documents"] == len(list(inputs.iterdir())) - 2
    assert record["run_date"] == "2026-11-21"
    assert set(second.column("run_date").to_pylist()) == {date(2026, 11, 21)}  # the answers partition
    assert set(second.column("run_id").to_pylist()) == {"nightly-2026-11-21"}
    assert set(second.column("status").to_pylist()) == {"ok"}


@pytest.mark.slow
def test_a_stopped_nightly_is_resubmitted_as_attempt_2_and_its_logs_followed(
    ray_cluster: str, tiny_model: Path, sample_pdfs: Path, tmp_path: Path, capsys
) -> None:
    inputs, submit = _nightly(ray_cluster, tiny_model, sample_pdfs, tmp_path)
    submit += ["--date", "2026-11-22"]
    assert main(submit) == 0
    first = capsys.readouterr().out.strip()
    assert first == "docqa-nightly-2026-11-22"
    assert main(["stop", first, "--address", ray_cluster]) == 0
    assert capsys.readouterr().out.strip() == "stopped"
    assert wait(ray_cluster, first, timeout_s=120) == "STOPPED"
    assert main(["status", first, "--address", ray_cluster]) == 0
    assert capsys.readouterr().out.strip() == "STOPPED"
    # Stopped means stopped: no driver of the first attempt is left to compete with the next one for CPUs.
    deadline = time.monotonic() + 60
    while _drivers("2026-11-22") and time.monotonic() < deadline:
        time.sleep(0.5)
    client = job_client(ray_cluster)
    assert not _drivers("2026-11-22"), (
        _describe(_drivers("2026-11-22")) + "\n" + str(client.get_job_info(first)) + "\n" + client.get_job_logs(first)
    )

    assert main(submit) == 0  # the scheduler fires again: a new attempt, not the stopped job
    second = capsys.readouterr().out.strip()
    assert second == "docqa-nightly-2026-11-22-attempt-2"
    # The driver is the process Ray starts and stops (no shell between them that a stop could signal alone).
    deadline = time.monotonic() + 60
    while not (drivers := _drivers("2026-11-22")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [driver.parent().name() for driver in drivers] == ["ray::JobSupervisor"]
    assert main(["logs", second, "--address", ray_cluster, "--follow"]) == 0  # returns when the job ends
    assert "run nightly-2026-11-22 committed" in capsys.readouterr().out
    assert main(["status", second, "--address", ray_cluster]) == 0
    assert capsys.readouterr().out.strip() == "SUCCEEDED"
    assert_sample_statuses(read_answers(str(tmp_path / "out"), "nightly-2026-11-22").to_pylist(), inputs)


def _drivers(nightly_date: str) -> list:
    """The processes on this machine running the nightly job's driver of ``nightly_date``."""
    import psutil

    marker = f"nightly --config job.yaml --date {nightly_date}"
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if "jobs.cli" in (cmdline := " ".join(process.info["cmdline"] or [])) and marker in cmdline:
            found.append(process)
    return found


def _describe(processes: list) -> str:
    """What a failure needs to be understood: each process's parents, signal masks and threads."""
    import psutil

    lines = []
    for process in processes:
        try:
            chain = [f"{p.pid}:{p.name()}:{' '.join(p.cmdline())[:80]}" for p in process.parents()]
            status = Path(f"/proc/{process.pid}/status").read_text()
            signals = [line for line in status.splitlines() if line.startswith(("Sig", "PPid", "Threads", "State"))]
            lines.append(f"{process.pid} {process.cmdline()} created {process.create_time()} parents {chain} {signals}")
        except psutil.Error as error:
            lines.append(f"{process.pid}: {error}")
    return "\n".join(lines)


def test_stop_and_unknown_ids(ray_cluster: str, refused_address: str, capsys) -> None:
    assert main(["status", "no-such-job", "--address", ray_cluster]) == 1
    assert "no job 'no-such-job'" in capsys.readouterr().err
    assert main(["status", "x", "--address", refused_address]) == 1
    assert "cannot reach the Ray job server" in capsys.readouterr().err


# A client never told of the token (Ray 2.60 clients send none without RAY_AUTH_MODE=token), and one with a
# wrong token. None removes the variable from the client's environment.
@pytest.mark.parametrize(
    ("client_environment", "problem"),
    [
        ({"RAY_AUTH_MODE": None, "RAY_AUTH_TOKEN_PATH": None}, "got no token from docqa"),
        ({"RAY_AUTH_TOKEN": "x" * 64}, "rejected the token"),
    ],
)
def test_a_client_without_the_clusters_token_is_told_how_to_give_it(
    ray_cluster: str, client_environment: dict[str, str | None], problem: str, tmp_path: Path
) -> None:
    environment = {**os.environ, "HOME": str(tmp_path)}  # no ~/.ray/auth_token of the user's either
    for name, value in client_environment.items():
        if value is None:
            environment.pop(name, None)
        else:
            environment[name] = value
    command = [sys.executable, "-m", "jobs.cli", "status", "docqa-run-x", "--address", ray_cluster]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"docqa: the Ray cluster at {ray_cluster} {problem}"), result.stderr
    for fix in ("RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN ", "RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token"):
        assert fix in message
    assert Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text() not in result.stderr


def test_an_encrypted_pdf_job_submitted_to_the_cluster_gets_its_password_from_the_clusters_secret(
    ray_cluster: str, tiny_model: Path, tmp_path: Path, capsys
) -> None:
    """The passwords never travel with the job: it names the variable, the cluster has it. Inline
    passwords are refused before anything is submitted."""
    from tests.hostile import encrypted_pdf

    inputs = tmp_path / "pdfs"
    inputs.mkdir()
    (inputs / "locked.pdf").write_bytes(encrypted_pdf(PDF_PASSWORD))
    job = _job(tmp_path, inputs, tiny_model)
    config = yaml.safe_load(job.read_text())
    job.write_text(yaml.safe_dump({**config, "render": {**config["render"], "passwords_env": PASSWORDS_ENV}}))
    assert main(["submit", "--address", ray_cluster, "--config", str(job), "--wait"]) == 0
    capsys.readouterr()
    rows = read_answers(str(tmp_path / "out")).to_pylist()
    assert [(Path(row["document"]).name, row["status"]) for row in rows] == [("locked.pdf", "ok")]
    assert PDF_PASSWORD not in job.read_text()

    inline = ["submit", "--address", ray_cluster, "--config", str(job), "--set", f"render.passwords=[{PDF_PASSWORD}]"]
    assert main(inline) == 2
    assert "render.passwords would travel with the job" in capsys.readouterr().err
