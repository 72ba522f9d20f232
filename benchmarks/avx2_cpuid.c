/* A CPU without AVX-512 or VNNI, as every library in one process sees it (AMD Zen 3 class: AVX2 + FMA).
 *
 * Loaded with LD_PRELOAD, it asks Linux to make the CPUID instruction fault (arch_prctl ARCH_SET_CPUID, the
 * "cpuid_fault" CPU flag, as the rr debugger does) and answers each CPUID itself: the real answer with the
 * AVX-512, VNNI (AVX512_VNNI, AVX_VNNI) and AMX bits cleared. PyTorch, oneDNN, ONNX Runtime (MLAS), numpy
 * and numba read those bits to pick their kernels, so all of them run their AVX2 code, natively, at this
 * CPU's speed. What it cannot change: glibc's own choice (made before this runs) and the hardware itself (a
 * Zen 3's clocks, caches and memory are not this CPU's).
 *
 * A SIGSEGV handler that the process installs later (Python's faulthandler, which pytest enables) is kept
 * behind this one (sigaction is wrapped): it sees every real fault, this one every CPUID.
 *
 * When Linux refuses (no cpuid_fault: some VMs and CPUs), it changes nothing and sets no MASKSSD_CPUID, so
 * the caller can tell; see benchmarks/_isa.py, which builds and checks it. */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define BIT(n) (1u << (n))

static int cpuid_enabled(int on) { return (int)syscall(SYS_arch_prctl, ARCH_SET_CPUID, on); }

static void mask(unsigned leaf, unsigned sub, unsigned *a, unsigned *b, unsigned *c, unsigned *d) {
    if (leaf == 7 && sub == 0) {
        /* AVX512 F DQ IFMA PF ER CD BW VL */
        *b &= ~(BIT(16) | BIT(17) | BIT(21) | BIT(26) | BIT(27) | BIT(28) | BIT(30) | BIT(31));
        /* AVX512 VBMI VBMI2 VNNI BITALG VPOPCNTDQ */
        *c &= ~(BIT(1) | BIT(6) | BIT(11) | BIT(12) | BIT(14));
        /* AVX512 4VNNIW 4FMAPS VP2INTERSECT, AMX-BF16, AVX512-FP16, AMX-TILE, AMX-INT8 */
        *d &= ~(BIT(2) | BIT(3) | BIT(8) | BIT(22) | BIT(23) | BIT(24) | BIT(25));
    } else if (leaf == 7 && sub == 1) {
        *a &= ~(BIT(4) | BIT(5) | BIT(21) | BIT(23)); /* AVX-VNNI, AVX512-BF16, AMX-FP16, AVX-IFMA */
        *d &= ~BIT(19);                               /* AVX10 */
    } else if (leaf == 0xd && sub == 0) {
        *a &= ~(BIT(5) | BIT(6) | BIT(7) | BIT(17) | BIT(18)); /* AVX-512 and AMX state */
    }
}

typedef int (*sigaction_fn)(int, const struct sigaction *, struct sigaction *);
static sigaction_fn real_sigaction;
static int active;             /* CPUID faults in this process: SIGSEGV is this file's */
static struct sigaction after; /* the SIGSEGV handler the process asked for since */

static void real_fault(int sig, siginfo_t *info, void *ctx) {
    if (after.sa_flags & SA_SIGINFO) {
        after.sa_sigaction(sig, info, ctx);
    } else if (after.sa_handler != SIG_DFL && after.sa_handler != SIG_IGN) {
        after.sa_handler(sig);
    } else { /* crash as it would have: the default action when the instruction runs again */
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        active = 0;
        real_sigaction(sig, &dfl, NULL);
    }
}

int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    if (!real_sigaction)
        real_sigaction = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    if (sig != SIGSEGV || !active)
        return real_sigaction(sig, act, old);
    if (old)
        *old = after;
    if (act)
        after = *act;
    return 0;
}

static void on_fault(int sig, siginfo_t *info, void *ctx) {
    greg_t *r = ((ucontext_t *)ctx)->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)r[REG_RIP];
    /* A faulting CPUID is a general-protection fault (SI_KERNEL): its bytes were fetched, so reading them is
     * safe. Anything else (a bad address, a jump into nowhere, a raise) is a real fault. */
    if (info->si_code != SI_KERNEL || !(ip[0] == 0x0f && ip[1] == 0xa2)) {
        real_fault(sig, info, ctx);
        return;
    }
    unsigned leaf = (unsigned)r[REG_RAX], sub = (unsigned)r[REG_RCX], a, b, c, d;
    cpuid_enabled(1);
    __cpuid_count(leaf, sub, a, b, c, d);
    cpuid_enabled(0);
    mask(leaf, sub, &a, &b, &c, &d);
    r[REG_RAX] = a;
    r[REG_RBX] = b;
    r[REG_RCX] = c;
    r[REG_RDX] = d;
    r[REG_RIP] += 2;
}

__attribute__((constructor)) static void start(void) {
    struct sigaction sa;
    unsetenv("MASKSSD_CPUID"); /* set again below only where it works in this process */
    if (!real_sigaction)
        real_sigaction = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    if (!real_sigaction || real_sigaction(SIGSEGV, &sa, &after) != 0)
        return;
    if (cpuid_enabled(0) != 0) { /* Linux cannot make CPUID fault here: leave everything as it is */
        real_sigaction(SIGSEGV, &after, NULL);
        return;
    }
    active = 1;
    setenv("MASKSSD_CPUID", "avx2", 1);
}
