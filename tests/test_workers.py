"""Scale-out: several workers on one study (SQLite on one machine, PostgreSQL across machines),
each trial run once, the study created and its baselines enqueued once; signals end a search
cleanly; one timing at a time on a machine."""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from edgeslim.search._front import front_entries

PG_URL = os.environ.get("EDGESLIM_TEST_POSTGRES_URL", "")
needs_pg = pytest.mark.skipif(not PG_URL, reason="set EDGESLIM_TEST_POSTGRES_URL (.ci/run starts a server)")

SPEC = """
[study]
name = "{name}"
trials = {trials}
heartbeat_s = {heartbeat}
objectives = ["accuracy", "size_bytes", "latency_ms"]
[model]
builtin = "digits-cnn"
train_epochs = 1
[finetune]
steps = {steps}
"""
PRESETS = 6  # dense + the uniform presets the digits CNN gets (duplicates dropped)


def _spec(tmp: Path, name: str, trials: int = 4, steps: int = 10, heartbeat: int = 60) -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(SPEC.format(name=name, trials=trials, steps=steps, heartbeat=heartbeat))
    return path


def _cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "edgeslim.search.cli", *argv]


def _check_study(study: optuna.Study, expected: int) -> None:
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(len(trials)))  # nothing lost, nothing twice
    assert len(trials) == expected, [(t.number, t.state.name) for t in trials]
    assert all(t.state == TrialState.COMPLETE for t in trials), [(t.number, t.state.name) for t in trials]
    presets = [t.user_attrs["preset"] for t in trials if t.user_attrs.get("preset")]
    assert len(presets) == len(set(presets)) == PRESETS, presets  # the baselines once
    plans = [json.dumps(t.params, sort_keys=True) for t in trials if t.user_attrs.get("preset")]
    assert len(set(plans)) == PRESETS


