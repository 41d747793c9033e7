"""What a container's processes may not do: capabilities, seccomp, masked kernel files.

The container init calls in here at two points. While it builds the root
(still seeing the host's tree) it masks the kernel interfaces under /proc and
/sys that leak host state or change the host. In the command's child, right
before exec and after no_new_privs, it drops every capability outside
Docker's default set (less CAP_NET_RAW) and loads a seccomp filter. Init
itself keeps its capabilities: it must still reap and signal, and it is not
reachable from inside (not dumpable, and no CAP_SYS_PTRACE is left in the
container).

The set and the filter are written out in docs/security.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

from quiltd import linux

# Docker's default capabilities (moby oci/caps/defaults.go), by number, less
# CAP_NET_RAW: with it a container forges any packet on its bridge (ARP
# replies, router advertisements, other containers' source addresses). ping
# does not need it: every group may open ICMP echo sockets (netconfig).
DEFAULT_CAPABILITIES: dict[str, int] = {
    "CAP_CHOWN": 0,
    "CAP_DAC_OVERRIDE": 1,
    "CAP_FOWNER": 3,
    "CAP_FSETID": 4,
    "CAP_KILL": 5,
    "CAP_SETGID": 6,
    "CAP_SETUID": 7,
    "CAP_SETPCAP": 8,
    "CAP_NET_BIND_SERVICE": 10,
    "CAP_SYS_CHROOT": 18,
    "CAP_MKNOD": 27,
    "CAP_AUDIT_WRITE": 29,
    "CAP_SETFCAP": 31,
}
DEFAULT_CAPABILITY_MASK = sum(1 << n for n in DEFAULT_CAPABILITIES.values())

PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# Files under /proc that show host state (kernel memory, timers, keys of other
# users, the scheduler's view of every task); /dev/null is bound over them.
MASKED_PROC_FILES = ("kcore", "keys", "timer_list", "sched_debug", "latency_stats", "timer_stats")
# Directories under /proc that describe host hardware; an empty read-only tmpfs covers them.
MASKED_PROC_DIRS = ("acpi", "scsi")
# Kernel knobs and triggers: visible, but read-only.
READ_ONLY_PROC = ("sys", "sysrq-trigger", "irq", "bus", "fs")
MASKED_SYS_DIRS = ("firmware",)

# System calls that reach the host kernel's global state: modules, kexec,
# reboot, swap, mounts, BPF, perf, the kernel keyring, file handles (the
# "shocker" escape). All fail with EPERM, as if the capability were missing.
DENIED_SYSCALLS = (
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "bpf", "perf_event_open", "keyctl", "add_key", "request_key",
    "open_by_handle_at", "name_to_handle_at",
    "mount", "umount2", "pivot_root", "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount",
    "fspick", "mount_setattr",
    "swapon", "swapoff", "reboot", "acct", "quotactl", "lookup_dcookie", "uselib", "userfaultfd",
    "iopl", "ioperm", "settimeofday", "clock_settime", "clock_adjtime",
    "setns",
    # io_uring runs system calls in kernel workers, past this filter, and has
    # been the source of many kernel privilege escalations.
    "io_uring_setup", "io_uring_enter", "io_uring_register",
)
# A new user namespace would give back every capability inside it; its flag
# is refused wherever it can be checked (unshare's and clone's flag word).
DENIED_WITH_NEWUSER = ("unshare", "clone")
# What a container asked for nested user namespaces may do after all: make
# them, and set up namespaces of its own in them (bwrap, a browser's
# sandbox, a rootless container engine). The kernel still refuses each of
# these on anything the container's user namespace does not own.
ALLOWED_WITH_NESTED_USERNS = (
    "mount", "umount2", "pivot_root", "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount",
    "fspick", "mount_setattr", "setns",
)
# Address families a container's socket() and socketpair() may ask for; every
# other one fails with EAFNOSUPPORT, as if the kernel lacked it. AF_VSOCK
# above all: vsock is not namespaced, so any container would reach the host's
# and the hypervisor's vsock services. The rest (AF_ALG, AF_TIPC, AF_RDS,
# AF_BLUETOOTH, AF_KCM, AF_XDP, ...) are kernel code no sandbox needs, with a
# long record of privilege escalations. AF_PACKET too: the kernel wants
# CAP_NET_RAW for it, which no container holds, and packet sockets have had
# their share of escalations.
ALLOWED_FAMILIES = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10, "AF_NETLINK": 16}
FAMILY_SYSCALLS = ("socket", "socketpair")
# clone3 passes its flags in memory a filter cannot read: report it missing,
# so libc falls back to clone, which the filter can check.
ENOSYS_SYSCALLS = ("clone3",)

_SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_ACT_ERRNO = 0x00050000
_SCMP_CMP_GT = 6
_SCMP_CMP_MASKED_EQ = 7
# Other ABIs the same kernel runs: without them a 32-bit binary would be
# killed outright (libseccomp's action for a foreign arch).
_EXTRA_ARCHES = {"x86_64": (0x40000003, 0x4000003E), "aarch64": (0x40000028,)}


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def _refused_families() -> list[_ArgCmp]:
    """Comparisons on the family argument that together match every family not allowed.

    The kernel reads the family as an int, the filter the whole register:
    each family below the largest allowed is compared on the low 32 bits
    (junk in the high half cannot slip one past), and any value from there
    up, high half included, is one unsigned comparison, which also covers
    the families later kernels will add.
    """
    top = max(ALLOWED_FAMILIES.values())
    low = [_ArgCmp(0, _SCMP_CMP_MASKED_EQ, 0xFFFFFFFF, family)
           for family in range(top) if family not in ALLOWED_FAMILIES.values()]
    return [*low, _ArgCmp(0, _SCMP_CMP_GT, top, 0)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_BPF_INSN_BYTES = 8  # struct sock_filter
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2


class _Seccomp:
    """A filter built once in the fork server, before any container exists.

    The library is loaded there, from the host's tree: after pivot_root the
    container's root may hold no libseccomp at all. It also compiles the
    rules into the BPF program there, once: seccomp_load would compile them
    again in every command's child, for a millisecond each. The child
    inherits the program and only hands it to the kernel, as seccomp_load
    does with the library's default attributes (no thread sync, no log).
    """

    def __init__(self, nested_userns: bool) -> None:
        self.nested_userns = nested_userns
        self._program: ctypes.Array[ctypes.c_char] | None = None
        self._fprog: _SockFprog | None = None
        self.error = "seccomp filter not prepared"

    def prepare(self) -> None:
        try:
            lib, ctx = self._build()
            try:
                self._program = self._export(lib, ctx)
            finally:
                lib.seccomp_release(ctypes.c_void_p(ctx))
            self._fprog = _SockFprog(len(self._program) // _BPF_INSN_BYTES,
                                     ctypes.cast(self._program, ctypes.c_void_p))
            self.error = ""
        except OSError as e:
            self.error = f"cannot build the seccomp filter: {e}"

    @staticmethod
    def _export(lib: ctypes.CDLL, ctx: int) -> ctypes.Array[ctypes.c_char]:
        r, w = os.pipe()
        try:
            rc = lib.seccomp_export_bpf(ctypes.c_void_p(ctx), w)
            if rc < 0:
                raise OSError(-rc, f"seccomp_export_bpf: {os.strerror(-rc)}")
            os.close(w)
            w = -1
            chunks = []
            while chunk := os.read(r, 65536):
                chunks.append(chunk)
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)
        program = b"".join(chunks)
        if not program or len(program) % _BPF_INSN_BYTES:
            raise OSError(errno.EINVAL, f"seccomp_export_bpf gave {len(program)} bytes")
        return ctypes.create_string_buffer(program, len(program))

    def _build(self) -> tuple[ctypes.CDLL, int]:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_init.argtypes = [ctypes.c_uint32]
        lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
        lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                               ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
        lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.seccomp_release.argtypes = [ctypes.c_void_p]
        ctx = lib.seccomp_init(_SCMP_ACT_ALLOW)
        if not ctx:
            raise OSError(errno.ENOMEM, "seccomp_init failed")

        def check(rc: int, what: str) -> None:
            if rc < 0 and rc != -errno.EEXIST:
                raise OSError(-rc, f"{what}: {os.strerror(-rc)}")

        for arch in _EXTRA_ARCHES.get(os.uname().machine, ()):
            check(lib.seccomp_arch_add(ctx, arch), f"seccomp_arch_add {arch:#x}")

        def rule(action: int, name: str, *cmps: _ArgCmp) -> None:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:
                return  # not a system call on this architecture
            array = (_ArgCmp * len(cmps))(*cmps) if cmps else None
            check(lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), array), f"seccomp rule {name}")

        eperm = _SCMP_ACT_ERRNO | errno.EPERM
        allowed = ALLOWED_WITH_NESTED_USERNS if self.nested_userns else ()
        for name in DENIED_SYSCALLS:
            if name not in allowed:
                rule(eperm, name)
        for name in () if self.nested_userns else DENIED_WITH_NEWUSER:
            rule(eperm, name, _ArgCmp(0, _SCMP_CMP_MASKED_EQ, linux.CLONE_NEWUSER, linux.CLONE_NEWUSER))
        for name in ENOSYS_SYSCALLS:
            rule(_SCMP_ACT_ERRNO | errno.ENOSYS, name)
        for name in FAMILY_SYSCALLS:
            for cmp in _refused_families():
                rule(_SCMP_ACT_ERRNO | errno.EAFNOSUPPORT, name, cmp)
        return lib, int(ctx)

    def load(self) -> None:
        if self._fprog is None:
            raise OSError(errno.ENOSYS, self.error)
        if _libc.prctl(ctypes.c_int(_PR_SET_SECCOMP), ctypes.c_ulong(_SECCOMP_MODE_FILTER),
                       ctypes.byref(self._fprog), ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"loading the seccomp filter: {os.strerror(err)}")


_FILTERS = {nested: _Seccomp(nested) for nested in (False, True)}


def prepare() -> None:
    """Builds the seccomp filters; called once in the fork server before it forks."""
    for f in _FILTERS.values():
        f.prepare()


def restrict_command(drop_capabilities: bool = True, nested_userns: bool = False) -> None:
    """In the command's child, just before exec: fewer capabilities, then seccomp.

    no_new_privs must already be set: it lets an unprivileged filter load and
    keeps setuid binaries from regaining what was dropped here.
    """
    if drop_capabilities:
        reduce_capabilities(DEFAULT_CAPABILITY_MASK)
    _FILTERS[nested_userns].load()


def reduce_capabilities(keep: int) -> None:
    """Bounding set to keep; ambient and inheritable empty; effective and permitted to keep.

    Inheritable stays empty as in Docker since CVE-2022-24769: root regains
    the bounding set on exec anyway, and nobody else should inherit any.
    """
    for cap in range(64):
        if keep & (1 << cap):
            continue
        try:
            linux.prctl(PR_CAPBSET_DROP, cap)
        except OSError as e:
            if e.errno == errno.EINVAL:
                break  # past the last capability this kernel knows
            raise
    linux.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)(
        _CapData(keep & 0xFFFFFFFF, keep & 0xFFFFFFFF, 0),
        _CapData(keep >> 32, keep >> 32, 0),
    )
    if _libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def mask_proc(proc: str) -> None:
    """Masks and write-protects the host-facing parts of a freshly mounted /proc."""
    for name in MASKED_PROC_FILES:
        path = os.path.join(proc, name)
        if os.path.exists(path):
            linux.mount("/dev/null", path, None, linux.MS_BIND)
    for name in MASKED_PROC_DIRS:
        _cover(os.path.join(proc, name))
    for name in READ_ONLY_PROC:
        path = os.path.join(proc, name)
        if os.path.exists(path):
            _bind_read_only(path)


def mask_sys(sys: str) -> None:
    """Covers the parts of the (read-only) /sys that expose host firmware."""
    for name in MASKED_SYS_DIRS:
        _cover(os.path.join(sys, name))


def _cover(path: str) -> None:
    if os.path.isdir(path):
        linux.mount("tmpfs", path, "tmpfs", linux.MS_RDONLY | _NOSUID_NODEV_NOEXEC, "mode=555")


_NOSUID_NODEV_NOEXEC = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC


def _bind_read_only(path: str) -> None:
    linux.mount(path, path, None, linux.MS_BIND | linux.MS_REC)
    linux.mount(path, path, None,
                linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY | _NOSUID_NODEV_NOEXEC)
