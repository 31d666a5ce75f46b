"""Tests of the `bnnorm` command: help, usage and user errors, outputs, resume and parallel runs.

Most tests call `bnnorm.cli.main` in this process with the real experiments in quick mode on the
offline digits data. The machinery tests that need many runs, or runs that fail on purpose, use
a small fake experiment module instead.
"""
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import psutil
import pytest
from matplotlib.figure import Figure

import bnnorm
from bnnorm import cli, data, experiments

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_command(capsys, *argv):
    "Call `main` with `argv` converted to str, and return its exit status, stdout and stderr."
    status = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def read_table(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def run_files(out):
    return sorted(Path(out, "runs").rglob("*.json"))


# ---------------------------------------------------------------- a fake experiment module


def make_fake_experiments():
    "Build a module with the experiment contract: two experiments of two widths per seed."
    module = types.ModuleType("fake_experiments")
    module.EXPERIMENTS = {"alpha": {"description": "Fake experiment alpha."},
                          "beta": {"description": "Fake experiment beta."}}

    def plan_runs(name, seeds=(0, 1, 2), epochs=None, quick=False):
        return [{"run_id": f"{name}-width{width}-seed{seed}", "experiment": name, "width": width,
                 "seed": seed, "epochs": epochs or 2, "quick": quick}
                for width in (1, 2) for seed in seeds]

    def execute_run(config, data):
        rows = [{"experiment": config["experiment"], "run_id": config["run_id"],
                 "seed": config["seed"], "epoch": epoch,
                 "loss": 1.0 / (epoch + config["width"] + config["seed"] + data["offset"])}
                for epoch in range(1, config["epochs"] + 1)]
        return {"rows": rows, "curves": {"loss": [row["loss"] for row in rows]}}

    def plot_experiment(name, results, path=None):
        figure = Figure()
        axes = figure.subplots()
        axes.plot([row["loss"] for result in results for row in result["rows"]])
        axes.set_title(name)
        return figure

    def summarize_experiment(name, results):
        return f"{name}: {len(results)} runs"

    def load_dataset(name, data_dir=None, download=False, quick=False):
        return {"offset": 1}

    for function in (plan_runs, execute_run, plot_experiment, summarize_experiment, load_dataset):
        setattr(module, function.__name__, function)
    return module


@pytest.fixture
def fake(monkeypatch):
    "Replace the experiment module with the fake one and yield the fake."
    module = make_fake_experiments()
    monkeypatch.setattr(cli, "experiment_module", lambda: module)
    yield module


class CountingRuns:
    "Wrap `execute_run`, record the run ids it finishes, and raise KeyboardInterrupt after `limit`."

    def __init__(self, execute_run, limit=None):
        self.execute_run, self.limit, self.executed = execute_run, limit, []

    def __call__(self, config, data):
        if self.limit is not None and len(self.executed) >= self.limit:
            raise KeyboardInterrupt
        result = self.execute_run(config, data)
        self.executed.append(config["run_id"])
        return result


# ---------------------------------------------------------------- help and usage


def test_help_lists_options_with_defaults(capsys):
    status, out, err = run_command(capsys, "run", "--help")
    assert status == 0
    for option in ("EXPERIMENT", "--dataset", "--data-dir", "--download", "--seeds", "--epochs",
                   "--jobs", "--out", "--quick"):
        assert option in out, option

    # argparse wraps help lines, so the checks read the text with whitespace collapsed.
    text = " ".join(out.split())
    assert text.count("(default: ") == 9
    for default in ("digits", "3", "1", "bnnorm_runs", "each experiment's own", "off"):
        assert f"(default: {default})" in text, default


def test_version_prints_package_version(capsys):
    status, out, err = run_command(capsys, "--version")
    assert status == 0
    assert out.strip() == f"bnnorm {bnnorm.__version__}"


def test_top_level_help_lists_commands(capsys):
    status, out, err = run_command(capsys, "--help")
    assert status == 0
    assert "run" in out
    assert "list" in out


@pytest.mark.parametrize("argv", [
    [],
    ["frobnicate"],
    ["run", "--no-such-option"],
    ["run", "--seeds", "three"],
    ["run", "--epochs", "1.5"],
    ["run", "--dataset", "mnist"],
    ["run", "no_such_experiment"],
    ["run", "--data-dir", "."],
    ["run", "--download"],
    ["list", "baseline"],
    ["run", "baseline", "--quick", "--no-such-option", "batch_size"],
])
def test_bad_usage_exits_2(capsys, argv):
    status, out, err = run_command(capsys, *argv)
    assert status == 2
    assert "error:" in err
    assert "Traceback" not in err


def test_unknown_experiment_lists_choices(capsys):
    status, out, err = run_command(capsys, "run", "baseline", "no_such_experiment")
    assert status == 2
    assert "'no_such_experiment'" in err
    for name in experiments.EXPERIMENTS:
        assert name in err


def test_list_shows_every_experiment(capsys):
    status, out, err = run_command(capsys, "list")
    assert status == 0
    listed = [line.split()[0] for line in out.splitlines()]
    assert listed == list(experiments.EXPERIMENTS)


# ---------------------------------------------------------------- user errors


def assert_one_line_error(status, err, *fragments):
    "Check exit status 1 and a single error line, the last line of stderr, containing `fragments`."
    assert status == 1
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    errors = [line for line in lines if "error" in line.lower()]
    assert errors == lines[-1:], err
    assert lines[-1].startswith("bnnorm: error: "), lines[-1]
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])


