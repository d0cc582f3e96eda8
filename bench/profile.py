"""`--profile`: py-spy on every Python service while a closed-loop point runs, and a summary of
where each one's on-CPU samples went (leaf functions, system calls, and the project's own code).

py-spy pauses a process at every sample (`--native` needs it): a profiled run is slower, so its
figures are for the shares, never for the throughput. Raw stacks (one line per distinct stack:
`frame;frame;... count`) go to bench/results/profiles/, flamegraph-ready."""

import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PYTHON_SERVICES = ("orders", "gateway", "stock-api", "worker-0", "worker-1")
# libc/kernel entry points: a leaf frame named like this is time spent in a system call
SYSCALLS = re.compile(r"^(__)?(libc_)?(write|writev|send|sendto|sendmsg|read|recv|recvfrom|recvmsg|"
                      r"epoll_wait|epoll_pwait|epoll_ctl|poll|select|futex|clock_gettime|getpid|"
                      r"close|connect|accept4?|fsync|fdatasync)(64)?$")
OWN_CODE = ("gateway/", "orders/", "stock/", "shared/")


EPOLL = "syscall epoll_pwait"


def _pyspy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


@contextmanager
def profiled(pids: dict[str, int], seconds: float, out_dir: Path, tag: str,
             native: bool = True) -> Iterator[dict[str, Path]]:
    """Samples each Python service of `pids` for `seconds` while the block runs; yields the
    raw-stack file of each (filled when the block ends)."""
    binary = _pyspy()
    files: dict[str, Path] = {}
    procs = []
    if binary is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, pid in pids.items():
            if name not in PYTHON_SERVICES:
                continue
            files[name] = out_dir / f"{tag}-{name}.txt"
            command = [binary, "record", "-p", str(pid), "-d", str(max(1, round(seconds))), "-r", "100",
                       "-f", "raw", "-o", str(files[name])] + (["--native"] if native else [])
            procs.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        yield files
    finally:
        for proc in procs:
            try:
                proc.wait(timeout=seconds + 30)
            except subprocess.TimeoutExpired:
                proc.kill()


def read_stacks(path: Path) -> Counter[tuple[str, ...]]:
    """py-spy's raw format: `frame;frame;...;leaf count` per line, root first."""
    stacks: Counter[tuple[str, ...]] = Counter()
    if not path.exists():
        return stacks
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def _function(frame: str) -> str:
    """`name (file:line)` -> `name (file)`: lines of one function together."""
    return re.sub(r":\d+\)$", ")", frame.strip())


def _file(frame: str) -> str:
    return frame.rpartition(" (")[2].rstrip(")").split(":")[0]


def _is_own(frame: str) -> bool:
    return _file(frame).startswith(OWN_CODE)


def classify(stack: tuple[str, ...]) -> tuple[str, str]:
    """(where the sample's CPU went, which of the project's functions led there).

    The first is the leaf's system call if it is one, else the package of the deepest Python
    frame (`asyncpg`, `aiohttp`, ..., or the project's file); the second is the deepest frame of
    the project's own code (`-` if none: the event loop itself)."""
    leaf = _function(stack[-1]).split(" ")[0]
    python = [f for f in stack if _file(f).endswith(".py")]
    if SYSCALLS.match(leaf):
        where = f"syscall {re.sub(r'^_*(libc_)?', '', leaf)}"
    elif python:
        path = _file(python[-1])
        where = path if path.startswith(OWN_CODE) else path.split("/")[0]
    else:
        where = "native"
    own = [f for f in stack if _is_own(f)]
    return where, (_function(own[-1]) if own else "-")


def summarize(stacks: Counter[tuple[str, ...]], top: int = 8) -> dict[str, Any]:
    """On-CPU samples by where they went (system call, library, own file), by the project's
    function that led there (inclusive of the libraries it called), and who made the writes.
    Samples in `epoll_pwait` (the event loop waiting) are counted apart, not in the shares."""
    polling = sum(c for stack, c in stacks.items() if classify(stack)[0] == EPOLL)
    total = sum(stacks.values()) - polling  # py-spy counts a loop entering epoll as running
    if total <= 0:
        return {"samples": 0}
    where: Counter[str] = Counter()
    via: Counter[str] = Counter()
    writes: Counter[str] = Counter()
    for stack, count in stacks.items():
        place, caller = classify(stack)
        if place == EPOLL:
            continue
        where[place] += count
        via[caller] += count
        if place in ("syscall write", "syscall writev", "syscall send", "syscall sendto", "syscall sendmsg"):
            writes[caller] += count

    def shares(counter: Counter[str]) -> dict[str, float]:
        return {name: round(count / total, 3) for name, count in counter.most_common(top)}

    syscalls = sum(v for k, v in where.items() if k.startswith("syscall"))
    return {"samples": total, "epoll_samples": polling, "syscall_share": round(syscalls / total, 3), "where": shares(where),
            "via": shares(via), "writes_via": shares(writes)}


def summarize_files(files: dict[str, Path]) -> dict[str, Any]:
    return {name: summarize(read_stacks(path)) for name, path in files.items()}
