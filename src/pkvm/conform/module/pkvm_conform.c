// SPDX-License-Identifier: GPL-2.0
/*
 * pkvm_conform: issue raw host hypercalls (hvc #0) to the running pKVM hypervisor and report
 * what came back, for comparing the real hypervisor against the pkvm Python model.
 *
 * Interface: /proc/pkvm_conform. Write one command per write(2), then read the answer (one
 * JSON line). Commands:
 *   seq N                         start sequence N: page names below are scoped to it
 *   hvc CPU FUNC A1 .. A6         FUNC is a host hypercall name of this kernel (from hcall_ids.h)
 *                                 or a number, taken as the whole x0. An argument is a number
 *                                 (any base strtoull accepts), page:NAME (pfn of a page the
 *                                 module allocates on first use), pa:NAME (its physical
 *                                 address), va:NAME (its kernel virtual address) or vm:NAME
 *                                 (the hyp handle of a VM the helper registered).
 *   vm NAME FD                    (from the VMM helper) record the hyp handle of the KVM VM
 *                                 whose fd is FD in the writing process, as vm:NAME; x1 of the
 *                                 answer is the handle
 *   topup FD N                    (from the VMM helper) push fresh zeroed pages on the pKVM
 *                                 memcache of the KVM vCPU whose fd is FD in the writing process
 *                                 until it holds N (at most 64); x1 = pages it holds (7.2 on)
 *   read CPU NAME                 read page NAME through the kernel's linear map on CPU, the
 *                                 way any host kernel code would, with an exception-table-backed
 *                                 accessor: a read the host stage-2 refuses (an abort injected
 *                                 back by the hyp) is caught. x0 = 0 or -EFAULT, x1 = how many
 *                                 of its 512 64-bit words are not zero
 *   page NAME                     allocate page NAME now; answers as "pages" does
 *   pages                         the current sequence's name -> pfn map (and -> kernel VA)
 *   ids                           every host hypercall name with its index in the enum
 *   smc CPU IMM X0 .. X17         (SMC conformance) `smc #IMM` on CPU with x0..x17 as given
 *                                 (numbers; missing ones 0); IMM is 0, 1 or 0xffff. The
 *                                 answer holds x0..x17 after the call (key "smc")
 * Missing arguments are 0. The hypercall runs on CPU with interrupts off (IPI or local).
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/proc_fs.h>
#include <linux/uaccess.h>
#include <linux/slab.h>
#include <linux/mm.h>
#include <linux/gfp.h>
#include <linux/smp.h>
#include <linux/string.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/kvm_host.h>
#include <linux/arm-smccc.h>
#include <linux/version.h>
#include <asm/kvm_asm.h>

#include "hcall_ids.h"	/* generated: PKVMC_HCALLS(X) lists X(name) for each enum entry */

#define PKVMC_MAX_PAGES		64
#define PKVMC_NAME_LEN		32
#define PKVMC_OUT_LEN		4096
/*
 * Each named page is the first of a block of 1 << PKVMC_ORDER pages of ours: a structure the
 * hyp reads or pins from its VA on (a struct kvm or kvm_vcpu passes 4 KiB) lands in memory of
 * ours, never in a neighbour Linux owns.
 */
#define PKVMC_ORDER		2
#define PKVMC_IN_LEN		512

struct pkvmc_hcall_name {
	const char *name;
	unsigned long index;
};

#define PKVMC_ENTRY(n) { #n, __KVM_HOST_SMCCC_FUNC_##n },
static const struct pkvmc_hcall_name pkvmc_hcalls[] = {
	{ "__kvm_hyp_init", __KVM_HOST_SMCCC_FUNC___kvm_hyp_init },
	PKVMC_HCALLS(PKVMC_ENTRY)
};

struct pkvmc_page {
	char name[PKVMC_NAME_LEN];
	struct page *page;
};

struct pkvmc_vm {
	char name[PKVMC_NAME_LEN];
	u64 handle;
};

#define PKVMC_MAX_VMS		64

static DEFINE_MUTEX(pkvmc_lock);
static struct pkvmc_vm pkvmc_vms[PKVMC_MAX_VMS];
static int pkvmc_nvms;
static struct pkvmc_page pkvmc_pages[PKVMC_MAX_PAGES];
static int pkvmc_npages;
static long pkvmc_seq;
static char pkvmc_out[PKVMC_OUT_LEN];
static size_t pkvmc_outlen;

