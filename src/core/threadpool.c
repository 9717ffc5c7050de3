/* Persistent thread pool: a parallel-for with spin-then-sleep workers.
 *
 * The caller publishes (fn, arg) and bumps a generation counter; workers spin on the counter for a short
 * while (decode steps come back to back) and then sleep on a condition variable. Completion is an atomic
 * count the caller spins on. Nothing is allocated and no lock is taken while work keeps coming. */
#include "core.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield")
#else
#define cpu_relax() ((void)0)
#endif

#define SPIN_ITERS 200000
#define SPIN_PURE 2000 /* past this many pauses, spinning threads also yield: on an oversubscribed machine the
                        * thread being waited for may need this core */

struct threadpool {
    int n_threads;
    pthread_t *threads;
    _Atomic uint64_t generation;
    _Atomic int n_done;
    _Atomic int stop;
    _Atomic int n_sleeping;
    threadpool_fn fn;
    void *arg;
    pthread_mutex_t lock;
    pthread_cond_t wake;
};

struct worker_arg {
    struct threadpool *tp;
    int ith;
};

static void *worker_main(void *p)
{
    struct worker_arg wa = *(struct worker_arg *)p;
    free(p);
    struct threadpool *tp = wa.tp;
    uint64_t seen = 0;
    for (;;) {
        uint64_t g;
        int spins = 0;
        while ((g = atomic_load_explicit(&tp->generation, memory_order_acquire)) == seen &&
               !atomic_load(&tp->stop)) {
            if (++spins < SPIN_ITERS) {
                if (spins > SPIN_PURE) sched_yield();
                else cpu_relax();
                continue;
            }
            pthread_mutex_lock(&tp->lock);
            atomic_fetch_add(&tp->n_sleeping, 1);
            while (atomic_load(&tp->generation) == seen && !atomic_load(&tp->stop))
                pthread_cond_wait(&tp->wake, &tp->lock);
            atomic_fetch_sub(&tp->n_sleeping, 1);
            pthread_mutex_unlock(&tp->lock);
            spins = 0;
        }
        if (atomic_load(&tp->stop)) return NULL;
        seen = g;
        tp->fn(tp->arg, wa.ith, tp->n_threads);
        atomic_fetch_add_explicit(&tp->n_done, 1, memory_order_release);
    }
}

int threadpool_init(struct threadpool **out, int n_threads, char *err)
{
    *out = NULL;
    if (n_threads < 1) n_threads = 1;
    struct threadpool *tp = calloc(1, sizeof(*tp));
    if (!tp) return err_set(err, ST_ENOMEM, "threadpool: out of memory");
    tp->n_threads = n_threads;
    pthread_mutex_init(&tp->lock, NULL);
    pthread_cond_init(&tp->wake, NULL);
    tp->threads = calloc((size_t)n_threads, sizeof(pthread_t));
    if (!tp->threads) {
        free(tp);
        return err_set(err, ST_ENOMEM, "threadpool: out of memory");
    }
    for (int i = 1; i < n_threads; i++) {
        struct worker_arg *wa = malloc(sizeof(*wa));
        if (!wa) {
            tp->n_threads = i;
            threadpool_free(tp);
            return err_set(err, ST_ENOMEM, "threadpool: out of memory");
        }
        wa->tp = tp;
        wa->ith = i;
        if (pthread_create(&tp->threads[i], NULL, worker_main, wa) != 0) {
            free(wa);
            tp->n_threads = i;
            threadpool_free(tp);
            return err_set(err, ST_EIO, "threadpool: cannot create thread %d", i);
        }
    }
    *out = tp;
    return ST_OK;
}

void threadpool_free(struct threadpool *tp)
{
    if (!tp) return;
    pthread_mutex_lock(&tp->lock);
    atomic_store(&tp->stop, 1);
    pthread_cond_broadcast(&tp->wake);
    pthread_mutex_unlock(&tp->lock);
    for (int i = 1; i < tp->n_threads; i++) pthread_join(tp->threads[i], NULL);
    pthread_mutex_destroy(&tp->lock);
    pthread_cond_destroy(&tp->wake);
    free(tp->threads);
    free(tp);
}

int threadpool_size(const struct threadpool *tp) { return tp ? tp->n_threads : 1; }

void threadpool_run(struct threadpool *tp, threadpool_fn fn, void *arg)
{
    if (!tp || tp->n_threads == 1) {
        fn(arg, 0, 1);
        return;
    }
    tp->fn = fn;
    tp->arg = arg;
    atomic_store_explicit(&tp->n_done, 0, memory_order_relaxed);
    atomic_fetch_add(&tp->generation, 1); /* seq_cst: pairs with n_sleeping */
    if (atomic_load(&tp->n_sleeping) > 0) {
        pthread_mutex_lock(&tp->lock);
        pthread_cond_broadcast(&tp->wake);
        pthread_mutex_unlock(&tp->lock);
    }
    fn(arg, 0, tp->n_threads);
    int spins = 0;
    while (atomic_load_explicit(&tp->n_done, memory_order_acquire) < tp->n_threads - 1) {
        if (++spins > SPIN_PURE) sched_yield();
        else cpu_relax();
    }
}
