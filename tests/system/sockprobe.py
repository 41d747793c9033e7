"""Asks for sockets of refused address families through every door a process has.

Run by the host image's python3 inside a container (see test_security.py):
the native call, the same family with junk in the register's high half,
socketpair, the x32 call number, and the i386 calls a 64-bit process reaches
with `int 0x80` (direct socket and the socketcall multiplexer, whose
arguments sit in memory a seccomp filter cannot read). Sockets the container
needs are asked for too, so a filter that refused everything would show.
Prints one line per attempt: "LABEL socket" or "LABEL ERRNONAME".
"""

import ctypes
import errno
import mmap
import struct

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                      ctypes.c_long]
MAP_32BIT = 0x40  # int 0x80 sees only the low 32 bits of a pointer
PROT_RWX = 7
page = libc.mmap(None, 4096, PROT_RWX, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_32BIT, -1, 0)
AF_UNIX, AF_INET, AF_PACKET, AF_TIPC, AF_ALG, AF_VSOCK = 1, 2, 17, 30, 38, 40
SOCK_STREAM, SOCK_DGRAM, SOCK_RAW, SOCK_SEQPACKET = 1, 2, 3, 5
SYS_SOCKET, SYS_SOCKETPAIR = 41, 53  # x86-64
SYS_I386_SOCKETCALL, SYS_I386_SOCKET = 102, 359
X32 = 0x40000000


def native(nr: int, *args: int) -> tuple[int, int]:
    rc = libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args))
    return rc, ctypes.get_errno() if rc < 0 else 0


def i386(nr: int, a: int, b: int, c: int) -> tuple[int, int]:
    # push rbx; mov eax, nr; mov ebx, a; mov ecx, b; mov edx, c; int 0x80; pop rbx; ret
    code = (b"\x53\xb8" + struct.pack("<I", nr) + b"\xbb" + struct.pack("<I", a) + b"\xb9"
            + struct.pack("<I", b) + b"\xba" + struct.pack("<I", c) + b"\xcd\x80\x5b\xc3")
    ctypes.memmove(page, code, len(code))
    rc = ctypes.CFUNCTYPE(ctypes.c_int)(page)()
    return (rc, -rc) if rc < 0 else (rc, 0)


def socketcall(family: int, kind: int) -> tuple[int, int]:
    args = page + 2048
    ctypes.memmove(args, struct.pack("<III", family, kind, 0), 12)
    return i386(SYS_I386_SOCKETCALL, 1, args, 0)  # 1: SYS_SOCKET


attempts = {
    "vsock": native(SYS_SOCKET, AF_VSOCK, SOCK_STREAM, 0),
    "vsock-high-bits": native(SYS_SOCKET, (1 << 32) | AF_VSOCK, SOCK_STREAM, 0),
    "vsock-socketpair": native(SYS_SOCKETPAIR, AF_VSOCK, SOCK_STREAM, 0, page + 3072),
    "vsock-x32": native(X32 | SYS_SOCKET, AF_VSOCK, SOCK_STREAM, 0),
    "vsock-i386": i386(SYS_I386_SOCKET, AF_VSOCK, SOCK_STREAM, 0),
    "vsock-i386-socketcall": socketcall(AF_VSOCK, SOCK_STREAM),
    "packet": native(SYS_SOCKET, AF_PACKET, SOCK_RAW, 0),
    "tipc": native(SYS_SOCKET, AF_TIPC, SOCK_DGRAM, 0),
    "alg": native(SYS_SOCKET, AF_ALG, SOCK_SEQPACKET, 0),
    "inet": native(SYS_SOCKET, AF_INET, SOCK_DGRAM, 0),
    "unix": native(SYS_SOCKET, AF_UNIX, SOCK_STREAM, 0),
    "inet-i386": i386(SYS_I386_SOCKET, AF_INET, SOCK_DGRAM, 0),
}
for label, (rc, err) in attempts.items():
    print(label, "socket" if rc >= 0 else errno.errorcode.get(err, str(err)))
print("done 0")
