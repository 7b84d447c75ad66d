/* The C helper of the CPU (the cffi module emu.cpu._emuc): its state and its functions.

   Unicorn calls a C hook in about 26 ns, a Python one in 0.5-1 us, so what runs inside the
   engine at guest speed lives in emuc.c: port-I/O exits for the hot ports, the work
   counter of deterministic mode, the deadline checks, the virtual TSC and the dirty-page
   bitmap, plus interrupt delivery's common cases.  The module is not linked against
   libunicorn: the few engine functions it calls are pointers that Python fills in.

   Everything between the two cdef markers is also cffi's declaration of the module
   (emu/cpu/cbuild.py reads it from here), so it holds only what cffi's parser accepts:
   declarations and #defines of integer constants. */
#ifndef EMU_CPU_EMUC_H
#define EMU_CPU_EMUC_H

#include <stdint.h>

/* --- cffi cdef begin --- */
/* Guest time, in nanoseconds: its one definition.  emu/clock.py's VirtualClock reads and
   sets it through the guest_clock_* functions; inside the engine the virtual TSC and the
   deadline checks read it directly. */
typedef struct {
    uint32_t mode;            /* GUEST_CLOCK_* */
    uint32_t running;         /* real time: guest time flows; else it stands at frozen_ns */
    int64_t  rt_offset_ns;    /* real time, running: guest = host monotonic ns - rt_offset_ns */
    int64_t  frozen_ns;       /* real time, stopped: where guest time stands */
    uint64_t icount;          /* deterministic: bytes of guest code executed (the unit of guest work) */
    uint32_t ns_per_unit;     /* deterministic: guest ns per unit of work (2^shift of -icount) */
    int64_t  icount_base_ns;  /* deterministic: guest = icount_base_ns + icount * ns_per_unit */
    int64_t  manual_ns;       /* manual (device tests): guest time as the test set it */
} guest_clock;

#define GUEST_CLOCK_REALTIME 0
#define GUEST_CLOCK_ICOUNT 1
#define GUEST_CLOCK_MANUAL 2

typedef struct {
    /* --- execution control ------------------------------------------------ */
    uint64_t icount_limit;    /* deterministic: the block hook stops the engine once clock.icount reaches this */
    int64_t  deadline_ns;     /* real-time mode: stop once guest time passes this */
    uint32_t block_tick;
    uint32_t stop_reason;     /* STOP_* bits set by the hooks */
    uint32_t exiting;         /* the machine is exiting: the rest of the block has no effect on I/O */
    uint32_t irq_waiting;     /* an interrupt is pending but IF was clear: stop once IF is set */
    uint32_t irq_skip_blocks; /* block starts irq_waiting lets pass first (the one-instruction block of an
                                 interrupt shadow) */
    /* --- time ----------------------------------------------------------------- */
    guest_clock clock;        /* the machine's guest time */
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
    /* --- interrupt delivery (protected and long mode fast path) ------------------ */
    void    *ctx;             /* a uc_context owned by the CPU object */
    int      (*context_save)(void *uc, void *ctx);
    int      (*context_restore)(void *uc, void *ctx);
    uint32_t off_regs, off_eip, off_eflags, off_hflags, off_segs, off_tr, off_idt, off_gdt, off_cr,
             off_old_exception;
    int      reg_rsp, reg_rip, reg_eflags;
    uint8_t *ram;
    uint64_t ram_size;
    uint8_t *host_dirty;      /* pages written by the host side (frames pushed here count) */
    uint64_t fast_deliveries;
    /* --- dirty log -------------------------------------------------------------- */
    uint8_t *dirty_map;       /* one byte per 4 KiB page of RAM */
    uint64_t ram_pages;
    uint64_t dirty_writes;
    /* --- real-time deadlines (patched engine: no block hook) ------------------- */
    void    *timer;           /* the deadline timer thread, see deadline_timer_* */
    uint64_t timer_fires;
    /* --- debugger watchpoints ----------------------------------------------------- */
    uint32_t watch_hit;       /* set by a watchpoint's memory hook; on_watch_step then stops */
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
void on_watch_step(void *uc, uint64_t addr, uint32_t size, void *user);
int64_t guest_clock_now(const guest_clock *clock);
void guest_clock_set(guest_clock *clock, int64_t guest_ns);
void guest_clock_start(guest_clock *clock);
void guest_clock_stop(guest_clock *clock);
uint64_t host_monotonic_ns(void);
uint64_t collect_dirty(uint8_t *map, uint8_t *extra, uint64_t npages, uint32_t *out);
int deliver_fast(emu_state *s, void *uc, int vector, int software, uint64_t return_ip, int push_error,
                 uint32_t error_code);
int after_hlt(emu_state *s, void *uc);
uint64_t mark_nonzero_pages(const uint8_t *ram, const int64_t *pages, uint64_t n, uint8_t *out);
uint64_t collect_dirty_bitmap(uint64_t *bitmap, uint8_t *extra, uint64_t npages, uint32_t *out);
void or_bits_into_bytes(const uint64_t *bits, uint64_t n, uint8_t *bytes);
int read_msrs(emu_state *s, void *uc, int reg_msr, const uint32_t *index, uint64_t *out, int n);
int deadline_timer_start(emu_state *s, void *uc);
void deadline_timer_arm(emu_state *s, int64_t guest_deadline_ns);
void deadline_timer_disarm(emu_state *s);
void deadline_timer_stop(emu_state *s);
int deadline_timer_after_fork(emu_state *s);
/* --- cffi cdef end --- */

#endif /* EMU_CPU_EMUC_H */
