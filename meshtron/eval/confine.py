"""Run one program confined by the Linux kernel; executed as a script (`python -I -S confine.py SETTINGS`)
by meshtron.eval.sandbox, never imported. It uses the standard library only.

The program arrives on stdin; one JSON status line leaves on stdout. With "confine" set:
1. unshare: new mount, network, pid, IPC and UTS namespaces, plus a user namespace when not root;
2. fork: the child is pid 1 of the new pid namespace (when it ends, the kernel kills everything the
   program started); this process stays outside as its watchdog and kills it at the timeout or
   when its output reaches the file-size limit;
3. the child builds a new root on tmpfs: read-only binds of the system and Python directories,
   a /dev with only null, zero, full, random and urandom, a fresh /proc of its own pid namespace,
   and a private size-limited writable /tmp; pivot_root into it and detach the old root;
4. it drops to uid/gid 65534 (when root; in a user namespace it is already 65534 and exec drops
   its capabilities), sets resource limits and no_new_privs, and installs a seccomp filter that
   refuses new sockets (socketpair stays), io_uring, and new user namespaces;
5. it execs Python on the program, with stdout and stderr going to the file the parent passed.
Without "confine" only the resource limits, the timeout and a temporary working directory apply.
"""

import ctypes
import json
import os
import platform
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time

UNPRIVILEGED = 65534  # "nobody"
SETUP_FAILED = 127
POLL_S = 0.02  # how often the watchdog looks at the clock and the output's size

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000
MNT_DETACH = 0x2
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 1, 38, 22, 2

# System call numbers the filter and the mounts need (the generic ones are the same on both).
ARCHES = {
    "x86_64": dict(audit=0xC000003E, socket=41, clone=56, unshare=272, pivot_root=155),
    "aarch64": dict(audit=0xC00000B7, socket=198, clone=220, unshare=97, pivot_root=41),
}
NR_IO_URING_SETUP, NR_CLONE3, NR_MOUNT_SETATTR = 425, 435, 442
X32_SYSCALL_BIT = 0x40000000

# Directories of the host shown read-only inside (symlinks among them are recreated as symlinks).
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
DEVICES = ("null", "zero", "full", "random", "urandom")

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


class SetupError(Exception):
    pass


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)}")


