"""Child processes that never outlive their parent: ``spawn`` and ``stop_group``.

``spawn(cmd)`` starts ``cmd`` in a session (and process group) of its own, through this file
run as a launcher (``python -I -S lifeline.py FD GRACE -- cmd...``). The launcher forks a
*sentinel* into the new group and then execs ``cmd`` (so the ``Popen``'s pid, pipes and
return code are the command's own). The sentinel is a small single-threaded process that
holds the read end of a pipe whose write end only the parent holds, and ends the whole
group (SIGTERM, then SIGKILL after ``grace_s``; the sentinel itself last) as soon as

- the pipe reaches EOF: the parent died, however (kill -9 included: the kernel closes its
  descriptors); a parent that merely exits does the same;
- the command died, however (it is the sentinel's parent: a parent-death signal set with
  ``prctl(PR_SET_PDEATHSIG)`` right after the fork, with the race closed by checking
  ``getppid()`` after setting it, and a poll of ``getppid()`` as a fallback).

So whatever the command starts (vLLM's engine-core processes, a ``harness run``'s own
workers) goes down with it, and a chain of spawned processes unwinds level by level. The sentinel ignores SIGTERM, SIGINT and SIGHUP: ``stop_group`` (SIGTERM to the
group, SIGKILL after a grace) stops the command gracefully and the sentinel then reaps what
is left. The parent-death signal is tied to the thread that forked, which is the launcher's
main thread that becomes the command's main thread, so it never fires while the command
lives (a parent-death signal set for the command itself would fire when the *parent's*
spawning thread ends, e.g. a worker thread of a pool).

Failure behaviour: a command that cannot be executed exits 127 with one ``error:`` line on
its stderr. The write end of the pipe is inherited by processes the parent creates with a
bare ``fork`` (not by ``subprocess``'s children): those delay the EOF until they exit too.
Without ``/proc`` (not Linux) the sentinel waits the whole grace before SIGKILL.

Standard library only: the launcher runs under ``python -I -S`` and imports nothing else.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from typing import Sequence

_POLL_S = 0.5           # the sentinel's fallback check that its command still lives
PR_SET_PDEATHSIG = 1    # <linux/prctl.h>


def spawn(cmd: Sequence[str], *, grace_s: float = 5.0, **popen) -> subprocess.Popen:
    """``subprocess.Popen(cmd, **popen)`` in a new session whose whole process group ends when
    this process dies or when ``cmd`` dies (see the module docstring); ``grace_s``: between
    the group's SIGTERM and its SIGKILL then. ``popen`` must not set ``start_new_session``,
    ``pass_fds`` or ``preexec_fn``."""
    for k in ("start_new_session", "pass_fds", "preexec_fn", "process_group"):
        if k in popen:
            raise TypeError(f"spawn sets {k} itself")
    r, w = os.pipe()  # both ends non-inheritable: only the sentinel gets r (pass_fds)
    try:
        proc = subprocess.Popen([sys.executable, "-I", "-S", os.path.abspath(__file__), str(r), repr(float(grace_s)),
                                 "--", *map(str, cmd)], start_new_session=True, pass_fds=(r,), **popen)
    except BaseException:
        os.close(w)
        raise
    finally:
        os.close(r)
    proc.lifeline = os.fdopen(w, "wb", buffering=0)  # closed with the Popen object or this process
    return proc


def stop_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """Stop a process started by ``spawn`` and everything it spawned: SIGTERM to its group,
    SIGKILL after ``grace_s`` (its sentinel then ends whatever the command left behind)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# ----- the launcher and its sentinel (this file as a script) ------------------------------------

def _set_parent_death_signal(sig: int) -> None:
    """``prctl(PR_SET_PDEATHSIG, sig)``; nothing where there is no such call (the poll remains)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


def _others_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` other than this one still runs (zombies do not
    count); True where ``/proc`` cannot tell."""
    me = os.getpid()
    try:
        pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return True
    for pid in pids:
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


def _end_group(grace_s: float) -> None:
    """SIGTERM to this process's group, SIGKILL once none of the others is left or after
    ``grace_s``; the SIGKILL ends this process too."""
    pgid = os.getpgid(0)
    with contextlib.suppress(OSError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _others_alive(pgid):
        time.sleep(0.05)
    with contextlib.suppress(OSError):
        os.killpg(pgid, signal.SIGKILL)
    os._exit(0)


def _sentinel(fd: int, leader: int, grace_s: float) -> None:
    """Wait for EOF on ``fd`` (the spawning parent died) or for ``leader`` (the command, this
    process's parent) to die; then end the group. Never returns."""
    try:
        null = os.open(os.devnull, os.O_RDWR)
        for std in (0, 1, 2):  # hold none of the command's pipes: its readers see EOF when it ends
            os.dup2(null, std)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        wake_r, wake_w = os.pipe()  # the parent-death signal's handler does nothing; this wakes select
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGUSR1, lambda signum, frame: None)
        _set_parent_death_signal(signal.SIGUSR1)
        while os.getppid() == leader:  # checked after setting the signal: a death before it is seen here
            ready, _, _ = select.select([fd, wake_r], [], [], _POLL_S)
            if fd in ready and not os.read(fd, 4096):
                break  # EOF: the spawning parent is gone
            if wake_r in ready:
                os.read(wake_r, 4096)
    finally:
        try:
            _end_group(grace_s)
        finally:
            os._exit(0)  # a forked copy of the launcher: it must never go on to exec the command


def _launch(argv: list[str]) -> None:
    """``FD GRACE -- cmd...``: fork the sentinel, then become ``cmd``."""
    fd, grace_s, cmd = int(argv[0]), float(argv[1]), argv[3:]
    leader = os.getpid()
    if os.fork() == 0:
        _sentinel(fd, leader, grace_s)
    os.close(fd)
    try:
        os.execvp(cmd[0], cmd)
    except OSError as e:
        print(f"error: cannot run {cmd[0]}: {e.strerror}", file=sys.stderr)
        os._exit(127)


if __name__ == "__main__":
    _launch(sys.argv[1:])