struct pkvmc_regs {
	u64 x[7];
};

static void pkvmc_do_hvc(void *data)
{
	struct pkvmc_regs *r = data;
	register u64 x0 asm("x0") = r->x[0];
	register u64 x1 asm("x1") = r->x[1];
	register u64 x2 asm("x2") = r->x[2];
	register u64 x3 asm("x3") = r->x[3];
	register u64 x4 asm("x4") = r->x[4];
	register u64 x5 asm("x5") = r->x[5];
	register u64 x6 asm("x6") = r->x[6];

	asm volatile("hvc #0"
		     : "+r"(x0), "+r"(x1), "+r"(x2), "+r"(x3), "+r"(x4), "+r"(x5), "+r"(x6)
		     :
		     : "memory");
	r->x[0] = x0;
	r->x[1] = x1;
	r->x[2] = x2;
	r->x[3] = x3;
}

static __printf(1, 2) void pkvmc_printf(const char *fmt, ...)
{
	va_list ap;

	if (pkvmc_outlen >= PKVMC_OUT_LEN - 1)
		return;
	va_start(ap, fmt);
	pkvmc_outlen += vscnprintf(pkvmc_out + pkvmc_outlen, PKVMC_OUT_LEN - pkvmc_outlen, fmt, ap);
	va_end(ap);
}

static void pkvmc_error(const char *what, const char *tok)
{
	pkvmc_outlen = 0;
	pkvmc_printf("{\"error\": \"%s: %s\"}\n", what, tok ? tok : "");
}

static struct page *pkvmc_named_page(const char *name)
{
	struct page *page;
	int i;

	if (strlen(name) >= PKVMC_NAME_LEN)
		return NULL;
	for (i = 0; i < pkvmc_npages; i++)
		if (!strcmp(pkvmc_pages[i].name, name))
			return pkvmc_pages[i].page;
	if (pkvmc_npages == PKVMC_MAX_PAGES)
		return NULL;
	page = alloc_pages(GFP_KERNEL | __GFP_ZERO, PKVMC_ORDER);
	if (!page)
		return NULL;
	strscpy(pkvmc_pages[pkvmc_npages].name, name, PKVMC_NAME_LEN);
	pkvmc_pages[pkvmc_npages].page = page;
	pkvmc_npages++;
	return page;
}

/* A VM's name keeps its handle after the VM is gone (a stale handle); a VM never made is 0. */
static int pkvmc_vm_handle(const char *name, u64 *handle)
{
	int i;

	*handle = 0;
	for (i = pkvmc_nvms - 1; i >= 0; i--) {
		if (!strcmp(pkvmc_vms[i].name, name)) {
			*handle = pkvmc_vms[i].handle;
			break;
		}
	}
	return 0;
}

/* One argument: a number or a symbolic page or VM reference. */
static int pkvmc_parse_arg(const char *tok, u64 *val)
{
	struct page *page;

	if (!strncmp(tok, "vm:", 3))
		return pkvmc_vm_handle(tok + 3, val);

	if (!strncmp(tok, "page:", 5) || !strncmp(tok, "pa:", 3) || !strncmp(tok, "va:", 3)) {
		const char *name = strchr(tok, ':') + 1;

		page = pkvmc_named_page(name);
		if (!page)
			return -ENOMEM;
		if (!strncmp(tok, "pa:", 3))
			*val = page_to_phys(page);
		else if (!strncmp(tok, "va:", 3))
			*val = (u64)page_address(page);
		else
			*val = page_to_pfn(page);
		return 0;
	}
	return kstrtou64(tok, 0, val);
}

static int pkvmc_parse_func(const char *tok, u64 *x0)
{
	int i;

	for (i = 0; i < ARRAY_SIZE(pkvmc_hcalls); i++) {
		if (!strcmp(tok, pkvmc_hcalls[i].name)) {
			*x0 = KVM_HOST_SMCCC_ID(pkvmc_hcalls[i].index);
			return 0;
		}
	}
	return kstrtou64(tok, 0, x0);
}

