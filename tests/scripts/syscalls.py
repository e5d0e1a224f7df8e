#!/usr/bin/env python3
"""Calls each system call a sandbox's seccomp filter should refuse (x86_64 numbers, harmless
arguments: bad flags, -1 descriptors, NULL pointers, no-ops) and prints as JSON the errno each
got (0: it went through), with the process's Seccomp mode. RR_PARAM_ONLY (comma-separated
names) limits the calls; RR_PARAM_TRACEME=1 adds ptrace(PTRACE_TRACEME) last."""
import ctypes
import json
import mmap
import os

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
X32 = 0x40000000
THREAD = 0x00010000  # CLONE_THREAD without CLONE_SIGHAND: EINVAL whatever else is asked
NAMESPACES = {"NEWNS": 0x00020000, "NEWCGROUP": 0x02000000, "NEWUTS": 0x04000000,
              "NEWIPC": 0x08000000, "NEWUSER": 0x10000000, "NEWPID": 0x20000000,
              "NEWNET": 0x40000000}
CALLS = {
    "ptrace": (101, -1, 0, 0, 0), "process_vm_readv": (310, 0, 0, 0, 0, 0, 0),
    "process_vm_writev": (311, 0, 0, 0, 0, 0, 0), "pidfd_getfd": (438, -1, 0, 0),
    "process_madvise": (440, -1, 0, 0, 0, 0), "keyctl": (250, -1, 0, 0, 0, 0),
    "add_key": (248, 0, 0, 0, 0, 0), "request_key": (249, 0, 0, 0, 0), "bpf": (321, -1, 0, 0),
    "perf_event_open": (298, 0, 0, -1, -1, 0), "userfaultfd": (323, -1),
    "mount": (165, 0, 0, 0, 0, 0), "umount2": (166, 0, 0), "pivot_root": (155, 0, 0),
    "move_mount": (429, -1, 0, -1, 0, -1), "open_tree": (428, -1, 0, -1),
    "fsopen": (430, 0, -1), "fsconfig": (431, -1, -1, 0, 0, 0), "fsmount": (432, -1, -1, 0),
    "fspick": (433, -1, 0, -1), "mount_setattr": (442, -1, 0, -1, 0, 0),
    "unshare": (272, 0), "setns": (308, -1, 0), "kexec_load": (246, 0, 0, 0, -1),
    "kexec_file_load": (320, -1, -1, 0, 0, -1), "init_module": (175, 0, 0, 0),
    "finit_module": (313, -1, 0, -1), "delete_module": (176, 0, 0),
    "iopl": (172, 0), "ioperm": (173, 0, 0, 0),
    "personality:0x40000": (135, 0x0040000), "personality:0x400000": (135, 0x0400000),
    "personality:0": (135, 0), "personality:0x8": (135, 0x8),
    "personality:0xffffffff": (135, 0xffffffff), "personality:reset": (135, 0),
    **{f"clone:{name}": (56, flag | THREAD, 0, 0, 0, 0) for name, flag in NAMESPACES.items()},
    "clone3": (435, 0, 0), "getpriority": (140, 0, 0), "x32:getpid": (X32 | 39,),
}


def call(number, *args):
    """errno of syscall(number, *args), 0 when it succeeded."""
    ctypes.set_errno(0)
    result = libc.syscall(ctypes.c_long(number), *(ctypes.c_long(a) for a in args))
    return ctypes.get_errno() if result == -1 else 0


def int80_getpid():
    """errno of getpid through the 32-bit ABI (`int 0x80`, eax = 20), 0 when it succeeded."""
    code = bytes.fromhex("b814000000cd80c3")  # mov eax, 20; int 0x80; ret
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    result = ctypes.CFUNCTYPE(ctypes.c_int)(address)()
    return -result if result < 0 else 0


only = [n for n in os.environ.get("RR_PARAM_ONLY", "").split(",") if n]
report = {name: call(*args) for name, args in CALLS.items() if not only or name in only}
if not only or "int80:getpid" in only:
    report["int80:getpid"] = int80_getpid()
if os.environ.get("RR_PARAM_TRACEME") == "1":
    report["ptrace:TRACEME"] = call(101, 0, 0, 0, 0)
with open("/proc/self/status") as fh:
    report["Seccomp"] = next(int(line.split()[1]) for line in fh if line.startswith("Seccomp:"))
print(json.dumps(report))
