"""Build the C helper module ``emu._emuc`` with cffi (``python -m emu.cbuild``).

Why C: Unicorn calls a Python hook in about 0.5-1 us, a C hook in about 26 ns.  The hot
paths that run inside the CPU engine therefore live here: port-I/O exits for the hot ports,
the work counter of deterministic mode, the real-time deadline check, the virtual
TSC (Unicorn's Python binding cannot hook RDTSC at all) and the dirty-page bitmap.  The
module is not linked against libunicorn: the few engine functions it calls are passed in
as pointers from Python.
"""

import pathlib
import shutil

from cffi import FFI

CDEF = r"""
typedef struct {
    /* --- execution control ------------------------------------------------ */
    uint64_t icount;          /* deterministic mode: bytes of guest code executed (the unit of guest work) */
    uint64_t icount_limit;    /* the block hook stops the engine once icount reaches this */
    int64_t  deadline_ns;     /* real-time mode: stop once guest time passes this */
    uint32_t block_tick;
    uint32_t stop_reason;     /* STOP_* bits set by the hooks */
    uint32_t frozen;          /* the machine is exiting: the rest of the block has no effect on I/O */
    uint32_t irq_waiting;     /* an interrupt is pending but IF was clear: stop once IF is set */
    /* --- time ----------------------------------------------------------------- */
    uint32_t icount_mode;     /* 1: guest time = icount_base_ns + icount * ns_per_unit (per unit of work) */
    uint32_t ns_per_unit;
    int64_t  icount_base_ns;
    int64_t  rt_offset_ns;    /* real time: guest time = host monotonic ns - rt_offset_ns */
    uint64_t tsc_hz;          /* virtual TSC frequency */
    int64_t  tsc_offset;      /* guest TSC = guest_ns * tsc_hz / 1e9 + tsc_offset */
    uint64_t rdtsc_count;
    /* --- port I/O ------------------------------------------------------------- */
    uint64_t io_exits;        /* every IN/OUT seen */
    uint64_t io_fast;         /* handled without Python */
    uint8_t  in_kind[65536];  /* IN_* */
    uint8_t  out_kind[65536]; /* OUT_* */
    uint32_t in_value[65536]; /* IN_CONST: the byte to return */
    uint32_t out_last[65536]; /* OUT_STORE: last byte written; OUT_RING: ring number */
    uint32_t unassigned[65536];
    uint32_t ring_head[4], ring_tail[4];
    uint8_t  ring[4][65536];
    uint32_t (*py_in)(uint32_t port, int size);
    void     (*py_out)(uint32_t port, int size, uint32_t value);
    int      (*emu_stop)(void *uc);
    int      (*reg_write)(void *uc, int regid, const void *value);
    int      (*reg_read)(void *uc, int regid, void *value);
    /* --- dirty log -------------------------------------------------------------- */
    uint8_t *dirty_map;       /* one byte per 4 KiB page of RAM */
    uint64_t ram_pages;
    uint64_t dirty_writes;
} emu_state;

#define STOP_DEADLINE 1
#define STOP_ICOUNT 2
#define STOP_RING_FULL 4
#define STOP_REQUEST 8
#define STOP_IRQ_WINDOW 16
#define IN_PYTHON 0
#define IN_CONST 1
#define IN_UNASSIGNED 2
#define OUT_PYTHON 0
#define OUT_STORE 1
#define OUT_RING 2
#define OUT_UNASSIGNED 3

void on_out(void *uc, uint32_t port, int size, uint32_t value, void *user);
uint32_t on_in(void *uc, uint32_t port, int size, void *user);
void on_block(void *uc, uint64_t addr, uint32_t size, void *user);
int on_rdtsc(void *uc, void *user);
int on_rdtscp(void *uc, void *user);
void on_mem_write(void *uc, int type, uint64_t addr, int size, int64_t value, void *user);
int64_t guest_now_ns(emu_state *s);
uint64_t host_monotonic_ns(void);
uint64_t collect_dirty(uint8_t *map, uint8_t *extra, uint64_t npages, uint32_t *out);
"""

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <time.h>
""" + CDEF.split("void on_out")[0] + r"""
#define RING_SIZE 65536u
#define UC_X86_REG_EAX 19
#define UC_X86_REG_ECX 22
#define UC_X86_REG_EDX 24
#define UC_X86_REG_EFLAGS 25

uint64_t host_monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int64_t guest_now_ns(emu_state *s) {
    if (s->icount_mode)
        return s->icount_base_ns + (int64_t)(s->icount * s->ns_per_unit);
    return (int64_t)host_monotonic_ns() - s->rt_offset_ns;
}

static void request_stop(emu_state *s, void *uc, uint32_t why) {
    s->stop_reason |= why;
    if (s->icount_mode)
        s->icount_limit = s->icount;   /* deterministic: the block hook stops before the next block */
    else
        s->emu_stop(uc);
}

void on_out(void *uc, uint32_t port, int size, uint32_t value, void *user) {
    emu_state *s = (emu_state *)user;
    if (s->frozen) return;
    s->io_exits++;
    port &= 0xffff;
    if (size == 1) {
        switch (s->out_kind[port]) {
        case OUT_STORE:
            s->out_last[port] = value & 0xff; s->io_fast++; return;
        case OUT_RING: {
            uint32_t r = s->out_last[port] & 3, h = s->ring_head[r];
            s->ring[r][h & (RING_SIZE - 1)] = (uint8_t)value;
            s->ring_head[r] = h + 1;
            s->io_fast++;
            if (h + 1 - s->ring_tail[r] >= RING_SIZE - 64) request_stop(s, uc, STOP_RING_FULL);
            return;
        }
        case OUT_UNASSIGNED:
            s->unassigned[port]++; s->io_fast++; return;
        }
    }
    s->py_out(port, size, value);
}