static void pkvmc_cmd_hvc(char *rest)
{
	struct pkvmc_regs r = {};
	char *tok;
	unsigned int cpu;
	int n = 0, err;

	tok = strsep(&rest, " ");
	if (!tok || kstrtouint(tok, 0, &cpu) || cpu >= nr_cpu_ids || !cpu_online(cpu))
		return pkvmc_error("bad cpu", tok);
	tok = strsep(&rest, " ");
	if (!tok || pkvmc_parse_func(tok, &r.x[0]))
		return pkvmc_error("bad function", tok);
	while ((tok = strsep(&rest, " ")) != NULL) {
		if (!*tok)
			continue;
		if (n == 6)
			return pkvmc_error("too many arguments", tok);
		err = pkvmc_parse_arg(tok, &r.x[++n]);
		if (err)
			return pkvmc_error("bad argument", tok);
	}
	err = smp_call_function_single(cpu, pkvmc_do_hvc, &r, 1);
	if (err)
		return pkvmc_error("cpu call failed", "");
	pkvmc_printf("{\"x0\": \"0x%llx\", \"x1\": \"0x%llx\", \"x2\": \"0x%llx\", \"x3\": \"0x%llx\"}\n",
		     r.x[0], r.x[1], r.x[2], r.x[3]);
}

struct pkvmc_read {
	void *src;
	long ret;
};

static u64 pkvmc_read_buf[PAGE_SIZE / sizeof(u64)];

static void pkvmc_do_read(void *data)
{
	struct pkvmc_read *r = data;

	r->ret = copy_from_kernel_nofault(pkvmc_read_buf, r->src, PAGE_SIZE);
}

static void pkvmc_cmd_read(char *rest)
{
	struct pkvmc_read r = {};
	struct page *page;
	unsigned int cpu;
	char *tok = strsep(&rest, " ");
	int i, nonzero = 0;

	if (!tok || kstrtouint(tok, 0, &cpu) || cpu >= nr_cpu_ids || !cpu_online(cpu))
		return pkvmc_error("bad cpu", tok);
	page = rest && *rest ? pkvmc_named_page(rest) : NULL;
	if (!page)
		return pkvmc_error("bad page", rest);
	r.src = page_address(page);
	if (smp_call_function_single(cpu, pkvmc_do_read, &r, 1))
		return pkvmc_error("cpu call failed", "");
	if (!r.ret)
		for (i = 0; i < ARRAY_SIZE(pkvmc_read_buf); i++)
			nonzero += pkvmc_read_buf[i] != 0;
	pkvmc_printf("{\"x0\": \"0x%llx\", \"x1\": \"0x%x\", \"x2\": \"0x0\", \"x3\": \"0x0\"}\n",
		     (u64)(r.ret ? -EFAULT : 0), nonzero);
}

/* The helper names a VM by its fd in the helper's own process (we run in that process). */
static void pkvmc_cmd_vm(char *rest)
{
	char *name = strsep(&rest, " ");
	struct file *file;
	struct kvm *kvm;
	unsigned int fd;
	u64 handle;

	if (!name || !*name || strlen(name) >= PKVMC_NAME_LEN || pkvmc_nvms == PKVMC_MAX_VMS)
		return pkvmc_error("bad vm name", name);
	if (!rest || kstrtouint(rest, 0, &fd))
		return pkvmc_error("bad vm fd", rest);
	file = fget(fd);
	if (!file)
		return pkvmc_error("no such fd", rest);
	if (strcmp(file_dentry(file)->d_name.name, "kvm-vm")) {
		fput(file);
		return pkvmc_error("not a KVM VM fd", rest);
	}
	kvm = file->private_data;
	handle = kvm->arch.pkvm.handle;
	fput(file);
	strscpy(pkvmc_vms[pkvmc_nvms].name, name, PKVMC_NAME_LEN);
	pkvmc_vms[pkvmc_nvms].handle = handle;
	pkvmc_nvms++;
	pkvmc_printf("{\"x0\": \"0x0\", \"x1\": \"0x%llx\", \"x2\": \"0x0\", \"x3\": \"0x0\"}\n",
		     handle);
}

#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 13, 0)
static phys_addr_t pkvmc_virt_to_phys(void *virt)
{
	return virt_to_phys(virt);
}

