"""A compromised render helper reaches nothing: a helper started exactly as the real one is (the same
bubblewrap confinement, environment and descriptors, and the same ``confine`` before anything else), running
attacker code where the serve loop would run, as a parser taken over by a crafted file would. Every escape
fails, and what it sends back, at start-up or later, is never executed. Then the same attack without the
confinement, to show that each attempt would have succeeded: the tests can fail. And where the helper cannot
be confined (no bubblewrap, a seccomp filter that does not load), ``render.isolation: strict`` refuses."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.cli import main
from jobs.devtools.samples import invoice_pdf, write_job
from pipeline import confinement as confinement_module
from pipeline import sandbox as sandbox_module
from pipeline.confinement import IsolationUnavailable
from pipeline.records import DocumentError, Status
from pipeline.sandbox import RenderSandbox

ROOT = Path(__file__).resolve().parents[1]
ATTACK = r"""
import ctypes, errno, json, os, signal, socket, subprocess, sys, time
from pipeline.helper_protocol import write_frame
from pipeline.render_helper import confine

targets = json.loads(TARGETS)
results = confine(MEMORY, EXEC_ALLOWED)  # what is in force, then each attempt's result
libc = ctypes.CDLL(None, use_errno=True)
BPF = {"x86_64": 321, "aarch64": 280}[os.uname().machine]  # bpf(2) has no libc wrapper


def attempt(name, action):
    try:
        action()
        results[name] = "succeeded"
    except OSError as error:
        results[name] = "blocked: " + errno.errorcode.get(error.errno, str(error.errno))
    except Exception as error:
        results[name] = "blocked: " + type(error).__name__


def checked(value):
    if value == -1:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def read(path):
    with open(path, "rb") as handle:
        handle.read()


def write(path):
    with open(path, "w") as handle:
        handle.write("import os  # planted by a compromised parser\n")


def exec_shell():
    if EXEC_ALLOWED:  # the exec would replace the helper, and end the attack: in a child
        subprocess.run(["/bin/sh", "-c", "true"], check=True)
    else:
        os.execv("/bin/sh", ["sh", "-c", "true"])


def signal_everyone():
    os.kill(-1, signal.SIGWINCH)
    for _ in range(500):  # where it got through: until the worker took it, before it is traced below
        if os.path.exists(targets["signalled"]):
            break
        time.sleep(0.01)


def signal_own_child():
    ready, tell = os.pipe()
    child = os.fork()
    if child == 0:
        signal.signal(signal.SIGWINCH, lambda *_: os._exit(7))
        os.write(tell, b"r")
        while True:
            signal.pause()
    os.read(ready, 1)
    os.kill(-1, signal.SIGWINCH)
    if os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) != 7:
        raise RuntimeError("the child never got the signal")


def ptrace_worker():
    checked(libc.ptrace(16, targets["worker"], None, None))  # PTRACE_ATTACH
    os.waitpid(targets["worker"], 0x40000000)  # __WALL: until it stops
    checked(libc.ptrace(17, targets["worker"], None, None))  # PTRACE_DETACH


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
    for _ in range(1000):
        if os.fork() == 0:
            os._exit(0)


def fill_disk():
    chunk, path = b"\0" * (64 << 20), os.path.join(os.environ["TMPDIR"], "filler")
    try:
        with open(path, "wb") as handle:
            for _ in range(160):  # 10 GiB
                handle.write(chunk)
    finally:
        os.unlink(path)


