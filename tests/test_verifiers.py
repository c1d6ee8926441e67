"""Verifiers, and the code sandbox's promises: no writes outside its dir, no network, no outliving its limit."""

import os
import socket
import threading
import time

import pytest

from actors.verifiers import CodeVerifier, MatchVerifier, NumericVerifier, final_number, run_sandboxed


@pytest.mark.parametrize(("text", "value"), [("17 + 25 = 42", 42.0), ("The answer is 1,234.", 1234.0),
                                              ("-3.5 degrees", -3.5), ("no digits", None), ("", None)])
def test_final_number(text, value):
    assert final_number(text) == value


def test_numeric_and_match_verifiers():
    v = NumericVerifier()
    assert v("So she has 42 apples.", "42").passed
    assert not v("So she has 41 apples.", "42").passed
    assert v("nothing", "42").reason == "no number in answer"
    assert MatchVerifier()("  Paris ", "paris").passed
    assert not MatchVerifier(case_sensitive=True)("paris", "Paris").passed
    assert MatchVerifier(regex=True)("the capital is Paris.", r"\bparis\b").passed
    assert "bad reference pattern" in MatchVerifier(regex=True)("x", "(").reason


@pytest.mark.parametrize(("answer", "reference", "passed", "reason"), [
    ("9 - 4 = 5. The answer is 5.", "5", True, "match"),
    ("8 - 2 = 3. The answer is 5.", "5", False, "right answer, wrong work: '8 - 2 = 3'"),  # from a real RS round
    ("2 + 3 + 4 = 9, so 9", "9", True, "match"),          # chained
    ("2 * 3 + 1 = 7 → 7", "7", True, "match"),            # precedence
    ("5 - -3 = 8. The answer is 8.", "8", True, "match"),  # negative operand
    ("3 × 4 = 12. The answer is 12.", "12", True, "match"),
    ("10 / 0 = 1, so 1", "1", False, "right answer, wrong work: '10 / 0 = 1'"),
    ("The answer is 12.", "12", True, "match"),            # no written work: the final answer decides
    ("3 + 4 = 7. The answer is 7.", "12", False, "got 7, want 12"),
])
def test_numeric_verifier_can_check_the_written_work(answer, reference, passed, reason):
    verdict = NumericVerifier(check_work=True)(answer, reference)
    assert (verdict.passed, verdict.reason) == (passed, reason)


def test_numeric_verifier_checks_only_the_final_answer_by_default():
    assert NumericVerifier()("8 - 2 = 3. The answer is 5.", "5").passed  # held-out accuracy = final answer


def test_code_verifier_passes_and_fails():
    cv = CodeVerifier(time_limit_s=10)
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    bad = "def add(a, b):\n    return a - b\n"
    tests = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
    assert cv(good, tests).passed
    verdict = cv(bad, tests)
    assert not verdict.passed and "AssertionError" in verdict.reason


def test_sandbox_cannot_write_outside_its_dir(tmp_path):
    target = tmp_path / "escaped.txt"
    os.chmod(tmp_path, 0o777)  # even a world-writable directory outside the sandbox stays out of reach
    code = f"""
import os
open("inside.txt", "w").write("ok")
for attempt in (lambda: open({str(target)!r}, "w").write("x"), lambda: open("/tmp/llamaray-escape", "w").write("x"),
                lambda: os.remove({str(tmp_path / 'keep')!r})):
    try:
        attempt(); print("ESCAPED")
    except (PermissionError, OSError) as e:
        print("blocked", type(e).__name__)
"""
    (tmp_path / "keep").write_text("keep me")
    res = run_sandboxed(code, time_limit_s=10)
    assert res.returncode == 0, res.stderr
    assert "ESCAPED" not in res.stdout and res.stdout.count("blocked") == 3
    assert not target.exists() and not os.path.exists("/tmp/llamaray-escape") and (tmp_path / "keep").exists()


def test_sandbox_has_no_network():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    accepted = []
    t = threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True)
    t.start()
    code = f"""
import socket
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=2); print("CONNECTED")
except Exception as e:
    print("blocked", type(e).__name__)
"""
    res = run_sandboxed(code, time_limit_s=10)
    server.close()
    assert "CONNECTED" not in res.stdout and "blocked" in res.stdout, (res.stdout, res.stderr)
    assert not accepted


def test_sandbox_time_and_memory_limits_and_no_survivors(tmp_path):
    start = time.monotonic()
    res = run_sandboxed("while True:\n    pass\n", time_limit_s=1.5)
    assert res.timed_out and time.monotonic() - start < 6
    res = run_sandboxed("x = bytearray(2 * 1024**3)\nprint('ALLOCATED')", time_limit_s=10, memory_mb=256)
    assert "ALLOCATED" not in res.stdout and "MemoryError" in res.stderr
    # A child process (if the code could start one) must not outlive the limit: fork is refused outright.
    res = run_sandboxed("import subprocess\nsubprocess.Popen(['sleep', '60'])\nprint('SPAWNED')", time_limit_s=5)
    assert "SPAWNED" not in res.stdout and "not allowed" in res.stderr


def test_crashing_or_hanging_code_is_a_failed_verdict_not_an_exception():
    cv = CodeVerifier(time_limit_s=1)
    assert "timed out" in cv("while True: pass", "assert True").reason
    assert not cv("raise SystemExit(3)", "assert True").passed
