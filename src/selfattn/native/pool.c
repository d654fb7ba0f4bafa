/* A small thread pool for the kernels: n-1 workers beside the calling thread.
 *
 * A decode step calls the kernels ~150 times a token with a few microseconds of NumPy in between,
 * so waking a sleeping thread per call (~50-200 us through the kernel) would cost more than the
 * work. Workers spin on a generation counter for SPIN_NS after each job, then sleep on a futex:
 * between the calls of one decode step they are awake; a few hundred microseconds after the last
 * one they stop using the core, so they do not compete with BLAS's or numba's threads in prefill.
 * Tasks are taken from a shared counter (dynamic scheduling); the caller works too and returns
 * when every worker has left the job. Called from one Python thread at a time (a lock in Python).
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#else
#include <sched.h>
#endif

#include "kernels.h"

#define MAX_THREADS 256

/* a spinning thread's hint to the core */
#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ volatile("yield")
#else
#define CPU_RELAX() ((void)0)
#endif
#define SPIN_NS 300000 /* how long an idle worker stays awake: 0.3 ms */

static struct {
    sa_task_fn fn;
    const void *ctx;
    int64_t n;
    int participants;   /* workers with id < participants - 1 take part in the current job */
    _Atomic int64_t next;
    _Atomic int busy;   /* workers still inside the current job */
    _Atomic uint32_t gen;
    _Atomic int sleepers;
    int n_workers, want;
    uint32_t start_gen[MAX_THREADS];
    pthread_t threads[MAX_THREADS];
} P = {.want = 1};

#ifdef __linux__
static long futex(_Atomic uint32_t *addr, int op, uint32_t val) {
    return syscall(SYS_futex, (uint32_t *)addr, op, val, NULL, NULL, 0);
}
#else /* no futex: a sleeping worker yields its core and looks again */
#define FUTEX_WAIT_PRIVATE 0
#define FUTEX_WAKE_PRIVATE 1
static long futex(_Atomic uint32_t *addr, int op, uint32_t val) {
    (void)addr, (void)val;
    if (op == FUTEX_WAIT_PRIVATE) sched_yield();
    return 0;
}
#endif

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void work(void) {
    for (;;) {
        int64_t t = atomic_fetch_add(&P.next, 1);
        if (t >= P.n) return;
        P.fn(P.ctx, t);
    }
}

static void *worker(void *arg) {
    int id = (int)(intptr_t)arg;
    uint32_t seen = P.start_gen[id]; /* the generation when it was created, not when it started */
    for (;;) {
        int64_t t0 = now_ns();
        int spins = 0;
        while (atomic_load(&P.gen) == seen) {
            CPU_RELAX();
            if (++spins % 256 == 0 && now_ns() - t0 > SPIN_NS) {
                atomic_fetch_add(&P.sleepers, 1);
                while (atomic_load(&P.gen) == seen) futex(&P.gen, FUTEX_WAIT_PRIVATE, seen);
                atomic_fetch_sub(&P.sleepers, 1);
            }
        }
        seen = atomic_load(&P.gen);
        if (id < P.participants - 1) {
            work();
            atomic_fetch_sub(&P.busy, 1);
        }
    }
    return NULL;
}

/* A forked child has none of the parent's workers: start again with none (the Python side asks
 * for its thread count again after a fork), instead of waiting forever for them. */
static void after_fork_in_child(void) {
    P.n_workers = 0;
    P.want = 1;
    atomic_store(&P.sleepers, 0);
    atomic_store(&P.busy, 0);
}

/* use n threads (the caller included) from the next job on; starts workers as needed */
int sa_set_threads(int n) {
    static int registered = 0;
    if (!registered) registered = !pthread_atfork(NULL, NULL, after_fork_in_child);
    if (n < 1) n = 1;
    if (n > MAX_THREADS) n = MAX_THREADS;
    while (P.n_workers < n - 1) {
        P.start_gen[P.n_workers] = atomic_load(&P.gen);
        if (pthread_create(&P.threads[P.n_workers], NULL, worker, (void *)(intptr_t)P.n_workers))
            break;
        pthread_detach(P.threads[P.n_workers]);
        P.n_workers++;
    }
    P.want = P.n_workers + 1 < n ? P.n_workers + 1 : n;
    return P.want;
}

/* threads the next job runs on, the caller included */
int sa_pool_threads(void) { return P.want; }

void sa_pool_run(sa_task_fn fn, const void *ctx, int64_t n) {
    int k = P.want;
    if (k > n) k = (int)n;
    if (k <= 1) {
        for (int64_t t = 0; t < n; t++) fn(ctx, t);
        return;
    }
    P.fn = fn;
    P.ctx = ctx;
    P.n = n;
    P.participants = k;
    atomic_store(&P.busy, k - 1);
    atomic_store(&P.next, 0);
    atomic_fetch_add(&P.gen, 1); /* seq_cst: pairs with the workers' sleepers / gen checks */
    if (atomic_load(&P.sleepers) > 0) futex(&P.gen, FUTEX_WAKE_PRIVATE, MAX_THREADS);
    work();
    while (atomic_load(&P.busy) > 0) CPU_RELAX();
}
