"""A compromised render helper reaches nothing: a helper started exactly as the real one is (the same
bubblewrap confinement, environment and descriptors, and the same ``confine`` before anything else), running
attacker code where the serve loop would run, as a parser taken over by a crafted file would. Every escape
fails, and what it sends back is never executed. Then the same attack without the confinement, to show that
each attempt would have succeeded: the test can fail."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import confinement as confinement_module
from pipeline.records import DocumentError, Status
from pipeline.sandbox import RenderSandbox

ROOT = Path(__file__).resolve().parents[1]
ATTACK = r"""
import errno, json, os, signal, socket, sys
from pipeline.helper_protocol import write_frame
from pipeline.render_helper import confine

targets = json.loads(TARGETS)
confine(MEMORY, False)
results = {}


def attempt(name, action):
    try:
        action()
        results[name] = "succeeded"
    except OSError as error:
        results[name] = "blocked: " + errno.errorcode.get(error.errno, str(error.errno))
    except Exception as error:
        results[name] = "blocked: " + type(error).__name__


def read(path):
    with open(path, "rb") as handle:
        handle.read()


def write(path):
    with open(path, "w") as handle:
        handle.write("import os  # planted by a compromised parser\n")


def connect_tcp():
    with socket.create_connection(("127.0.0.1", targets["tcp_port"]), timeout=2):
        pass


def send_udp():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.sendto(b"x", ("127.0.0.1", targets["udp_port"]))


def connect_unix(address):
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(2)
        client.connect(address)


def fork_many():
    children = []
    for _ in range(1000):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        children.append(pid)


def fill_disk():
    chunk = b"\0" * (64 << 20)
    with open("/tmp/filler", "wb") as handle:
        for _ in range(160):  # 10 GiB
            handle.write(chunk)


