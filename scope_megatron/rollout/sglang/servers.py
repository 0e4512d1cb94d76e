"""SGLangServers: the set of SGLang servers an engine talks to, attached or launched.

  SGLangServers.attach(["http://host:30000", ...])      servers someone else runs
  with SGLangServers.launch(model_path, num_servers=2, tp_size=1, base_port=30000,
                            gpus=[[0], [1]], log_dir="logs/sglang") as servers:
      engine = SGLangEngine(SGLangClient(servers.urls), pad_id=...)

Launching runs `<command> --model-path M --host H --port P --tp-size T [--mem-fraction-static F]
[--enable-deterministic-inference] [--base-gpu-id G] <extra_args>` per server (G = i * T for
server i when several servers share the visible GPUs: no `gpus`, no --base-gpu-id in extra_args),
with command = python -m sglang.launch_server by default (overridable, e.g. for tests), each in its own process group
(start_new_session) with stdout and stderr in a log file, CUDA_VISIBLE_DEVICES per server when
`gpus` is given, torchrun's rendezvous variables (the server would join the trainer's process
group) and SGLANG_RETURN_ORIGINAL_LOGPROB removed from the environment (it would
return log-probs at temperature 1, breaking the Rollouts contract). It then waits for GET /health
to answer 200 on every server (startup_timeout); a process that exits first, or a timeout,
raises SGLangError with the tail of its log, after shutting every launched server down.
shutdown() sends SIGTERM to each process group, waits, then SIGKILLs (SGLang's scheduler and
detokenizer processes are in the group). On Linux each server also gets SIGKILL from the kernel
when the launching process dies without running shutdown (PR_SET_PDEATHSIG: torchrun stops
surviving ranks with SIGTERM / SIGKILL when one fails, or on Ctrl-C; SGLang's own subprocesses
die with their server), so no server outlives the trainer. That signal is tied to the launching
thread: it is set only when launching from the main thread. It is armed by `setpriv --pdeathsig
KILL` (util-linux) in front of the command where setpriv has that option, else by a preexec_fn
(Python code between fork and exec: unsafe in a threaded process, so only the fallback).
"""
from __future__ import annotations

import atexit
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import requests

from .client import SGLangError

DEFAULT_COMMAND = (sys.executable, "-m", "sglang.launch_server")


def _port_free(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now (SO_REUSEADDR, as servers bind: connections
    of an earlier server in TIME_WAIT do not block it, a listening socket does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def _tail(path: Optional[Path], lines: int = 40) -> str:
    if path is None or not path.exists():
        return "(no log)"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:]) or "(empty log)"


# set by torchrun for the trainer; a server that inherits them initializes torch.distributed
# against the trainer's rendezvous and hangs before it is healthy
_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                       "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT",
                       "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
                       "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE", "TORCH_NCCL_ASYNC_ERROR_HANDLING")


def server_environment() -> Dict[str, str]:
    """This process's environment without what must not reach a server it launches."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARIABLES}
    env.pop("SGLANG_RETURN_ORIGINAL_LOGPROB", None)  # it would return log-probs at temperature 1
    return env


@functools.lru_cache(maxsize=None)
def _setpriv() -> Optional[str]:
    """The path of a setpriv that has --pdeathsig (util-linux >= 2.33), or None."""
    path = shutil.which("setpriv")
    if path is None:
        return None
    try:
        usage = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return path if "--pdeathsig" in usage else None


def _die_with_parent(args: List[str]) -> tuple:
    """(args, preexec_fn) for Popen so that the child gets SIGKILL when this process's main
    thread exits, however it exits: args run under setpriv --pdeathsig where available (no Python
    in the forked child), else a preexec_fn; (args, None) where neither applies."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return args, None
    setpriv = _setpriv()
    if setpriv is not None:
        # the shell checks that the parent did not die before the signal was armed, then execs
        # the server (same pid throughout)
        guard = f'[ "$PPID" = {os.getpid()} ] || exit 1; exec "$@"'
        return [setpriv, "--pdeathsig", "KILL", "--", "/bin/sh", "-c", guard, "sh"] + list(args), None
    return args, _preexec_die_with_parent()


