"""The fork server and its children: each measurement in a fresh process with a memory limit and a time budget."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import sys
import time
import warnings

from .cases import Case
from .measure import _limit_address_space, classify_failure, measure, measure_in_turns

_PREWARM_ENV = "QRKD_BENCH_PREWARM"


def _child_main(job: dict) -> None:
    """In a child forked by the server: measure, write the result file. Never returns (os._exit)."""
    started = time.perf_counter()
    try:
        os.setsid()  # its own process group: a timeout kills it together with any compiler it started
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        warnings.simplefilter("ignore")  # e.g. MerLin's deprecation notices, once per child: noise in the progress
        case = Case.from_dict(job["case"])
        if case.device == "cpu" and job.get("mem_limit"):
            _limit_address_space(job["mem_limit"])
        if isinstance(job["impl"], list):  # several impls: timed against each other in turns
            result = measure_in_turns(case, job["impl"], job["settings"], started)
        else:
            result = measure(case, job["impl"], job["settings"], started)
    except BaseException as exc:  # a failure of the measured code is a result, not a crash of the sweep
        result = classify_failure(exc)
    try:
        gc.collect()
        tmp = job["result_path"] + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f)
        os.replace(tmp, job["result_path"])
    finally:
        os._exit(0)


def _prewarm(spec: str) -> None:
    """Runs in the fork server, once: everything every child would otherwise redo, none of it running a torch op
    (OpenMP's thread pool and CUDA must start in the children)."""
    import torch  # noqa: F401

    import qrkd  # noqa: F401

    parts = spec.split(",")
    if "cpu" in parts:
        from qrkd import backends

        backends.backend_status()
    if "compile" in parts:
        import torch._dynamo  # noqa: F401
        import torch._inductor.compile_fx  # noqa: F401

        if "cpu" in parts:
            from torch._inductor import cpu_vec_isa

            cpu_vec_isa.pick_vec_isa()  # builds and loads probe programs (seconds), cached for every child
    if "merlin" in parts:
        with contextlib.suppress(ImportError):
            import merlin  # noqa: F401
    if torch.cuda.is_initialized():
        raise RuntimeError("CUDA was initialised in the benchmark's fork server: its children could not use it")


def _serve(fd: int) -> None:
    """The fork server: reads one job (JSON) per line on stdin, forks a child for it, reports on `fd`
    "pid <pid>" when the child runs and {"pid", "status", "maxrss"} (os.wait4) when it is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles ^C and closes our stdin
    out = os.fdopen(fd, "w", buffering=1)
    _prewarm(os.environ.pop(_PREWARM_ENV, ""))
    gc.collect()
    gc.freeze()  # the children's gc then leaves these objects (and their copy-on-write pages) alone
    out.write("ready\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            try:
                with contextlib.suppress(OSError):
                    os.close(fd)
                _child_main(job)
            finally:
                os._exit(1)  # never back into the server's loop
        out.write(f"pid {pid}\n")
        _, status, usage = os.wait4(pid, 0)
        out.write(json.dumps({"pid": pid, "status": status, "maxrss": usage.ru_maxrss * 1024}) + "\n")


class ServerDied(RuntimeError):
    pass


class Runner:
    """Runs each measurement in a child of one fork server: a process that has imported torch and qrkd once."""

    def __init__(self, device="cpu", mem_limit=None, prewarm=("cpu",)):
        self.device = device
        self.mem_limit = mem_limit
        self.prewarm = ",".join(prewarm)
        self.server = None
        self._fd = None
        self._buf = b""
        self._tmp = None
        self.started_s = None

    def start(self) -> float:
        """Starts the fork server (its imports and prewarming happen now, not in the first case's budget)."""
        if self.server is not None and self.server.poll() is None:
            return self.started_s
        import subprocess
        import tempfile

        self.close()
        t0 = time.perf_counter()
        self._tmp = tempfile.mkdtemp(prefix="qrkd-bench-")
        r, w = os.pipe()
        env = dict(os.environ)
        env[_PREWARM_ENV] = self.prewarm
        env["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"  # torch.cuda.is_available() without creating a CUDA context
        code = "import sys; from qrkd.benchmark.runner import _serve; _serve(int(sys.argv[1]))"
        self.server = subprocess.Popen([sys.executable, "-c", code, str(w)], stdin=subprocess.PIPE, pass_fds=(w,),
                                       env=env)
        os.close(w)
        self._fd, self._buf = r, b""
        line = self._readline(900.0)
        if line != "ready":
            self.close()
            raise ServerDied(f"the benchmark fork server did not start ({line!r})")
        self.started_s = time.perf_counter() - t0
        return self.started_s

    def _readline(self, timeout: float):
        """The server's next line, or None after `timeout` seconds; ServerDied at end of file."""
        import select

        end = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = end - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self._fd], [], [], left)
            if ready:
                chunk = os.read(self._fd, 65536)
                if not chunk:
                    raise ServerDied("the benchmark fork server exited")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def run(self, case: Case, impl, settings: dict, timeout: float) -> dict:
        """One measurement of `impl` (a name) or, given a list of names, those impls timed in turns in one child."""
        try:
            return self._run(case, impl, settings, timeout)
        except ServerDied as exc:
            self.close()  # the next measurement starts a new server
            return {"status": "error", "detail": str(exc), "wall_s": 0.0}

    def _run(self, case, impl, settings, timeout) -> dict:
        self.start()
        path = os.path.join(self._tmp, "result.json")
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        job = {"case": case.to_dict(), "impl": impl, "settings": settings, "mem_limit": self.mem_limit,
               "result_path": path}
        try:
            self.server.stdin.write(json.dumps(job).encode() + b"\n")
            self.server.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise ServerDied(f"the benchmark fork server is gone ({exc})") from exc
        line = self._readline(120.0)
        if not line or not line.startswith("pid "):
            raise ServerDied(f"the benchmark fork server did not fork ({line!r})")
        pid = int(line.split()[1])
        t0 = time.perf_counter()
        timed_out = False
        try:
            line = self._readline(timeout)
            if line is None:
                timed_out = True
                self._kill(pid)
                line = self._readline(60.0)
        except KeyboardInterrupt:
            self._kill(pid)
            raise
        if line is None:
            raise ServerDied(f"child {pid} could not be reaped")
        wall = time.perf_counter() - t0
        done = json.loads(line)
        status = done["status"]
        result = None
        if os.path.exists(path):
            with open(path) as f:
                result = json.load(f)
        if timed_out:
            result = {"status": "timeout", "detail": f"killed after the {timeout:g} s budget"}
        elif result is None:
            if os.WIFSIGNALED(status):
                sig = os.WTERMSIG(status)
                oom = sig == signal.SIGKILL
                result = {"status": "oom" if oom else "error",
                          "detail": f"the child died of {signal.Signals(sig).name}"
                          + (" (by the kernel's OOM killer, most likely)" if oom else "")}
            else:
                result = {"status": "error",
                          "detail": f"the child exited with code {os.WEXITSTATUS(status)} without a result"}
        result["wall_s"] = wall
        result["child_maxrss_bytes"] = done["maxrss"]
        return result

    @staticmethod
    def _kill(pid: int) -> None:
        try:
            os.killpg(pid, signal.SIGKILL)  # the child made itself a group leader
        except OSError:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        if self.server is not None:
            with contextlib.suppress(Exception):
                self.server.stdin.close()
            try:
                self.server.wait(10)
            except Exception:
                self.server.kill()
                self.server.wait()
            self.server = None
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if self._tmp:
            import shutil

            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