attempt("read the worker's environment", lambda: read(f"/proc/{targets['worker']}/environ"))
attempt("read the planted AWS credentials", lambda: read(targets["aws_credentials"]))
attempt("read the planted Ray token", lambda: read(targets["ray_token"]))
attempt("write into the project's code", lambda: write(targets["code"]))
attempt("exec /bin/sh", lambda: os.execv("/bin/sh", ["sh", "-c", "true"]))
attempt("kill the worker", lambda: os.kill(targets["worker"], signal.SIGKILL))
attempt("kill every process", lambda: os.kill(-1, 0))
attempt("connect over TCP", connect_tcp)
attempt("send over UDP", send_udp)
attempt("connect to a Unix socket", lambda: connect_unix(targets["unix_socket"]))
attempt("connect to an abstract Unix socket", lambda: connect_unix(targets["abstract_socket"]))
attempt("fork 1000 processes", fork_many)
attempt("write 10 GB", fill_disk)
write_frame(WRITE_FD, {"ok": True, "value": results})
"""
ESCAPES = [
    "read the worker's environment",
    "read the planted AWS credentials",
    "read the planted Ray token",
    "write into the project's code",
    "exec /bin/sh",
    "kill the worker",
    "kill every process",
    "connect over TCP",
    "send over UDP",
    "connect to a Unix socket",
    "connect to an abstract Unix socket",
    "fork 1000 processes",
    "write 10 GB",
]


class AttackedSandbox(RenderSandbox):
    """The real sandbox, whose helper runs ``payload`` (with TARGETS, MEMORY, WRITE_FD filled in) instead of
    the serve loop, after the same start-up and the same ``confine``."""

    def __init__(self, payload: str, targets: dict, isolation: str = "strict") -> None:
        self.payload, self.targets = payload, targets
        super().__init__(1024, "pymupdf", isolation)

    def helper_code(self, read_fd: int, write_fd: int, pixels_fd: int) -> str:
        values = {
            "TARGETS": repr(json.dumps(self.targets)),
            "MEMORY": str(self.memory_bytes),
            "WRITE_FD": str(write_fd),
        }
        code = self.payload
        for name, value in values.items():
            code = code.replace(name, value)
        return code


@pytest.fixture
def targets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """What an attacker would go for: this process (the worker), planted credentials and a Ray token, the
    project's own code, a TCP and a UDP listener, a Unix socket on disk and an abstract one."""
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text("[default]\naws_secret_access_key = planted-secret\n")
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text("planted-ray-token")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "worker-secret-in-its-environment")
    tcp = socket.create_server(("127.0.0.1", 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(0.5)
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(tmp_path / "worker.sock"))
    unix.listen()
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(f"\0docqa-test-{os.getpid()}")
    abstract.listen()
    planted = ROOT / "pipeline" / "planted_by_the_attack.py"
    yield (
        {
            "worker": os.getpid(),
            "aws_credentials": str(home / ".aws" / "credentials"),
            "ray_token": str(home / ".ray" / "auth_token"),
            "code": str(planted),
            "tcp_port": tcp.getsockname()[1],
            "udp_port": udp.getsockname()[1],
            "unix_socket": str(tmp_path / "worker.sock"),
            "abstract_socket": f"\0docqa-test-{os.getpid()}",
        },
        (tcp, udp, unix, abstract),
    )
    planted.unlink(missing_ok=True)
    for listener in (tcp, udp, unix, abstract):
        listener.close()


def _nothing_arrived(listeners) -> bool:
    tcp, udp, unix, abstract = listeners
    for listener in (tcp, unix, abstract):
        listener.settimeout(0.3)
        try:
            listener.accept()[0].close()
            return False
        except TimeoutError:
            pass
    try:
        udp.recvfrom(16)
        return False
    except TimeoutError:
        return True


def test_a_compromised_helper_reaches_nothing(targets) -> None:
    aimed, listeners = targets
    sandbox = AttackedSandbox(ATTACK, aimed)
    try:
        results = {name: sandbox.isolation[name] for name in ESCAPES}
    finally:
        os.killpg(sandbox.process_id, signal.SIGKILL)
    assert {name for name, result in results.items() if not result.startswith("blocked")} == set(), results
    assert not Path(aimed["code"]).exists()
    assert _nothing_arrived(listeners)


def test_without_the_confinement_the_same_attack_gets_through(targets, monkeypatch: pytest.MonkeyPatch) -> None:
    """The confinement broken on purpose (no bubblewrap, no seccomp): the attempts succeed, so the test above
    can fail. (The worker here is a sacrificial process, and the code written a file in a scratch folder.)"""
    aimed, _ = targets
    victim = subprocess.Popen(["sleep", "60"])
    scratch = Path(aimed["unix_socket"]).parent / "code.py"
    aimed = {**aimed, "worker": victim.pid, "code": str(scratch)}
    monkeypatch.setattr(confinement_module, "unavailable", lambda: "broken on purpose by the test")
    unconfined = (
        ATTACK.replace("confine(MEMORY, False)", "pass  # no confinement")
        # exec in a child (an exec of the helper itself would end the attack), and no 10 GB on this disk
        .replace('os.execv("/bin/sh", ["sh", "-c", "true"])', '__import__("subprocess").run(["/bin/sh", "-c", "true"])')
        .replace("range(160):  # 10 GiB", "range(1):  # 64 MiB")
    )
    sandbox = AttackedSandbox(unconfined, aimed, isolation="best_effort")
    try:
        results = {name: sandbox.isolation[name] for name in ESCAPES}
    finally:
        os.killpg(sandbox.process_id, signal.SIGKILL)
        victim.kill()
    succeeded = {name for name, result in results.items() if result == "succeeded"}
    assert succeeded >= {
        "read the worker's environment",
        "read the planted AWS credentials",
        "read the planted Ray token",
        "write into the project's code",
        "kill the worker",
        "connect over TCP",
        "send over UDP",
        "connect to a Unix socket",
        "connect to an abstract Unix socket",
        "fork 1000 processes",
        "exec /bin/sh",
    }, results
    assert scratch.exists()


MALICIOUS_PICKLE = r"""
import os, pickle, struct
from pipeline.render_helper import confine


class Payload:
    def __reduce__(self):
        return (os.system, ("touch MARKER",))


confine(MEMORY, False)
os.write(WRITE_FD, pickle.dumps(("ok", Payload())))
"""
OVERSIZED_HEADER = r"""
import os, struct
from pipeline.render_helper import confine

confine(MEMORY, False)
os.write(WRITE_FD, struct.pack(">I", 4_000_000_000) + b"\x80" * 64)
"""
TRUNCATED = r"""
import os, struct, time
from pipeline.render_helper import confine

confine(MEMORY, False)
os.write(WRITE_FD, struct.pack(">I", 1000) + b"\x81\xa2ok")
time.sleep(600)
"""


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (MALICIOUS_PICKLE, "broke the protocol"),
        (OVERSIZED_HEADER, "over the"),
        (TRUNCATED, "did not start within"),
    ],
    ids=["malicious pickle", "oversized header", "truncated message"],
)
def test_what_a_compromised_helper_sends_is_refused_and_never_run(
    payload: str, reason: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "executed"
    monkeypatch.setattr("pipeline.sandbox.START_TIMEOUT_S", 3.0)  # the truncated message's deadline comes sooner
    with pytest.raises(DocumentError) as caught:
        AttackedSandbox(payload.replace("MARKER", str(marker)), {})
    assert caught.value.status == Status.RENDER_ERROR and reason in caught.value.reason, caught.value.reason
    assert not marker.exists()


WORKER = """
import sys, time
from pipeline.sandbox import RenderSandbox

sandbox = RenderSandbox(1024)
print(sandbox.helper_pid, flush=True)
time.sleep(600)
"""


def test_the_helper_does_not_outlive_its_worker() -> None:
    worker = subprocess.Popen([sys.executable, "-c", WORKER], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    helper = int(worker.stdout.readline())
    assert Path(f"/proc/{helper}").exists()
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{helper}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{helper}").exists()


def test_strict_isolation_refuses_where_it_cannot_confine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(confinement_module, "unavailable", lambda: "bubblewrap (bwrap) is not installed")
    with pytest.raises(DocumentError) as caught:
        RenderSandbox(1024, "pymupdf", "strict")
    assert caught.value.status == Status.RENDER_ERROR
    assert "render.isolation=strict" in caught.value.reason and "apt-get install bubblewrap" in caught.value.reason
    assert "KubeRay" in caught.value.reason and "best_effort" in caught.value.reason
