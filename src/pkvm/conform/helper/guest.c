// SPDX-License-Identifier: GPL-2.0
/*
 * Guest conformance for pkvm_vmm (included by pkvm_vmm.c): run one guest image under the
 * real KVM and record every exit KVM_RUN gives userspace.
 *
 * The image (sent with "img" commands) is loaded at the start of guest RAM (IPA 0x4000_0000,
 * KIB KiB, one memslot) and vCPU 0 enters at its first byte (KVM's reset state: EL1h, DAIF
 * masked, MMU off); the other vCPUs are created powered off (KVM_ARM_VCPU_POWER_OFF) and wait
 * for PSCI CPU_ON, as kvmtool does. Each vCPU has its own thread looping on KVM_RUN (a
 * powered-off vCPU sleeps inside KVM_RUN). The devices answer MMIO reads as the model's VMM
 * does: a PL011 at 0x0900_0000 (flag register 0x90, PrimeCell ids), zero elsewhere; writes are
 * dropped. The run stops at the first SYSTEM_EVENT, an unexpected exit, a KVM_RUN error,
 * MAX_EXITS exits in all, or TIMEOUT_MS; the other vCPUs are then kicked out with
 * immediate_exit and a signal (those kicks are not recorded).
 *
 * The answer is one JSON line: x0 = 0 or -errno of the set-up ioctl that failed ("at" names
 * it), "stop" (shutdown, reset, event, exit, error, limit, timeout), "exits" (the count) and
 * per vCPU the list of its exits, in order:
 *   "mw ADDR LEN DATA" / "mr ADDR LEN DATA"   MMIO write / read (DATA: written / answered)
 *   "e TYPE"                                  KVM_EXIT_SYSTEM_EVENT of that type
 *   "r REASON"                                any other exit reason
 *   "x ERRNO"                                 KVM_RUN failed with -ERRNO
 * (numbers in hex).
 */
#include <pthread.h>
#include <signal.h>
#include <time.h>

#define IMAGE_MAX	(1 << 20)
#define UART_BASE	0x09000000ULL
#define UART_SIZE	0x1000ULL

static uint8_t image_buf[IMAGE_MAX];
static size_t image_len;

struct gthread {
	int idx, fd, done;
	struct kvm_run *run;
	pthread_t tid;
	char *rec;
	size_t len, cap;
};

static struct gthread gth[VMM_MAX_VCPUS];
static int g_nr;
static volatile int g_stop;
static const char *g_why = "";
static unsigned long g_exits, g_max;
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;

static int image_put(unsigned long long off, const char *hex)
{
	size_t n = strlen(hex) / 2;

	if (strlen(hex) % 2 || off > IMAGE_MAX || n > IMAGE_MAX - off)
		return -EINVAL;
	for (size_t i = 0; i < n; i++) {
		unsigned int v;

		if (sscanf(hex + 2 * i, "%2x", &v) != 1)
			return -EINVAL;
		image_buf[off + i] = v;
	}
	if (off + n > image_len)
		image_len = off + n;
	return 0;
}

static void set_stop(const char *why)
{
	pthread_mutex_lock(&g_lock);
	if (!g_stop) {
		g_stop = 1;
		g_why = why;
	}
	pthread_mutex_unlock(&g_lock);
}

static void record(struct gthread *t, const char *fmt, ...)
{
	char buf[96];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	if (t->len + n + 4 > t->cap) {
		t->cap = (t->cap + n + 4) * 2;
		t->rec = realloc(t->rec, t->cap);
	}
	t->len += sprintf(t->rec + t->len, "%s\"%s\"", t->len ? ", " : "", buf);
}

