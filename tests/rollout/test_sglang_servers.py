"""SGLangServers: launching server processes (the test server's module stands in for
`python -m sglang.launch_server`), health waiting, errors with the log tail, clean shutdown,
attaching to running servers."""
import os
import socket
import sys
import time
from pathlib import Path

import pytest
import requests

from scope_megatron.rollout import SamplingParams
from scope_megatron.rollout.sglang import SGLangClient, SGLangEngine, SGLangError, SGLangServers
from tests.rollout.fake_sglang_server import FakeSGLangServer, toy_hf_dir

REPO = Path(__file__).resolve().parents[2]
FAKE_COMMAND = (sys.executable, "-m", "tests.rollout.fake_sglang_server")


def _free_ports(count: int) -> int:
    """A base port with `count` free ports from it."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count >= 65535:
            continue
        socks = []
        try:
            for p in range(base, base + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no free ports")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_launch_serves_and_shuts_down(tmp_path, monkeypatch):
    monkeypatch.setenv("SGLANG_RETURN_ORIGINAL_LOGPROB", "1")  # must not reach the servers
    base = _free_ports(2)
    with SGLangServers.launch(toy_hf_dir(), num_servers=2, base_port=base, tp_size=1, mem_fraction_static=0.5,
                              deterministic=True, extra_args=["--log-level", "error"], gpus=[[0], [1]],
                              log_dir=tmp_path, command=FAKE_COMMAND, env={"PYTHONPATH": str(REPO)},
                              startup_timeout=120) as servers:
        assert servers.urls == [f"http://127.0.0.1:{base}", f"http://127.0.0.1:{base + 1}"]
        assert servers.alive() == [True, True]
        pids = [p.pid for p in servers.processes]
        for i, url in enumerate(servers.urls):
            info = requests.get(url + "/server_info", timeout=10).json()
            assert info["env"] == {"CUDA_VISIBLE_DEVICES": str(i), "SGLANG_RETURN_ORIGINAL_LOGPROB": None}
        engine = SGLangEngine(SGLangClient(servers.urls, timeout=60), pad_id=0)
        out = engine.generate([[1, 4, 5, 13, 6, 7, 14]] * 3, SamplingParams(n=2, max_new_tokens=4, seed=1))
        assert out.num_rollouts == 6
        engine.close()
    logs = sorted(tmp_path.glob("sglang-*.log"))
    assert [p.name for p in logs] == [f"sglang-{base}.log", f"sglang-{base + 1}.log"]
    first_line = logs[0].read_text().splitlines()[0]
    assert first_line.startswith("$ ") and f"--port {base}" in first_line and "--tp-size 1" in first_line
    assert "--mem-fraction-static 0.5" in first_line and "--enable-deterministic-inference" in first_line
    assert first_line.endswith("--log-level error") and "fake sglang server ready" in logs[0].read_text()
    assert all(_gone(pid) for pid in pids) and servers.processes == []
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", base))  # nothing listens there any more
        s.listen()


def test_a_server_that_exits_is_reported_with_its_log(tmp_path):
    cmd = (sys.executable, "-c", "import sys; print('CUDA error: no device', flush=True); sys.exit(3)")
    with pytest.raises(SGLangError) as err:
        SGLangServers.launch("/no/model", base_port=_free_ports(1), log_dir=tmp_path, command=cmd,
                             startup_timeout=60)
    assert "exited with code 3" in str(err.value) and "CUDA error: no device" in str(err.value)


def test_startup_timeout_kills_the_process(tmp_path):
    pid_file = tmp_path / "pid"
    cmd = (sys.executable, "-c", f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
                                 "print('loading weights', flush=True); time.sleep(120)")
    t0 = time.monotonic()
    with pytest.raises(SGLangError, match=r"not healthy after 1\.5 s[\s\S]*loading weights"):
        SGLangServers.launch("/no/model", base_port=_free_ports(1), log_dir=tmp_path / "logs", command=cmd,
                             startup_timeout=1.5, kill_timeout=5)
    assert time.monotonic() - t0 < 30
    assert _gone(int(pid_file.read_text()))


def test_a_busy_port_is_refused_before_launching():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(SGLangError, match="already in use"):
            SGLangServers.launch("/no/model", base_port=port, command=(sys.executable, "-c", "pass"))


def test_attach():
    with FakeSGLangServer(toy_hf_dir()) as server:
        servers = SGLangServers.attach(server.url + "/")
        assert servers.urls == [server.url] and servers.alive() == [True]
        servers.shutdown()  # attached servers are not ours to stop
        assert requests.get(server.url + "/health", timeout=5).status_code == 200
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(SGLangError, match="not healthy after"):
        SGLangServers.attach([dead], startup_timeout=0.5)


def test_launched_servers_do_not_inherit_torchrun_rendezvous(monkeypatch):
    """Under torchrun the trainer's RANK / MASTER_PORT ... would make a launched server join the
    trainer's process group (it hangs before /health); they are dropped, the rest is kept."""
    from scope_megatron.rollout.sglang.servers import server_environment

    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x", "SGLANG_RETURN_ORIGINAL_LOGPROB": "1",
                       "CUDA_VISIBLE_DEVICES": "0,1", "MY_SETTING": "kept"}.items():
        monkeypatch.setenv(key, value)
    env = server_environment()
    assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                "SGLANG_RETURN_ORIGINAL_LOGPROB"} & set(env)
    assert env["MY_SETTING"] == "kept" and env["CUDA_VISIBLE_DEVICES"] == "0,1"


