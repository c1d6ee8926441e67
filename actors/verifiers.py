"""Verifiers: scorers for tasks whose answers can be checked (plain Python; the scorer actors wrap them).

- ``NumericVerifier``: the last number in the answer equals the reference (math word problems); optionally every
  written calculation in the answer must hold too (``check_work``).
- ``MatchVerifier``: exact match (after whitespace/case normalisation) or a regular expression.
- ``CodeVerifier``: runs candidate Python code against unit tests in a sandboxed subprocess — no network (a fresh
  network namespace), no writes outside its temporary directory (an unprivileged user plus an audit hook), CPU time,
  wall time, address-space and file-size limits, and the whole process group killed at the end.

Every verifier returns a ``Verdict``; a verifier that crashes or hangs yields a failed verdict with the reason instead
of an exception, so one poison candidate never stops a job.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?|-?\.\d+")


@dataclass(frozen=True)
class Verdict:
    """The outcome of checking one candidate answer."""

    score: float
    """1.0 for a correct answer, 0.0 for a wrong one (code: the share of tests passed)."""
    passed: bool
    """Whether the answer counts as correct."""
    reason: str
    """Why — short, for the failed-row report."""
    scorer: str
    """Which verifier produced this verdict."""


def final_number(text: str) -> float | None:
    """The last number in ``text`` ("… so the answer is 1,234." → 1234.0), or None."""
    found = _NUMBER.findall(text or "")
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


_EQUATION = re.compile(r"((?:-?\d+(?:\.\d+)?\s*[-+*/×÷]\s*)+-?\d+(?:\.\d+)?)\s*=\s*(-?\d+(?:\.\d+)?)")
"""A written calculation: ``a op b [op c …] = r`` with + - * / × ÷ between plain numbers."""


def _arith(expr: str) -> float | None:
    """The value of a plain arithmetic expression (numbers and + - * /, usual precedence), or None."""
    import ast
    import operator

    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}

    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return float(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(type(node).__name__)

    try:
        return ev(ast.parse(expr.replace("×", "*").replace("÷", "/"), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError):
        return None


def wrong_step(text: str, rel_tol: float = 1e-6) -> str | None:
    """The first written calculation in ``text`` that does not hold (``"8 - 2 = 3"``), or None if all do."""
    for m in _EQUATION.finditer(text or ""):
        value, claimed = _arith(m.group(1)), float(m.group(2))
        if value is None or not math.isclose(value, claimed, rel_tol=rel_tol, abs_tol=1e-9):
            return m.group(0)
    return None


@dataclass(frozen=True)
class NumericVerifier:
    """Correct when the last number in the answer equals the reference within a relative tolerance.

    ``check_work=True`` also rejects an answer whose written calculations (``a + b = c``) do not hold, so a right
    final number reached by wrong work ("8 - 2 = 3. The answer is 5.") is not kept as training data. Held-out
    accuracy uses the default (final answer only), the usual definition.
    """

    rel_tol: float = 1e-6
    check_work: bool = False
    name: str = "numeric"

    def __call__(self, answer: str, reference: str) -> Verdict:
        want = final_number(str(reference))
        if want is None:
            return Verdict(0.0, False, f"reference {reference!r} holds no number", self.name)
        got = final_number(answer)
        if got is None:
            return Verdict(0.0, False, "no number in answer", self.name)
        ok = math.isclose(got, want, rel_tol=self.rel_tol, abs_tol=1e-9)
        if not ok:
            return Verdict(0.0, False, f"got {got:g}, want {want:g}", self.name)
        bad = wrong_step(answer, self.rel_tol) if self.check_work else None
        if bad is not None:
            return Verdict(0.0, False, f"right answer, wrong work: {bad!r}", self.name)
        return Verdict(1.0, True, "match", self.name)


@dataclass(frozen=True)
class MatchVerifier:
    """Exact match after normalising whitespace and case, or — with ``regex=True`` — the reference as a pattern."""

    regex: bool = False
    case_sensitive: bool = False
    name: str = "match"

    def __call__(self, answer: str, reference: str) -> Verdict:
        if self.regex:
            try:
                ok = re.search(reference, answer, 0 if self.case_sensitive else re.IGNORECASE) is not None
            except re.error as e:
                return Verdict(0.0, False, f"bad reference pattern: {e}", self.name)
        else:
            norm = (lambda s: " ".join(s.split())) if self.case_sensitive else (lambda s: " ".join(s.split()).lower())
            ok = norm(answer) == norm(reference)
        return Verdict(float(ok), ok, "match" if ok else "no match", self.name)


# ---------------------------------------------------------------------------------------------------- sandbox

# Runs first inside the sandbox: blocks sockets and writes outside the work dir even where the OS layers are missing.
_GUARD = textwrap.dedent("""
    import os, sys
    _root = os.path.realpath(os.getcwd())
    def _inside(path):
        try:
            p = os.path.realpath(os.fsdecode(path) if not isinstance(path, int) else "")
        except Exception:
            return False
        return p == _root or p.startswith(_root + os.sep)
    def _hook(event, args):
        if event.startswith("socket.") or event in ("os.system", "os.exec", "os.posix_spawn", "os.fork",
                                                    "os.forkpty", "subprocess.Popen", "ctypes.dlopen"):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open" and args[1] and any(c in str(args[1]) for c in "wax+") and not _inside(args[0]):
            raise PermissionError(f"sandbox: writing {args[0]!r} outside the work dir is not allowed")
        if event in ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.link", "os.symlink",
                     "os.truncate", "shutil.rmtree") and args and not _inside(args[0]):
            raise PermissionError(f"sandbox: {event} outside the work dir is not allowed")
    sys.addaudithook(_hook)
    del _hook
    exec(compile(open("main.py").read(), "main.py", "exec"), {"__name__": "__main__"})