def _mount(source, target, fstype, flags, data=None) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _make_read_only(path: str, recursive: bool = True) -> None:
    """Make the mount at `path` (and every mount below it if `recursive`) read-only, nosuid and nodev."""
    attr = _MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, 0, 0, 0)
    ret = libc.syscall(NR_MOUNT_SETATTR, AT_FDCWD, path.encode(), AT_RECURSIVE if recursive else 0,
                       ctypes.byref(attr), ctypes.sizeof(attr))
    _check(ret, f"mount_setattr {path}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def enter_namespaces(arch: dict) -> None:
    """New namespaces for what this process forks next. Root keeps its real identity until the
    child drops it; anyone else needs a user namespace, where it becomes 65534 (capable only inside)."""
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    uid, gid = os.geteuid(), os.getegid()
    if uid != 0:
        flags |= CLONE_NEWUSER
    _check(libc.unshare(flags), "unshare")
    if uid != 0:
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{UNPRIVILEGED} {uid} 1")
        _write("/proc/self/gid_map", f"{UNPRIVILEGED} {gid} 1")


def _python_dirs() -> list[str]:
    """The interpreter's installation, where it lies outside the system directories (pyenv, venvs:
    a virtual environment is the folder above its bin/python link, as this script runs without site)."""
    dirs = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    for executable in (os.path.abspath(sys.executable), os.path.realpath(sys.executable)):
        dirs.add(os.path.realpath(os.path.dirname(os.path.dirname(executable))))
    inside = lambda d: any(d == s or d.startswith(s + "/") for s in SYSTEM_DIRS)  # noqa: E731
    return sorted(d for d in dirs if not inside(d))


def build_root(root: str, tmp_bytes: int) -> None:
    """The file system the program sees, assembled on a tmpfs at `root`, then made the root."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing done here propagates to the host
    # What it shows of the host, opened before the new root covers `root` (a Python may live there).
    shown = [p for p in SYSTEM_DIRS if os.path.lexists(p)] + _python_dirs()
    links = {p: os.readlink(p) for p in shown if os.path.islink(p)}
    handles = {p: os.open(p, os.O_PATH) for p in shown if p not in links}
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    os.makedirs(root + "/tmp")  # first, so that a Python under /tmp is bound into it, not hidden by it
    _mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmp_bytes},mode=1777")
    for path in shown:
        target = root + path
        if os.path.lexists(target):  # inside one bound already (a virtual environment in its base Python)
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if path in links:
            os.symlink(links[path], target)
        else:
            os.mkdir(target)
            _mount(f"/proc/self/fd/{handles[path]}", target, None, MS_BIND | MS_REC)
            _make_read_only(target)
    os.makedirs(root + "/dev")
    _mount("tmpfs", root + "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=755")
    for name in DEVICES:
        open(f"{root}/dev/{name}", "w").close()
        _mount(f"/dev/{name}", f"{root}/dev/{name}", None, MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2"), ("shm", "/tmp")):
        os.symlink(target, f"{root}/dev/{name}")
    _make_read_only(root + "/dev", recursive=False)  # its device nodes are mounts of their own
    os.makedirs(root + "/proc")
    _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY)
    _make_read_only(root, recursive=False)


def pivot(root: str, arch: dict) -> None:
    """Make `root` the root and detach the old one, so no path (and no chroot trick) leads back."""
    os.chdir(root)
    _check(libc.syscall(arch["pivot_root"], b".", b"."), "pivot_root")
    _check(libc.umount2(b".", MNT_DETACH), "umount old root")
    os.chdir("/")


def _assemble(program: list) -> bytes:
    """Classic BPF from (code, k, true_label, false_label) tuples and label names."""
    labels, insns = {}, []
    for op in program:
        if isinstance(op, str):
            labels[op] = len(insns)
        else:
            insns.append(op)
    out = b""
    for i, (code, k, jt, jf) in enumerate(insns):
        offset = lambda label: labels[label] - (i + 1) if label else 0  # noqa: E731
        out += struct.pack("=HBBI", code, offset(jt), offset(jf), k & 0xFFFFFFFF)
    return out


def install_seccomp(arch: dict) -> None:
    """Refuse new sockets of every family (several are not network-namespaced, e.g. AF_VSOCK, and an
    AF_UNIX socket reaches any listening socket file it can see, read-only mount or not; socketpair
    stays), io_uring (it opens sockets without the socket call) and new user namespaces (the kernel's
    widest door to privilege); kill any other system-call ABI (x32, 32-bit) so none of this is bypassed."""
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, kill = 0x7FFF0000, 0x80000000
    errno = lambda e: 0x00050000 | e  # noqa: E731
    prog = _assemble([
        (ld, 4, None, None), (jeq, arch["audit"], None, "kill"),
        (ld, 0, None, None), (jge, X32_SYSCALL_BIT, "kill", None),
        (jeq, arch["socket"], "eacces", None),
        (jeq, NR_IO_URING_SETUP, "eperm", None),
        (jeq, NR_CLONE3, "enosys", None),  # its flags cannot be inspected; libc falls back to clone
        (jeq, arch["clone"], "flags", None), (jeq, arch["unshare"], "flags", None),
        (ret, allow, None, None),
        "flags", (ld, 16, None, None), (jset, CLONE_NEWUSER, "eperm", "allow"),
        "allow", (ret, allow, None, None),
        "eacces", (ret, errno(13), None, None),
        "eperm", (ret, errno(1), None, None),
        "enosys", (ret, errno(38), None, None),
        "kill", (ret, kill, None, None),
    ])
    buf = ctypes.create_string_buffer(prog)

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog) // 8, ctypes.addressof(buf))
    _check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0), "seccomp")


def set_limits(s: dict) -> None:
    for name, value in (("RLIMIT_AS", s["memory_bytes"]), ("RLIMIT_CPU", s["cpu_seconds"]),
                        ("RLIMIT_FSIZE", s["file_bytes"]), ("RLIMIT_CORE", 0), ("RLIMIT_NOFILE", 256)):
        resource.setrlimit(getattr(resource, name), (value, value))


def drop_privileges(s: dict) -> None:
    if os.geteuid() == 0:
        try:
            os.setgroups([])
            os.setresgid(UNPRIVILEGED, UNPRIVILEGED, UNPRIVILEGED)
            os.setresuid(UNPRIVILEGED, UNPRIVILEGED, UNPRIVILEGED)  # clears every capability
        except OSError as e:  # e.g. root of a user namespace that maps no other uid
            raise SetupError(f"cannot switch to uid {UNPRIVILEGED}: {e.strerror}") from None
    # After the uid change, so that it counts the processes of 65534, not root's (root is exempt).
    resource.setrlimit(resource.RLIMIT_NPROC, (s["max_processes"], s["max_processes"]))
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")


def child(s: dict, source: bytes, output_fd: int, errors_w: int, arch: dict | None) -> None:
    """Runs in the forked child: confine (if asked), then exec the program. Never returns."""
    try:
        os.setsid()  # its own process group, so that the watchdog can kill all it starts (unconfined too)
        if arch is not None:
            build_root("/tmp", s["tmp_bytes"])  # the host /tmp is only the mount point
            pivot("/tmp", arch)
            workdir = "/tmp"
        else:
            workdir = s["workdir"]
        os.chdir(workdir)
        _write("program.py", source.decode())
        set_limits(s)
        if arch is not None:
            drop_privileges(s)
            install_seccomp(arch)
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(output_fd, 1)
        os.dup2(output_fd, 2)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        # As invoked (a virtual environment's python is a link that makes its packages importable).
        os.execve(sys.executable, [sys.executable, "-I", "-B", "program.py"], env)
    except BaseException as e:  # noqa: BLE001 - reported to the watchdog, whatever it is
        os.write(errors_w, f"{type(e).__name__}: {e}".encode())
    os._exit(SETUP_FAILED)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def watch(pid: int, s: dict, errors_r: int) -> dict:
    """Wait for the child; kill it and all it started at the timeout or once its output reaches the
    file-size limit (its writes fail there, but a program may go on trying), and kill what it left
    running when it ends (in a pid namespace the kernel does that with the child; unconfined, its
    process group is what can be reached)."""
    deadline, verdict = time.monotonic() + s["timeout"], None
    # WNOWAIT: it ends but is not reaped, so its pid (and group id) cannot be reused before the kill.
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is None:
        if time.monotonic() > deadline:
            verdict = {"status": "timeout"}
        elif os.fstat(s["output_fd"]).st_size >= s["file_bytes"]:
            verdict = {"status": "output"}
        if verdict is not None:
            _kill_group(pid)
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
            break
        time.sleep(POLL_S)
    _kill_group(pid)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(errors_r, "rb") as f:
        setup_error = f.read().decode(errors="replace")  # empty when exec succeeded (close-on-exec)
    if setup_error:
        return {"status": "unavailable", "reason": setup_error}
    if verdict is not None:
        return verdict
    if os.WIFSIGNALED(status):
        return {"status": "signal", "signal": os.WTERMSIG(status)}
    return {"status": "exited", "code": os.waitstatus_to_exitcode(status)}


def main() -> None:
    s = json.loads(sys.argv[1])
    source = sys.stdin.buffer.read()
    arch = None
    try:
        if s["confine"]:
            arch = ARCHES.get(platform.machine())
            if arch is None:
                raise SetupError(f"no seccomp filter for the {platform.machine()} architecture")
            enter_namespaces(arch)
        else:
            s["workdir"] = tempfile.mkdtemp(prefix="meshtron-sandbox-")
    except (SetupError, OSError) as e:
        print(json.dumps({"status": "unavailable", "reason": str(e)}), flush=True)
        return
    errors_r, errors_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(errors_r)
        child(s, source, s["output_fd"], errors_w, arch)
    os.close(errors_w)
    try:
        result = watch(pid, s, errors_r)
    finally:
        if not s["confine"]:
            shutil.rmtree(s["workdir"], ignore_errors=True)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