static void pkvmc_cmd_topup(char *rest)
{
	char *tok = strsep(&rest, " ");
	struct kvm_hyp_memcache *mc;
	struct kvm_vcpu *vcpu;
	struct file *file;
	unsigned int fd, n;

	if (!tok || kstrtouint(tok, 0, &fd) || !rest || kstrtouint(rest, 0, &n) || n > 64)
		return pkvmc_error("bad topup", rest);
	file = fget(fd);
	if (!file)
		return pkvmc_error("no such fd", tok);
	if (strncmp(file_dentry(file)->d_name.name, "kvm-vcpu", 8)) {
		fput(file);
		return pkvmc_error("not a KVM vCPU fd", tok);
	}
	vcpu = file->private_data;
	mc = &vcpu->arch.pkvm_memcache;
	while (mc->nr_pages < n) {
		struct page *page = alloc_page(GFP_KERNEL | __GFP_ZERO);

		if (!page)
			break;
		push_hyp_memcache(mc, page_address(page), pkvmc_virt_to_phys);
	}
	pkvmc_printf("{\"x0\": \"0x0\", \"x1\": \"0x%lx\", \"x2\": \"0x0\", \"x3\": \"0x0\"}\n",
		     mc->nr_pages);
	fput(file);
}
#else
static void pkvmc_cmd_topup(char *rest)
{
	pkvmc_error("no pKVM vCPU memcache on this kernel", rest);
}
#endif

static void pkvmc_cmd_pages(void)
{
	int i;

	pkvmc_printf("{\"pages\": {");
	for (i = 0; i < pkvmc_npages; i++)
		pkvmc_printf("%s\"%s\": \"0x%lx\"", i ? ", " : "", pkvmc_pages[i].name,
			     page_to_pfn(pkvmc_pages[i].page));
	pkvmc_printf("}, \"vas\": {");
	for (i = 0; i < pkvmc_npages; i++)
		pkvmc_printf("%s\"%s\": \"0x%llx\"", i ? ", " : "", pkvmc_pages[i].name,
			     (u64)page_address(pkvmc_pages[i].page));
	pkvmc_printf("}}\n");
}

static void pkvmc_cmd_ids(void)
{
	int i;

	pkvmc_printf("{\"ids\": {");
	for (i = 0; i < ARRAY_SIZE(pkvmc_hcalls); i++)
		pkvmc_printf("%s\"%s\": %lu", i ? ", " : "", pkvmc_hcalls[i].name,
			     pkvmc_hcalls[i].index);
	pkvmc_printf("}}\n");
}

/* --- SMC conformance: `smc #imm` from EL1 with x0..x17 set, all 18 registers read back ---- */
#define PKVMC_SMC_REGS 18

struct pkvmc_smc {
	u64 imm;
	u64 x[PKVMC_SMC_REGS];
};

#define PKVMC_SMC_ASM(IMM)								\
	asm volatile("ldp x0, x1, [%0, #0]\n\t"						\
		     "ldp x2, x3, [%0, #16]\n\t"					\
		     "ldp x4, x5, [%0, #32]\n\t"					\
		     "ldp x6, x7, [%0, #48]\n\t"					\
		     "ldp x8, x9, [%0, #64]\n\t"					\
		     "ldp x10, x11, [%0, #80]\n\t"					\
		     "ldp x12, x13, [%0, #96]\n\t"					\
		     "ldp x14, x15, [%0, #112]\n\t"					\
		     "ldp x16, x17, [%0, #128]\n\t"					\
		     "smc #" #IMM "\n\t"						\
		     "stp x0, x1, [%0, #0]\n\t"					\
		     "stp x2, x3, [%0, #16]\n\t"					\
		     "stp x4, x5, [%0, #32]\n\t"					\
		     "stp x6, x7, [%0, #48]\n\t"					\
		     "stp x8, x9, [%0, #64]\n\t"					\
		     "stp x10, x11, [%0, #80]\n\t"					\
		     "stp x12, x13, [%0, #96]\n\t"					\
		     "stp x14, x15, [%0, #112]\n\t"					\
		     "stp x16, x17, [%0, #128]\n\t"					\
		     : : "r"(x) : "x0", "x1", "x2", "x3", "x4", "x5", "x6", "x7", "x8",	\
		       "x9", "x10", "x11", "x12", "x13", "x14", "x15", "x16", "x17",	\
		       "memory")

static void pkvmc_do_smc(void *data)
{
	struct pkvmc_smc *r = data;
	u64 *x = r->x;	/* in a callee-saved register: SMCCC preserves x18..x30 */

	switch (r->imm) {
	case 0:
		PKVMC_SMC_ASM(0);
		break;
	case 1:
		PKVMC_SMC_ASM(1);
		break;
	default:
		PKVMC_SMC_ASM(0xffff);
		break;
	}
}

