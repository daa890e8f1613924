"""Nothing lost when sweep workers die: Slurm time limits, kill -9, a node that goes down.

A trial is *lost* when its worker stops before it ended: a signal (SIGTERM at a time limit,
Ctrl-C), a worker process gone on this machine (kill -9, OOM), or, on any machine, no
heartbeat for GRACE_BEATS heartbeats. A lost trial is FAIL (never a result) and its point is
queued again as a WAITING trial with the same values (Optuna's retry: the grid's point keeps
its grid_id), so the study runs exactly the missing points, never a point twice.

Heartbeats are Optuna's own protocol (BaseHeartbeat: record_heartbeat, _get_stale_trial_ids;
get_heartbeat_thread): RDBStorage implements it; HeartbeatJournal implements it for the file
journal, which Optuna does not. The Caffe child of a worker dies with it (train.py sets
PR_SET_PDEATHSIG), and the lost trial's run.json is closed as failed.
"""
import os
import socket
import time

HEARTBEAT_SECONDS = 60  # a running trial's sign of life, written by its worker
GRACE_BEATS = 3  # heartbeats missed before a trial counts as lost
MAX_RETRIES = 3  # a lost point is queued again at most this often (a point that kills its worker stops)
# What a retry does not inherit: the lost trial's life (its worker, run dir, heartbeat, why it failed).
NOT_INHERITED_USER = ("worker", "run_dir", "final", "reason")
NOT_INHERITED_SYSTEM = ("heartbeat",)


def make_heartbeat_journal(path, interval):
    """Optuna's JournalStorage on a file, with Optuna's heartbeat protocol."""
    from optuna.storages._heartbeat import BaseHeartbeat  # Optuna's protocol; only RDBStorage implements it
    from optuna.storages.journal import JournalFileBackend, JournalStorage
    from optuna.trial import TrialState

    class HeartbeatJournal(JournalStorage, BaseHeartbeat):
        """A trial's heartbeat is a system attribute holding the wall-clock time of its last beat."""

        def record_heartbeat(self, trial_id):
            from optuna.exceptions import UpdateFinishedTrialError
            try:
                self.set_trial_system_attr(trial_id, "heartbeat", time.time())
            except UpdateFinishedTrialError:
                pass  # taken as lost by another worker: its worker says so when it tells

        def _get_stale_trial_ids(self, study_id):
            oldest = time.time() - GRACE_BEATS * interval
            return [t._trial_id for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
                    if t.system_attrs.get("heartbeat", oldest + 1) < oldest]  # no beat yet: not judged (as RDB)

        def get_heartbeat_interval(self):
            return interval

        def get_heartbeat_stale_trial_callback(self):
            return None  # fail_stale does the failing, with a reason

    return HeartbeatJournal(JournalFileBackend(path))


def rdb_storage(url, interval):
    """Optuna's RDBStorage with its own heartbeat, our stale-trial callback."""
    import warnings

    import optuna
    with warnings.catch_warnings():  # Optuna marks its heartbeat "experimental": noise on every worker's terminal
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, heartbeat_interval=interval, grace_period=GRACE_BEATS * interval)


def heartbeat(study, trial):
    """A context in which the trial's heartbeat is recorded (a no-op without heartbeats)."""
    from optuna.storages._heartbeat import get_heartbeat_thread
    return get_heartbeat_thread(trial._trial_id, study._storage)


# ---------------------------------------------------------------- finding lost trials
def collect_lost(study, interval):
    """Fail the trials whose worker is gone and queue their points again; -> the numbers of those
    this worker failed (another worker may fail others at the same moment)."""
    return sorted(fail_orphans(study, interval) + fail_stale(study))


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _local_and_alive(trial):
    """The trial's worker runs on this machine and its process is there: never lost, however late
    its heartbeat (a stalled disk, a stopped process, another worker's shorter --heartbeat)."""
    worker = trial.user_attrs.get("worker") or {}
    pid = int(worker.get("pid", 0) or 0)
    return worker.get("host") == socket.gethostname() and pid > 0 and _alive(pid)