attempt("signal every process (kill -1)", signal_everyone)
attempt("signal its own child through kill -1", signal_own_child)
attempt("read the worker's environment", lambda: read(f"/proc/{targets['worker']}/environ"))
attempt("read the planted AWS credentials", lambda: read(targets["aws_credentials"]))
attempt("read the planted Ray token", lambda: read(targets["ray_token"]))
attempt("write into the project's code", lambda: write(targets["code"]))
attempt("exec /bin/sh", exec_shell)
attempt("read another process's memory", lambda: checked(libc.process_vm_readv(os.getpid(), None, 0, None, 0, 0)))
attempt("mount", lambda: checked(libc.mount(None, None, None, 0, None)))
attempt("bpf", lambda: checked(libc.syscall(BPF, 0x7FFFFFFF, None, 0)))
attempt("connect over TCP", connect_tcp)
attempt("send over UDP", send_udp)
attempt("connect to a Unix socket", lambda: connect_unix(targets["unix_socket"]))
attempt("connect to an abstract Unix socket", lambda: connect_unix(targets["abstract_socket"]))
attempt("ptrace the worker", ptrace_worker)  # after the signals: a traced worker would not run its handler
attempt("kill the worker", lambda: os.kill(targets["worker"], signal.SIGKILL))
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
    "ptrace the worker",
    "read another process's memory",
    "mount",
    "bpf",
    "signal every process (kill -1)",
    "signal its own child through kill -1",
    "kill the worker",
    "connect over TCP",
    "send over UDP",
    "connect to a Unix socket",
    "connect to an abstract Unix socket",
    "fork 1000 processes",
    "write 10 GB",
]
SECCOMP_REFUSED = ["ptrace the worker", "read another process's memory", "mount", "bpf"]  # refused: EPERM
# The worker's stand-in: an outside process with a secret in its environment, that notes a SIGWINCH.
VICTIM = """
import signal, sys, time
signal.signal(signal.SIGWINCH, lambda *_: open(sys.argv[1], "w").close())
print("ready", flush=True)
time.sleep(120)
"""


class AttackedSandbox(RenderSandbox):
    """The real sandbox, whose helper runs ``payload`` (with TARGETS, MEMORY, EXEC_ALLOWED, READ_FD and
    WRITE_FD filled in) instead of the serve loop, after the same start-up and the same ``confine``."""

    def __init__(self, payload: str, targets: dict, isolation: str = "strict", backend: str = "pymupdf") -> None:
        self.payload, self.targets = payload, targets
        super().__init__(1024, backend, isolation)

    def helper_code(self, read_fd: int, write_fd: int, pixels_fd: int) -> str:
        values = {
            "TARGETS": repr(json.dumps(self.targets)),
            "MEMORY": str(self.memory_bytes),
            "EXEC_ALLOWED": str(self.exec_allowed),
            "READ_FD": str(read_fd),
            "WRITE_FD": str(write_fd),
        }
        code = self.payload
        for name, value in values.items():
            code = code.replace(name, value)
        return code


def _stop(sandbox: RenderSandbox) -> None:
    os.killpg(sandbox.process_id, signal.SIGKILL)
    sandbox._process.wait(timeout=30)


@pytest.fixture
def targets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """What an attacker would go for: the worker (an outside process with a secret in its environment),
    planted credentials and a Ray token, the project's own code, a TCP and a UDP listener, a Unix socket on
    disk and an abstract one."""
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text("[default]\naws_secret_access_key = planted-secret\n")
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text("planted-ray-token")
    monkeypatch.setenv("HOME", str(home))
    signalled = tmp_path / "the worker got a signal"
    secret = {**os.environ, "AWS_SECRET_ACCESS_KEY": "worker-secret-in-its-environment"}
    victim = subprocess.Popen(
        [sys.executable, "-c", VICTIM, str(signalled)], env=secret, stdout=subprocess.PIPE, text=True
    )
    assert victim.stdout.readline() == "ready\n"
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
            "worker": victim.pid,
            "signalled": str(signalled),
            "aws_credentials": str(home / ".aws" / "credentials"),
            "ray_token": str(home / ".ray" / "auth_token"),
            "code": str(planted),
            "tcp_port": tcp.getsockname()[1],
            "udp_port": udp.getsockname()[1],
            "unix_socket": str(tmp_path / "worker.sock"),
            "abstract_socket": f"\0docqa-test-{os.getpid()}",
        },
        (tcp, udp, unix, abstract),
        victim,
    )
    planted.unlink(missing_ok=True)
    victim.kill()
    victim.wait()
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


@pytest.mark.parametrize("backend", ["pymupdf", "pdf2image"])
def test_a_compromised_helper_reaches_nothing(backend: str, targets) -> None:
    """The MuPDF helper (the default) is refused every attempt. The pdf2image helper must run poppler, so it
    keeps exec and fork, and kill(-1) reaches its own children; everything else holds for it too (nothing of
    the worker's, no network, no writes to the code, the seccomp refusals), and its processes live in its own
    PID namespace: the worker never gets the signal. Fork is capped by RLIMIT_NPROC only where the worker is
    not root (the kernel does not count processes against root's limit)."""
    aimed, listeners, victim = targets
    sandbox = AttackedSandbox(ATTACK, aimed, backend=backend)
    try:
        results = {name: sandbox.isolation[name] for name in ESCAPES}
    finally:
        _stop(sandbox)
    allowed = set()
    if backend == "pdf2image":
        allowed = {"exec /bin/sh", "signal its own child through kill -1"}
        allowed |= {"fork 1000 processes"} if os.getuid() == 0 else set()
    assert {name for name, result in results.items() if not result.startswith("blocked")} == allowed, results
    assert all(results[name] == "blocked: EPERM" for name in SECCOMP_REFUSED), results
    assert not Path(aimed["code"]).exists() and not Path(aimed["signalled"]).exists()
    assert victim.poll() is None
    assert _nothing_arrived(listeners)


