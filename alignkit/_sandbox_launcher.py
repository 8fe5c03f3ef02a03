"""The sandbox's launcher: run by `alignkit.sandbox` as `python -I -S -B <this file> <cfg>`, never imported.

It sets up the namespaces, mounts, limits and privilege drop of docs/sandbox.md, forks the program and
reports its wait status. Process tree: launcher -> [PID 1 of the new PID namespace, which only reaps
->] program. Standard library only: it runs without site-packages, as the caller (root or not).
"""

import ctypes
import marshal
import os
import resource
import signal
import sys


def main(cfg: dict) -> None:
    """Reports one dict literal per line on `cfg["status_fd"]`: {"error", "step"} on failure, else
    {"pid"} (the launcher's child) then {"wait", "maxrss_kb", "cpu"}; never returns."""
    status_fd = cfg["status_fd"]
    os.set_inheritable(status_fd, False)  # the program never sees it
    os.umask(0o022)  # directories made for the interpreter below must be traversable

    def report(**fields):
        os.write(status_fd, (repr(fields) + "\n").encode())  # a literal: no json import (8 ms)

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
    libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
    libc.unshare.argtypes = (ctypes.c_int,)
    libc.syscall.restype = ctypes.c_long

    class MountAttr(ctypes.Structure):
        _fields_ = [(n, ctypes.c_uint64) for n in ("attr_set", "attr_clr", "propagation", "userns_fd")]

    def check(ret, what):
        if ret < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def mount(src, target, fstype, flags, data=None):
        enc = [x.encode() if isinstance(x, str) else x for x in (src, target, fstype, data)]
        check(libc.mount(enc[0], enc[1], enc[2], flags, enc[3]), f"mount {target}")

    def mount_setattr(path, recursive, attr_set, attr_clr=0):
        attr = MountAttr(attr_set, attr_clr, 0, 0)
        flags = 0x8000 if recursive else 0  # AT_RECURSIVE
        ret = libc.syscall(442, ctypes.c_int(-100), path.encode(), ctypes.c_uint(flags),  # mount_setattr
                           ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
        check(ret, f"mount_setattr {path}")

    def traversable(path, uid, gid):
        st = os.stat(path)
        bits = 0o100 if st.st_uid == uid else 0o010 if st.st_gid == gid else 0o001
        return bool(st.st_mode & bits)

    PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 4096, 16384, 1 << 18
    RDONLY, NOSUID, NODEV = 0x1, 0x2, 0x4  # MOUNT_ATTR_*
    FLAGS = {"net": 0x40000000, "ipc": 0x08000000, "mount": 0x00020000, "pid": 0x20000000}
    mode, want, uid, gid, workdir = cfg["mode"], set(cfg["want"]), cfg["uid"], cfg["gid"], cfg["workdir"]

    step = "pdeathsig"
    try:
        check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")
        if os.getppid() != cfg["parent"]:
            os._exit(1)
        if mode == "userns":
            step = "userns"
            outer_uid, outer_gid = os.getuid(), os.getgid()
            check(libc.unshare(0x10000000), "unshare(CLONE_NEWUSER)")
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {outer_uid} 1"),
                               ("gid_map", f"{gid} {outer_gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        for name in ("net", "ipc", "mount", "pid"):
            if name in want:
                step = name
                check(libc.unshare(FLAGS[name]), f"unshare({name})")
        if "mount" in want:
            step = "mount"
            mount(None, "/", None, MS_REC | MS_PRIVATE)
            # Directories that stop the sandbox uid on the way to the interpreter (a 0700 /root under
            # pyenv): cover the top-most one with a tmpfs and bind the needed paths back into it.
            blocked = {}
            for path in cfg["expose"]:
                parts = path.strip("/").split("/")
                for i in range(1, len(parts)):
                    anc = "/" + "/".join(parts[:i])
                    if not traversable(anc, uid, gid):
                        blocked[path] = anc
                        break
            tops = sorted(set(blocked.values()), key=len)
            tops = [t for t in tops if not any(t.startswith(o + "/") for o in tops)]
            fds = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in blocked}
            for top in tops:
                mount("tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
            for path, fd in fds.items():
                os.makedirs(path, mode=0o755, exist_ok=True)
                mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
                os.close(fd)
            mount(workdir, workdir, None, MS_BIND)  # its own mount, made writable again below
            if "readonly" in want:
                step = "readonly"
                mount_setattr("/", True, RDONLY | NOSUID)
                mount_setattr(workdir, False, NOSUID | NODEV, RDONLY)
    except Exception as err:  # any failure here is the sandbox's, reported with its step
        report(error=f"{type(err).__name__}: {err}" if not isinstance(err, OSError) else str(err), step=step)
        os._exit(1)

    def start_program():  # in a fresh child: limits, credentials, exec; never returns
        step = "rlimits"
        try:
            for name, (soft, hard) in cfg["limits"].items():  # only ever lowered: clamp to the current hard limit
                res = getattr(resource, name)
                cap = resource.getrlimit(res)[1]
                if cap != resource.RLIM_INFINITY:
                    soft, hard = min(soft, cap), min(hard, cap)
                resource.setrlimit(res, (soft, hard))
            step = "credentials"
            if mode == "root":
                os.setgroups([])
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)
            step = "prctl"
            check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
            check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")  # reset by setuid
            step = "exec"
            os.chdir(workdir)
            os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])
        except BaseException as err:  # anything before exec is a sandbox failure
            report(error=f"{type(err).__name__}: {err}", step=step)
        os._exit(127)

    def wait_for(pid):  # reap every child (orphans included) until `pid` exits; report its status
        while True:
            got, wait_status, usage = os.wait4(-1, 0)
            if got == pid:
                report(wait=wait_status, maxrss_kb=usage.ru_maxrss, cpu=usage.ru_utime + usage.ru_stime)
                return

    pid = os.fork()
    if pid == 0:
        if "pid" not in want:
            start_program()
        # PID 1 of the new namespace (still the caller's uid). The program must not be PID 1 itself: a
        # namespace's init ignores every signal it has no handler for, SIGXCPU from RLIMIT_CPU included.
        # When this process exits, the kernel kills whatever is left in the namespace.
        try:
            check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")
            if "mount" in want:
                mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY)
        except OSError as err:  # no fresh /proc: the probe then runs without a PID namespace
            report(error=str(err), step="pid")
            os._exit(127)
        child = os.fork()
        if child == 0:
            start_program()
        wait_for(child)
        os._exit(0)
    report(pid=pid)
    if "pid" in want:
        os.waitpid(pid, 0)  # PID 1 reports the program's status
    else:
        wait_for(pid)
    os._exit(0)


if __name__ == "__main__":
    # the settings come as hex-encoded marshal data: `marshal` is built in, `ast`/`json` would cost 8-12 ms a run
    main(marshal.loads(bytes.fromhex(sys.argv[1])))