uint32_t on_in(void *uc, uint32_t port, int size, void *user) {
    emu_state *s = (emu_state *)user;
    if (s->frozen) return size == 1 ? 0xff : size == 2 ? 0xffff : 0xffffffffu;
    s->io_exits++;
    port &= 0xffff;
    if (size == 1) {
        switch (s->in_kind[port]) {
        case IN_CONST:
            s->io_fast++; return s->in_value[port];
        case IN_UNASSIGNED:
            s->unassigned[port]++; s->io_fast++; return 0xff;
        }
    }
    return s->py_in(port, size);
}

/* Every translated block starts here.
   Real time: the slice ends at the next timer deadline (the clock is read every 32 blocks).
   Deterministic: guest time is the amount of guest code executed, counted in bytes of the
   blocks run; a stop requested here happens before the block executes, so slice ends are
   exact and reproducible, also after a state restore. */
void on_block(void *uc, uint64_t addr, uint32_t size, void *user) {
    emu_state *s = (emu_state *)user;
    if (s->irq_waiting) {
        /* QEMU looks for interrupts at every block start; so do we while one waits for IF
           (sti, popf, iret end their block, so this stop comes right after them) */
        uint64_t flags = 0;
        s->reg_read(uc, UC_X86_REG_EFLAGS, &flags);
        if (flags & 0x200) {
            s->irq_waiting = 0;
            s->stop_reason |= STOP_IRQ_WINDOW;
            s->emu_stop(uc);
            return;
        }
    }
    if (s->icount_mode) {
        if (s->icount >= s->icount_limit) {
            s->stop_reason |= STOP_ICOUNT;
            s->emu_stop(uc);
            return;
        }
        s->icount += size;
        return;
    }
    if ((++s->block_tick & 31) == 0 && guest_now_ns(s) >= s->deadline_ns) {
        s->stop_reason |= STOP_DEADLINE;
        s->emu_stop(uc);
    }
}

static uint64_t guest_tsc(emu_state *s) {
    int64_t ns = guest_now_ns(s);
    unsigned __int128 t = (unsigned __int128)(uint64_t)ns * s->tsc_hz / 1000000000ull;
    return (uint64_t)t + (uint64_t)s->tsc_offset;
}

int on_rdtsc(void *uc, void *user) {
    emu_state *s = (emu_state *)user;
    uint64_t t = guest_tsc(s), lo = t & 0xffffffffu, hi = t >> 32;
    s->rdtsc_count++;
    s->reg_write(uc, UC_X86_REG_EAX, &lo);
    s->reg_write(uc, UC_X86_REG_EDX, &hi);
    return 1;  /* skip the host's rdtsc */
}

int on_rdtscp(void *uc, void *user) {
    emu_state *s = (emu_state *)user;
    uint64_t zero = 0;
    on_rdtsc(uc, user);
    s->reg_write(uc, UC_X86_REG_ECX, &zero);  /* TSC_AUX of CPU 0 */
    return 1;
}

void on_mem_write(void *uc, int type, uint64_t addr, int size, int64_t value, void *user) {
    emu_state *s = (emu_state *)user;
    uint64_t p0 = addr >> 12, p1 = (addr + (uint64_t)size - 1) >> 12;
    if (p0 < s->ram_pages) s->dirty_map[p0] = 1;
    if (p1 != p0 && p1 < s->ram_pages) s->dirty_map[p1] = 1;
    s->dirty_writes++;
}

/* Merge the CPU dirty map with the host-write map, list the dirty pages, clear both. */
uint64_t collect_dirty(uint8_t *map, uint8_t *extra, uint64_t npages, uint32_t *out) {
    uint64_t n = 0;
    const uint64_t *m64 = (const uint64_t *)map, *e64 = (const uint64_t *)extra;
    uint64_t words = npages / 8;
    for (uint64_t w = 0; w < words; w++) {
        if (!(m64[w] | e64[w])) continue;
        for (uint64_t i = w * 8; i < w * 8 + 8; i++)
            if (map[i] | extra[i]) { out[n++] = (uint32_t)i; map[i] = 0; extra[i] = 0; }
    }
    for (uint64_t i = words * 8; i < npages; i++)
        if (map[i] | extra[i]) { out[n++] = (uint32_t)i; map[i] = 0; extra[i] = 0; }
    return n;
}
"""


def build():
    """Compile in build/cffi and place the extension module next to this file."""
    ffi = FFI()
    ffi.cdef(CDEF)
    ffi.set_source("_emuc", SOURCE, extra_compile_args=["-O2"])
    here = pathlib.Path(__file__).resolve().parent
    workdir = here.parent / "build" / "cffi"
    workdir.mkdir(parents=True, exist_ok=True)
    built = pathlib.Path(ffi.compile(tmpdir=str(workdir), verbose=False))
    target = here / built.name
    shutil.copyfile(built, target)
    return target


if __name__ == "__main__":
    print("built", build())
