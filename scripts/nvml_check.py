#!/usr/bin/env python3
"""vramgate's NVML probe on a real NVIDIA GPU, end to end (run it through scripts/nvml-check.sh).

Starts the given vramgate binary with `probe = "nvml"` in a temp dir of its own (its own home,
XDG and state directories, an ephemeral loopback port), then a child process that allocates GPU
memory (PyTorch if the interpreter can import it, else a tiny CUDA program built with nvcc, or
the command given with --alloc-cmd), and checks through GET /vramgate/status that:

1. the allocation is attributed to the child's pid within one sample interval (plus --slack);
2. once the child frees it, status sees the memory back (the pid's figure drops by at least half
   the allocation, or the pid leaves the list);
3. once the child exits, its pid leaves the list.

It prints the timings as a table. Exit 0: all seen; 1: a step failed (the message says which and
what status showed); 77: skipped, nothing to allocate with (no PyTorch, no nvcc). Standard
library only. CI never runs it: no machine there has a GPU.

The allocator protocol (what --alloc-cmd must follow): it gets VRAMGATE_CHECK_MIB (MiB to
allocate) and VRAMGATE_CHECK_DEVICE (the NVML index; CUDA_DEVICE_ORDER=PCI_BUS_ID is set so CUDA's
numbering matches) in its environment, allocates, prints `allocated` on a line of its own; on a
line `free` on its stdin it frees the memory and prints `freed`; on a line `exit` (or the end of
its stdin) it exits. The process the command starts must be the one that holds the memory (it is
run without a shell).
"""

import argparse
import json
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

SKIPPED = 77
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POLL = 0.005  # seconds between status reads: small against any sample interval vramgate allows

TORCH_ALLOCATOR = """
import os, sys
import torch
mib, device = int(os.environ["VRAMGATE_CHECK_MIB"]), int(os.environ["VRAMGATE_CHECK_DEVICE"])
held = torch.empty(mib * 1024 * 1024, dtype=torch.uint8, device=f"cuda:{device}")
held.zero_()  # touch it, so the driver has committed it
torch.cuda.synchronize(device)
print("allocated", flush=True)
sys.stdin.readline()
del held
torch.cuda.empty_cache()  # hand the cached block back to the driver
torch.cuda.synchronize(device)
print("freed", flush=True)
sys.stdin.readline()
"""

CUDA_ALLOCATOR = r"""
// vramgate's NVML check: allocate VRAMGATE_CHECK_MIB MiB on device VRAMGATE_CHECK_DEVICE.
#include <cstdio>
#include <cstdlib>
#include <cuda_runtime.h>

static int check(cudaError_t e, const char *what) {
    if (e == cudaSuccess) return 0;
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
    return 1;
}

int main() {
    const char *mib_text = std::getenv("VRAMGATE_CHECK_MIB"), *device_text = std::getenv("VRAMGATE_CHECK_DEVICE");
    if (mib_text == nullptr || device_text == nullptr) return 2;
    size_t bytes = std::strtoull(mib_text, nullptr, 10) << 20;
    void *held = nullptr;
    char line[64];
    if (check(cudaSetDevice(std::atoi(device_text)), "cudaSetDevice") || check(cudaMalloc(&held, bytes), "cudaMalloc") ||
        check(cudaMemset(held, 0, bytes), "cudaMemset") || check(cudaDeviceSynchronize(), "cudaDeviceSynchronize"))
        return 1;
    std::printf("allocated\n");
    std::fflush(stdout);
    if (std::fgets(line, sizeof line, stdin) == nullptr) return 0;
    if (check(cudaFree(held), "cudaFree") || check(cudaDeviceSynchronize(), "cudaDeviceSynchronize")) return 1;
    std::printf("freed\n");
    std::fflush(stdout);
    std::fgets(line, sizeof line, stdin);
    return 0;
}
"""


class Failed(Exception):
    """A step of the check failed; the message says which and what was seen."""