""")


@dataclass(frozen=True)
class SandboxResult:
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float
    isolation: str
    """Which OS layers were in force: "netns+nobody", "nobody", "netns" or "audit-hook only"."""


@dataclass(frozen=True)
class _Isolation:
    python: str
    """An interpreter the sandbox user can execute (the venv's may sit under an unreadable /root)."""
    unshare: bool
    """Whether `unshare --net` works here (root, or user namespaces allowed)."""
    drop_to_nobody: bool
    """Whether the code runs as uid/gid 65534."""


_ISOLATION: _Isolation | None = None


def _probe_isolation() -> _Isolation:
    """Find the strongest set of OS layers this machine allows, once per process."""
    as_root = hasattr(os, "geteuid") and os.geteuid() == 0
    unshare = shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "--net", "true"], capture_output=True).returncode == 0
    candidates = [sys.executable, getattr(sys, "_base_executable", sys.executable), "/usr/bin/python3",
                  "/usr/local/bin/python3"]
    if as_root:
        for py in dict.fromkeys(c for c in candidates if c and os.path.exists(c)):
            probe = ([*(["unshare", "--net"] if unshare else []), "setpriv", "--reuid=65534", "--regid=65534",
                      "--clear-groups", "--", py, "-I", "-S", "-c", "pass"])
            if shutil.which("setpriv") and subprocess.run(probe, capture_output=True).returncode == 0:
                return _Isolation(py, unshare, True)
    return _Isolation(sys.executable, unshare, False)


def run_sandboxed(code: str, *, time_limit_s: float = 5.0, memory_mb: int = 512, file_mb: int = 16) -> SandboxResult:
    """Run ``code`` as ``main.py`` in a fresh temporary directory under every isolation layer available here."""
    global _ISOLATION
    if _ISOLATION is None:
        _ISOLATION = _probe_isolation()
    iso = _ISOLATION
    workdir = tempfile.mkdtemp(prefix="llamaray-sandbox-")
    try:
        with open(os.path.join(workdir, "main.py"), "w") as f:
            f.write(code)
        with open(os.path.join(workdir, "guard.py"), "w") as f:
            f.write(_GUARD)
        if iso.drop_to_nobody:
            os.chown(workdir, 65534, 65534)
            for name in ("main.py", "guard.py"):
                os.chown(os.path.join(workdir, name), 65534, 65534)

        def limits() -> None:  # runs in the child before exec
            import resource
            mem = memory_mb * 2**20
            resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
            cpu = math.ceil(time_limit_s) + 1  # CPU seconds: a backstop behind the wall-clock limit
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_mb * 2**20, file_mb * 2**20))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

        # Enter a network namespace with no interfaces up, then drop to nobody, then run the guard + code.
        cmd = [iso.python, "-I", "-S", "guard.py"]
        if iso.drop_to_nobody:
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"] + cmd
        if iso.unshare:
            cmd = ["unshare", "--net", "--"] + cmd
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "PYTHONDONTWRITEBYTECODE": "1"}
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, preexec_fn=limits, start_new_session=True, text=True)
        timed_out = False
        try:
            out, err = proc.communicate(timeout=time_limit_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            out, err = "", ""
        finally:
            try:  # the whole session: also children the code started
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if timed_out:
            out, err = proc.communicate()
        timed_out = timed_out or proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL)
        layers = [name for name, on in (("netns", iso.unshare), ("nobody", iso.drop_to_nobody)) if on]
        return SandboxResult(None if timed_out else proc.returncode, out[-4000:], err[-4000:], timed_out,
                             time.monotonic() - start, "+".join(layers) or "audit-hook only")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@dataclass(frozen=True)
class CodeVerifier:
    """Runs the candidate's code followed by ``reference`` (assert-style unit tests) in the sandbox."""

    time_limit_s: float = 5.0
    memory_mb: int = 512
    name: str = "code"

    def __call__(self, answer: str, reference: str) -> Verdict:
        code = extract_code(answer)
        program = f"{code}\n\n# --- tests ---\n{reference}\nprint('ALL_TESTS_PASSED')\n"
        res = run_sandboxed(program, time_limit_s=self.time_limit_s, memory_mb=self.memory_mb)
        if res.timed_out:
            return Verdict(0.0, False, f"timed out after {self.time_limit_s:g}s", self.name)
        if res.returncode == 0 and "ALL_TESTS_PASSED" in res.stdout:
            return Verdict(1.0, True, "all tests passed", self.name)
        last = (res.stderr.strip().splitlines() or [f"exit code {res.returncode}"])[-1]
        return Verdict(0.0, False, last[:200], self.name)


def extract_code(answer: str) -> str:
    """The first fenced ```python block of an answer, or the answer itself."""
    m = re.search(r"```(?:python|py)?\s*\n(.*?)```", answer, re.DOTALL)
    return m.group(1) if m else answer