static void pkvmc_cmd_smc(char *rest)
{
	struct pkvmc_smc r = {};
	char *tok;
	unsigned int cpu;
	int n = 0, i, err;

	tok = strsep(&rest, " ");
	if (!tok || kstrtouint(tok, 0, &cpu) || cpu >= nr_cpu_ids || !cpu_online(cpu))
		return pkvmc_error("bad cpu", tok);
	tok = strsep(&rest, " ");
	if (!tok || kstrtou64(tok, 0, &r.imm) || (r.imm != 0 && r.imm != 1 && r.imm != 0xffff))
		return pkvmc_error("bad smc immediate (0, 1 or 0xffff)", tok);
	while ((tok = strsep(&rest, " ")) != NULL) {
		if (!*tok)
			continue;
		if (n == PKVMC_SMC_REGS)
			return pkvmc_error("too many registers", tok);
		if (kstrtou64(tok, 0, &r.x[n++]))
			return pkvmc_error("bad register value", tok);
	}
	err = smp_call_function_single(cpu, pkvmc_do_smc, &r, 1);
	if (err)
		return pkvmc_error("cpu call failed", "");
	pkvmc_printf("{\"smc\": [");
	for (i = 0; i < PKVMC_SMC_REGS; i++)
		pkvmc_printf("%s\"0x%llx\"", i ? ", " : "", r.x[i]);
	pkvmc_printf("]}\n");
}
/* --- end of SMC conformance ----------------------------------------------------------------- */

static ssize_t pkvmc_write(struct file *file, const char __user *ubuf, size_t len, loff_t *off)
{
	char buf[PKVMC_IN_LEN];
	char *rest, *cmd;

	if (len >= sizeof(buf))
		return -E2BIG;
	if (copy_from_user(buf, ubuf, len))
		return -EFAULT;
	buf[len] = '\0';
	strim(buf);
	rest = buf;

	mutex_lock(&pkvmc_lock);
	pkvmc_outlen = 0;
	pkvmc_out[0] = '\0';
	cmd = strsep(&rest, " ");
	if (!strcmp(cmd, "hvc")) {
		pkvmc_cmd_hvc(rest ? rest : "");
	} else if (!strcmp(cmd, "seq")) {
		if (!rest || kstrtol(rest, 0, &pkvmc_seq))
			pkvmc_error("bad sequence number", rest);
		/* Pages stay allocated (the hyp may still hold them); names start afresh. */
		pkvmc_npages = 0;
	} else if (!strcmp(cmd, "read")) {
		pkvmc_cmd_read(rest);
	} else if (!strcmp(cmd, "vm")) {
		pkvmc_cmd_vm(rest);
	} else if (!strcmp(cmd, "topup")) {
		pkvmc_cmd_topup(rest);
	} else if (!strcmp(cmd, "page")) {
		if (!rest || !pkvmc_named_page(rest))
			pkvmc_error("cannot allocate page", rest);
		else
			pkvmc_cmd_pages();
	} else if (!strcmp(cmd, "pages")) {
		pkvmc_cmd_pages();
	} else if (!strcmp(cmd, "ids")) {
		pkvmc_cmd_ids();
	} else if (!strcmp(cmd, "smc")) {
		pkvmc_cmd_smc(rest ? rest : "");
	} else {
		pkvmc_error("unknown command", cmd);
	}
	mutex_unlock(&pkvmc_lock);
	return len;
}

static ssize_t pkvmc_read(struct file *file, char __user *ubuf, size_t len, loff_t *off)
{
	ssize_t ret;

	mutex_lock(&pkvmc_lock);
	ret = simple_read_from_buffer(ubuf, len, off, pkvmc_out, pkvmc_outlen);
	mutex_unlock(&pkvmc_lock);
	return ret;
}

static const struct proc_ops pkvmc_ops = {
	.proc_read = pkvmc_read,
	.proc_write = pkvmc_write,
	.proc_lseek = default_llseek,
};

static struct proc_dir_entry *pkvmc_entry;

static int __init pkvmc_init(void)
{
	pkvmc_entry = proc_create("pkvm_conform", 0600, NULL, &pkvmc_ops);
	return pkvmc_entry ? 0 : -ENOMEM;
}

static void __exit pkvmc_exit(void)
{
	proc_remove(pkvmc_entry);
}

module_init(pkvmc_init);
module_exit(pkvmc_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("Raw pKVM host hypercalls for pkvm conformance testing");
