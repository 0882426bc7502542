// SPDX-License-Identifier: GPL-2.0
/*
 * pkvm_vmm: a very small VMM over /dev/kvm for the pkvm conformance harness.
 *
 * Started once per boot by the initramfs /init with stdin/stdout on FIFOs. It reads one
 * command per line and answers each with one JSON line of four registers, the shape the
 * module's hypercall answers have:
 *
 *   create NAME VCPUS PROTECTED   create a VM (PROTECTED 1: the protected VM type) with VCPUS
 *                                 vCPUs and 64 KiB of guest RAM at IPA 0x4000_0000 holding a
 *                                 loop of UART stores, run vCPU 0 once (the first KVM_RUN makes
 *                                 the hyp VM), then tell the module the VM's hyp handle under
 *                                 NAME so later hypercalls can name it as vm:NAME.
 *                                 x0 = 0 or -errno, x1 = handle, x2 = exit reason, x3 = VCPUS
 *   run NAME VCPU                 one KVM_RUN: x0 = 0 or -errno, x1 = exit reason,
 *                                 x2 = MMIO address (MMIO exits), x3 = 0
 *   destroy NAME                  close every fd of the VM (KVM tears it down and gives its
 *                                 pages back), then read the guest RAM back as the VMM's own
 *                                 memory: x0 = 0 or -errno, x1 = how many of its 64-bit words
 *                                 are not zero, x2 = how many of its pages could not be read
 *                                 (the kernel's copy from them faulted)
 *   topup NAME VCPU N             have the module fill the vCPU's pKVM memcache up to N pages:
 *                                 x0 = 0 or -errno, x1 = pages it holds
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stddef.h>
#include <stdint.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#define VMM_MAX_VMS	16
#define VMM_MAX_VCPUS	8
#define GUEST_IPA	0x40000000ULL
#define GUEST_SIZE	0x10000ULL
#define VM_TYPE_PROTECTED	(1UL << 31)	/* 7.2's protected VM type bit */

/* movz x1, #0x0900, lsl #16; 1: str w0, [x1]; add w0, w0, #1; b 1b */
static const uint32_t guest_code[] = { 0xd2a12001, 0xb9000020, 0x11000400, 0x17fffffe };

struct vmm_vm {
	char name[32];
	int fd;
	int nr_vcpus;
	int vcpu_fd[VMM_MAX_VCPUS];
	struct kvm_run *run[VMM_MAX_VCPUS];
	void *mem;
};

static struct vmm_vm vms[VMM_MAX_VMS];
static int kvm_fd = -1;
static long run_size;

static void answer(int64_t x0, uint64_t x1, uint64_t x2, uint64_t x3)
{
	printf("{\"x0\": \"0x%llx\", \"x1\": \"0x%llx\", \"x2\": \"0x%llx\", \"x3\": \"0x%llx\"}\n",
	       (unsigned long long)x0, (unsigned long long)x1, (unsigned long long)x2,
	       (unsigned long long)x3);
	fflush(stdout);
}

static struct vmm_vm *find_vm(const char *name)
{
	for (int i = 0; i < VMM_MAX_VMS; i++)
		if (vms[i].fd > 0 && !strcmp(vms[i].name, name))
			return &vms[i];
	return NULL;
}

/*
 * Read the guest RAM after the teardown. The kernel copies each page into a pipe: a page the
 * host stage-2 still refuses fails that copy with EFAULT instead of faulting this process.
 */
static void read_back(struct vmm_vm *vm, uint64_t *nonzero, uint64_t *faulted)
{
	static uint64_t buf[4096 / sizeof(uint64_t)];
	int p[2];

	*nonzero = *faulted = 0;
	if (!vm->mem || pipe(p) < 0)
		return;
	for (uint64_t off = 0; off < GUEST_SIZE; off += sizeof(buf)) {
		if (write(p[1], (char *)vm->mem + off, sizeof(buf)) != (ssize_t)sizeof(buf)) {
			(*faulted)++;
			continue;
		}
		if (read(p[0], buf, sizeof(buf)) != (ssize_t)sizeof(buf)) {
			(*faulted)++;
			continue;
		}
		for (size_t i = 0; i < sizeof(buf) / sizeof(buf[0]); i++)
			*nonzero += buf[i] != 0;
	}
	close(p[0]);
	close(p[1]);
}