def duration(text):
    """`500ms`, `2s` or `1.5s` as seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s)", text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 500ms or 2s")
    value = float(match.group(1))
    return value / 1000 if match.group(2) == "ms" else value


def arguments(argv):
    parser = argparse.ArgumentParser(
        prog="scripts/nvml-check.sh",
        description="Checks vramgate's NVML probe on a real NVIDIA GPU: attribution of an allocation to "
        "its pid within one sample, and its release. Exit 0 ok, 1 failed, 77 skipped.",
    )
    parser.add_argument(
        "binary", nargs="?", default=os.path.join(REPO, "target", "release", "vramgate"),
        help="the vramgate binary (default: target/release/vramgate; build it with cargo build --release)",
    )
    parser.add_argument("--library", help="[gpu.nvml] library (default: the system's libnvidia-ml.so.1)")
    parser.add_argument("--device", type=int, default=0, help="NVML index of the GPU to allocate on (default 0)")
    parser.add_argument("--mib", type=int, default=1024, help="MiB to allocate (default 1024)")
    parser.add_argument("--interval", type=duration, default=0.5, help="sample_interval (default 500ms)")
    parser.add_argument(
        "--slack", type=duration, default=0.1,
        help="time allowed beyond one interval for the sample itself and the status read (default 100ms)",
    )
    parser.add_argument("--timeout", type=duration, default=20.0, help="longest wait for any step (default 20s)")
    parser.add_argument(
        "--python", default=sys.executable,
        help="interpreter for the PyTorch allocator (default: the one running this check)",
    )
    parser.add_argument("--nvcc", default="nvcc", help="CUDA compiler for the fallback allocator (default: nvcc)")
    parser.add_argument("--alloc-cmd", help="an allocator of your own, following the protocol in this file's docstring")
    args = parser.parse_args(argv)
    if args.mib < 1:
        parser.error("--mib must be at least 1")
    if args.device < 0:
        parser.error("--device must be 0 or more")
    return args


def torch_importable(python):
    try:
        result = subprocess.run([python, "-c", "import torch"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def allocator(args, scratch):
    """The command that allocates, and its name; None when there is nothing to allocate with."""
    if args.alloc_cmd:
        command = shlex.split(args.alloc_cmd)
        if not command:
            raise Failed("--alloc-cmd is empty")
        return command, f"--alloc-cmd ({command[0]})"
    if torch_importable(args.python):
        return [args.python, "-c", TORCH_ALLOCATOR], "PyTorch"
    nvcc = shutil.which(args.nvcc)
    if nvcc is None:
        return None
    source, program = os.path.join(scratch, "alloc.cu"), os.path.join(scratch, "alloc")
    with open(source, "w", encoding="utf-8") as out:
        out.write(CUDA_ALLOCATOR)
    built = subprocess.run([nvcc, "-o", program, source], stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, check=False)
    if built.returncode != 0:
        raise Failed(f"{nvcc} could not build the CUDA allocator:\n{built.stderr.strip()}")
    return [program], "a CUDA program (nvcc)"


def tail(path, lines=20):
    try:
        with open(path, encoding="utf-8", errors="replace") as text:
            return "".join(text.readlines()[-lines:]).rstrip()
    except OSError:
        return "(no output)"


class Daemon:
    """vramgate serve on NVML in `scratch`, isolated from the user's daemon and files."""

    def __init__(self, binary, args, scratch):
        home = os.path.join(scratch, "home")
        env = {k: v for k, v in os.environ.items() if not k.startswith("VRAMGATE_") and k != "NOTIFY_SOCKET"}
        env.update(HOME=home, XDG_STATE_HOME=os.path.join(home, ".local", "state"),
                   XDG_CONFIG_HOME=os.path.join(home, ".config"), XDG_CACHE_HOME=os.path.join(home, ".cache"),
                   XDG_DATA_HOME=os.path.join(home, ".local", "share"), VRAMGATE_LOG="info")
        os.makedirs(home)
        config = os.path.join(scratch, "vramgate.toml")
        with open(config, "w", encoding="utf-8") as out:
            # json.dumps gives a TOML basic string for any path.
            out.write(f"[server]\nstate_dir = {json.dumps(os.path.join(scratch, 'state'))}\n")
            out.write(f"[gpu]\nprobe = \"nvml\"\nsample_interval = \"{round(args.interval * 1000)}ms\"\n")
            if args.library:
                out.write(f"[gpu.nvml]\nlibrary = {json.dumps(os.path.abspath(args.library))}\n")
        self.stdout_path, self.log = os.path.join(scratch, "daemon.out"), os.path.join(scratch, "daemon.log")
        with open(self.stdout_path, "w") as stdout, open(self.log, "w") as stderr:
            self.process = subprocess.Popen([binary, "serve", "--config", config, "--listen", "127.0.0.1:0"],
                                            stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=env)
        self.url = self._address(args.timeout)
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _address(self, timeout):
        """The URL from the `… listening on URL` line."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.stdout_path, encoding="utf-8", errors="replace") as out:
                for line in out:
                    if "listening on " in line:
                        return line.split("listening on ", 1)[1].strip()
            if self.process.poll() is not None:
                raise Failed(f"vramgate exited (status {self.process.returncode}) before listening; its log:\n"
                             f"{tail(self.log)}")
            time.sleep(0.01)
        raise Failed(f"vramgate printed no 'listening on' line within {timeout:g} s; its log:\n{tail(self.log)}")

    def status(self):
        try:
            with self.opener.open(self.url + "/vramgate/status", timeout=10) as response:
                return json.load(response)
        except (OSError, urllib.error.URLError, ValueError) as e:
            raise Failed(f"GET {self.url}/vramgate/status failed: {e}; vramgate's log:\n{tail(self.log)}") from e

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def device_of(status, index):
    for device in status.get("devices", []):
        if device.get("index") == index:
            return device
    names = [f"{d.get('index')}: {d.get('name')}" for d in status.get("devices", [])]
    raise Failed(f"status lists no device {index} (devices: {names or 'none'}; degraded: "
                 f"{status.get('degraded_reasons')})")


def listed(device, pid):
    """The process entry of `pid` on `device`, or None."""
    return next((p for p in device.get("processes", []) if p.get("pid") == pid), None)


def shown(device):
    return ", ".join(f"pid {p.get('pid')} {p.get('used_mib')} MiB" for p in device.get("processes", [])) or "none"


def wait_until(daemon, index, seen, timeout):
    """Polls status until `seen(device)` is true; returns (seconds waited, device) or raises."""
    start = time.monotonic()
    while True:
        device = device_of(daemon.status(), index)
        if seen(device):
            return time.monotonic() - start, device
        if time.monotonic() - start > timeout:
            return None, device
        time.sleep(POLL)


class Allocator:
    """The child that holds GPU memory, driven line by line."""

    def __init__(self, command, args, scratch):
        env = {k: v for k, v in os.environ.items() if not k.startswith("VRAMGATE_")}
        env.update(VRAMGATE_CHECK_MIB=str(args.mib), VRAMGATE_CHECK_DEVICE=str(args.device),
                   CUDA_DEVICE_ORDER="PCI_BUS_ID")
        self.errors = os.path.join(scratch, "allocator.err")
        with open(self.errors, "w") as stderr:
            self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                            env=env, text=True, bufsize=1)
        self.pid = self.process.pid

    def expect(self, word, timeout):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failed(f"the allocator (pid {self.pid}) did not print '{word}' within {timeout:g} s; its "
                             f"stderr:\n{tail(self.errors)}")
            ready, _, _ = select.select([self.process.stdout], [], [], left)
            if ready:
                line = self.process.stdout.readline()
                if line == "":
                    self.process.wait()
                    raise Failed(f"the allocator (pid {self.pid}) exited (status {self.process.returncode}) before "
                                 f"printing '{word}'; its stderr:\n{tail(self.errors)}")
                if line.strip() == word:
                    return

    def say(self, word):
        try:
            self.process.stdin.write(word + "\n")
            self.process.stdin.flush()
        except BrokenPipeError as e:
            raise Failed(f"the allocator (pid {self.pid}) is gone; its stderr:\n{tail(self.errors)}") from e

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def check(args, scratch):
    binary = os.path.abspath(args.binary)
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        raise Failed(f"no vramgate binary at {binary}: build one with `cargo build --release`, or pass its path")
    chosen = allocator(args, scratch)
    if chosen is None:
        print(f"skipped: no PyTorch ({args.python} cannot import torch) and no nvcc ({args.nvcc} not found)")
        return SKIPPED
    command, how = chosen
    daemon, child = None, None
    try:
        daemon = Daemon(binary, args, scratch)
        first = daemon.status()
        if first.get("probe") != "nvml":
            raise Failed(f"vramgate runs the {first.get('probe')} probe, not nvml")
        before = device_of(first, args.device)
        child = Allocator(command, args, scratch)
        child.expect("allocated", max(args.timeout, 120.0))  # a first CUDA context can take a while
        limit = args.interval + args.slack
        # A figure of at least the allocation (the driver adds the CUDA context), or none where
        # the driver does not report one (then the pid alone attributes it).
        def attributed(device):
            entry = listed(device, child.pid)
            return entry is not None and (entry.get("used_mib") is None or entry["used_mib"] >= args.mib)
        attribution, device = wait_until(daemon, args.device, attributed, max(args.timeout, limit))
        if attribution is None:
            raise Failed(f"{args.mib} MiB allocated by pid {child.pid} on device {args.device} was not attributed "
                         f"to it within {max(args.timeout, limit):g} s; status lists: {shown(device)}")
        figure = listed(device, child.pid).get("used_mib")
        results = [("allocation attributed to its pid", attribution, limit,
                    f"one sample interval + {args.slack * 1000:.0f} ms")]
        child.say("free")
        child.expect("freed", args.timeout)
        def freed(device):
            entry = listed(device, child.pid)
            return (entry is None or figure is None or entry.get("used_mib") is None
                    or entry["used_mib"] <= figure - (args.mib + 1) // 2)
        released, device = wait_until(daemon, args.device, freed, args.timeout)
        if released is None:
            raise Failed(f"pid {child.pid} freed {args.mib} MiB but status still shows it after {args.timeout:g} s: "
                         f"{shown(device)}")
        results.append(("free seen (figure down or pid gone)", released, args.timeout, "--timeout"))
        child.say("exit")
        try:
            child.process.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired as e:
            raise Failed(f"the allocator (pid {child.pid}) did not exit within {args.timeout:g} s") from e
        gone, device = wait_until(daemon, args.device, lambda d: listed(d, child.pid) is None, args.timeout)
        if gone is None:
            raise Failed(f"pid {child.pid} exited but status still lists it after {args.timeout:g} s: {shown(device)}")
        results.append(("exit seen (pid gone from the list)", gone, args.timeout, "--timeout"))
    finally:
        if child is not None:
            child.stop()
        if daemon is not None:
            daemon.stop()
    print(f"vramgate NVML check: device {args.device} ({before.get('name')}, {before.get('total_mib')} MiB), "
          f"sample_interval {args.interval * 1000:.0f} ms, {args.mib} MiB allocated by {how} (pid {child.pid}, "
          f"{'no figure' if figure is None else f'{figure} MiB'} in status)")
    print(f"{'step':<38} {'latency':>10}  limit")
    late = []
    for step, seconds, bound, why in results:
        print(f"{step:<38} {seconds * 1000:>7.1f} ms  {bound * 1000:.0f} ms ({why})")
        if seconds > bound:
            late.append(f"{step}: {seconds * 1000:.1f} ms > {bound * 1000:.0f} ms")
    if late:
        raise Failed("too slow: " + "; ".join(late))
    print("ok")
    return 0


def main(argv):
    args = arguments(argv)
    # A SIGTERM (or the end of a CI job's shell) cleans up as an error does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    scratch = tempfile.mkdtemp(prefix="vramgate-nvml-check.")
    try:
        return check(args, scratch)
    except Failed as failure:
        print(f"FAILED: {failure}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
