"""Cluster and scheduling configs: every YAML parses and says what matters; Ray validates its own config."""

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import JobConfig

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "infra" / "k8s"
CRON = re.compile(r"^(\S+\s+){4}\S+$")


def _load(name: str) -> dict:
    [document] = list(yaml.safe_load_all((K8S / name).read_text()))
    return document


def _cluster_needs(cluster: dict) -> None:
    """Head without tasks, GPU workers, the docqa image, the job config mounted on the head, Ray token
    authentication through KubeRay's authOptions."""
    assert cluster["authOptions"] == {"mode": "token"}
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    head_container = head["template"]["spec"]["containers"][0]
    assert head_container["image"].endswith("/docqa:0.1.0")
    assert {"name": "job-config", "mountPath": "/config"} in head_container["volumeMounts"]
    [gpu] = cluster["workerGroupSpecs"]
    worker = gpu["template"]["spec"]["containers"][0]
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]


def test_every_yaml_parses() -> None:
    files = [*K8S.glob("*.yaml"), ROOT / "ray_cluster.yaml", *ROOT.glob("examples/*.yaml")]
    assert len(files) >= 8
    for path in files:
        assert list(yaml.safe_load_all(path.read_text())), path


def test_rayjob_runs_one_docqa_run_on_gpus() -> None:
    job = _load("rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["entrypoint"] == "docqa run --config /config/job.yaml"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    _cluster_needs(job["spec"]["rayClusterSpec"])


def test_raycronjob_schedules_docqa_nightly() -> None:
    cron = _load("raycronjob.yaml")
    assert (cron["apiVersion"], cron["kind"]) == ("ray.io/v1", "RayCronJob")
    assert CRON.match(cron["spec"]["schedule"])
    assert "alpha" in (K8S / "raycronjob.yaml").read_text().lower()
    assert cron["spec"]["jobTemplate"]["entrypoint"].startswith("docqa nightly ")
    _cluster_needs(cron["spec"]["jobTemplate"]["rayClusterSpec"])


def test_cronjob_submits_the_nightly_run_to_the_long_lived_cluster() -> None:
    cron = _load("cronjob.yaml")
    cluster = _load("raycluster.yaml")
    assert (cron["apiVersion"], cron["kind"], cluster["kind"]) == ("batch/v1", "CronJob", "RayCluster")
    assert CRON.match(cron["spec"]["schedule"]) and cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    command = pod["containers"][0]["command"]
    assert command[:2] == ["docqa", "submit"] and "--nightly" in command
    assert command[command.index("--address") + 1] == f"http://{cluster['metadata']['name']}-head-svc:8265"
    # The submitter holds the token KubeRay generated for the cluster (a Secret named after it).
    environment = {variable["name"]: variable for variable in pod["containers"][0]["env"]}
    assert environment["RAY_AUTH_MODE"]["value"] == "token"
    secret = environment["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert secret == {"name": cluster["metadata"]["name"], "key": "auth_token"}
    _cluster_needs(cluster["spec"])


def test_plain_cron_line_submits_the_nightly_run() -> None:
    lines = [
        line for line in (ROOT / "infra/cron/docqa-nightly.cron").read_text().splitlines() if line and line[0] != "#"
    ]
    [line] = lines
    schedule, command = " ".join(line.split()[:5]), " ".join(line.split()[5:])
    assert CRON.match(schedule)
    assert "ray exec ray_cluster.yaml" in command and "docqa submit" in command and "--nightly" in command


def test_shipped_job_config_is_valid() -> None:
    config = JobConfig.model_validate(yaml.safe_load(_load("job-config.yaml")["data"]["job.yaml"]))
    assert config.actors.num_gpus_per_actor == 1 and config.input.startswith("s3://")


def test_ray_cluster_config_passes_rays_validation() -> None:
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    raw = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))
    assert raw["available_node_types"][raw["head_node_type"]]["resources"] == {"CPU": 0}
    workers = [node for name, node in raw["available_node_types"].items() if name != raw["head_node_type"]]
    assert workers and all(node["node_config"]["InstanceType"].startswith(("g", "p")) for node in workers)
    assert raw["docker"]["image"].endswith("/docqa:0.1.0")
    # Token authentication on every node: the mode in every container, ray start under it, the token file.
    assert "--env RAY_AUTH_MODE=token" in raw["docker"]["run_options"]
    for command in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]:
        assert "ray start" not in command or "RAY_AUTH_MODE=token ray start" in command
    assert raw["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["head"]["unknown_field"] = 1
    with pytest.raises(Exception, match="unknown_field"):
        validate_config(prepare_config(broken))


def test_dockerfile_builds_on_the_ray_gpu_image() -> None:
    dockerfile = (ROOT / "infra/Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:2\.60\.0-py311-gpu$", dockerfile, re.M)
    assert "poppler-utils" in dockerfile
    assert "pip install --no-cache-dir --require-hashes --no-deps -r /tmp/image-lock.txt" in dockerfile


def test_the_image_installs_the_lock_less_its_cpu_torch(tmp_path: Path) -> None:
    """The Dockerfile's own filter, run on the committed lock: every pin but torch survives, hashes included."""
    dockerfile = (ROOT / "infra/Dockerfile").read_text()
    command = re.search(r"(awk .*?) > /tmp/image-lock.txt", dockerfile).group(1)
    lock = (ROOT / "requirements-lock.txt").read_text()
    image_lock = subprocess.run(command, shell=True, cwd=ROOT, check=True, capture_output=True, text=True).stdout

    def pins(text: str) -> dict[str, str]:
        return dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+) \\$", text, re.M))

    locked, image = pins(lock), pins(image_lock)
    assert locked["torch"].endswith("+cpu") and "torch" not in image
    assert image == {name: version for name, version in locked.items() if name != "torch"}
    assert {"bitsandbytes", "transformers", "ray"} <= set(image)
    torch_entry = re.search(r"^torch==.*?(?=^\S)", lock, re.M | re.S).group(0)
    assert image_lock.count("--hash=sha256:") == lock.count("--hash=sha256:") - torch_entry.count("--hash=sha256:")


