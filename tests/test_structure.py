"""The structure rules (scripts/check_structure.py) hold for the project, and the checker finds each kind of
violation in a small tree made to break them (so a green result means something)."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("check_structure", ROOT / "scripts" / "check_structure.py")
check_structure = importlib.util.module_from_spec(spec)
sys.modules["check_structure"] = check_structure
spec.loader.exec_module(check_structure)


def test_project_has_no_cycle_no_stray_ray_and_no_unexplained_long_function():
    problems = check_structure.check()
    assert problems == [], "\n".join(problems)


def test_checker_finds_each_kind_of_violation(tmp_path):
    def write(rel: str, text: str) -> None:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)

    write("model/__init__.py", "")
    write("model/a.py", "def f():\n    from model import b\n")  # a deferred import still makes the cycle
    write("model/b.py", "from model.a import f\nimport ray\n")
    write("corpus/__init__.py", "")
    write("corpus/c.py", "import ray.data\nds = ray.data.from_items([1])\n")  # allowed
    write("corpus/d.py", "import ray.data\nray.init()\n")  # the name ray, used beyond ray.data
    write("jobs/__init__.py", "")
    body = "".join(f"    x{i} = {i}\n" for i in range(90))
    write("jobs/j.py", f"def long():\n{body}\n\ndef explained():\n    \"\"\"Long because it must.\"\"\"\n{body}")
    problems = check_structure.check(tmp_path)
    assert any(p.startswith("import cycle: model.a ↔ model.b") for p in problems), problems
    assert any("model/b.py: imports ray" in p for p in problems), problems
    assert any("long() is 91 lines" in p for p in problems), problems
    assert any("corpus/d.py:2: uses ray.init" in p for p in problems), problems
    assert not any("corpus/c.py" in p or "explained" in p for p in problems), problems
    assert len(problems) == 4, problems
