/* Ports, selectors and constants of the modelled PC shared by every guest. */
#ifndef FIRMWARE_DEFS_H
#define FIRMWARE_DEFS_H

/* 16550A UART, COM1 */
#define COM1            0x3f8
#define UART_RBR        0       /* receive buffer (read, DLAB=0) */
#define UART_THR        0       /* transmit holding (write, DLAB=0) */
#define UART_IER        1
#define UART_IIR        2
#define UART_FCR        2
#define UART_LCR        3
#define UART_MCR        4
#define UART_LSR        5
#define UART_IER_RDA    0x01    /* received data available interrupt */
#define UART_MCR_DTR    0x01
#define UART_MCR_RTS    0x02
#define UART_MCR_OUT2   0x08    /* gates the UART interrupt onto the ISA IRQ line */
#define UART_LSR_DR     0x01
#define UART_LSR_THRE   0x20
#define COM1_IRQ        4

/* 8259A pair */
#define PIC1_CMD        0x20
#define PIC1_DATA       0x21
#define PIC2_CMD        0xa0
#define PIC2_DATA       0xa1
#define PIC_EOI         0x20
#define IRQ_BASE        0x20    /* protected-mode vector of IRQ0 after remapping */

/* 8254 */
#define PIT_CH0         0x40
#define PIT_CMD         0x43
#define PIT_HZ          1193182
#define PIT_DIV_100HZ   11932
#define PIT_DIV_1000HZ  1193

/* MC146818 RTC */
#define RTC_INDEX       0x70
#define RTC_DATA        0x71

/* isa-debug-exit: QEMU exits with status (value << 1) | 1 */
#define DEBUG_EXIT_PORT 0xf4

/* Multiboot v1 */
#define MB_HEADER_MAGIC 0x1badb002
#define MB_BOOT_MAGIC   0x2badb002
#define MB_INFO_CMDLINE 0x04    /* flags bit: cmdline field valid */
#define CMDLINE_MAX     256

/* Flat GDT installed by the multiboot entry */
#define SEL_CODE32      0x08
#define SEL_DATA32      0x10

/* Exceptions for which the CPU pushes an error code (SDM vol. 3, 6.13). */
#define HAS_ERROR_CODE(v) ((v) == 8 || ((v) >= 10 && (v) <= 14) || (v) == 17 || (v) == 21 || (v) == 29 || (v) == 30)

/* Page table entry bits and IA32_EFER, for the guests that page or enter long mode. */
#define PTE_P           0x001
#define PTE_RW          0x002
#define PTE_US          0x004
#define PTE_PWT         0x008
#define PTE_PCD         0x010
#define PTE_PS          0x080
#define MSR_EFER        0xc0000080

#endif