def _preexec_die_with_parent():
    """The preexec_fn fallback of _die_with_parent (or None where unavailable). ctypes is resolved
    here, before the fork."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec():
        prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return preexec


class SGLangServers:
    """URLs of SGLang servers, and the processes behind them when launched here."""

    def __init__(self, urls: Sequence[str], processes: Optional[List[subprocess.Popen]] = None,
                 logs: Optional[List[Optional[Path]]] = None, kill_timeout: float = 30.0):
        self.urls: List[str] = [u.rstrip("/") for u in urls]
        self.processes: List[subprocess.Popen] = list(processes or [])
        self.logs: List[Optional[Path]] = list(logs or [None] * len(self.urls))
        self.kill_timeout = float(kill_timeout)
        self._log_files = []
        if self.processes:
            atexit.register(self.shutdown)

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def attach(cls, urls: Union[str, Sequence[str]], *, wait: bool = True, startup_timeout: float = 60.0
               ) -> "SGLangServers":
        """Servers that are already running (checks GET /health unless wait=False)."""
        servers = cls([urls] if isinstance(urls, str) else urls)
        if wait:
            servers.wait_healthy(startup_timeout)
        return servers

    @classmethod
    def launch(cls, model_path: Union[str, Path], *, num_servers: int = 1, host: str = "127.0.0.1",
               base_port: int = 30000, tp_size: int = 1, mem_fraction_static: Optional[float] = None,
               deterministic: bool = False, extra_args: Sequence[str] = (),
               gpus: Optional[Sequence[Sequence[int]]] = None, log_dir: Optional[Union[str, Path]] = None,
               command: Sequence[str] = DEFAULT_COMMAND, env: Optional[Dict[str, str]] = None,
               startup_timeout: float = 900.0, kill_timeout: float = 30.0) -> "SGLangServers":
        """Starts num_servers servers on ports base_port, base_port + 1, ... (see the module
        docstring). gpus[i]: the GPU ids of server i (CUDA_VISIBLE_DEVICES; its length should be
        tp_size); None: all servers see this process's GPUs, server i from GPU i * tp_size on.
        deterministic: --enable-deterministic-inference (needed for sampling_seed to be honoured). env: extra environment variables."""
        if num_servers < 1 or tp_size < 1:
            raise ValueError("SGLangServers.launch: num_servers and tp_size must be >= 1")
        if gpus is not None and len(gpus) != num_servers:
            raise ValueError(f"SGLangServers.launch: {len(gpus)} GPU lists for {num_servers} servers")
        ports = [base_port + i for i in range(num_servers)]
        busy = [p for p in ports if not _port_free(host, p)]
        if busy:
            raise SGLangError(f"SGLangServers.launch: port(s) {busy} on {host} are already in use")
        log_root = Path(log_dir) if log_dir is not None else None
        if log_root is not None:
            log_root.mkdir(parents=True, exist_ok=True)
        processes, logs, urls, files = [], [], [], []
        servers = None
        try:
            for i, port in enumerate(ports):
                args = list(command) + ["--model-path", str(model_path), "--host", host, "--port", str(port),
                                        "--tp-size", str(tp_size)]
                if mem_fraction_static is not None:
                    args += ["--mem-fraction-static", str(mem_fraction_static)]
                if deterministic:
                    args.append("--enable-deterministic-inference")
                if gpus is None and num_servers > 1 and not any(str(a).startswith("--base-gpu-id")
                                                                for a in extra_args):
                    # the same visible GPUs for every server: SGLang would start each on the first
                    args += ["--base-gpu-id", str(i * tp_size)]
                args += [str(a) for a in extra_args]
                child_env = server_environment()
                child_env.update(env or {})
                if gpus is not None:
                    child_env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus[i])
                log = (log_root / f"sglang-{port}.log") if log_root is not None else None
                out = open(log, "ab") if log is not None else subprocess.DEVNULL
                if log is not None:
                    files.append(out)
                    out.write(f"$ {' '.join(args)}\n".encode())
                    out.flush()
                run_args, preexec = _die_with_parent(args)
                proc = subprocess.Popen(run_args, stdout=out, stderr=subprocess.STDOUT, env=child_env,
                                        start_new_session=True, cwd=os.getcwd(), preexec_fn=preexec)
                processes.append(proc)
                logs.append(log)
                urls.append(f"http://{host}:{port}")
            servers = cls(urls, processes, logs, kill_timeout=kill_timeout)
            servers._log_files = files
            servers.wait_healthy(startup_timeout)
            return servers
        except BaseException:
            if servers is not None:
                servers.shutdown()
            else:
                for proc in processes:
                    _stop_group(proc, kill_timeout)
                for f in files:
                    f.close()
            raise

    # -- state ----------------------------------------------------------------------------------

    def wait_healthy(self, timeout: float) -> None:
        """Waits until every server answers GET /health with 200. Raises SGLangError if a
        launched process exits first or the time runs out (with its log tail)."""
        deadline = time.monotonic() + timeout
        pending = list(range(len(self.urls)))
        session = requests.Session()
        try:
            while pending:
                for i in list(pending):
                    proc = self.processes[i] if i < len(self.processes) else None
                    if proc is not None and proc.poll() is not None:
                        raise SGLangError(f"SGLang server {self.urls[i]} exited with code {proc.returncode} "
                                          f"before it was healthy; log {self.logs[i]}:\n{_tail(self.logs[i])}")
                    try:
                        if session.get(self.urls[i] + "/health", timeout=5).status_code == 200:
                            pending.remove(i)
                    except requests.RequestException:
                        pass
                if not pending:
                    break
                if time.monotonic() > deadline:
                    i = pending[0]
                    raise SGLangError(f"SGLang server {self.urls[i]} not healthy after {timeout:g} s; log "
                                      f"{self.logs[i]}:\n{_tail(self.logs[i])}")
                time.sleep(0.5)
        finally:
            session.close()

    def alive(self) -> List[bool]:
        """Whether each launched process still runs (attached servers: True)."""
        return [p.poll() is None for p in self.processes] if self.processes else [True] * len(self.urls)

    def shutdown(self) -> None:
        """Stops the launched servers (SIGTERM to each process group, wait, SIGKILL)."""
        processes, self.processes = self.processes, []
        for proc in processes:
            _stop_group(proc, self.kill_timeout)
        for f in self._log_files:
            f.close()
        self._log_files = []

    def __enter__(self) -> "SGLangServers":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _stop_group(proc: subprocess.Popen, timeout: float) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    # the leader may be gone while children of its group live on
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