static uint64_t device_read(uint64_t addr)
{
	static const uint8_t ids[8] = { 0x11, 0x10, 0x14, 0x00, 0x0d, 0xf0, 0x05, 0xb1 };
	uint64_t off = addr - UART_BASE;

	if (addr < UART_BASE || addr >= UART_BASE + UART_SIZE)
		return 0;
	if (off == 0x18)
		return 0x90;
	if (off >= 0xfe0 && !(off & 3))
		return ids[(off - 0xfe0) / 4];
	return 0;
}

static void *vcpu_loop(void *arg)
{
	struct gthread *t = arg;
	struct kvm_run *run = t->run;

	while (!g_stop) {
		unsigned long n;

		if (ioctl(t->fd, KVM_RUN, 0) < 0) {
			if (errno == EINTR)
				continue;	/* our kick (or a stray signal): look at g_stop */
			record(t, "x %x", errno);
			set_stop("error");
			break;
		}
		if (run->exit_reason == KVM_EXIT_INTR)
			continue;
		n = __atomic_add_fetch(&g_exits, 1, __ATOMIC_SEQ_CST);
		if (run->exit_reason == KVM_EXIT_MMIO) {
			uint64_t data = 0;
			uint32_t len = run->mmio.len > 8 ? 8 : run->mmio.len;

			if (run->mmio.is_write) {
				memcpy(&data, run->mmio.data, len);
			} else {
				data = device_read(run->mmio.phys_addr);
				if (len < 8)
					data &= (1ULL << (8 * len)) - 1;
				memcpy(run->mmio.data, &data, len);
			}
			record(t, "m%c %llx %x %llx", run->mmio.is_write ? 'w' : 'r',
			       (unsigned long long)run->mmio.phys_addr, run->mmio.len,
			       (unsigned long long)data);
		} else if (run->exit_reason == KVM_EXIT_SYSTEM_EVENT) {
			record(t, "e %x", run->system_event.type);
			set_stop(run->system_event.type == KVM_SYSTEM_EVENT_SHUTDOWN ? "shutdown" :
				 run->system_event.type == KVM_SYSTEM_EVENT_RESET ? "reset" : "event");
			break;
		} else {
			record(t, "r %x", run->exit_reason);
			set_stop("exit");
			break;
		}
		if (n >= g_max) {
			set_stop("limit");
			break;
		}
	}
	__atomic_store_n(&t->done, 1, __ATOMIC_SEQ_CST);
	return NULL;
}

static void kick(int sig)
{
	(void)sig;
}

static double now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* Run the threads until a stop, then kick every vCPU still inside KVM_RUN out. */
static void run_threads(unsigned long timeout_ms)
{
	struct sigaction sa = { .sa_handler = kick };
	double t0 = now_ms();
	int i, left;

	sigaction(SIGUSR1, &sa, NULL);	/* no SA_RESTART: KVM_RUN returns -EINTR */
	for (i = 0; i < g_nr; i++)
		pthread_create(&gth[i].tid, NULL, vcpu_loop, &gth[i]);
	while (!g_stop) {
		if (now_ms() - t0 > timeout_ms)
			set_stop("timeout");
		usleep(2000);
	}
	do {
		left = 0;
		for (i = 0; i < g_nr; i++) {
			if (__atomic_load_n(&gth[i].done, __ATOMIC_SEQ_CST))
				continue;
			left++;
			gth[i].run->immediate_exit = 1;
			pthread_kill(gth[i].tid, SIGUSR1);
		}
		if (left)
			usleep(1000);
	} while (left);
	for (i = 0; i < g_nr; i++)
		pthread_join(gth[i].tid, NULL);
}

static void guest_answer(int err, const char *at)
{
	printf("{\"x0\": \"0x%llx\", \"at\": \"%s\", \"stop\": \"%s\", \"exits\": %lu, \"vcpus\": [",
	       (unsigned long long)(int64_t)err, at, err ? "" : g_why, g_exits);
	for (int i = 0; i < g_nr; i++)
		printf("%s[%s]", i ? ", " : "", gth[i].rec ? gth[i].rec : "");
	printf("]}\n");
	fflush(stdout);
}

