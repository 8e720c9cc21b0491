"""Publish functions of an already loaded library under other names, for libraries loaded after this one.

The fast OpenBLAS that pip can install on every Linux machine (the ``scipy-openblas32`` wheel: one
self-contained library, a kernel for each CPU chosen at run time) prefixes its symbols (``scipy_cblas_sgemm``),
while MLX's CPU backend calls ``cblas_sgemm``. This module writes, in memory, a minimal ELF shared object whose
dynamic symbol table defines each wanted name as an *absolute* symbol (``SHN_ABS``) holding the address of the
target function, and loads it with ``RTLD_GLOBAL``. When ``mlx.core`` is loaded afterwards, the dynamic linker
binds its ``cblas_sgemm`` to that address, i.e. straight into the optimized function: no code, no trampoline,
nothing executable in the generated object (its only segments are a read-only one for the tables and a
writable one for ``.dynamic``, which the loader relocates in place).

glibc resolves ``SHN_ABS`` symbols to their value without adding the load address since 2.28 (before, it
added it, which would make these aliases point to the wrong place), so :func:`supported` requires glibc 2.28+.
Only x86-64 and aarch64 (little-endian ELF64) are written.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
import tempfile

ELF_MACHINES = {"x86_64": 62, "amd64": 62, "aarch64": 183, "arm64": 183}  # EM_X86_64, EM_AARCH64
PAGE = 0x10000  # segment alignment: the largest page size of either architecture (aarch64 with 64 KiB pages)

PT_LOAD, PT_DYNAMIC, PT_GNU_STACK = 1, 2, 0x6474E551
PF_W, PF_R = 2, 4
DT_NULL, DT_HASH, DT_STRTAB, DT_SYMTAB, DT_STRSZ, DT_SYMENT, DT_SONAME = 0, 4, 5, 6, 10, 11, 14
SHN_ABS = 0xFFF1
STB_GLOBAL_STT_FUNC = (1 << 4) | 2
EHDR, PHDR, SYM, DYN = "<16sHHIQQQIHHHHHH", "<IIQQQQQQ", "<IBBHQQ", "<qQ"


def supported() -> bool:
    """True where the aliases resolve correctly: Linux with glibc 2.28 or newer on x86-64 or aarch64."""
    if platform.machine().lower() not in ELF_MACHINES:
        return False
    try:
        libc, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = (int(x) for x in version.split(".")[:2])
    except (AttributeError, ValueError, OSError):  # not glibc (musl has no such confstr)
        return False
    return libc == "glibc" and (major, minor) >= (2, 28)


def elf_hash(name: bytes) -> int:
    """The System V ABI symbol hash (what DT_HASH tables are indexed by)."""
    h = 0
    for c in name:
        h = ((h << 4) + c) & 0xFFFFFFFF
        g = h & 0xF0000000
        if g:
            h ^= g >> 24
        h &= ~g & 0xFFFFFFFF
    return h


def alias_object(aliases: dict[str, int], soname: str = "libmlx_canary_alias.so") -> bytes:
    """An ELF64 shared object defining each ``name`` of ``aliases`` as an absolute function symbol at the
    given address."""
    machine = ELF_MACHINES[platform.machine().lower()]
    names = [n.encode() for n in aliases]
    strtab = b"\0"
    name_offsets = []
    for n in names + [soname.encode()]:
        name_offsets.append(len(strtab))
        strtab += n + b"\0"

    n_phdr = 4
    strtab_off = struct.calcsize(EHDR) + n_phdr * struct.calcsize(PHDR)
    symtab_off = _align(strtab_off + len(strtab), 8)
    symtab = struct.pack(SYM, 0, 0, 0, 0, 0, 0)  # index 0: the undefined symbol
    for offset, address in zip(name_offsets, aliases.values()):
        symtab += struct.pack(SYM, offset, STB_GLOBAL_STT_FUNC, 0, SHN_ABS, address, 0)
    hash_off = symtab_off + len(symtab)
    hashtab = _hash_table(names)
    dyn_off = _align(hash_off + len(hashtab), 8)
    dyn_vaddr = dyn_off + PAGE  # congruent to its file offset modulo the alignment, in its own page
    dynamic = b"".join(struct.pack(DYN, tag, value) for tag, value in (
        (DT_HASH, hash_off), (DT_STRTAB, strtab_off), (DT_SYMTAB, symtab_off), (DT_STRSZ, len(strtab)),
        (DT_SYMENT, struct.calcsize(SYM)), (DT_SONAME, name_offsets[-1]), (DT_NULL, 0)))

    phdrs = b"".join((
        struct.pack(PHDR, PT_LOAD, PF_R, 0, 0, 0, dyn_off, dyn_off, PAGE),
        struct.pack(PHDR, PT_LOAD, PF_R | PF_W, dyn_off, dyn_vaddr, dyn_vaddr, len(dynamic), len(dynamic), PAGE),
        struct.pack(PHDR, PT_DYNAMIC, PF_R | PF_W, dyn_off, dyn_vaddr, dyn_vaddr, len(dynamic), len(dynamic), 8),
        # no executable stack: without this header the loader assumes one (and new glibc refuses to dlopen it)
        struct.pack(PHDR, PT_GNU_STACK, PF_R | PF_W, 0, 0, 0, 0, 0, 16),
    ))
    ident = b"\x7fELF" + bytes([2, 1, 1, 0, 0]) + bytes(7)  # ELF64, little-endian, version 1, System V ABI
    ehdr = struct.pack(EHDR, ident, 3, machine, 1, 0, struct.calcsize(EHDR), 0, 0, struct.calcsize(EHDR),
                       struct.calcsize(PHDR), n_phdr, 0, 0, 0)  # ET_DYN, no section headers
    image = bytearray(dyn_off + len(dynamic))
    for offset, part in ((0, ehdr), (len(ehdr), phdrs), (strtab_off, strtab), (symtab_off, symtab),
                         (hash_off, hashtab), (dyn_off, dynamic)):
        image[offset:offset + len(part)] = part
    return bytes(image)


def _hash_table(names: list[bytes]) -> bytes:
    """DT_HASH with one bucket per symbol; chains link symbols that share a bucket."""
    n_bucket, n_chain = max(1, len(names)), len(names) + 1
    buckets, chains = [0] * n_bucket, [0] * n_chain
    for index, name in enumerate(names, start=1):
        b = elf_hash(name) % n_bucket
        chains[index] = buckets[b]
        buckets[b] = index
    return struct.pack(f"<{2 + n_bucket + n_chain}I", n_bucket, n_chain, *buckets, *chains)


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def load_aliases(aliases: dict[str, int]) -> ctypes.CDLL:
    """Write the alias object to an anonymous in-memory file (a temporary file where memfd is missing) and
    load it globally, so that libraries loaded afterwards bind those names to the given addresses."""
    image = alias_object(aliases)
    if hasattr(os, "memfd_create"):
        try:
            fd = os.memfd_create("mlx-canary-blas-alias")
        except OSError:
            fd = None
        if fd is not None:
            try:
                os.write(fd, image)
                return ctypes.CDLL(f"/proc/self/fd/{fd}", mode=ctypes.RTLD_GLOBAL)
            except OSError:  # no /proc: go through a file
                pass
            finally:
                os.close(fd)  # the loader keeps its own mapping
    with tempfile.NamedTemporaryFile(prefix="mlx-canary-blas-alias-", suffix=".so") as f:
        f.write(image)
        f.flush()
        return ctypes.CDLL(f.name, mode=ctypes.RTLD_GLOBAL)
