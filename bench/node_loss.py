"""A run that loses a node: a two-node Ray cluster on loopback (Ray's own ``cluster_utils.Cluster``: a
head and a worker raylet on this machine, token authentication as configured), `docqa run` as a separate
driver, and ``kill -9`` of the worker's raylet while the run is under way.

Two topologies; in both a tenant actor holds the head's CPUs at the start, so that a model actor starts
on the worker. In ``starved`` it is let go once that actor is up; in ``survives`` it is let go at the kill,
so that until then the worker carries the whole run (its model actor and its render tasks), and a render
task is lost with the node for sure, however fast the machine:

- ``survives``: head 3 CPUs, worker 2 CPUs, one model actor. Expected: Ray restarts the actor on the head
  and re-runs the lost render task, the run completes, every document exactly once.
- ``starved``: head 2 CPUs, worker 2 CPUs, ``actors.min_actors`` = ``max_actors`` = 2 (the CPU check
  passes: 4 CPUs, 2 for actors). Were both actors restarted on the head, they would hold its 2 CPUs and no
  render task could run. The pool's floor is one actor (jobs/run.py) and Ray Data's resource allocator
  and autoscaler let an actor go that the live cluster cannot afford, so the run is expected to complete,
  every document exactly once. Had the pool not shrunk, the stall watchdog would end the run with exit
  code 1 and what is pending; then the same run id is run again on a healthy cluster, and must complete.

The raylet is killed once the run has committed its first documents (``--kill-after-documents``) and a
model actor runs on the worker, and in ``survives`` while a render task runs there too, so most of the
work is still to do on the node that is left.

    python -m bench.node_loss [--documents 60] [--kill-after-documents 1] [--stall-timeout-s 45]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

QUESTIONS = [{"id": "total", "text": "Total?", "pages": "all", "max_new_tokens": 2}]


def _node_of_actors(class_part: str) -> list[str]:
    from ray._private.state import actors

    return [
        info["Address"]["NodeID"]
        for info in actors().values()
        if class_part in info["ActorClassName"] and info["State"] == "ALIVE"
    ]


def run_topology(name: str, workdir: Path, inputs: Path, model: Path, args: argparse.Namespace) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from jobs.devtools.samples import write_job
    from pipeline.tables import committed_runs, read_answers, read_current

    head_cpus, worker_cpus, actors = (3, 2, 1) if name == "survives" else (2, 2, 2)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=worker_cpus)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    # The head's CPUs are held at the start, so that the first placements (a model actor) go to the worker.
    tenant = (
        ray.remote(num_cpus=head_cpus)(_Tenant)
        .options(
            scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                ray.get_runtime_context().get_node_id(), soft=False
            )
        )
        .remote()
    )
    ray.get(tenant.ready.remote())
    run_dir = workdir / name
    run_dir.mkdir()
    job = write_job(
        run_dir,
        inputs,
        model,
        QUESTIONS,
        render={"image_splitting": False},
        actors={"min_actors": actors, "max_actors": actors},
        # The survivor keeps the default: a short limit there could end a run that is only slow to start.
        limits={"stall_timeout_s": args.stall_timeout_s if name == "starved" else 900},
        commit_interval_s=2,
    )
    environment = {**os.environ, "RAY_ADDRESS": cluster.address}
    command = [sys.executable, "-m", "jobs.cli", "run", "--config", str(job), "--run-id", name]
    started = time.monotonic()
    driver = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    worker_id = worker.node_id
    placement = {}
    pool_sizes = _PoolSizes(driver)
    pool_sizes.start()
    deadline = time.monotonic() + 120  # until a model actor is up (on the worker: the only CPUs free), then let go
    while not _node_of_actors("AnswerPages") and time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.2)
    if name == "starved":  # two actors asked for: the worker alone cannot also run a render task
        ray.kill(tenant)
    output = str(run_dir / "out")
    raylet = worker.all_processes["raylet"][0].process
    deadline = time.monotonic() + 300
    while not _ready_to_kill(name, output, raylet.pid, worker_id, args) and time.monotonic() < deadline:
        if driver.poll() is not None:
            break
        time.sleep(0.2)
    placement["model actors on the worker at the kill"] = _node_of_actors("AnswerPages").count(worker_id)
    placement["model actors alive at the kill"] = len(_node_of_actors("AnswerPages"))
    placement["render tasks on the worker at the kill"] = _render_tasks_under(raylet.pid)
    placement["documents committed at the kill"] = _committed_documents(output, name)
    if name == "survives":
        ray.kill(tenant)
    os.kill(raylet.pid, signal.SIGKILL)  # kill -9 of the worker's raylet
    killed_at = time.monotonic() - started
    pool_sizes.mark_kill()
    try:
        out, err = driver.communicate(timeout=args.stall_timeout_s * 4 + 300)
    except subprocess.TimeoutExpired:
        driver.kill()
        out, err = driver.communicate()
        err += "\n(bench: the driver had to be killed: a HANG)"
    wall = time.monotonic() - started
    pool_sizes.join()
    placement["model actors alive before the kill (sampled)"] = pool_sizes.distinct(before_kill=True)
    placement["model actors alive after the kill (sampled)"] = pool_sizes.distinct(before_kill=False)
    result = {
        "topology": f"head {head_cpus} CPUs + worker {worker_cpus} CPUs, {actors} model actor(s)",
        **placement,
        "worker raylet killed at (s)": round(killed_at, 1),
        "exit code": driver.returncode,
        "wall time (s)": round(wall, 1),
        "message": _message(driver.returncode, out, err),
    }
    ray.shutdown()
    if name == "starved" and driver.returncode == 1:  # the cluster healed (a fresh one): the same run id resumes
        cluster.shutdown()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        environment = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
        again = subprocess.run(
            [*command[:-2], "--run-id", name, "--set", "actors.max_actors=1", "--set", "actors.min_actors=1"],
            env=environment,
            capture_output=True,
            text=True,
            timeout=600,
        )
        result["rerun exit code"] = again.returncode
        ray.shutdown()
    else:
        cluster.shutdown()
    rows = read_answers(output, name)
    keys = Counter(tuple(row.values()) for row in rows.select(["document", "page_number", "question_id"]).to_pylist())
    listed = {str(path) for path in inputs.iterdir()}
    result.update(
        {
            "documents in the run's rows": len({row[0] for row in keys}),
            "documents listed": len(listed),
            "duplicates": sum(n - 1 for n in keys.values()),
            "missing documents": len(listed - {row[0] for row in keys}),
            "statuses": dict(Counter(rows.column("status").to_pylist())),
            "current rows": read_current(output).num_rows,
            "runs committed": [record["run_id"] for record in committed_runs(output)],
        }
    )
    return result


def _ready_to_kill(name: str, output: str, raylet_pid: int, worker_id: str, args: argparse.Namespace) -> bool:
    """Whether the moment to kill has come: the run has committed its first documents, a model actor runs
    on the worker, and in ``survives`` a render task too (a task is lost with the node, not only an actor)."""
    if _committed_documents(output, name) < args.kill_after_documents:
        return False
    if worker_id not in _node_of_actors("AnswerPages"):
        return False
    return name != "survives" or _render_tasks_under(raylet_pid) > 0


def _render_tasks_under(raylet_pid: int) -> int:
    """Ray workers of the node whose raylet this is that run a render task now (Ray sets a busy worker's
    process title to ``ray::`` and its task's name)."""
    import psutil

    try:
        workers = psutil.Process(raylet_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    running = 0
    for worker in workers:
        try:
            running += "RenderPages" in " ".join(worker.cmdline())
        except psutil.Error:
            continue
    return running


def _committed_documents(output: str, run_id: str) -> int:
    from pipeline.tables import read_answers

    return len(set(read_answers(output, run_id, columns=["document"]).column("document").to_pylist()))


def _message(code: int, out: str, err: str) -> str:
    """The summary's first line, or the error docqa printed (its lines from 'docqa: ' on)."""
    if code in (0, 3):
        return next((line for line in out.splitlines() if line.startswith("run ")), "")
    start = err.rfind("docqa: ")
    return err[start:].strip() if start >= 0 else err.strip()[-500:]


class _PoolSizes(threading.Thread):
    """The number of live model actors, sampled every half second while the driver runs: shows whether
    the pool shrank, before and after the node loss."""

    def __init__(self, driver: subprocess.Popen) -> None:
        super().__init__(daemon=True)
        self.driver = driver
        self.sizes: list[int] = []
        self.killed_at_sample: int | None = None

    def run(self) -> None:
        while self.driver.poll() is None:
            self.sizes.append(len(_node_of_actors("AnswerPages")))
            time.sleep(0.5)

    def mark_kill(self) -> None:
        self.killed_at_sample = len(self.sizes)

    def distinct(self, before_kill: bool) -> list[int]:
        """The sizes in the order they were first seen, before or after the kill."""
        sizes = self.sizes[: self.killed_at_sample] if before_kill else self.sizes[self.killed_at_sample :]
        return list(dict.fromkeys(sizes))


class _Tenant:
    def ready(self) -> bool:
        return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=60)
    parser.add_argument(
        "--kill-after-documents", type=int, default=1, help="kill the raylet once the run committed this many"
    )
    parser.add_argument("--stall-timeout-s", type=float, default=45.0, help="limits.stall_timeout_s of the starved run")
    parser.add_argument("--only", choices=["survives", "starved"])
    args = parser.parse_args()

    from jobs.devtools.samples import write_samples
    from jobs.devtools.tiny_models import build_tiny_idefics2

    workdir = Path(tempfile.mkdtemp(prefix="docqa-node-loss-"))
    inputs = workdir / "pdfs"
    write_samples(inputs, count=args.documents, with_bad_files=False)
    model = build_tiny_idefics2(workdir / "tiny")
    print("# bench.node_loss  kill -9 of a worker raylet mid-run, two nodes on loopback", flush=True)
    for name in [args.only] if args.only else ["survives", "starved"]:
        result = run_topology(name, workdir, inputs, model, args)
        print(f"## {name}", flush=True)
        for key, value in result.items():
            print(f"{key}: {value}", flush=True)
        print(f"RESULT {json.dumps({'name': name, **result})}", flush=True)


if __name__ == "__main__":
    main()