def test_submit_ships_exactly_our_packages_and_the_config(tmp_path: Path) -> None:
    """The job's working_dir holds pipeline/, actors/, jobs/ and job.yaml, and every docqa module a job
    imports comes from it: a package missing there would be imported from this checkout instead (the
    editable install), which is not on a cluster, and this test would fail."""
    from jobs.submit import stage_working_dir
    from pipeline.config_loading import load_config

    job = tmp_path / "job.yaml"
    job.write_text("input: s3://in/\noutput: s3://out/\nquestions: [{id: q, text: 'Total?'}]\n")
    config = load_config(job)
    staging = stage_working_dir(config)
    try:
        assert sorted(path.name for path in staging.iterdir()) == ["actors", "job.yaml", "jobs", "pipeline"]
        assert load_config(staging / "job.yaml") == config
        modules = sorted(
            ".".join(path.relative_to(staging).with_suffix("").parts).removesuffix(".__init__")
            for path in staging.rglob("*.py")
        )
        assert {"jobs.cli", "jobs.run", "pipeline.writing", "pipeline.tables", "actors.answering"} <= set(modules)
        check = (
            "import importlib, os, sys\n"
            "outside = [m for m in sys.argv[1:] if not importlib.import_module(m).__file__.startswith(os.getcwd())]\n"
            "print(outside)\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", check, *modules], cwd=staging, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip() == "[]"
    finally:
        shutil.rmtree(staging)


def test_each_decision_is_taken_in_one_place_and_only_the_decoder_and_the_adapter_are_long() -> None:
    """The structure's rules (docs/development.md), as bench.structure measures them: a decision the code
    takes again elsewhere, or a module grown past 400 lines that is not one long thing, fails here."""
    from bench.structure import decisions, long_files

    assert {decision: places for decision, places in decisions().items() if len(places) > 1} == {}
    assert {name.split(" ")[0] for name in long_files()} <= {"actors/adapters.py", "actors/decoding.py"}