def _fail(study, trial, reason):
    """FAIL a RUNNING trial with its reason, then what a lost trial leaves; False when another
    worker got there first."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState
    retries = len(trial.system_attrs.get("retry_history", []))
    if retries >= MAX_RETRIES:
        reason += "; not queued again: its point was lost %d times" % (retries + 1)
    try:
        study._storage.set_trial_user_attr(trial._trial_id, "reason", reason)
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    except UpdateFinishedTrialError:
        return False
    lost(study, study._storage.get_trial(trial._trial_id))
    return True


def fail_orphans(study, interval):
    """Trials left RUNNING by a worker of this machine (same host name) whose process is gone
    (killed, crashed): lost at once, without waiting for the heartbeat's grace period. Also a
    trial that never got as far as naming its worker or beating (its worker died inside ask)."""
    import datetime

    from optuna.trial import TrialState
    host, failed = socket.gethostname(), []
    oldest = datetime.datetime.now() - datetime.timedelta(seconds=GRACE_BEATS * interval)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker") or {}
        pid = int(worker.get("pid", 0) or 0)
        if worker.get("host") == host and pid > 0 and pid != os.getpid() and not _alive(pid):
            reason = "lost: its worker (pid %d on %s) is gone" % (pid, host)
        elif not worker and "heartbeat" not in t.system_attrs and t.datetime_start and t.datetime_start < oldest:
            reason = "lost: its worker stopped before it started training (no worker, no heartbeat)"
        else:
            continue
        if _fail(study, t, reason):
            failed.append(t.number)
    return failed


def fail_stale(study):
    """Optuna's fail_stale_trials, with a reason and without a trial of a live local worker: the
    RUNNING trials whose last heartbeat is older than the grace period are lost."""
    from optuna.storages._heartbeat import is_heartbeat_enabled
    if not is_heartbeat_enabled(study._storage):
        return []
    failed = []
    for trial_id in study._storage._get_stale_trial_ids(study._study_id):
        trial = study._storage.get_trial(trial_id)
        if _local_and_alive(trial):
            continue
        if _fail(study, trial, "lost: no heartbeat (its worker was killed or its node went down)"):
            failed.append(trial.number)
    return failed


# ---------------------------------------------------------------- what a lost trial leaves
def lost(study, trial, why="no heartbeat"):
    """A lost trial (FAIL by now): its run.json closed as failed, its point queued again."""
    close_run(trial.user_attrs.get("run_dir"), trial.user_attrs.get("reason") or "lost: %s" % why)
    retry(study, trial)


def close_run(run_dir, reason):
    """A lost trial's run.json, left "running" by a worker that died, closed as failed."""
    from . import runs
    if not run_dir or not os.path.isfile(os.path.join(run_dir, "run.json")):
        return
    try:
        record = runs.load_record(run_dir)
        if record.get("status") == "running":
            record.update(status="failed", ended=runs.now(), exit_code=1)
            record.setdefault("final", {})["error"] = reason
            runs.save_record(run_dir, record)
    except (OSError, ValueError):
        pass  # a run dir on a disk that is gone: the study's word is what counts


def retry(study, trial):
    """Queue the lost trial's point again (Optuna's RetryHeartbeatStaleTrialCallback, without the
    lost trial's heartbeat, worker and run dir): the same values, the same grid_id."""
    import optuna
    system = {k: v for k, v in trial.system_attrs.items() if k not in NOT_INHERITED_SYSTEM}
    history = list(system.get("retry_history", [])) + [trial.number]
    if len(history) > MAX_RETRIES:
        return None
    system.update(failed_trial=system.get("failed_trial", trial.number), retry_history=history)
    study.add_trial(optuna.create_trial(
        state=optuna.trial.TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs={k: v for k, v in trial.user_attrs.items() if k not in NOT_INHERITED_USER},
        system_attrs=system))
    return history


def retried(trials):
    """{lost trial number: the number of the trial that retried it}."""
    return {t.system_attrs["retry_history"][-1]: t.number for t in trials if t.system_attrs.get("retry_history")}


# ---------------------------------------------------------------- is there work left?
def work_left(study, grid):
    """False once every point is taken: nothing WAITING, and for a grid every grid_id held by a
    trial that is running, finished, or failed for good (a lost trial's retry holds its point)."""
    from optuna.trial import TrialState
    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.WAITING for t in trials):
        return True
    if not grid:
        return True
    again = retried(trials)
    held = {t.system_attrs.get("grid_id") for t in trials
            if t.state != TrialState.FAIL or t.number not in again}
    return bool(set(range(grid)) - held)


def grid_size(grid_space):
    """How many points a GridSampler space has."""
    size = 1
    for choices in grid_space.values():
        size *= len(choices)
    return size


def lost_reason(trial, trials):
    """The report's words for a FAIL trial: its reason, and the trial that retried it."""
    again = retried(trials)
    reason = trial.user_attrs.get("reason") or ("lost: no heartbeat (its worker was killed or its node went down)"
                                                if trial.number in again else "")
    return reason + ("; retried as trial %d" % again[trial.number] if trial.number in again else "")