def test_jobs_2_on_sqlite_shares_the_trials_and_writes_the_storage_front(tmp_path):
    spec = _spec(tmp_path, "jobs", trials=9)
    out = tmp_path / "out"
    run = subprocess.run(_cli("search", str(spec), "--jobs", "2", "--out", str(out), "--format", "json"),
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "2 workers on this machine (5, 4 trials each)" in run.stderr
    study = optuna.load_study(study_name="jobs", storage=f"sqlite:///{out / 'study.db'}")
    _check_study(study, 9)
    names = ["accuracy", "size_bytes", "latency_ms"]
    front = json.loads((out / "pareto.json").read_text())
    assert sorted(e["trial"] for e in front) == sorted(e["trial"] for e in front_entries(study, names))
    assert {e["trial"] for e in front} == {t.number for t in study.best_trials}
    assert "worker done" in (out / "worker-1.log").read_text()
    assert not list(out.glob(".worker-spec-*.json"))  # the hand-over file is removed


def test_two_searches_started_together_create_the_study_once(tmp_path):
    spec = _spec(tmp_path, "twin", trials=4)
    out = tmp_path / "out"
    procs = [subprocess.Popen(_cli("search", str(spec), "--out", str(out)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=tmp_path) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-1500:] for _, e in results]
    study = optuna.load_study(study_name="twin", storage=f"sqlite:///{out / 'study.db'}")
    _check_study(study, 8)
    assert sum("training the digits-cnn base model" in e for _, e in results) == 1  # trained once, then cached


@needs_pg
def test_three_workers_on_postgresql_create_once_and_run_each_trial_once(tmp_path):
    name = f"pg-{uuid.uuid4().hex[:8]}"
    spec = _spec(tmp_path, name, trials=4)
    procs = [subprocess.Popen(_cli("worker", str(spec), "--storage", PG_URL, "--out", str(tmp_path / "out")),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
             for _ in range(3)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e[-1500:] for _, e in results]
    study = optuna.load_study(study_name=name, storage=PG_URL)
    _check_study(study, 12)
    # a fourth worker with no spec joins from what the study stores
    run = subprocess.run(_cli("worker", "--storage", PG_URL, "--name", name, "--trials", "1", "--out",
                              str(tmp_path / "out")), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-1500:]
    _check_study(study, 13)


def _wait_for(url: str, name: str, pred, timeout: float = 240) -> list[optuna.trial.FrozenTrial]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            trials = optuna.load_study(study_name=name, storage=url).get_trials()
        except Exception:  # not created yet, or being written
            trials = []
        if pred(trials):
            return trials
        time.sleep(0.1)
    raise AssertionError("timed out waiting for the study")


def _running_since(trials, seconds: float):
    return next((t for t in trials if t.state == TrialState.RUNNING and t.number >= 1
                 and (datetime.datetime.now() - t.datetime_start).total_seconds() > seconds), None)


@pytest.mark.parametrize("storage", ["sqlite", pytest.param("postgresql", marks=needs_pg)])
def test_kill_9_mid_trial_then_rerun_fails_it_as_stale_and_retries_its_plan(tmp_path, storage):
    name = f"kill-{uuid.uuid4().hex[:8]}"
    spec = _spec(tmp_path, name, trials=3, steps=400, heartbeat=1)
    url = PG_URL if storage == "postgresql" else f"sqlite:///{tmp_path / 'out' / 'study.db'}"
    argv = ["search", str(spec), "--out", str(tmp_path / "out")] + (["--storage", url] if storage == "postgresql" else [])
    worker = subprocess.Popen(_cli(*argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        trials = _wait_for(url, name, lambda ts: _running_since(ts, 1.5) is not None)
        killed = _running_since(trials, 1.5)
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
    completed = {t.number for t in trials if t.state == TrialState.COMPLETE}
    time.sleep(2.5)  # past the grace period (2 heartbeats)
    run = subprocess.run(_cli(*argv, "--trials", "1"), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-1500:]
    after = optuna.load_study(study_name=name, storage=url).get_trials()
    by_number = {t.number: t for t in after}
    assert by_number[killed.number].state == TrialState.FAIL  # failed as stale by the rerun
    assert completed <= {t.number for t in after if t.state == TrialState.COMPLETE}  # nothing completed is lost
    retried = [t for t in after if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retried) == 1 and retried[0].params == killed.params  # its plan, once
    assert sum(t.state == TrialState.COMPLETE for t in after) == len(completed) + 1
    assert not [t for t in after if t.state == TrialState.RUNNING]


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_finishes_the_running_trial_writes_the_front_and_exits_128_plus_signal(tmp_path, sig, code):
    spec = _spec(tmp_path, "sig", trials=30, steps=150)
    out = tmp_path / "out"
    url = f"sqlite:///{out / 'study.db'}"
    proc = subprocess.Popen(_cli("search", str(spec), "--out", str(out)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    _wait_for(url, "sig", lambda ts: sum(t.state == TrialState.COMPLETE for t in ts) >= 2
              and any(t.state == TrialState.RUNNING for t in ts))
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == code, stderr[-1500:]
    assert f"{signal.Signals(sig).name}: finishing the running trial" in stderr
    trials = [t for t in optuna.load_study(study_name="sig", storage=url).get_trials() if t.state != TrialState.WAITING]
    assert all(t.state == TrialState.COMPLETE for t in trials)  # the running trial finished, none left RUNNING
    assert 3 <= len(trials) < 30
    front = json.loads((out / "pareto.json").read_text())
    assert front and {e["trial"] for e in front} <= {t.number for t in trials}
    assert (out / "report.html").is_file() and "stopped early by a signal" in stdout


def test_a_second_signal_aborts_the_running_trial(tmp_path):
    spec = _spec(tmp_path, "sig2", trials=30, steps=4000)
    out = tmp_path / "out"
    url = f"sqlite:///{out / 'study.db'}"
    proc = subprocess.Popen(_cli("search", str(spec), "--out", str(out)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    _wait_for(url, "sig2", lambda ts: _running_since(ts, 0.5) is not None)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-1500:]
    states = [t.state for t in optuna.load_study(study_name="sig2", storage=url).get_trials()]
    assert TrialState.FAIL in states and TrialState.RUNNING not in states
    assert (out / "pareto.json").is_file()


HOLD = """
import sys, time
from edgeslim.objectives._machine import compute_slot, timing_slot
slot = compute_slot if sys.argv[1] == "compute" else timing_slot
with slot():
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_a_timing_waits_for_running_steps_and_holds_off_new_ones(tmp_path):
    from edgeslim.objectives._machine import compute_slot, timing_slot

    env = {**os.environ, "EDGESLIM_LOCK_DIR": str(tmp_path)}
    os.environ["EDGESLIM_LOCK_DIR"] = str(tmp_path)
    try:
        step = subprocess.Popen([sys.executable, "-c", HOLD, "compute", "1.0"], stdout=subprocess.PIPE, text=True,
                                env=env)
        assert step.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with timing_slot():  # another worker's step is under way: the timing waits for it
            waited = time.monotonic() - t0
        assert 0.6 < waited < 5, waited
        step.wait(timeout=10)
        timing = subprocess.Popen([sys.executable, "-c", HOLD, "timing", "1.0"], stdout=subprocess.PIPE, text=True,
                                  env=env)
        assert timing.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with compute_slot():  # a timing runs elsewhere: no new step until it is done
            waited = time.monotonic() - t0
        assert 0.6 < waited < 5, waited
        timing.wait(timeout=10)
    finally:
        del os.environ["EDGESLIM_LOCK_DIR"]