static void destroy_vm(struct vmm_vm *vm, uint64_t *nonzero, uint64_t *faulted)
{
	for (int i = 0; i < vm->nr_vcpus; i++) {
		if (vm->run[i])
			munmap(vm->run[i], run_size);
		close(vm->vcpu_fd[i]);
	}
	close(vm->fd);
	if (nonzero)
		read_back(vm, nonzero, faulted);
	if (vm->mem)
		munmap(vm->mem, GUEST_SIZE);
	memset(vm, 0, sizeof(*vm));
}

static int set_pc(int vcpu_fd, uint64_t pc)
{
	struct kvm_one_reg reg = {
		.id = KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE |
		      (offsetof(struct kvm_regs, regs.pc) / sizeof(uint32_t)),
		.addr = (uint64_t)(uintptr_t)&pc,
	};
	return ioctl(vcpu_fd, KVM_SET_ONE_REG, &reg);
}

static int add_vcpu(struct vmm_vm *vm, int idx)
{
	struct kvm_vcpu_init init;
	int fd = ioctl(vm->fd, KVM_CREATE_VCPU, idx);

	if (fd < 0)
		return -errno;
	vm->vcpu_fd[idx] = fd;
	vm->nr_vcpus = idx + 1;
	if (ioctl(vm->fd, KVM_ARM_PREFERRED_TARGET, &init) < 0)
		return -errno;
	init.features[0] |= 1u << KVM_ARM_VCPU_PSCI_0_2;
	if (ioctl(fd, KVM_ARM_VCPU_INIT, &init) < 0)
		return -errno;
	if (set_pc(fd, GUEST_IPA) < 0)
		return -errno;
	vm->run[idx] = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (vm->run[idx] == MAP_FAILED) {
		vm->run[idx] = NULL;
		return -errno;
	}
	return 0;
}

/* Tell the module which hyp handle this VM has; its answer holds it in x1. */
static int register_handle(struct vmm_vm *vm, uint64_t *handle)
{
	char cmd[96], buf[256], *p;
	int fd = open("/proc/pkvm_conform", O_RDWR);
	ssize_t n;

	if (fd < 0)
		return -errno;
	snprintf(cmd, sizeof(cmd), "vm %s %d", vm->name, vm->fd);
	if (write(fd, cmd, strlen(cmd)) < 0) {
		close(fd);
		return -errno;
	}
	n = pread(fd, buf, sizeof(buf) - 1, 0);
	close(fd);
	if (n <= 0)
		return -EIO;
	buf[n] = '\0';
	p = strstr(buf, "\"x1\": \"");
	if (!p || strstr(buf, "\"error\""))
		return -EINVAL;
	*handle = strtoull(p + 7, NULL, 16);
	return 0;
}

/* Ask the module to top the vCPU's memcache up (it works on our fd); answer as it answers. */
static void cmd_topup(struct vmm_vm *vm, int idx, int n)
{
	char cmd[64], buf[256];
	int fd;
	ssize_t len;

	if (!vm)
		return answer(-ENOENT, 0, 0, 0);
	if (idx < 0 || idx >= vm->nr_vcpus || n < 0 || n > 64)
		return answer(-EINVAL, 0, 0, 0);
	fd = open("/proc/pkvm_conform", O_RDWR);
	if (fd < 0)
		return answer(-errno, 0, 0, 0);
	snprintf(cmd, sizeof(cmd), "topup %d %d", vm->vcpu_fd[idx], n);
	if (write(fd, cmd, strlen(cmd)) < 0) {
		close(fd);
		return answer(-errno, 0, 0, 0);
	}
	len = pread(fd, buf, sizeof(buf) - 1, 0);
	close(fd);
	if (len <= 0)
		return answer(-EIO, 0, 0, 0);
	buf[len] = '\0';
	if (strstr(buf, "\"error\""))
		return answer(-EINVAL, 0, 0, 0);
	fputs(buf, stdout);
	fflush(stdout);
}

static int run_vcpu(struct vmm_vm *vm, int idx, uint64_t *reason, uint64_t *addr)
{
	if (idx < 0 || idx >= vm->nr_vcpus)
		return -EINVAL;
	if (ioctl(vm->vcpu_fd[idx], KVM_RUN, 0) < 0)
		return -errno;
	*reason = vm->run[idx]->exit_reason;
	*addr = *reason == KVM_EXIT_MMIO ? vm->run[idx]->mmio.phys_addr : 0;
	return 0;
}

