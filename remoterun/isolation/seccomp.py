"""The seccomp filter of a bwrap task: the calls a script has no business with fail with EPERM.

Built with libseccomp (through `pyseccomp`, a ctypes binding with the official binding's API)
once per distinct profile at start, exported as a BPF program, and handed to bwrap on a pipe of
its own per attempt (`--seccomp FD`): bwrap loads it just before it execs the script, after its
own set-up (mount, pivot_root, unshare), so only the script and its children are bound.

The filter names the native architecture alone. A call through another ABI (x86's `int 0x80`,
x32's numbers with bit 0x40000000 on x86_64) takes the filter's bad-architecture action, set
to EPERM like every other denial (libseccomp's own default there would kill the thread).

A profile (`[sandbox] seccomp = "<path>"`) is a TOML file changing the default list:
`deny = ["name", ...]` (more calls failing with EPERM), `allow = ["name", ...]` (calls of the
default list let through: `personality` drops its argument check, `clone` its namespace flags,
`clone3` its ENOSYS).
"""

from __future__ import annotations

import errno
import os
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from remoterun.config import ConfigError

OFF = "off"
DEFAULT = "default"
# Denied outright: tracing and reading other processes, the kernel keyring, BPF, perf, user
# page faults (a race-widening tool), mounts old and new, namespaces, kexec, kernel modules, and
# I/O port access.
DENIED = (
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "process_madvise",
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
    "mount", "umount2", "pivot_root", "move_mount", "open_tree", "fsopen", "fsconfig",
    "fsmount", "fspick", "mount_setattr", "unshare", "setns", "kexec_load", "kexec_file_load",
    "init_module", "finit_module", "delete_module", "iopl", "ioperm",
)
# personality(2) values let through: PER_LINUX, PER_LINUX32, their UNAME26 variants (glibc and
# setarch use no others for Linux programs) and the query 0xffffffff; any other flag (such as
# ADDR_NO_RANDOMIZE, READ_IMPLIES_EXEC) is refused.
PERSONA_KEPT = 0x0008 | 0x0020000  # the bits the allowed values differ by
# clone(2) flags that make a namespace: refused in clone's flags; clone3 hides its flags in
# memory a filter cannot read, so it gets ENOSYS and glibc falls back to clone.
CLONE_NAMESPACES = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000,
                    0x40000000)
CONDITIONAL = ("personality", "clone", "clone3")
MAX_PROGRAM = 60 << 10  # a pipe holds 64 KiB: its one write never blocks


@dataclass(frozen=True)
class Profile:
    """The calls of one filter: the default list with a profile's changes."""

    deny: frozenset[str] = frozenset()  # added to DENIED
    allow: frozenset[str] = frozenset()  # taken from DENIED and CONDITIONAL


def resolve(setting: str, base: Path) -> str:
    """A `seccomp` setting with a profile's path made absolute (relative to `base`)."""
    if setting in (OFF, DEFAULT):
        return setting
    return str(base / setting) if not Path(setting).is_absolute() else setting


def load_profile(where: str, path: Path) -> Profile:
    """A profile file's changes, checked (blocking: it reads the file). ConfigError naming
    `where` and the key when it cannot be used."""
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read the profile {str(path)!r}: "
                          f"{exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: {str(path)!r} is not valid TOML: {exc}") from exc
    unknown = set(raw) - {"deny", "allow"}
    if unknown:
        raise ConfigError(f"{where}: {str(path)!r}: unknown key {sorted(unknown)[0]!r} "
                          f"(deny, allow)")
    return Profile(frozenset(_names(where, path, "deny", raw.get("deny", []))),
                   frozenset(_names(where, path, "allow", raw.get("allow", []))))


def _names(where: str, path: Path, key: str, value: Any) -> list[str]:
    # Imported where used, here and below: without libseccomp the binding fails at import,
    # and the server still starts (its filtered bwrap tasks fail, said at start).
    import pyseccomp

    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: {str(path)!r}: {key}: expected a list of system call "
                          f"names, got {value!r}")
    for name in value:
        if pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name) < 0:
            raise ConfigError(f"{where}: {str(path)!r}: {key}: unknown system call {name!r}")
    return list(value)


def compile_filter(profile: Profile) -> bytes:
    """The BPF program of this profile (blocking: libseccomp builds it, ~1 ms)."""
    import pyseccomp as sc

    eperm = sc.ERRNO(errno.EPERM)
    box = sc.SyscallFilter(sc.ALLOW)
    box.set_attr(sc.Attr.ACT_BADARCH, eperm)  # x86 and x32 on x86_64: refused, not killed
    for name in sorted((set(DENIED) | profile.deny) - profile.allow):
        box.add_rule(eperm, name)
    if "personality" not in profile.allow | profile.deny:
        for mask, value in _persona_refused():
            box.add_rule(eperm, "personality", sc.Arg(0, sc.MASKED_EQ, mask, value))
    if "clone" not in profile.allow | profile.deny:
        for flag in CLONE_NAMESPACES:
            box.add_rule(eperm, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    if "clone3" not in profile.allow | profile.deny:
        box.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    fd = os.memfd_create("remoterun-seccomp", os.MFD_CLOEXEC)
    with os.fdopen(fd, "w+b") as out:
        box.export_bpf(out)
        out.seek(0)
        program = out.read()
    if len(program) > MAX_PROGRAM:
        raise ConfigError(f"seccomp: the filter is {len(program)} bytes, over {MAX_PROGRAM}")
    return program


def _persona_refused() -> Iterable[tuple[int, int]]:
    """(mask, value) pairs whose matches are the refused personalities: a low word with any
    bit outside PERSONA_KEPT set, except 0xffffffff. libseccomp compares an argument once per
    rule, so the set is a union of masked compares: around a cycle of the other bits, "this one
    set and the next clear" (some bit set, not all); then, all of them set, a kept bit clear."""
    others = [1 << b for b in range(32) if not (1 << b) & PERSONA_KEPT]
    for i, bit in enumerate(others):
        after = others[(i + 1) % len(others)]
        yield bit | after, bit
    every = sum(others)
    for kept in (0x0008, 0x0020000):
        yield every | kept, every


def pipe_of(program: bytes) -> int:
    """A pipe's read end holding this program and its end of file, for bwrap's --seccomp."""
    read, write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        os.write(write, program)  # far below the pipe's capacity (MAX_PROGRAM)
    except OSError:
        os.close(read)
        raise
    finally:
        os.close(write)
    return read


class Filters:
    """The compiled filters of every profile the config names, built once at start."""

    def __init__(self) -> None:
        self._programs: dict[str, bytes] = {}
        self.unavailable = ""  # why libseccomp could not be used here, if it could not

    def build(self, settings: Iterable[tuple[str, str]]) -> None:
        """Compile each (where, resolved setting) not built yet (blocking). ConfigError for a
        bad profile; a missing libseccomp is remembered (its tasks fail, the server runs)."""
        for where, setting in settings:
            if setting == OFF or setting in self._programs:
                continue
            try:
                profile = Profile() if setting == DEFAULT else load_profile(where, Path(setting))
                self._programs[setting] = compile_filter(profile)
            except (ImportError, RuntimeError, OSError) as exc:  # no usable libseccomp here
                self.unavailable = f"libseccomp cannot be used here: {exc}"
                return

    def program(self, setting: str) -> bytes | None:
        """The compiled program of a resolved setting, None for "off"; KeyError if unbuilt."""
        return None if setting == OFF else self._programs[setting]