@pytest.mark.parametrize("option, value", [("--seeds", 0), ("--epochs", 0), ("--jobs", 0),
                                           ("--jobs", -1), ("--epochs", -1)])
def test_out_of_range_value_exits_2(capsys, tmp_path, option, value):
    argv = ["run", "--quick", option, value, "--out", tmp_path / "out"]
    status, out, err = run_command(capsys, *argv)
    assert status == 2
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("bnnorm run: error: "), last
    assert f"{option} {value} is invalid" in last
    assert "must be at least 1" in last
    assert not (tmp_path / "out").exists()


def test_empty_out_exits_2(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, out, err = run_command(capsys, "run", "--quick", "--seeds", "1", "--out", "")
    assert status == 2
    assert "--out '' is invalid" in err
    assert list(tmp_path.iterdir()) == []


def test_unknown_run_option_shows_run_usage(capsys):
    status, out, err = run_command(capsys, "run", "--bogus")
    assert status == 2
    assert "usage: bnnorm run" in err
    assert "bnnorm run: error: unrecognized arguments: --bogus" in err


def test_data_dir_without_cifar10_names_it(capsys):
    status, out, err = run_command(capsys, "run", "--data-dir", ".")
    assert status == 2
    assert "--data-dir applies only to CIFAR-10" in err
    assert "--download" not in err.splitlines()[-1]


def test_data_error_leaves_no_out_dir(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "new" / "out"
    status, _, err = run_command(capsys, "run", "baseline", "--quick", "--seeds", "1",
                                 "--dataset", "cifar10", "--data-dir", empty, "--out", out)
    assert status == 1, err
    assert not (tmp_path / "new").exists()


def test_out_file_reported_as_file(capsys, tmp_path):
    target = tmp_path / "afile"
    target.write_text("not a directory")
    status, _, err = run_command(capsys, "run", "--quick", "--out", target)
    assert_one_line_error(status, err, f"{target} is a file, not a directory")


def test_data_dir_file_reported_as_file(capsys, tmp_path):
    target = tmp_path / "afile"
    target.write_text("not a directory")
    status, _, err = run_command(capsys, "run", "--dataset", "cifar10", "--data-dir", target,
                                 "--out", tmp_path / "out")
    assert_one_line_error(status, err, f"data directory {target} is a file, not a directory")


def test_continued_message_lower_case():
    assert cli._lower_first("Cannot read x") == "cannot read x"
    assert cli._lower_first("CIFAR-10 files missing") == "CIFAR-10 files missing"


def test_missing_data_dir_exits_1(capsys, tmp_path):
    missing = tmp_path / "no-such-dir"
    status, out, err = run_command(capsys, "run", "baseline", "--quick", "--dataset", "cifar10",
                                   "--data-dir", missing, "--out", tmp_path / "out")
    assert_one_line_error(status, err, f"data directory {missing} not found", "--download")


def test_cifar10_not_found_exits_1(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("BNNORM_CIFAR10_DIR", raising=False)
    monkeypatch.setenv("BNNORM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    status, out, err = run_command(capsys, "run", "baseline", "--quick", "--seeds", "1",
                                   "--dataset", "cifar10", "--out", tmp_path / "out")
    assert_one_line_error(status, err, "CIFAR-10 not found", "--data-dir PATH", "--download")


def test_empty_data_dir_exits_1(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    status, out, err = run_command(capsys, "run", "baseline", "--quick", "--seeds", "1",
                                   "--dataset", "cifar10", "--data-dir", empty,
                                   "--out", tmp_path / "out")
    assert_one_line_error(status, err, "failed to load the cifar10 dataset", str(empty))


def test_truncated_batch_file_exits_1(capsys, tmp_path):
    root = data.write_fake_cifar10(tmp_path / "cifar", num_per_batch=4)
    batch = root / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:100])
    status, out, err = run_command(capsys, "run", "baseline", "--quick", "--seeds", "1",
                                   "--dataset", "cifar10", "--data-dir", root,
                                   "--out", tmp_path / "out")
    assert_one_line_error(status, err, "data_batch_3")


def test_unwritable_out_dir_exits_1(capsys, tmp_path):
    # A path below a regular file cannot be created, even by root, which ignores permissions.
    blocker = tmp_path / "results.txt"
    blocker.write_text("a file, not a directory")
    status, out, err = run_command(capsys, "run", "--quick", "--out", blocker / "out")
    assert_one_line_error(status, err, f"output directory {blocker / 'out'} is not writable")


def test_changed_settings_rejected(capsys, fake, tmp_path):
    out = tmp_path / "out"
    assert run_command(capsys, "run", "alpha", "--seeds", "1", "--out", out)[0] == 0
    argv = ["run", "alpha", "--seeds", "1", "--out", out]
    status, _, err = run_command(capsys, *argv, "--epochs", "5")
    assert_one_line_error(status, err, f"{out} already contains run", "epochs: stored 2, planned 5",
                          "--out")
    status, _, err = run_command(capsys, *argv, "--quick")
    assert_one_line_error(status, err, "quick: stored False, planned True")


@pytest.mark.parametrize("change, problem", [
    ({"result": {"rows": "x"}}, "its result has no list of rows"),
    ({"result": {}}, "its result has no list of rows"),
    ({"format": 99}, "its format is 99, expected 1"),
    ({"settings": None}, "its settings is missing or not a JSON object"),
])
def test_damaged_run_file_exits_1(capsys, fake, tmp_path, change, problem):
    out = tmp_path / "out"
    assert run_command(capsys, "run", "alpha", "--seeds", "1", "--out", out)[0] == 0
    damaged = run_files(out)[0]
    record = {**json.loads(damaged.read_text()), **change}
    damaged.write_text(json.dumps({key: value for key, value in record.items()
                                   if value is not None}))
    status, _, err = run_command(capsys, "run", "alpha", "--seeds", "1", "--out", out)
    assert_one_line_error(status, err, f"invalid run file {damaged}: {problem}", "Delete it")


def test_other_data_dir_rejected(capsys, fake, tmp_path):
    first = data.write_fake_cifar10(tmp_path / "first", num_per_batch=4)
    second = data.write_fake_cifar10(tmp_path / "second", num_per_batch=5)
    out = tmp_path / "out"
    argv = ["run", "alpha", "--seeds", "1", "--dataset", "cifar10", "--out", out]
    assert run_command(capsys, *argv, "--data-dir", first)[0] == 0
    status, _, err = run_command(capsys, *argv, "--data-dir", second)
    assert_one_line_error(status, err, f"{out} already contains run", "data_dir: stored")

    # The same files elsewhere still differ in their directory.
    shutil.rmtree(second)
    shutil.copytree(first, second)
    status, _, err = run_command(capsys, *argv, "--data-dir", second)
    assert_one_line_error(status, err, "data_dir: stored")
    assert "data_fingerprint" not in err


def test_changed_data_in_place_rejected(capsys, fake, tmp_path):
    root = data.write_fake_cifar10(tmp_path / "cifar", num_per_batch=4)
    out = tmp_path / "out"
    argv = ["run", "alpha", "--seeds", "1", "--dataset", "cifar10", "--data-dir", root,
            "--out", out]
    assert run_command(capsys, *argv)[0] == 0
    shutil.rmtree(root)
    data.write_fake_cifar10(root, num_per_batch=5)
    status, _, err = run_command(capsys, *argv)
    assert_one_line_error(status, err, "data_fingerprint: stored")


def finished_process_id():
    "Return the id of a process that has exited."
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_live_lock_rejected(capsys, fake, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = psutil.Process(holder.pid).create_time()
        (out / "bnnorm.lock").write_text(f"{holder.pid} {started!r}\n")
        status, _, err = run_command(capsys, "run", "alpha", "--seeds", "1", "--out", out)
    finally:
        holder.kill()
        holder.wait()
    assert_one_line_error(status, err, f"another bnnorm run (pid {holder.pid}) is using {out}")
    assert run_files(out) == []
    assert (out / "bnnorm.lock").exists()


def test_stale_lock_taken_over(capsys, fake, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "bnnorm.lock").write_text(f"{finished_process_id()} 1000.0\n")
    status, _, err = run_command(capsys, "run", "alpha", "--seeds", "1", "--out", out)
    assert status == 0, err
    assert len(run_files(out)) == 2
    assert not (out / "bnnorm.lock").exists()


def test_corrupt_run_file_exits_1(capsys, fake, tmp_path):
    out = tmp_path / "out"
    assert run_command(capsys, "run", "alpha", "--seeds", "1", "--out", out)[0] == 0
    broken = run_files(out)[0]
    broken.write_text('{"settings": {"dataset": ')
    status, _, err = run_command(capsys, "run", "alpha", "--seeds", "1", "--out", out)
    assert_one_line_error(status, err, f"invalid run file {broken}", "Delete it")


# ---------------------------------------------------------------- resume machinery (fake module)


def test_interrupt_reports_saved_runs(capsys, fake, monkeypatch, tmp_path):
    out = tmp_path / "out"
    monkeypatch.setattr(fake, "execute_run", CountingRuns(fake.execute_run, limit=3))
    status, _, err = run_command(capsys, "run", "--seeds", "2", "--out", out)
    assert status == 130
    assert "Traceback" not in err
    assert f"3 of 8 runs are saved in {out / 'runs'}" in err
    assert "Run the same command again to resume" in err
    assert len(run_files(out)) == 3
    assert not (out / "results.csv").exists()
    assert not list(out.rglob("*.tmp"))
    assert not (out / "bnnorm.lock").exists()


def test_resume_skips_finished_runs(capsys, fake, monkeypatch, tmp_path):
    reference = tmp_path / "reference"
    assert run_command(capsys, "run", "--seeds", "2", "--out", reference)[0] == 0

    out = tmp_path / "resumed"
    original = fake.execute_run
    first = CountingRuns(original, limit=5)
    monkeypatch.setattr(fake, "execute_run", first)
    assert run_command(capsys, "run", "--seeds", "2", "--out", out)[0] == 130
    second = CountingRuns(original)
    monkeypatch.setattr(fake, "execute_run", second)
    status, _, err = run_command(capsys, "run", "--seeds", "2", "--out", out)

    assert status == 0
    assert "5 already finished" in err
    assert len(first.executed) == 5
    assert len(second.executed) == 3
    assert not set(second.executed) & set(first.executed)
    assert (out / "results.csv").read_text() == (reference / "results.csv").read_text()
    assert (out / "summary.md").read_text() == (reference / "summary.md").read_text()


def test_unsafe_run_ids_stay_inside_runs_dir(capsys, fake, monkeypatch, tmp_path):
    planned = fake.plan_runs

    def plan_runs(name, seeds=(0,), epochs=None, quick=False):
        configs = planned(name, seeds, epochs, quick)
        return [{**config, "run_id": f"../../{config['run_id']}/x"} for config in configs]

    monkeypatch.setattr(fake, "plan_runs", plan_runs)
    out = tmp_path / "out"
    assert run_command(capsys, "run", "alpha", "--seeds", "1", "--out", out)[0] == 0
    assert sorted(path.parent for path in run_files(out)) == [out / "runs" / "alpha"] * 2
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_unplanned_run_files_left_out(capsys, fake, tmp_path):
    out = tmp_path / "out"
    assert run_command(capsys, "run", "alpha", "--seeds", "2", "--out", out)[0] == 0
    status, _, err = run_command(capsys, "run", "alpha", "--seeds", "1", "--out", out)

    assert status == 0
    assert "2 already finished" in err
    assert "nothing to run" in err
    assert len(run_files(out)) == 4
    assert {row["seed"] for row in read_table(out / "results.csv")} == {"0"}
    summary = (out / "summary.md").read_text()
    assert "runs/ also contains 2 other run files" in summary
    assert "They are not in results.csv" in summary
    assert "also contains 2 run files that this command did not plan" in err


def test_other_experiments_plots_listed(capsys, fake, tmp_path):
    out = tmp_path / "out"
    assert run_command(capsys, "run", "--seeds", "1", "--out", out)[0] == 0
    status, _, err = run_command(capsys, "run", "alpha", "--seeds", "1", "--out", out)
    assert status == 0
    summary = (out / "summary.md").read_text()
    assert "Plots written by this command: alpha.png" in summary
    assert "Not updated by this command, so out of date: beta.png" in summary
    assert "beta.png in" in err
    assert {row["experiment"] for row in read_table(out / "results.csv")} == {"alpha"}


def test_names_after_options_accepted(capsys, fake, tmp_path):
    out = tmp_path / "out"
    assert run_command(capsys, "run", "beta", "--seeds", "1", "alpha", "--out", out)[0] == 0
    rows = read_table(out / "results.csv")
    assert list(dict.fromkeys(row["experiment"] for row in rows)) == ["beta", "alpha"]


def test_duplicate_run_ids_rejected(fake, monkeypatch, tmp_path):
    def plan_runs(name, seeds, epochs, quick):
        return [{"run_id": "same"}, {"run_id": "same"}]

    monkeypatch.setattr(fake, "plan_runs", plan_runs)
    with pytest.raises(ValueError, match="returned run_id 'same' twice"):
        cli.run_sweep(["alpha"], seeds=1, out=tmp_path / "out")


# ---------------------------------------------------------------- the real experiments, quick mode


@pytest.fixture(scope="module")
def quick_sweep(tmp_path_factory):
    "Run every experiment in quick mode with one seed, and return the out dir, stderr and result."
    out = tmp_path_factory.mktemp("quick") / "out"
    log = tmp_path_factory.mktemp("quick-log") / "stderr.txt"
    with open(log, "w") as stream:
        result = cli.run_sweep((), seeds=1, out=out, quick=True, log=stream)
    return out, log.read_text(), result


def test_quick_run_writes_every_output(quick_sweep):
    out, log, result = quick_sweep
    planned = cli.plan_sweep(list(experiments.EXPERIMENTS), seeds=1, quick=True)
    assert result["runs"] == len(planned)
    assert len(run_files(out)) == len(planned)

    for name in experiments.EXPERIMENTS:
        assert (out / f"{name}.png").read_bytes()[:8] == PNG_SIGNATURE, name

    rows = read_table(out / "results.csv")
    stored = [json.loads(path.read_text()) for path in run_files(out)]
    stored_rows = [row for record in stored for row in record["result"]["rows"]]
    assert len(rows) == len(stored_rows)
    assert {row["run_id"] for row in rows} == {run["run_id"] for run in planned}

    summary = (out / "summary.md").read_text()
    for name in experiments.EXPERIMENTS:
        assert f"![{name}]({name}.png)" in summary, name


def test_quick_run_reports_progress(quick_sweep):
    out, log, result = quick_sweep
    planned = cli.plan_sweep(list(experiments.EXPERIMENTS), seeds=1, quick=True)
    progress_line = re.compile(r"bnnorm: \w+ run \d+/\d+ finished in ")
    progress = [line for line in log.splitlines() if progress_line.match(line)]
    assert len(progress) == len(planned)
    for name in experiments.EXPERIMENTS:
        total = sum(run["experiment"] == name for run in planned)
        last = f"bnnorm: {name} run {total}/{total} "
        assert any(line.startswith(last) for line in progress), name
    assert " left" in progress[0]
    assert progress[-1].endswith(f"; {len(planned)}/{len(planned)} runs done")


def test_interrupted_sweep_matches_uninterrupted(capsys, monkeypatch, tmp_path):
    argv = ["run", "baseline", "batch_size", "--quick", "--seeds", "2"]
    reference = tmp_path / "reference"
    assert run_command(capsys, *argv, "--out", reference)[0] == 0
    total = len(run_files(reference))
    assert total >= 4

    out = tmp_path / "resumed"
    original = experiments.execute_run
    first = CountingRuns(original, limit=3)
    monkeypatch.setattr(experiments, "execute_run", first)
    status, _, err = run_command(capsys, *argv, "--out", out)
    assert status == 130
    assert f"3 of {total} runs are saved" in err

    second = CountingRuns(original)
    monkeypatch.setattr(experiments, "execute_run", second)
    assert run_command(capsys, *argv, "--out", out)[0] == 0
    assert len(second.executed) == total - 3
    assert not set(second.executed) & set(first.executed)

    table = (out / "results.csv").read_text()
    assert table == (reference / "results.csv").read_text()
    rows = read_table(out / "results.csv")
    keys = [(row["run_id"], row["epoch"]) for row in rows]
    assert len(keys) == len(set(keys))


def test_cifar10_run_from_data_dir(capsys, tmp_path):
    root = data.write_fake_cifar10(tmp_path / "cifar-10-batches-py", num_per_batch=300)
    status, _, err = run_command(capsys, "run", "baseline", "--quick", "--seeds", "1",
                                 "--dataset", "cifar10", "--data-dir", root,
                                 "--out", tmp_path / "out")
    assert status == 0, err
    assert "runs on cifar10 (quick mode)" in err
    rows = read_table(tmp_path / "out" / "results.csv")
    assert {row["dataset"] for row in rows} == {"cifar10"}
    assert "Dataset: cifar10 (quick mode)" in (tmp_path / "out" / "summary.md").read_text()


def test_jobs_two_matches_jobs_one(capsys, tmp_path):
    argv = ["run", "baseline", "--quick", "--seeds", "2"]
    assert run_command(capsys, *argv, "--jobs", "1", "--out", tmp_path / "one")[0] == 0
    status, _, err = run_command(capsys, *argv, "--jobs", "2", "--out", tmp_path / "two")
    assert status == 0
    assert "to run with 2 worker processes" in err
    for name in ("results.csv", "summary.md"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text(), name


def console_script():
    "Return the path of the installed `bnnorm` script, skipping the test when there is none."
    script = Path(sys.executable).parent / "bnnorm"
    if script.exists():
        return str(script)
    if shutil.which("bnnorm"):
        return shutil.which("bnnorm")
    pytest.skip("the bnnorm console script is not installed; run `pip install -e .`")


def test_console_script_runs(tmp_path):
    script = console_script()
    out = tmp_path / "out"
    done = subprocess.run([script, "run", "baseline", "--quick", "--seeds", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (out / "baseline.png").exists()
    assert (out / "results.csv").exists()
    assert (out / "summary.md").exists()

    failed = subprocess.run([script, "run", "--seeds", "0"], capture_output=True, text=True,
                            timeout=60)
    assert failed.returncode == 2
    lines = failed.stderr.strip().splitlines()
    assert lines[0].startswith("usage: bnnorm run"), lines
    assert lines[-1].startswith("bnnorm run: error: --seeds 0 is invalid"), lines
    assert "Traceback" not in failed.stderr


def interrupt_after_three_runs(argv, out, group=False, wait_seconds=60):
    """Start the command, send SIGINT once three run files exist, and return (returncode, stderr).

    A child inherits an ignored SIGINT (as under a shell's `&`) and Python keeps ignoring it, so
    the child restores the default disposition before the command starts. With `group`, the
    command runs in its own process group and the signal goes to the whole group, as a
    terminal's Ctrl-C reaches the workers too.
    """
    command = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, start_new_session=group,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + wait_seconds
        while len(run_files(out)) < 3 and time.monotonic() < deadline and command.poll() is None:
            time.sleep(0.02)
        if group:
            os.killpg(command.pid, signal.SIGINT)
        else:
            command.send_signal(signal.SIGINT)
        err = command.communicate(timeout=60)[1]
    finally:
        command.kill()
    return command.returncode, err


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT, which Windows does not have")
def test_sigint_saves_finished_runs(tmp_path):
    out = tmp_path / "out"
    total = len(cli.plan_sweep(["weight_scale"], seeds=1))
    argv = [console_script(), "run", "weight_scale", "--seeds", "1", "--out", str(out)]
    returncode, err = interrupt_after_three_runs(argv, out)

    saved = len(run_files(out))
    assert returncode == 130, err
    assert "Traceback" not in err
    assert 3 <= saved < total
    assert f"interrupted; {saved} of {total} runs are saved in {out / 'runs'}" in err
    assert not list(out.rglob("*.tmp"))


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT, which Windows does not have")
def test_sigint_with_two_jobs_stops_cleanly(tmp_path):
    out = tmp_path / "out"
    total = len(cli.plan_sweep(["weight_scale"], seeds=1))
    argv = [console_script(), "run", "weight_scale", "--seeds", "1", "--jobs", "2",
            "--out", str(out)]
    returncode, err = interrupt_after_three_runs(argv, out, group=True, wait_seconds=90)

    saved = len(run_files(out))
    assert returncode == 130, err
    assert "Traceback" not in err
    assert "psutil" not in err
    assert 3 <= saved < total
    assert f"interrupted; {saved} of {total} runs are saved in {out / 'runs'}" in err
    assert not list(out.rglob("*.tmp"))
    assert not (out / "bnnorm.lock").exists()
