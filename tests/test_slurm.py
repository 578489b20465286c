"""configs/alps.sbatch without Slurm: fake `srun` and `scontrol` first on PATH record what the job script asks of
them, so the requeue decision, the restart bound and the SIGUSR1 hand-off run as they would in an allocation."""
import os
import re
import signal
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "configs", "alps.sbatch")
JOB_ID = "4242"

# `srun ... torchrun ... train.py`: records its environment, sleeps $FAKE_SECONDS and exits with $FAKE_RC; on SIGUSR1
# it exits with $FAKE_USR1_RC instead (train.py saves a checkpoint and exits). `srun --overlap ... pkill -USR1 ...`
# (the job script's trap) sends SIGUSR1 to that fake step; with FAKE_FORWARD_WAITS=1 it returns only after the step
# has exited, so the step ends while the job script is still inside its trap.
FAKE_SRUN = r"""#!/bin/bash
echo "srun $*" >> "$FAKE_DIR/srun.log"
case " $* " in
*" pkill "*)
    kill -USR1 "$(cat "$FAKE_DIR/train.pid")"
    if [ "$FAKE_FORWARD_WAITS" = 1 ]; then
        for _ in $(seq 100); do [ -e "$FAKE_DIR/train.done" ] && break; sleep 0.05; done
        sleep 0.3
    fi
    exit 0 ;;
esac
env | grep -E '^(SRUN_|NCCL_|FI_)' > "$FAKE_DIR/train.env"
on_usr1() {
    echo "step got USR1" >> "$FAKE_DIR/srun.log"
    kill "$sleeper" 2>/dev/null
    touch "$FAKE_DIR/train.done"
    exit "$FAKE_USR1_RC"
}
trap on_usr1 USR1
sleep "$FAKE_SECONDS" &
sleeper=$!
echo $$ > "$FAKE_DIR/train.pid"
wait "$sleeper"
touch "$FAKE_DIR/train.done"
exit "$FAKE_RC"
"""

FAKE_SCONTROL = r"""#!/bin/bash
echo "scontrol $*" >> "$FAKE_DIR/scontrol.log"
if [ "$1" = show ]; then echo nid000001; echo nid000002; fi
"""

# CSCS's list for NCCL with uenv on Alps (docs/software/communication/nccl_env_vars, shown on
# https://docs.cscs.ch/software/communication/nccl/), plus FI_PROVIDER=cxi which the script adds
CSCS_NCCL = {"NCCL_NET": "AWS Libfabric", "NCCL_NET_GDR_LEVEL": "PHB", "NCCL_CROSS_NIC": "1", "NCCL_PROTO": "^LL128",
             "FI_CXI_DEFAULT_CQ_SIZE": "131072", "FI_CXI_DEFAULT_TX_SIZE": "16384", "FI_CXI_DISABLE_HOST_REGISTER": "1",
             "FI_CXI_RX_MATCH_MODE": "software", "FI_MR_CACHE_MONITOR": "userfaultfd"}

def start(tmp_path, restarts=None, max_restarts=10, rc=0, usr1_rc=0, seconds="0.1", forward_waits=0):
    """The job script as the batch shell of a 2-node allocation, with fake srun and scontrol: the process."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SRUN_", "NCCL_", "FI_", "MAX_RESTARTS"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", SLURM_JOB_ID=JOB_ID, SLURM_NNODES="2",
               SLURM_JOB_NODELIST="nid[000001-000002]", SLURM_CPUS_PER_TASK="288", MAX_RESTARTS=str(max_restarts),
               FAKE_DIR=str(tmp_path), FAKE_RC=str(rc), FAKE_USR1_RC=str(usr1_rc), FAKE_SECONDS=seconds,
               FAKE_FORWARD_WAITS=str(forward_waits))
    if restarts is not None:  # Slurm sets it once the job has been requeued
        env["SLURM_RESTART_COUNT"] = str(restarts)
    return subprocess.Popen(["bash", SCRIPT, "configs/tiny.toml"], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

def finish(proc):
    out, _ = proc.communicate(timeout=30)
    return proc.returncode, out

def log(tmp_path, name):
    path = tmp_path / name
    return path.read_text() if path.exists() else ""

def requeued(tmp_path):
    return f"scontrol requeue {JOB_ID}" in log(tmp_path, "scontrol.log")

def test_script_parses():
    out = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True)
    assert out.returncode == 0 and out.stderr == "", out.stderr

def test_no_set_e():
    # `set -e` would end the script when `wait` returns early for the USR1 trap, before the requeue decision
    code = [line.split("#")[0] for line in open(SCRIPT)]
    assert not [line for line in code if re.search(r"\bset\s+(-\w*e|-o\s+errexit)", line)]

def step_env(tmp_path):
    """Run the job script to a clean finish: the environment its training step saw, and the step's srun line."""
    rc, out = finish(start(tmp_path))
    assert rc == 0 and not requeued(tmp_path), out  # a finished run stays finished
    env = dict(line.split("=", 1) for line in log(tmp_path, "train.env").splitlines())
    return env, log(tmp_path, "srun.log").splitlines()[0]

def test_step_gets_the_cpus_of_the_task(tmp_path):
    # Slurm >= 22.05: the step has sbatch's --cpus-per-task only through SRUN_CPUS_PER_TASK or srun's own option
    env, step = step_env(tmp_path)
    assert env.get("SRUN_CPUS_PER_TASK") == "288" or "--cpus-per-task=288" in step, (env, step)

def test_step_gets_the_cscs_network_settings(tmp_path):
    env, _ = step_env(tmp_path)
    assert {k: env.get(k) for k in CSCS_NCCL} == CSCS_NCCL

def test_failed_step_is_requeued(tmp_path):
    rc, out = finish(start(tmp_path, rc=3))
    assert rc == 3 and requeued(tmp_path), out

def test_failed_step_is_not_requeued_once_the_restarts_are_used_up(tmp_path):
    rc, out = finish(start(tmp_path, restarts=10, max_restarts=10, rc=3))
    assert rc == 3 and not requeued(tmp_path), out
    assert "not requeueing" in out

def test_job_requeued_beyond_max_restarts_does_not_start(tmp_path):
    # Slurm itself requeues the job after a node failure (--requeue), without the script's own count
    rc, out = finish(start(tmp_path, restarts=11, max_restarts=10))
    assert rc == 1, out
    assert len(out.strip().splitlines()) == 1 and "MAX_RESTARTS" in out, out
    assert log(tmp_path, "srun.log") == "" and not requeued(tmp_path)

@pytest.mark.parametrize("forward_waits,usr1_rc", [(0, 0), (1, 0), (1, 7)])
def test_usr1_is_forwarded_and_the_step_status_reported(tmp_path, forward_waits, usr1_rc):
    # forward_waits=0: the step exits after the trap returned (wait is cut short, then waits again);
    # forward_waits=1: the step exits while the script is still inside its trap
    proc = start(tmp_path, seconds="20", usr1_rc=usr1_rc, forward_waits=forward_waits)
    deadline = time.monotonic() + 10
    while not (tmp_path / "train.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    rc, out = finish(proc)
    srun_log = log(tmp_path, "srun.log")
    assert "pkill -USR1" in srun_log and "step got USR1" in srun_log, srun_log
    assert rc == usr1_rc, out  # the step's own status, not the 138 of an interrupted wait
    assert f"srun exited with {usr1_rc} (time limit: 1)" in out, out
    assert requeued(tmp_path)  # the time limit requeues even a clean exit
