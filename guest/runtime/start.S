/*
 * _start: the entry point of every vCPU (docs/guest-platform.md, "Boot convention").
 *
 * On entry RSP = the top of this vCPU's boot stack, RDI = vCPU id, RSI = vCPU count.
 * vCPU 0 clears .bss and then sets __vsmp_booted; the others wait for that flag (it lives in
 * .data, which is never cleared). Every vCPU then calls main(); when main returns, its value
 * goes to the vCPU-done port (0xF5): that ends this vCPU only, and the machine ends when every
 * vCPU has, with the first non-zero status (vsmp_exit, port 0xF4, ends the machine at once).
 */
	.section .text._start, "ax", @progbits
	.globl	_start
	.type	_start, @function
_start:
	andq	$-16, %rsp		/* the ABI's alignment at a call */
	xorl	%ebp, %ebp		/* the outermost frame */
	testl	%edi, %edi
	jnz	.Lwait_for_boot

	leaq	__bss_start(%rip), %rdi
	leaq	__bss_end(%rip), %rcx
	subq	%rdi, %rcx
	xorl	%eax, %eax
	cld
	rep stosb
	movl	%esi, %edi		/* the vCPU count */
	call	__vsmp_boot_init	/* the runtime's own state, before anyone else runs */
	movl	$1, __vsmp_booted(%rip)	/* a plain store: visible after the .bss stores (TSO) */
	jmp	.Lcall_main

.Lwait_for_boot:
	pause
	cmpl	$0, __vsmp_booted(%rip)
	je	.Lwait_for_boot

.Lcall_main:
	call	main
	outb	%al, $0xf5		/* this vCPU is done, with main's status */
.Lnever:
	hlt				/* never reached: the monitor ends the vCPU at the out */
	jmp	.Lnever
	.size	_start, . - _start

	.data
	.balign	4
	.type	__vsmp_booted, @object
	.size	__vsmp_booted, 4
__vsmp_booted:
	.long	0

	.section .note.GNU-stack, "", @progbits
