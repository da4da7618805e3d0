"""The project's shape: one-way imports, and documentation whose links resolve."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = {p.relative_to(ROOT).with_suffix("").as_posix().replace("/", "."): p
           for p in [*ROOT.glob("*.py"), *ROOT.glob("data/*.py")] if p.stem != "__init__"}


def imports(path: Path) -> set[str]:
    """The names a file imports (a module, or a module's attribute), at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        found |= {a.name for a in node.names} if isinstance(node, ast.Import) else \
            {node.module} | {f"{node.module}.{a.name}" for a in node.names} \
            if isinstance(node, ast.ImportFrom) and node.module else set()
    return found


def project_imports(path: Path) -> set[str]:
    """The project modules a file imports, at any depth of its code."""
    own = path.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".")
    return {n for n in imports(path) if n in MODULES} - {own}


def test_no_module_imports_one_that_imports_it_back():
    graph = {name: project_imports(path) for name, path in MODULES.items()}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph[start])
    cycles = [name for name in graph if reaches(name, name, {name})]
    assert cycles == []


def test_the_contract_imports_only_what_it_states():
    assert project_imports(MODULES["task"]) <= {"instances"}
    assert project_imports(MODULES["grader"]) <= {"task", "instances", "conversions", "diagnosis", "data.target_model",
                                                  "data", "bounded"}
    assert project_imports(MODULES["bounded"]) == set()  # the child machinery knows nothing of the task


def anchors(markdown: str) -> set[str]:
    """GitHub's ids for a page's headings."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", markdown, re.MULTILINE)}


def test_every_link_in_the_readme_and_docs_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) >= 6
    for page in pages:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            assert resolved.exists(), f"{page.name}: {target}"
            if anchor:
                assert anchor in anchors(resolved.read_text()), f"{page.name}: {target}"


def test_the_readme_is_a_front_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_the_readme_names_every_label_a_run_can_end_with():
    """report.RUN_LABELS is the one table of labels (it sets the console's width); the README explains each."""
    import report
    section = (ROOT / "README.md").read_text().split("## Why runs fail", 1)[1].split("\n## ", 1)[0]
    missing = [label for label in report.RUN_LABELS if f"`{label}`" not in section]
    assert missing == []
    assert set(report.RUN_LABELS.values()) == {"pass", "fail", "error", "stopped"}


def test_every_command_line_answers_help_at_once():
    import subprocess
    import sys
    import time
    for script in ("main.py", "task.py", "grader.py", "bench.py", "harbor_export.py"):
        started = time.monotonic()
        r = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                           check=False)
        assert r.returncode == 0 and r.stdout.startswith("usage:"), (script, r.stderr)
        assert time.monotonic() - started < 15, script  # bench.py --help used to start the benchmark


def test_task_cli_refuses_a_used_workspace_unless_told_to_replace_it(tmp_path):
    import subprocess
    import sys
    cmd = [sys.executable, "task.py", "--workspace", str(tmp_path), "--level", "7"]
    assert subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=120, check=False).returncode == 0
    (tmp_path / "stale.txt").write_text("x")
    refused = subprocess.run([*cmd[:-1], "3"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert refused.returncode == 2 and "--replace" in refused.stderr and (tmp_path / "reference.npz").exists()
    replaced = subprocess.run([*cmd[:-1], "3", "--replace"], cwd=ROOT, capture_output=True, timeout=120, check=False)
    assert replaced.returncode == 0 and not (tmp_path / "reference.npz").exists()  # level 3 shows source_model.py
    assert not (tmp_path / "stale.txt").exists() and len(list((tmp_path / "checkpoint").glob("iter_*"))) == 1


def test_only_the_inspect_task_imports_inspect_ai():
    """inspect-ai is an optional extra: the harness, the grader and the tools never need it."""
    users = {name for name, path in MODULES.items() if "inspect_ai" in path.read_text()}
    assert users == {"inspect_task"}
    import tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("inspect-ai") for d in project["optional-dependencies"]["inspect"])


def test_the_declared_dependencies_are_what_the_code_imports():
    """What the project's modules (but the optional inspect_task) import from outside the standard library
    and the project is a declared dependency, or one that anthropic itself requires (httpx2, which
    scripted_api.py drives); and every declared dependency is imported."""
    import importlib.metadata
    import sys
    import tomllib
    name = re.compile(r"[\w-]+")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = {name.match(d)[0] for d in pyproject["project"]["dependencies"]}
    brought = {name.match(r)[0] for d in declared for r in importlib.metadata.requires(d) or [] if "extra ==" not in r}
    local = {path.stem for path in MODULES.values()}  # source_model.py imports its sibling also as a workspace file
    imported = {n.split(".")[0] for m, path in MODULES.items() if m != "inspect_task" for n in imports(path)}
    imported -= sys.stdlib_module_names | local | {"data"}
    assert declared <= imported and imported - declared <= brought, (declared, imported)
