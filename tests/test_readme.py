"""README opens with the two commands, and CI runs exactly the second one."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text)


def test_readme_starts_with_demo_and_test_commands():
    cmds = readme_commands()
    assert "run_demo.sh" in cmds[0] and "pip install" in cmds[0]
    assert "pytest" in cmds[1] and "pip install" in cmds[1]


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci


def test_demo_script_exists_and_is_executable():
    script = REPO / "scripts" / "run_demo.sh"
    assert script.is_file() and script.stat().st_mode & 0o111
