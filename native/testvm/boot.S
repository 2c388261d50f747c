/*
 * Entry of gangway-testvm: the multiboot v1 header, a flat GDT (multiboot leaves the
 * loader's, which may be gone), the stack, and the interrupt stubs hw.c installs.
 * The loader enters in 32-bit protected mode, paging off: guest-physical addresses are
 * the kernel's addresses.
 */
	.set MB_MAGIC, 0x1badb002
	.set MB_FLAGS, 0x00000003 /* modules page-aligned, memory map wanted */

	.section .multiboot, "a"
	.align 4
	.long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)

	.section .bss
	.align 16
stack_bottom:
	.skip 65536
stack_top:

	.section .text
	.global _start
_start:
	cli
	lgdt gdt_descriptor
	ljmp $0x08, $1f
1:	mov $0x10, %ecx
	mov %ecx, %ds
	mov %ecx, %es
	mov %ecx, %fs
	mov %ecx, %gs
	mov %ecx, %ss
	mov $stack_top, %esp
	cld
	push %ebx /* multiboot info */
	push %eax /* multiboot magic */
	call kmain
2:	cli
	hlt
	jmp 2b

/* IRQ 0, the PIT: it only wakes the CPU from hlt, so acknowledge it and return. */
	.global irq_timer_stub
irq_timer_stub:
	push %eax
	mov $0x20, %al
	out %al, $0x20
	pop %eax
	iret

/* A masked IRQ line can still raise a spurious IRQ 7 or 15: no acknowledgement is due. */
	.global irq_spurious_stub
irq_spurious_stub:
	iret

/* CPU exceptions: fatal_exception(vector) reports and halts, so the error code some push is left where it is. */
	.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
exception_\n:
	push $\n
	call fatal_exception
	.endr

	.section .rodata
	.align 4
	.global exception_stubs
exception_stubs:
	.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	.long exception_\n
	.endr

	.align 8
gdt:
	.quad 0
	.quad 0x00cf9a000000ffff /* 0x08: code, base 0, 4 GiB, 32-bit */
	.quad 0x00cf92000000ffff /* 0x10: data, base 0, 4 GiB */
gdt_end:
gdt_descriptor:
	.word gdt_end - gdt - 1
	.long gdt

	.section .note.GNU-stack, "", @progbits