static void cmd_create(const char *name, int nr_vcpus, int protected)
{
	struct kvm_userspace_memory_region slot;
	struct vmm_vm *vm = NULL;
	uint64_t handle = 0, reason = 0, addr = 0;
	int i, err;

	for (i = 0; i < VMM_MAX_VMS && !vm; i++)
		if (vms[i].fd <= 0)
			vm = &vms[i];
	if (!vm || find_vm(name) || nr_vcpus < 1 || nr_vcpus > VMM_MAX_VCPUS ||
	    strlen(name) >= sizeof(vm->name))
		return answer(-EINVAL, 0, 0, 0);
	vm->fd = ioctl(kvm_fd, KVM_CREATE_VM, protected ? VM_TYPE_PROTECTED : 0UL);
	if (vm->fd < 0) {
		err = -errno;
		vm->fd = 0;
		return answer(err, 0, 0, 0);
	}
	strcpy(vm->name, name);
	vm->mem = mmap(NULL, GUEST_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
		       -1, 0);
	if (vm->mem == MAP_FAILED) {
		vm->mem = NULL;
		err = -errno;
		goto fail;
	}
	memcpy(vm->mem, guest_code, sizeof(guest_code));
	slot = (struct kvm_userspace_memory_region){
		.slot = 0,
		.guest_phys_addr = GUEST_IPA,
		.memory_size = GUEST_SIZE,
		.userspace_addr = (uint64_t)(uintptr_t)vm->mem,
	};
	if (ioctl(vm->fd, KVM_SET_USER_MEMORY_REGION, &slot) < 0) {
		err = -errno;
		goto fail;
	}
	for (i = 0; i < nr_vcpus; i++) {
		err = add_vcpu(vm, i);
		if (err)
			goto fail;
	}
	err = run_vcpu(vm, 0, &reason, &addr);
	if (err)
		goto fail;
	err = register_handle(vm, &handle);
	if (err)
		goto fail;
	return answer(0, handle, reason, nr_vcpus);
fail:
	destroy_vm(vm, NULL, NULL);
	answer(err, 0, 0, 0);
}

/*
 * Guest conformance (guest.c):
 *
 *   img OFFSET HEX                put bytes into the image buffer at OFFSET (the console's
 *                                 lines are short: an image comes in pieces; gaps are zeros)
 *   guest VCPUS PROTECTED KIB MAX_EXITS TIMEOUT_MS
 *                                 run the image buffer as a guest (see guest.c) and clear it
 */
#include "guest.c"

int main(void)
{
	static char line[8192];
	char a[64], b[64], c[8000], d[64];

	setvbuf(stdin, NULL, _IOLBF, 0);
	kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm_fd >= 0)
		run_size = ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
	while (fgets(line, sizeof(line), stdin)) {
		int n = sscanf(line, "%63s %63s %7999s %63s", a, b, c, d);
		struct vmm_vm *vm;
		uint64_t reason = 0, addr = 0;
		int err;

		if (n < 1)
			continue;
		if (kvm_fd < 0) {
			answer(-ENODEV, 0, 0, 0);
		} else if (!strcmp(a, "img") && n == 3) {
			answer(image_put(strtoull(b, NULL, 0), c), 0, 0, 0);
		} else if (!strcmp(a, "guest")) {
			cmd_guest(line);
		} else if (!strcmp(a, "create") && n == 4) {
			cmd_create(b, atoi(c), atoi(d));
		} else if (!strcmp(a, "run") && n == 3) {
			vm = find_vm(b);
			err = vm ? run_vcpu(vm, atoi(c), &reason, &addr) : -ENOENT;
			answer(err, reason, addr, 0);
		} else if (!strcmp(a, "topup") && n == 4) {
			cmd_topup(find_vm(b), atoi(c), atoi(d));
		} else if (!strcmp(a, "destroy") && n == 2) {
			uint64_t nonzero = 0, faulted = 0;

			vm = find_vm(b);
			if (vm)
				destroy_vm(vm, &nonzero, &faulted);
			answer(vm ? 0 : -ENOENT, nonzero, faulted, 0);
		} else {
			answer(-EINVAL, 0, 0, 0);
		}
	}
	return 0;
}
