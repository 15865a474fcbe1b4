"""Crash safety: a worker killed with kill -9 mid-trial loses nothing that completed; its trial
is failed as stale by the next run (heartbeats on RDB storage) and its plan retried once."""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import time

import optuna
from optuna.trial import TrialState

from edgeslim.search.cli import main

SPEC = """
[study]
name = "crash"
trials = 4
heartbeat_s = 1
objectives = ["accuracy", "size_bytes"]
[model]
builtin = "digits-cnn"
train_epochs = 1
[finetune]
steps = 400
batch_size = 64
"""


def _trials(url: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name="crash", storage=url).get_trials()
    except (KeyError, Exception):  # not created yet, or the database is being written
        return []


def test_kill_9_mid_trial_keeps_completed_trials_and_retries_the_killed_plan(tmp_path):
    spec = tmp_path / "crash.toml"
    spec.write_text(SPEC)
    out = tmp_path / "out"
    url = f"sqlite:///{out / 'study.db'}"
    code = f"from edgeslim.search.cli import main; raise SystemExit(main(['search', {str(spec)!r}, '--out', {str(out)!r}]))"
    worker = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        running = None
        while time.monotonic() < deadline and worker.poll() is None:
            trials = _trials(url)
            # killed after its first heartbeat: a trial killed before any heartbeat was written is
            # never seen as stale by Optuna (no record to age), so wait 1.5 heartbeats into the trial
            running = next((t for t in trials if t.state == TrialState.RUNNING and t.number >= 1
                            and (datetime.datetime.now() - t.datetime_start).total_seconds() > 1.5), None)
            if running is not None:
                break
            time.sleep(0.1)
        assert running is not None, "the worker never reached a fine-tuning trial"
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(30)
    finally:
        if worker.poll() is None:
            worker.kill()
    before = {t.number: t.state for t in _trials(url)}
    assert before[0] == TrialState.COMPLETE and before[running.number] == TrialState.RUNNING
    time.sleep(2.5)  # past the grace period (2 x heartbeat_s): the killed trial is stale

    assert main(["search", str(spec), "--out", str(out), "--trials", "1"]) == 0
    after = _trials(url)
    by_number = {t.number: t for t in after}
    assert by_number[0].state == TrialState.COMPLETE  # nothing that completed is lost
    assert by_number[running.number].state == TrialState.FAIL
    retries = [t for t in after if t.system_attrs.get("failed_trial") == running.number]
    assert len(retries) == 1  # retried once, with the killed trial's plan
    killed = by_number[running.number]
    assert retries[0].params == killed.params and retries[0].user_attrs.get("plan") == killed.user_attrs.get("plan")
    assert sum(t.state == TrialState.COMPLETE for t in after) == sum(s == TrialState.COMPLETE for s in before.values()) + 1
    assert not [t for t in after if t.state == TrialState.RUNNING]
