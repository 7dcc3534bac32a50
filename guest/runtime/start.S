/*
 * _start: the entry point of every vCPU (docs/guest-platform.md, "Boot convention").
 *
 * On entry RSP = the top of this vCPU's boot stack, RDI = vCPU id, RSI = vCPU count.
 * vCPU 0 clears .bss and then sets __vsmp_booted; the others wait for that flag (it lives in
 * .data, which is never cleared). Every vCPU then calls main() and passes its return value
 * to vsmp_exit().
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
	movl	$1, __vsmp_booted(%rip)	/* a plain store: visible after the .bss stores (TSO) */
	jmp	.Lcall_main

.Lwait_for_boot:
	pause
	cmpl	$0, __vsmp_booted(%rip)
	je	.Lwait_for_boot

.Lcall_main:
	call	main
	movl	%eax, %edi
	call	vsmp_exit
.Lnever:
	jmp	.Lnever
	.size	_start, . - _start

	.data
	.balign	4
	.type	__vsmp_booted, @object
	.size	__vsmp_booted, 4
__vsmp_booted:
	.long	0

	.section .note.GNU-stack, "", @progbits
