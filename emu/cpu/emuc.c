/* The C helper of the CPU: the hot paths that run inside the engine (see emuc.h). */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "emuc.h"

/* a parameter that a callback's signature (Unicorn's hook types) has and this one ignores */
#define UNUSED(x) ((void)(x))

#define RING_SIZE 65536u
#define UC_X86_REG_EFLAGS 25
/* RDTSC and RDTSCP write whole registers: in 64-bit mode they clear bits 63:32 of RAX, RDX
   and RCX (Unicorn's EAX keeps them, and Linux ORs RAX into the TSC it reads) */
#define UC_X86_REG_RAX 35
#define UC_X86_REG_RCX 38
#define UC_X86_REG_RDX 40
#define UC_X86_REG_MSR 248
#define MSR_TSC_AUX 0xc0000103u

uint64_t host_monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ---------------------------------------------------------------------------------------
   Guest time.  Real time follows the host's monotonic clock while the machine runs and
   stands still while it is stopped (QEMU's QEMU_CLOCK_VIRTUAL); deterministic time is the
   guest work executed, ns_per_unit ns per byte of guest code (QEMU's -icount shift=N counts
   instructions);
   manual time moves only when a test sets it.
   --------------------------------------------------------------------------------------- */
int64_t guest_clock_now(const guest_clock *c) {
    switch (c->mode) {
    case GUEST_CLOCK_ICOUNT:
        return c->icount_base_ns + (int64_t)(c->icount * c->ns_per_unit);
    case GUEST_CLOCK_MANUAL:
        return c->manual_ns;
    default:
        return c->running ? (int64_t)host_monotonic_ns() - c->rt_offset_ns : c->frozen_ns;
    }
}

/* Place guest time at guest_ns (a state load, an idle warp, a test's step). */
void guest_clock_set(guest_clock *c, int64_t guest_ns) {
    switch (c->mode) {
    case GUEST_CLOCK_ICOUNT:
        c->icount_base_ns = guest_ns - (int64_t)(c->icount * c->ns_per_unit);
        break;
    case GUEST_CLOCK_MANUAL:
        c->manual_ns = guest_ns;
        break;
    default:
        c->frozen_ns = guest_ns;
        c->rt_offset_ns = (int64_t)host_monotonic_ns() - guest_ns;
    }
}

/* Real time: let guest time flow again from where it stood (the other modes ignore it). */
void guest_clock_start(guest_clock *c) {
    if (c->mode == GUEST_CLOCK_REALTIME && !c->running) {
        c->rt_offset_ns = (int64_t)host_monotonic_ns() - c->frozen_ns;
        c->running = 1;
    }
}

void guest_clock_stop(guest_clock *c) {
    if (c->mode == GUEST_CLOCK_REALTIME && c->running) {
        c->frozen_ns = (int64_t)host_monotonic_ns() - c->rt_offset_ns;
        c->running = 0;
    }
}

static void request_stop(emu_state *s, void *uc, uint32_t why) {
    __atomic_fetch_or(&s->stop_reason, why, __ATOMIC_RELAXED);  /* the deadline thread ORs in too */
    if (s->clock.mode == GUEST_CLOCK_ICOUNT)
        s->icount_limit = s->clock.icount;   /* deterministic: the block hook stops before the next block */
    else
        s->emu_stop(uc);
}

void on_out(void *uc, uint32_t port, int size, uint32_t value, void *user) {
    emu_state *s = (emu_state *)user;
    if (s->exiting) return;
    s->io_exits++;
    port &= 0xffff;
    if (size == 1) {
        switch (s->out_kind[port]) {
        case OUT_STORE:
            s->out_last[port] = value & 0xff; s->io_fast++; return;
        case OUT_RING: {
            uint32_t r = s->out_last[port] & 3, h = s->ring_head[r];
            if (h - s->ring_tail[r] >= RING_SIZE) break;  /* full (the stop lands at a block end): Python drains it */
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
    UNUSED(uc);
    if (s->exiting) return size == 1 ? 0xff : size == 2 ? 0xffff : 0xffffffffu;
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
    UNUSED(addr);
    if (s->irq_waiting && s->irq_skip_blocks) {
        s->irq_skip_blocks--;
    } else if (s->irq_waiting) {
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
    if (s->stop_reason & STOP_REQUEST) {
        /* X86Cpu.request_stop from a hook: stop before this block, not inside the last one */
        s->emu_stop(uc);
        return;
    }
    if (s->clock.mode == GUEST_CLOCK_ICOUNT) {
        if (s->clock.icount >= s->icount_limit) {
            s->stop_reason |= STOP_ICOUNT;
            s->emu_stop(uc);
            return;
        }
        s->clock.icount += size;
        return;
    }
    if ((++s->block_tick & 31) == 0 && guest_clock_now(&s->clock) >= s->deadline_ns) {
        s->stop_reason |= STOP_DEADLINE;
        s->emu_stop(uc);
    }
}

static uint64_t guest_tsc(emu_state *s) {
    int64_t ns = guest_clock_now(&s->clock);
    unsigned __int128 t = (unsigned __int128)(uint64_t)ns * s->tsc_hz / 1000000000ull;
    return (uint64_t)t + (uint64_t)s->tsc_offset;
}

int on_rdtsc(void *uc, void *user) {
    emu_state *s = (emu_state *)user;
    uint64_t t = guest_tsc(s), lo = t & 0xffffffffu, hi = t >> 32;
    s->rdtsc_count++;
    s->reg_write(uc, UC_X86_REG_RAX, &lo);
    s->reg_write(uc, UC_X86_REG_RDX, &hi);
    return 1;  /* skip the host's rdtsc */
}

/* RDTSCP: the TSC, and ECX = IA32_TSC_AUX as the guest wrote it (the engine keeps the MSR;
   the whole RCX is written: bits 63:32 are cleared in 64-bit mode) */
int on_rdtscp(void *uc, void *user) {
    emu_state *s = (emu_state *)user;
    struct { uint32_t rid; uint64_t value; } aux = { MSR_TSC_AUX, 0 };
    uint64_t rcx;
    on_rdtsc(uc, user);
    s->reg_read(uc, UC_X86_REG_MSR, &aux);
    rcx = aux.value & 0xffffffffu;
    s->reg_write(uc, UC_X86_REG_RCX, &rcx);
    return 1;
}

void on_mem_write(void *uc, int type, uint64_t addr, int size, int64_t value, void *user) {
    emu_state *s = (emu_state *)user;
    UNUSED(uc); UNUSED(type); UNUSED(value);
    uint64_t p0 = addr >> 12, p1 = (addr + (uint64_t)size - 1) >> 12;
    if (p0 < s->ram_pages) s->dirty_map[p0] = 1;
    if (p1 != p0 && p1 < s->ram_pages) s->dirty_map[p1] = 1;
    s->dirty_writes++;
}

/* Merge the CPU dirty map with the host-write map, list the dirty pages, clear both. */
/* A code hook at every instruction while debugger watchpoints exist: once a watched
   access happened (the memory hook set watch_hit), stop before the next instruction, so
   the accessing one has completed.  A stop from the memory hook itself would end the
   slice inside that instruction, which would then run again.  In C: a Python hook at every
   instruction runs the guest at a few MIPS. */
void on_watch_step(void *uc, uint64_t addr, uint32_t size, void *user) {
    emu_state *s = (emu_state *)user;
    UNUSED(addr);
    UNUSED(size);
    if (s->watch_hit) {
        s->stop_reason |= STOP_REQUEST;
        s->emu_stop(uc);
    }
}

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

/* ---------------------------------------------------------------------------------------
   Interrupt delivery, the common path, in C: a gate of the IDT in 32-bit protected mode or
   long mode, same privilege or a change through the TSS (RSP0/ESP0, IST), as QEMU's
   do_interrupt_protected/do_interrupt64 (target/i386/tcg/seg_helper.c).  emu/cpu/x86.py's
   _deliver_protected/_deliver_long do the same and everything else: a non-zero return
   means "not handled, nothing changed; use Python" (a fault while delivering, a 16-bit or
   task gate, a conforming or LDT code segment, virtual-8086 mode...).
   tests/test_delivery_paths.py drives the same events through both and compares.
   --------------------------------------------------------------------------------------- */
#define DESC_B (1u << 22)
#define DESC_L (1u << 21)
#define DESC_P (1u << 15)
#define DESC_S (1u << 12)
#define DESC_CS (1u << 11)
#define DESC_C (1u << 10)
#define DESC_W (1u << 9)
#define DESC_G (1u << 23)
#define HF_CPL_MASK 3u
#define HF_CS32 (1u << 4)
#define HF_SS32 (1u << 5)
#define HF_ADDSEG (1u << 6)
#define HF_LMA (1u << 14)
#define HF_CS64 (1u << 15)
#define CR0_PE 1u
#define EFLAGS_TF (1u << 8)
#define EFLAGS_IF (1u << 9)
#define EFLAGS_NT (1u << 14)
#define EFLAGS_RF (1u << 16)
#define EFLAGS_VM (1u << 17)
#define GATE_INTERRUPT 0xe
#define GATE_TRAP 0xf
#define TSS32_AVAILABLE 9
#define TSS32_BUSY 0xb
#define SEG_ES 0
#define SEG_CS 1
#define SEG_SS 2
#define SEG_DS 3

typedef struct { uint32_t selector, pad; uint64_t base; uint32_t limit, flags; } segcache;

static uint8_t *cx(emu_state *s, uint32_t off) { return (uint8_t *)s->ctx + off; }
static uint64_t cx64(emu_state *s, uint32_t off) { uint64_t v; memcpy(&v, cx(s, off), 8); return v; }
static uint32_t cx32(emu_state *s, uint32_t off) { uint32_t v; memcpy(&v, cx(s, off), 4); return v; }
static segcache *seg(emu_state *s, int i) { return (segcache *)cx(s, s->off_segs + 24 * i); }

static int ram_u64(emu_state *s, uint64_t pa, uint64_t *v, int size) {
    if (pa + size > s->ram_size) return -1;
    *v = 0;
    memcpy(v, s->ram + pa, size);
    return 0;
}

/* linear -> physical for a supervisor access; -1 on anything a fault would come from */
static int64_t translate(emu_state *s, uint64_t lin, int write) {
    uint64_t cr0 = cx64(s, s->off_cr), cr3 = cx64(s, s->off_cr + 24), cr4 = cx64(s, s->off_cr + 32);
    uint32_t hf = cx32(s, s->off_hflags);
    int64_t high = (int64_t)lin >> 47;
    if ((hf & HF_LMA) && high != 0 && high != -1) return -1;  /* non-canonical: #GP(0) */
    if (!(cr0 & 0x80000000u)) return (hf & HF_LMA) ? (int64_t)lin : (int64_t)(lin & 0xffffffffu);
    uint64_t e;
    int wp = (cr0 >> 16) & 1;
    if (cr4 & 0x20) {
        const uint64_t addr_mask = 0x000ffffffffff000ull;
        uint64_t table;
        int shift;
        if (hf & HF_LMA) { table = cr3 & addr_mask; shift = 39; }
        else {
            if (ram_u64(s, (cr3 & 0xffffffe0u) + ((lin >> 30) & 3) * 8, &e, 8) || !(e & 1)) return -1;
            table = e & addr_mask; shift = 21;
        }
        for (; shift >= 12; shift -= 9) {
            if (ram_u64(s, table + ((lin >> shift) & 511) * 8, &e, 8) || !(e & 1)) return -1;
            if (write && !(e & 2) && wp) return -1;
            if (shift == 12 || ((e & 0x80) && (shift == 30 || shift == 21))) {
                uint64_t page = 1ull << shift;
                return (int64_t)(((e & addr_mask) & ~(page - 1)) | (lin & (page - 1)));
            }
            table = e & addr_mask;
        }
        return -1;
    }
    lin &= 0xffffffffu;
    if (ram_u64(s, (cr3 & 0xfffff000u) + (lin >> 22) * 4, &e, 4) || !(e & 1)) return -1;
    if (write && !(e & 2) && wp) return -1;
    if ((e & 0x80) && (cr4 & 0x10))
        return (int64_t)((e & 0xffc00000u) | ((e & 0x1fe000u) << 19) | (lin & 0x3fffff));
    uint64_t pde = e;
    if (ram_u64(s, (pde & 0xfffff000u) + ((lin >> 12) & 1023) * 4, &e, 4) || !(e & 1)) return -1;
    if (write && !(e & 2) && wp) return -1;
    return (int64_t)((e & 0xfffff000u) | (lin & 0xfff));
}

static int vread(emu_state *s, uint64_t lin, void *dst, uint32_t n) {
    uint8_t *out = (uint8_t *)dst;
    while (n) {
        uint32_t chunk = 0x1000 - (lin & 0xfff);
        if (chunk > n) chunk = n;
        int64_t pa = translate(s, lin, 0);
        if (pa < 0 || (uint64_t)pa + chunk > s->ram_size) return -1;
        memcpy(out, s->ram + pa, chunk);
        out += chunk; lin += chunk; n -= chunk;
    }
    return 0;
}

/* all pages are translated before the first byte is written: a fault leaves memory as it was */
static int vwrite(emu_state *s, uint64_t lin, const void *src, uint32_t n) {
    int64_t pa[2]; uint32_t len[2]; int parts = 0;
    uint64_t l = lin; uint32_t left = n;
    while (left) {
        if (parts == 2) return -1;
        uint32_t chunk = 0x1000 - (l & 0xfff);
        if (chunk > left) chunk = left;
        pa[parts] = translate(s, l, 1);
        if (pa[parts] < 0 || (uint64_t)pa[parts] + chunk > s->ram_size) return -1;
        len[parts++] = chunk; l += chunk; left -= chunk;
    }
    const uint8_t *in = (const uint8_t *)src;
    for (int i = 0; i < parts; i++) {
        memcpy(s->ram + pa[i], in, len[i]);
        s->host_dirty[pa[i] >> 12] = 1;
        s->host_dirty[(pa[i] + len[i] - 1) >> 12] = 1;
        in += len[i];
    }
    return 0;
}

static int descriptor(emu_state *s, uint32_t selector, uint64_t *base, uint32_t *limit, uint32_t *flags) {
    uint32_t gdt_limit = cx32(s, s->off_gdt + 16);
    uint64_t gdt_base = cx64(s, s->off_gdt + 8);
    uint32_t index = selector & ~7u, d[2];
    if ((selector & 4) || index == 0 || index + 7 > gdt_limit) return -1;
    if (vread(s, gdt_base + index, d, 8)) return -1;
    *base = (d[0] >> 16) | ((d[1] & 0xff) << 16) | (d[1] & 0xff000000u);
    *limit = (d[0] & 0xffff) | (d[1] & 0x000f0000u);
    if (d[1] & DESC_G) *limit = (*limit << 12) | 0xfff;
    *flags = d[1];
    return 0;
}

/* QEMU's cpu_x86_load_seg_cache() for CS and SS: the cache and the derived hflags */
static void load_seg(emu_state *s, int i, uint32_t sel, uint64_t base, uint32_t limit, uint32_t flags) {
    segcache *c = seg(s, i);
    c->selector = sel; c->base = base; c->limit = limit; c->flags = flags;
    uint32_t hf = cx32(s, s->off_hflags);
    uint64_t cr0 = cx64(s, s->off_cr), eflags = cx64(s, s->off_eflags);
    if (i == SEG_CS) {
        if ((hf & HF_LMA) && (flags & DESC_L)) hf = (hf | HF_CS32 | HF_SS32 | HF_CS64) & ~HF_ADDSEG;
        else hf = (hf & ~(HF_CS32 | HF_CS64)) | ((flags & DESC_B) >> (22 - 4));
    }
    if (i == SEG_SS) hf = (hf & ~HF_CPL_MASK) | ((flags >> 13) & 3);
    uint32_t derived = (seg(s, SEG_SS)->flags & DESC_B) >> (22 - 5);
    if (!(hf & HF_CS64)) {
        if (!(cr0 & CR0_PE) || (eflags & EFLAGS_VM) || !(hf & HF_CS32)) derived |= HF_ADDSEG;
        else derived |= (uint32_t)((seg(s, SEG_DS)->base | seg(s, SEG_ES)->base | seg(s, SEG_SS)->base) != 0) << 6;
    }
    hf = (hf & ~(HF_SS32 | HF_ADDSEG)) | derived;
    memcpy(cx(s, s->off_hflags), &hf, 4);
}

/* An IDT gate the fast path takes: a present 32-bit (or long mode) interrupt or trap gate
   that the event may use.  0 when it is one. */
typedef struct { uint32_t type, selector, ist; uint64_t offset; } gate;

static int read_gate(emu_state *s, int long_mode, int vector, int software, uint32_t cpl, gate *out) {
    uint32_t size = long_mode ? 16 : 8, g[4] = {0, 0, 0, 0};
    uint64_t idt_base = cx64(s, s->off_idt + 8);
    uint32_t idt_limit = cx32(s, s->off_idt + 16);
    if ((uint32_t)vector * size + size - 1 > idt_limit) return -1;
    if (vread(s, idt_base + (uint64_t)vector * size, g, size)) return -1;
    out->type = (g[1] >> 8) & 0x1f;
    if (!(g[1] & DESC_P) || (out->type != GATE_INTERRUPT && out->type != GATE_TRAP)) return -1;
    if (software && ((g[1] >> 13) & 3) < cpl) return -1;  /* int n through a gate of lower DPL: #GP */
    out->selector = g[0] >> 16;
    out->offset = (g[0] & 0xffff) | (g[1] & 0xffff0000u) | (long_mode ? (uint64_t)g[2] << 32 : 0);
    out->ist = long_mode ? (g[1] & 7) : 0;
    return 0;
}

/* The gate's code segment, when the fast path takes it: a present, non-conforming code
   segment of the GDT (64-bit in long mode) of DPL <= CPL.  Its selector gets RPL = DPL. */
static int target_code_segment(emu_state *s, int long_mode, uint32_t selector, uint32_t cpl, segcache *cs) {
    if (descriptor(s, selector, &cs->base, &cs->limit, &cs->flags)) return -1;
    uint32_t f = cs->flags, dpl = (f >> 13) & 3;
    if (!(f & DESC_S) || !(f & DESC_CS) || !(f & DESC_P) || (f & DESC_C)) return -1;
    if (long_mode && (!(f & DESC_L) || (f & DESC_B))) return -1;
    if (dpl > cpl) return -1;
    cs->selector = (selector & 0xfffc) | dpl;
    return 0;
}

/* What the frame saves of the interrupted code. */
typedef struct { uint64_t rsp, rflags, return_ip; uint32_t cs, ss, error_code; int push_error; } interrupted;

/* Long mode: the frame (SS, RSP, RFLAGS, CS, RIP, error code) goes to the IST stack the
   gate names, else to RSP0 of the TSS on a privilege change, else to the current stack;
   always 16-byte aligned. */
static int push_frame_long(emu_state *s, const interrupted *from, uint32_t ist, int switch_stack, uint32_t dpl,
                           uint64_t *new_sp) {
    segcache *tr = (segcache *)cx(s, s->off_tr);
    uint64_t sp = from->rsp;
    if (ist || switch_stack) {
        uint32_t slot = ist ? 0x24 + 8 * (ist - 1) : 4 + 8 * dpl;
        if (slot + 7 > tr->limit || vread(s, tr->base + slot, &sp, 8)) return -1;
    }
    uint64_t frame[6] = {from->error_code, from->return_ip, from->cs, from->rflags, from->rsp, from->ss};
    uint32_t words = from->push_error ? 6 : 5;
    sp = (sp & ~0xfull) - 8 * words;
    if (vwrite(s, sp, frame + 6 - words, 8 * words)) return -1;
    *new_sp = sp;
    return 0;
}

/* 32-bit protected mode: on a privilege change the frame goes to SS0:ESP0 of the TSS and
   starts with SS and ESP (new_ss receives that SS); then EFLAGS, CS, EIP, error code. */
static int push_frame_protected(emu_state *s, const interrupted *from, int switch_stack, uint32_t dpl,
                                segcache *new_ss, uint64_t *new_sp) {
    const segcache *stack = seg(s, SEG_SS);
    uint64_t sp = from->rsp;
    if (switch_stack) {
        const segcache *tr = (const segcache *)cx(s, s->off_tr);
        uint32_t tss_type = (tr->flags >> 8) & 0xf, slot = 4 + 8 * dpl, esp_ss[2];
        if (tss_type != TSS32_AVAILABLE && tss_type != TSS32_BUSY) return -1;
        if (slot + 7 > tr->limit || vread(s, tr->base + slot, esp_ss, 8)) return -1;
        new_ss->selector = esp_ss[1] & 0xffff;
        if (!(new_ss->selector & 0xfffc)) return -1;
        if ((new_ss->selector & 3) != dpl) return -1;  /* #TS(SS): Python raises it */
        if (descriptor(s, new_ss->selector, &new_ss->base, &new_ss->limit, &new_ss->flags)) return -1;
        uint32_t f = new_ss->flags;
        if (((f >> 13) & 3) != dpl || !(f & DESC_S) || (f & DESC_CS) || !(f & DESC_W)) return -1;
        if (!(f & DESC_P)) return -1;
        stack = new_ss;
        sp = esp_ss[0];
    }
    uint64_t mask = (stack->flags & DESC_B) ? 0xffffffffull : 0xffffull;
    uint32_t frame[6] = {from->error_code, (uint32_t)from->return_ip, from->cs, (uint32_t)from->rflags,
                         (uint32_t)from->rsp, from->ss};
    uint32_t words = (switch_stack ? 5 : 3) + (from->push_error ? 1 : 0);
    sp = (sp - 4 * words) & mask;
    if (vwrite(s, (stack->base + sp) & 0xffffffffull, frame + (from->push_error ? 0 : 1), 4 * words)) return -1;
    /* QEMU's SET_ESP: a 16-bit stack keeps the bits of ESP above 15, a 32-bit one clears 63:32 */
    *new_sp = mask == 0xffffull ? (from->rsp & ~0xffffull) | sp : sp;
    return 0;
}

int deliver_fast(emu_state *s, void *uc, int vector, int software, uint64_t return_ip, int push_error,
                 uint32_t error_code) {
    if (s->context_save(uc, s->ctx)) return 1;
    uint32_t hflags = cx32(s, s->off_hflags), cpl = hflags & HF_CPL_MASK;
    int long_mode = (hflags & HF_LMA) != 0;
    if (!(cx64(s, s->off_cr) & CR0_PE) || (cx64(s, s->off_eflags) & EFLAGS_VM)) return 1;  /* real or vm86 */
    gate g;
    segcache cs, new_ss = {0, 0, 0, 0, 0};
    if (read_gate(s, long_mode, vector, software, cpl, &g)) return 1;
    if (target_code_segment(s, long_mode, g.selector, cpl, &cs)) return 1;
    uint32_t dpl = cs.selector & 3;
    int switch_stack = dpl < cpl;
    interrupted from = {0, 0, return_ip, seg(s, SEG_CS)->selector, seg(s, SEG_SS)->selector, error_code,
                        push_error};
    s->reg_read(uc, s->reg_rsp, &from.rsp);
    s->reg_read(uc, s->reg_eflags, &from.rflags);
    uint64_t new_sp;
    if (long_mode) {
        if (push_frame_long(s, &from, g.ist, switch_stack, dpl, &new_sp)) return 1;
        new_ss.selector = dpl;  /* a privilege change loads a null SS of the new ring */
        new_ss.flags = dpl << 13;
    } else if (push_frame_protected(s, &from, switch_stack, dpl, &new_ss, &new_sp)) {
        return 1;
    }
    /* nothing can fail from here on but the engine's own restore */
    if (switch_stack) load_seg(s, SEG_SS, new_ss.selector, new_ss.base, new_ss.limit, new_ss.flags);
    load_seg(s, SEG_CS, cs.selector, cs.base, cs.limit, cs.flags);
    int32_t none = -1;
    memcpy(cx(s, s->off_old_exception), &none, 4);
    if (s->context_restore(uc, s->ctx)) return 1;
    uint64_t new_flags = from.rflags & ~(uint64_t)(EFLAGS_TF | EFLAGS_NT | EFLAGS_RF | EFLAGS_VM);
    if (g.type == GATE_INTERRUPT) new_flags &= ~(uint64_t)EFLAGS_IF;
    s->reg_write(uc, s->reg_rsp, &new_sp);
    s->reg_write(uc, s->reg_eflags, &new_flags);
    s->reg_write(uc, s->reg_rip, &g.offset);
    s->fast_deliveries++;
    return 0;
}

/* Unicorn ends emu_start after hlt with no hook and no flag: it was a hlt when the byte
   before RIP (through CS and the page tables) is 0xF4.  1 yes, 0 no, -1 unreadable. */
int after_hlt(emu_state *s, void *uc) {
    if (s->context_save(uc, s->ctx)) return -1;
    uint64_t rip = cx64(s, s->off_eip);
    uint32_t hf = cx32(s, s->off_hflags);
    uint64_t lin = (hf & HF_LMA) && (hf & HF_CS64) ? rip - 1 : ((seg(s, SEG_CS)->base + rip - 1) & 0xffffffffull);
    uint8_t byte;
    if (vread(s, lin, &byte, 1)) return -1;
    return byte == 0xf4;
}

/* Merge the engine's dirty log (one bit per page, collected and cleared by the engine) with
   the host-write map (one byte per page), list the dirty pages and clear the host map. */
uint64_t collect_dirty_bitmap(uint64_t *bitmap, uint8_t *extra, uint64_t npages, uint32_t *out) {
    uint64_t n = 0;
    const uint64_t *e64 = (const uint64_t *)extra;
    for (uint64_t w = 0; w < (npages + 63) / 64; w++) {
        uint64_t bits = bitmap[w];
        for (uint64_t k = w * 8; k < w * 8 + 8 && k * 8 < npages; k++) {
            if (k * 8 + 8 <= npages && !e64[k]) continue;  /* 8 clean pages at once */
            for (uint64_t i = k * 8; i < k * 8 + 8 && i < npages; i++)
                if (extra[i]) { bits |= 1ull << (i % 64); extra[i] = 0; }
        }
        while (bits) {
            uint64_t i = w * 64 + (uint64_t)__builtin_ctzll(bits);
            bits &= bits - 1;
            if (i < npages) out[n++] = (uint32_t)i;
        }
    }
    return n;
}

/* bytes[i] |= bit i of bits, for n bits (a piece of RAM's dirty log into the page map) */
void or_bits_into_bytes(const uint64_t *bits, uint64_t n, uint8_t *bytes) {
    for (uint64_t w = 0; w < (n + 63) / 64; w++) {
        uint64_t word = bits[w];
        while (word) {
            uint64_t i = w * 64 + (uint64_t)__builtin_ctzll(word);
            word &= word - 1;
            if (i < n) bytes[i] = 1;
        }
    }
}

/* ---------------------------------------------------------------------------------------
   The real-time deadline timer.  With the patched engine no hook runs at every block: a
   thread sleeps until the slice's deadline (host monotonic time) and then asks the engine
   to stop, at the next block start.  A stop request that arrives while uc_emu_start is
   still starting up can be lost (Unicorn issue 636), so the thread asks again every 200 us
   until the slice is disarmed.  A late request from an old slice only ends the next slice
   early, which the run loop takes in its stride.
   --------------------------------------------------------------------------------------- */
typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    pthread_t thread;
    emu_state *s;
    void *uc;
    int64_t deadline;  /* host CLOCK_MONOTONIC ns, while armed */
    int armed, quit;
} deadline_timer;

static void timespec_at(struct timespec *ts, int64_t ns) {
    ts->tv_sec = ns / 1000000000;
    ts->tv_nsec = ns % 1000000000;
}

static void *deadline_timer_main(void *arg) {
    deadline_timer *t = (deadline_timer *)arg;
    struct timespec ts;
    pthread_mutex_lock(&t->lock);
    while (!t->quit) {
        if (!t->armed) {
            pthread_cond_wait(&t->cond, &t->lock);
            continue;
        }
        int64_t now = (int64_t)host_monotonic_ns();
        if (now < t->deadline) {
            timespec_at(&ts, t->deadline);
            pthread_cond_timedwait(&t->cond, &t->lock, &ts);
            continue;  /* due, re-armed or disarmed: look again */
        }
        __atomic_fetch_or(&t->s->stop_reason, STOP_DEADLINE, __ATOMIC_RELAXED);
        t->s->timer_fires++;
        pthread_mutex_unlock(&t->lock);
        t->s->emu_stop(t->uc);
        pthread_mutex_lock(&t->lock);
        if (t->armed && !t->quit) {
            timespec_at(&ts, (int64_t)host_monotonic_ns() + 200000);
            pthread_cond_timedwait(&t->cond, &t->lock, &ts);
        }
    }
    pthread_mutex_unlock(&t->lock);
    return NULL;
}

int deadline_timer_start(emu_state *s, void *uc) {
    deadline_timer *t = (deadline_timer *)calloc(1, sizeof(*t));
    pthread_condattr_t attr;
    if (!t) return -1;
    t->s = s;
    t->uc = uc;
    pthread_mutex_init(&t->lock, NULL);
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&t->cond, &attr);
    pthread_condattr_destroy(&attr);
    if (pthread_create(&t->thread, NULL, deadline_timer_main, t) != 0) {
        free(t);
        return -1;
    }
    s->timer = t;
    return 0;
}

/* In the child of a fork (-daemonize) the parent's thread does not exist, and its lock may
   have been held at the fork: leave that timer alone (a small leak) and start a new one. */
int deadline_timer_after_fork(emu_state *s) {
    deadline_timer *old = (deadline_timer *)s->timer;
    if (!old) return 0;
    s->timer = NULL;
    return deadline_timer_start(s, old->uc);
}

void deadline_timer_arm(emu_state *s, int64_t guest_deadline_ns) {
    deadline_timer *t = (deadline_timer *)s->timer;
    pthread_mutex_lock(&t->lock);
    t->deadline = guest_deadline_ns + s->clock.rt_offset_ns;  /* guest = host - rt_offset (running) */
    t->armed = 1;
    pthread_cond_signal(&t->cond);
    pthread_mutex_unlock(&t->lock);
}

void deadline_timer_disarm(emu_state *s) {
    deadline_timer *t = (deadline_timer *)s->timer;
    pthread_mutex_lock(&t->lock);
    t->armed = 0;
    pthread_mutex_unlock(&t->lock);  /* the thread notices when it next wakes */
}

void deadline_timer_stop(emu_state *s) {
    deadline_timer *t = (deadline_timer *)s->timer;
    if (!t) return;
    pthread_mutex_lock(&t->lock);
    t->quit = 1;
    t->armed = 0;
    pthread_cond_signal(&t->cond);
    pthread_mutex_unlock(&t->lock);
    pthread_join(t->thread, NULL);
    pthread_mutex_destroy(&t->lock);
    pthread_cond_destroy(&t->cond);
    free(t);
    s->timer = NULL;
}

/* The MSRs index[0..n) into out (a state save reads some forty: one engine call each, but
   not forty Python ones).  reg_msr is UC_X86_REG_MSR; the engine takes a uc_x86_msr. */
int read_msrs(emu_state *s, void *uc, int reg_msr, const uint32_t *index, uint64_t *out, int n) {
    struct { uint32_t rid; uint64_t value; } msr;
    for (int i = 0; i < n; i++) {
        msr.rid = index[i];
        msr.value = 0;
        if (s->reg_read(uc, reg_msr, &msr)) return -1;
        out[i] = msr.value;
    }
    return 0;
}

/* out[i] = 1 when page pages[i] holds any non-zero byte; stops at the first one found. */
uint64_t mark_nonzero_pages(const uint8_t *ram, const int64_t *pages, uint64_t n, uint8_t *out) {
    uint64_t count = 0;
    for (uint64_t i = 0; i < n; i++) {
        const uint64_t *w = (const uint64_t *)(ram + ((uint64_t)pages[i] << 12));
        uint8_t any = 0;
        for (int k = 0; k < 512; k += 8) {
            if (w[k] | w[k + 1] | w[k + 2] | w[k + 3] | w[k + 4] | w[k + 5] | w[k + 6] | w[k + 7]) { any = 1; break; }
        }
        out[i] = any;
        count += any;
    }
    return count;
}