static void cmd_guest(const char *line)
{
	struct kvm_userspace_memory_region slot;
	struct vmm_vm vm = { .name = "guest" };
	unsigned long kib = 0, timeout_ms = 0;
	int nr = 0, protected = 0, err = 0, i;
	const char *at = "";

	g_nr = 0;
	g_stop = 0;
	g_why = "";
	g_exits = 0;
	g_max = 0;
	memset(gth, 0, sizeof(gth));
	if (sscanf(line, "guest %d %d %lu %lu %lu", &nr, &protected, &kib, &g_max,
		   &timeout_ms) != 5 || nr < 1 || nr > VMM_MAX_VCPUS || !kib ||
	    kib * 1024 < image_len || !g_max) {
		err = -EINVAL;
		at = "arguments";
		goto out;
	}
	vm.fd = ioctl(kvm_fd, KVM_CREATE_VM, protected ? VM_TYPE_PROTECTED : 0UL);
	if (vm.fd < 0) {
		err = -errno;
		vm.fd = 0;
		at = "KVM_CREATE_VM";
		goto out;
	}
	vm.mem = mmap(NULL, kib * 1024, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
		      -1, 0);
	if (vm.mem == MAP_FAILED) {
		vm.mem = NULL;
		err = -errno;
		at = "mmap";
		goto out;
	}
	memcpy(vm.mem, image_buf, image_len);
	slot = (struct kvm_userspace_memory_region){
		.slot = 0,
		.guest_phys_addr = GUEST_IPA,
		.memory_size = kib * 1024,
		.userspace_addr = (uint64_t)(uintptr_t)vm.mem,
	};
	if (ioctl(vm.fd, KVM_SET_USER_MEMORY_REGION, &slot) < 0) {
		err = -errno;
		at = "KVM_SET_USER_MEMORY_REGION";
		goto out;
	}
	for (i = 0; i < nr; i++) {
		struct kvm_vcpu_init init;
		int fd = ioctl(vm.fd, KVM_CREATE_VCPU, i);

		at = "KVM_CREATE_VCPU";
		if (fd < 0)
			goto fail_errno;
		vm.vcpu_fd[i] = fd;
		vm.nr_vcpus = i + 1;
		at = "KVM_ARM_VCPU_INIT";
		if (ioctl(vm.fd, KVM_ARM_PREFERRED_TARGET, &init) < 0)
			goto fail_errno;
		init.features[0] |= 1u << KVM_ARM_VCPU_PSCI_0_2;
		if (i)
			init.features[0] |= 1u << KVM_ARM_VCPU_POWER_OFF;
		if (ioctl(fd, KVM_ARM_VCPU_INIT, &init) < 0)
			goto fail_errno;
		at = "KVM_SET_ONE_REG";
		if (set_pc(fd, GUEST_IPA) < 0)
			goto fail_errno;
		at = "mmap kvm_run";
		vm.run[i] = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
		if (vm.run[i] == MAP_FAILED) {
			vm.run[i] = NULL;
			goto fail_errno;
		}
		gth[i] = (struct gthread){ .idx = i, .fd = fd, .run = vm.run[i] };
	}
	g_nr = nr;
	at = "";
	run_threads(timeout_ms);
	goto out;
fail_errno:
	err = -errno;
out:
	guest_answer(err, at);
	for (i = 0; i < VMM_MAX_VCPUS; i++)
		free(gth[i].rec);
	memset(gth, 0, sizeof(gth));
	g_nr = 0;
	if (vm.fd > 0) {
		for (i = 0; i < vm.nr_vcpus; i++) {
			if (vm.run[i])
				munmap(vm.run[i], run_size);
			close(vm.vcpu_fd[i]);
		}
		close(vm.fd);
	}
	if (vm.mem)
		munmap(vm.mem, kib * 1024);
	memset(image_buf, 0, image_len);
	image_len = 0;
}