def test_without_the_confinement_the_same_attack_gets_through(
    targets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The confinement broken on purpose (no bubblewrap: not on PATH; no ``confine``): the attempts succeed,
    so the test above can fail. (The worker is a sacrificial process, the code written is a file in a scratch
    folder, and the 10 GB are 576 MiB: past RLIMIT_FSIZE's 512 MiB, in the helper's private folder.)"""
    aimed, listeners, victim = targets
    scratch = tmp_path / "code.py"
    aimed = {**aimed, "code": str(scratch)}
    monkeypatch.setenv("PATH", str(tmp_path))  # bubblewrap is looked for on PATH
    confinement_module.unavailable.cache_clear()
    unconfined = ATTACK.replace("confine(MEMORY, EXEC_ALLOWED)", "{}  # no confinement")
    unconfined = unconfined.replace("range(160):  # 10 GiB", "range(9):  # 576 MiB")
    try:
        sandbox = AttackedSandbox(unconfined, aimed, isolation="best_effort", backend="pdf2image")
    finally:
        confinement_module.unavailable.cache_clear()
    try:
        results = {name: sandbox.isolation[name] for name in ESCAPES}
    finally:
        _stop(sandbox)
    succeeded = {name for name, result in results.items() if result == "succeeded"}
    assert succeeded >= set(ESCAPES) - {"mount", "bpf"}, results
    # mount and bpf fail here too, but on their arguments, not refused by a filter
    assert results["mount"] != "blocked: EPERM" and results["bpf"] != "blocked: EPERM", results
    assert scratch.exists() and Path(aimed["signalled"]).exists() and victim.wait(timeout=10) == -signal.SIGKILL
    assert not _nothing_arrived(listeners)


BEFORE_ANSWERS = r"""
import os, pickle, struct, time
from pipeline.helper_protocol import read_frame, write_frame
from pipeline.render_helper import confine, isolation_report


class Payload:
    def __reduce__(self):
        return (os.system, ("touch MARKER",))


confine(MEMORY, EXEC_ALLOWED)
"""
MALICIOUS_PICKLE = "os.write(WRITE_FD, pickle.dumps(('ok', Payload())))"
OVERSIZED_HEADER = 'os.write(WRITE_FD, struct.pack(">I", 4_000_000_000) + b"\\x80" * 64)'
TRUNCATED = 'os.write(WRITE_FD, struct.pack(">I", 1000) + b"\\x81\\xa2ok")'
HOSTILE_ANSWERS = [
    (MALICIOUS_PICKLE, "broke the protocol"),
    (OVERSIZED_HEADER, "over the"),
    (TRUNCATED, "a truncated message: 4 of 1000 bytes came by the deadline"),
]
HOSTILE_IDS = ["malicious pickle", "oversized header", "truncated message"]


@pytest.mark.parametrize(("answer", "reason"), HOSTILE_ANSWERS, ids=HOSTILE_IDS)
def test_what_a_compromised_helper_sends_at_start_up_is_refused_and_never_run(
    answer: str, reason: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "executed"
    monkeypatch.setattr("pipeline.sandbox.START_TIMEOUT_S", 1.5)  # the truncated message's deadline comes sooner
    payload = BEFORE_ANSWERS.replace("MARKER", str(marker)) + answer + "\ntime.sleep(600)\n"
    with pytest.raises(DocumentError) as caught:
        AttackedSandbox(payload, {})
    assert caught.value.status == Status.RENDER_ERROR and reason in caught.value.reason, caught.value.reason
    assert not marker.exists()


# After a true start-up report, the helper answers the request named OPERATION with ANSWER (an ``open``
# before a ``render`` is answered as a real helper would).
AFTER_START = r"""
write_frame(WRITE_FD, {"ok": True, "value": isolation_report(confined)})
while True:
    request = read_frame(READ_FD, time.monotonic() + 600, 1 << 30)
    if request["op"] == "open" and OPERATION != "open":
        write_frame(WRITE_FD, {"ok": True, "value": [1, False, "pdf"]})
        continue
    ANSWER
    time.sleep(600)
"""
WRONG_TYPE = {"open": '["1", False, "pdf"]', "render": '[100, "100", 3]'}


@pytest.mark.parametrize("operation", ["open", "render"])
@pytest.mark.parametrize(
    ("answer", "status", "reason"),
    [
        *[(answer, Status.RENDER_ERROR, reason) for answer, reason in HOSTILE_ANSWERS],
        ('write_frame(WRITE_FD, {"ok": True, "value": WRONG})', Status.RENDER_ERROR, "is not an integer"),
        ("pass  # silence", Status.TIMEOUT, "did not finish within the document's time limit"),
    ],
    ids=[*HOSTILE_IDS, "a field of the wrong type", "no answer"],
)
def test_what_a_compromised_helper_answers_later_is_that_documents_render_error(
    operation: str, answer: str, status: Status, reason: str, tmp_path: Path
) -> None:
    """Every hostile answer makes the document ``render_error`` and the helper is replaced; nothing it sent is
    run. Only a helper that sends nothing at all by the deadline makes it ``timeout`` (a slow page looks the
    same)."""
    marker = tmp_path / "executed"
    answer = answer.replace("WRONG", WRONG_TYPE[operation])
    before = BEFORE_ANSWERS.replace("confine(", "confined = confine(").replace("MARKER", str(marker))
    payload = before + AFTER_START.replace("OPERATION", repr(operation)).replace("ANSWER", answer)
    sandbox = AttackedSandbox(payload, {})
    first = sandbox.process_id
    deadline = time.monotonic() + 1
    try:
        with pytest.raises(DocumentError) as caught:
            sandbox.call("open", (invoice_pdf(1, 1, (612, 792)), "pymupdf", []), deadline)
            sandbox.call("render", (1, 448), deadline)
        assert caught.value.status == status and reason in caught.value.reason, caught.value.reason
        assert f"{operation} " in caught.value.reason
        assert sandbox.process_id != first and sandbox._process.poll() is None  # replaced: the next document's
    finally:
        _stop(sandbox)
    assert not marker.exists()


OUTLIVE = r"""
import os, signal, time
from pipeline.helper_protocol import write_frame
from pipeline.render_helper import confine

tried = confine(MEMORY, EXEC_ALLOWED)
for name in ("SIGTERM", "SIGHUP", "SIGINT"):
    signal.signal(getattr(signal, name), signal.SIG_IGN)
for name, action in (("setsid", os.setsid), ("fork", os.fork)):
    try:
        if action() == 0:  # the child: out of the session, deaf to the same signals, and waiting
            os.setsid()
            time.sleep(600)
        tried[name] = "succeeded"
    except OSError as error:
        tried[name] = f"blocked: {error.strerror}"
write_frame(WRITE_FD, {"ok": True, "value": tried})
time.sleep(600)
"""
WORKER = """
import sys, time
from tests.test_isolation import OUTLIVE, AttackedSandbox

sandbox = AttackedSandbox(OUTLIVE, {}, backend=sys.argv[1])
print(sandbox.isolation["fork"], flush=True)
time.sleep(600)
"""


def _descendants(pid: int) -> set[int]:
    found, pending = set(), [pid]
    while pending:
        for task in Path(f"/proc/{pending.pop()}/task").glob("*"):
            try:
                children = {int(child) for child in (task / "children").read_text().split()}
            except OSError:
                continue
            pending += children - found
            found |= children
    return found


@pytest.mark.parametrize("backend", ["pymupdf", "pdf2image"])
def test_the_helper_does_not_outlive_its_worker(backend: str) -> None:
    """Attacker code that ignores SIGTERM, SIGHUP and SIGINT, tries to leave its session and (pdf2image, where
    fork is allowed) starts a child in a session of its own: all of it ends when its worker is SIGKILLed."""
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER, backend], cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    forked = worker.stdout.readline().strip()
    assert forked == ("succeeded" if backend == "pdf2image" else "blocked: Operation not permitted")
    left = _descendants(worker.pid)  # bubblewrap, the helper, and its child if it could fork
    assert len(left) >= (4 if backend == "pdf2image" else 3), left
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in left) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in left if Path(f"/proc/{pid}").exists()]


BROKEN_SECCOMP = "import sys\nsys.modules['pyseccomp'] = None  # as where libseccomp is missing: its import fails\n"


class BrokenSeccompSandbox(RenderSandbox):
    """The real helper (the same start-up, ``confine`` and serve loop) where its seccomp filter cannot load."""

    def helper_code(self, read_fd: int, write_fd: int, pixels_fd: int) -> str:
        return BROKEN_SECCOMP + super().helper_code(read_fd, write_fd, pixels_fd)


def test_strict_isolation_refuses_a_helper_whose_seccomp_filter_did_not_load() -> None:
    before = _descendants(os.getpid())
    with pytest.raises(IsolationUnavailable) as caught:
        BrokenSeccompSandbox(1024, "pymupdf", "strict")
    assert caught.value.status == Status.RENDER_ERROR  # what a document meeting it becomes
    reason = caught.value.reason
    assert "render.isolation=strict" in reason and "seccomp filter: none: the filter could not be loaded" in reason
    assert "libseccomp" in reason and "KubeRay" in reason and "best_effort" in reason
    assert _descendants(os.getpid()) <= before  # the unfiltered helper was killed


@pytest.fixture
def without_bubblewrap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A machine without bubblewrap: a PATH where ``bwrap`` is not found (it is looked for on PATH)."""
    monkeypatch.setenv("PATH", str(tmp_path / "no-bwrap-here"))
    confinement_module.unavailable.cache_clear()
    yield
    confinement_module.unavailable.cache_clear()


@pytest.mark.parametrize("missing", ["seccomp", "bubblewrap"])
def test_best_effort_renders_with_what_is_there_and_says_so_once(
    missing: str, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    if missing == "bubblewrap":
        request.getfixturevalue("without_bubblewrap")
    kind = BrokenSeccompSandbox if missing == "seccomp" else RenderSandbox
    sandbox_module._log_reduced_isolation.cache_clear()
    caplog.set_level(logging.WARNING, logger="pipeline.sandbox")
    helpers = [kind(1024, "pymupdf", "best_effort") for _ in range(2)]
    try:
        for helper in helpers:
            helper.call("open", (invoice_pdf(1, 1, (612, 792)), "pymupdf", []), time.monotonic() + 30)
            height, width, _ = helper.call("render", (1, 448), time.monotonic() + 30)
            assert max(height, width) == 448 and helper.pixels[: height * width * 3].min() < 255
        seccomp = Path(f"/proc/{helpers[0].helper_pid}/status").read_text()
        expected = "none: bubblewrap (bwrap) is not installed (render.isolation=best_effort)"
        if missing == "seccomp":
            assert "Seccomp:\t0" in seccomp and helpers[0].isolation["seccomp"].startswith("none: the filter could")
            expected = "none: the filter could not be loaded (ModuleNotFoundError: import of pyseccomp"
        assert expected in helpers[0].summary and helpers[0].summary == helpers[1].summary
    finally:
        for helper in helpers:
            _stop(helper)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert warnings == [f"render isolation reduced (render.isolation=best_effort): {helpers[0].summary}"]


@pytest.mark.parametrize("missing", ["seccomp", "bubblewrap"])
def test_docqa_run_refuses_to_start_where_strict_isolation_cannot_be_met(
    missing: str,
    tiny_model: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """Exit 2 before any work, naming what is missing, the setting and how to enable it on a KubeRay pod.
    Without bubblewrap: a PATH where it is not found. Without seccomp: the run's helper starts with the
    filter's library made unimportable (the hook AttackedSandbox uses)."""
    documents = tmp_path / "in"
    documents.mkdir()
    (documents / "invoice.pdf").write_bytes(invoice_pdf(1, 1, (612, 792)))
    job = write_job(tmp_path, documents, tiny_model, [{"id": "total", "text": "Total?", "pages": "last"}])
    if missing == "bubblewrap":
        request.getfixturevalue("without_bubblewrap")
        named = "bubblewrap (bwrap) is not installed"
    else:
        real = RenderSandbox.helper_code
        monkeypatch.setattr(RenderSandbox, "helper_code", lambda self, *fds: BROKEN_SECCOMP + real(self, *fds))
        named = "the helper's seccomp filter: none: the filter could not be loaded"
    assert main(["run", "--config", str(job)]) == 2
    err = capsys.readouterr().err
    assert named in err and "render.isolation=strict" in err and "KubeRay" in err and "best_effort" in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
