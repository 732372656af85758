"""How a render helper is confined, on the worker's side: the bubblewrap command it is started under, and
whether this machine allows it (pipeline/render_helper.py adds what a process does to itself: seccomp,
resource limits, no new privileges, death with its parent).

bubblewrap (Debian's ``bubblewrap``, what Flatpak uses) rather than ``unshare`` and mounts of our own: one
small, audited program that, in one exec and without privileges, gives the helper its own user, PID,
network, IPC, UTS and cgroup namespaces, a new root holding only read-only binds of what the interpreter
needs (/usr, the Python installation, the virtual environment, docqa's ``pipeline`` package) and a private
size-capped tmpfs, and kills the sandbox when its parent dies. Done by hand with unshare(2), mount(2) and
pivot_root(2), each step would be ours to get right.

``render.isolation``: ``strict`` (the default) refuses to render where the helper cannot be confined this
way, or where its seccomp filter cannot be loaded (pipeline/sandbox.py reads the helper's own report);
``best_effort`` renders with what this machine allows, logs it once and records it.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from pipeline.records import DocumentError, Status

PACKAGE = Path(__file__).resolve().parent  # docqa's pipeline package: all the helper imports of ours
TMPFS_BYTES = 512 * 1024 * 1024  # the helper's private /tmp (pdf2image spools the document there)
SYSTEM_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")  # /usr-merged roots: links, or directories
SYSTEM_FILES = ("/etc/ld.so.cache", "/etc/fonts", "/etc/alternatives", "/etc/localtime")
ENABLE_HINT = (
    "install bubblewrap (Debian: apt-get install bubblewrap; the docqa image has it) and allow unprivileged user "
    "namespaces (sysctl kernel.unprivileged_userns_clone=1 and user.max_user_namespaces > 0). On a KubeRay pod "
    "the node must allow user namespaces and the pod's securityContext must let it create them: "
    "seccompProfile: {type: Unconfined} (or a profile that allows unshare and clone with CLONE_NEWUSER) and, on "
    "AppArmor nodes, appArmorProfile: {type: Unconfined}. Or set render.isolation: best_effort to render with "
    "what this machine allows (recorded in each run)"
)
SECCOMP_HINT = (
    "install libseccomp (Debian: apt-get install libseccomp2) beside docqa's pyseccomp dependency, on a kernel "
    "with seccomp filters (CONFIG_SECCOMP_FILTER). On a KubeRay pod the pod's securityContext must let a process "
    "add its own filter: seccompProfile: {type: RuntimeDefault} or {type: Unconfined} does (a Localhost profile "
    "must allow the seccomp and prctl system calls). Or set render.isolation: best_effort to render with what "
    "this machine allows (recorded in each run)"
)


class IsolationUnavailable(DocumentError):
    """``render.isolation: strict`` and the helper cannot be confined here; the message names what is
    missing, the setting and how to enable it. A document that meets it is ``render_error``; before a run,
    jobs/cluster.py makes it the refusal to start (exit 2)."""

    def __init__(self, missing: str, how: str = ENABLE_HINT) -> None:
        super().__init__(
            Status.RENDER_ERROR,
            f"render.isolation=strict: the render helper cannot be confined on this machine: {missing}. To enable "
            f"it, {how}",
        )
        self.missing, self.how = missing, how

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # a Ray task raising it hands it on whole
        return IsolationUnavailable, (self.missing, self.how)


@dataclass(frozen=True)
class Confinement:
    """The command prefix a helper starts under, and what it gives."""

    prefix: tuple[str, ...]  # bwrap and its arguments, or nothing
    namespaces: str  # what the parent arranged, as the run record says it


def _binds() -> list[str]:
    """The read-only view: /usr, the Python installation and its environment, the pipeline package."""
    arguments = ["--ro-bind", "/usr", "/usr"]
    for name in SYSTEM_LINKS:
        path = Path("/") / name
        if path.is_symlink():
            arguments += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            arguments += ["--ro-bind", str(path), str(path)]
    for path in SYSTEM_FILES:
        if Path(path).exists():
            arguments += ["--ro-bind", path, path]
    python = {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve(), Path(sys.executable).resolve().parent}
    python |= {Path(sysconfig.get_paths()[key]).resolve() for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    for path in sorted(python):
        if path.exists() and not path.is_relative_to("/usr"):
            arguments += ["--ro-bind", str(path), str(path)]
    arguments += ["--ro-bind", str(PACKAGE), str(PACKAGE)]
    for path in tessdata_candidates():  # Tesseract's trained data (OCR), where it is outside /usr
        if path.is_dir() and not path.resolve().is_relative_to("/usr"):
            arguments += ["--ro-bind", str(path.resolve()), str(path.resolve())]
    return arguments


class OcrUnavailable(RuntimeError):
    """``ocr.engine: tesseract`` and the trained data of a language is nowhere to be found."""


def tessdata_candidates() -> list[Path]:
    """Where Tesseract's trained data may be: ``TESSDATA_PREFIX``, then Debian's and other distributions'
    folders."""
    listed = [Path(os.environ["TESSDATA_PREFIX"])] if os.environ.get("TESSDATA_PREFIX") else []
    listed += sorted(Path("/usr/share/tesseract-ocr").glob("*/tessdata"), reverse=True)  # newest version first
    return [*listed, Path("/usr/share/tessdata"), Path("/usr/local/share/tessdata")]


def tessdata_directory(languages: list[str]) -> str:
    """The folder holding ``LANG.traineddata`` for every language (the render helper sees it: under /usr, or
    bound read-only); raises OcrUnavailable saying what to install."""
    for folder in tessdata_candidates():
        if all((folder / f"{language}.traineddata").is_file() for language in languages):
            return str(folder.resolve())
    packages = " ".join(f"tesseract-ocr-{language.lower().replace('_', '-')}" for language in languages)
    raise OcrUnavailable(
        f"ocr.engine=tesseract: no Tesseract data for {'+'.join(languages)} was found (looked in TESSDATA_PREFIX, "
        f"/usr/share/tesseract-ocr/*/tessdata, /usr/share/tessdata). Install it (Debian: apt-get install "
        f"tesseract-ocr {packages}; the docqa image has English), or set ocr.engine: none"
    )


def bwrap_prefix(environment: dict[str, str]) -> tuple[str, ...]:
    """bubblewrap's command line for a helper with ``environment`` (and nothing else)."""
    bwrap = shutil.which("bwrap")
    assert bwrap is not None
    arguments = [
        bwrap,
        "--unshare-user",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        # The private /tmp first: a bind below it (a Ray Job's working_dir, a runtime env's Python) comes after.
        "--size",
        str(TMPFS_BYTES),
        "--tmpfs",
        "/tmp",
        *_binds(),
        "--chdir",
        "/tmp",
        "--clearenv",
    ]
    for name, value in environment.items():
        arguments += ["--setenv", name, value]
    return (*arguments, "--")


@functools.cache
def unavailable() -> str | None:
    """Why a helper cannot be confined by bubblewrap on this machine, or None when it can (tried once per
    process: a sandbox running /bin/true)."""
    if shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed"
    try:
        done = subprocess.run(
            [*bwrap_prefix({"PATH": "/usr/bin:/bin"}), "/bin/true"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"bubblewrap could not run: {error}"
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no message"])[-1]
        return f"bubblewrap cannot create the namespaces here: {reason}"
    return None


def confinement(isolation: str, environment: dict[str, str]) -> Confinement:
    """How to start a helper under ``render.isolation``; raises IsolationUnavailable for ``strict`` where
    bubblewrap cannot confine it."""
    missing = unavailable()
    if missing is None:
        namespaces = "bubblewrap: own user, pid, network, ipc, uts namespaces; read-only root; private /tmp"
        return Confinement(bwrap_prefix(environment), namespaces)
    if isolation == "strict":
        raise IsolationUnavailable(missing)
    return Confinement((), f"none: {missing} (render.isolation=best_effort)")
