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


def test_ci_runs_both_readme_commands_verbatim_in_fresh_venvs():
    """.ci/run reads the commands out of README.md with the same pattern, so they cannot drift."""
    ci = (REPO / ".ci" / "run").read_text()
    assert 'blocks = re.findall(r"```bash\\n(.+?)\\n```"' in ci
    assert "run_readme_command 1 " in ci and "run_readme_command 2 " in ci
    assert 'python3 -m venv "$venv"' in ci and "system-site-packages" not in ci.replace("no system site-packages", "")
    assert "check_report.py" in ci
    assert "python -m pytest -q -m extended tests" in ci  # what README command 2 leaves out


def test_readme_commands_install_from_the_lock():
    for cmd in readme_commands()[:2]:
        assert "-c requirements.lock" in cmd


def test_demo_script_exists_and_is_executable():
    script = REPO / "scripts" / "run_demo.sh"
    assert script.is_file() and script.stat().st_mode & 0o111