# a minimal server: GET /health answers 200 (on the --port it is given, like sglang.launch_server)
_HEALTH_ONLY = (
    "import sys, http.server\n"
    "port = int(sys.argv[sys.argv.index('--port') + 1])\n"
    "class H(http.server.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        self.send_response(200); self.send_header('Content-Length', '0'); self.end_headers()\n"
    "    def log_message(self, *a):\n"
    "        pass\n"
    "http.server.HTTPServer(('127.0.0.1', port), H).serve_forever()\n"
)


def _dead(pid: int) -> bool:
    """Gone, or a zombie nobody reaped (a container's init may not reap orphans)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
@pytest.mark.parametrize("via", ["setpriv", "preexec_fn"])
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_launched_servers_do_not_outlive_the_launching_process(tmp_path, sig, via):
    """torchrun stops the surviving ranks with SIGTERM, then SIGKILL, when one rank fails (and on
    Ctrl-C): global rank 0 then dies without running atexit or finally blocks. Its servers run in
    their own session, so nothing else stops them: they must die with it, not stay behind holding
    the GPUs and the ports of the next run. Armed by setpriv where it is on PATH, else by the
    preexec_fn fallback (PATH without setpriv)."""
    import shutil
    import signal
    import subprocess

    from scope_megatron.rollout.sglang.servers import _setpriv

    if via == "setpriv" and _setpriv() is None:
        pytest.skip("no setpriv with --pdeathsig on PATH")

    base = _free_ports(1)
    launcher = (
        "import sys, time\n"
        "from scope_megatron.rollout.sglang import SGLangServers\n"
        f"s = SGLangServers.launch('/no/model', base_port={base}, log_dir={str(tmp_path)!r}, "
        f"command=(sys.executable, '-c', {_HEALTH_ONLY!r}), startup_timeout=60, kill_timeout=5)\n"
        "print(s.processes[0].pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if via == "preexec_fn":
        env["PATH"] = str(tmp_path / "empty")  # no setpriv to be found
    else:
        launcher = launcher.replace("print(s.processes[0].pid, flush=True)",
                                    "assert s.processes[0].args[1:3] == ['--pdeathsig', 'KILL']\n"
                                    "print(s.processes[0].pid, flush=True)")
    assert via == "setpriv" or shutil.which("setpriv", path=env["PATH"]) is None
    trainer = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, cwd=REPO, env=env)
    server_pid = None
    try:
        line = trainer.stdout.readline()
        assert line, "the launching process did not start its server"
        server_pid = int(line)
        assert not _dead(server_pid)
        os.kill(trainer.pid, getattr(signal, sig))
        trainer.wait(timeout=30)
        deadline = time.monotonic() + 15
        while not _dead(server_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _dead(server_pid), f"the server (pid {server_pid}) outlived the process that launched it"
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
        if server_pid is not None and not _dead(server_pid):
            os.killpg(server_pid, signal.SIGKILL)


def test_servers_launched_without_gpu_lists_take_distinct_gpus(tmp_path):
    """Without `gpus` every server sees the same CUDA_VISIBLE_DEVICES, and SGLang starts each one
    on the first visible GPU (--base-gpu-id 0): num_servers > 1 would stack them all on GPU 0
    (out of memory at startup). Server i starts at GPU i * tp_size of the visible ones instead."""
    base = _free_ports(2)
    with SGLangServers.launch("/no/model", num_servers=2, base_port=base, tp_size=2, log_dir=tmp_path,
                              command=(sys.executable, "-c", _HEALTH_ONLY), startup_timeout=60, kill_timeout=5):
        pass
    logs = [(tmp_path / f"sglang-{base + i}.log").read_text() for i in range(2)]  # the command, first
    assert "--base-gpu-id 0" in logs[0] and "--base-gpu-id 2" in logs[1]
    # given GPU lists (CUDA_VISIBLE_DEVICES per server), or a --base-gpu-id of the user's: left alone
    base = _free_ports(2)
    with SGLangServers.launch("/no/model", num_servers=2, base_port=base, gpus=[[0], [1]], log_dir=tmp_path,
                              command=(sys.executable, "-c", _HEALTH_ONLY), startup_timeout=60, kill_timeout=5):
        pass
    with SGLangServers.launch("/no/model", num_servers=1, base_port=base, log_dir=tmp_path / "one",
                              command=(sys.executable, "-c", _HEALTH_ONLY), startup_timeout=60, kill_timeout=5):
        pass
    logs = [(tmp_path / f"sglang-{base + i}.log").read_text() for i in range(2)] + \
        [(tmp_path / "one" / f"sglang-{base}.log").read_text()]
    assert not any("--base-gpu-id" in text for text in logs)
    base = _free_ports(2)
    with SGLangServers.launch("/no/model", num_servers=2, base_port=base, extra_args=("--base-gpu-id", "4"),
                              log_dir=tmp_path / "user", command=(sys.executable, "-c", _HEALTH_ONLY),
                              startup_timeout=60, kill_timeout=5):
        pass
    for i in range(2):
        text = (tmp_path / "user" / f"sglang-{base + i}.log").read_text()
        assert text.count("--base-gpu-id") == 1 and "--base-gpu-id 4" in text
