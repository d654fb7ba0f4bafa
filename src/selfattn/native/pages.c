/* Bring a mapped file's pages into memory with several readers at once. A model's first forward
 * pass faults its weights in one page at a time, one reader per core: 588 MB/s from this
 * machine's virtual disk, where four readers touching a page each reach 1.4 GB/s (4.47 GB: 6.4 s
 * with one thread, 3.2 s with four; 0.02 s when the pages are already cached). The threads are
 * our own, not the kernels' pool: they wait on I/O, not on the cores. */
#include <pthread.h>
#include <stdint.h>

#include "kernels.h"

typedef struct {
    const volatile uint8_t *p;
    int64_t n;
} span;

static void *touch(void *arg) {
    const span *s = arg;
    uint8_t sink = 0;
    for (int64_t o = 0; o < s->n; o += 4096) sink ^= s->p[o];
    (void)sink;
    return NULL;
}

int sa_touch_pages(const uint8_t *p, int64_t n, int readers) {
    enum { MAX_READERS = 16 };
    if (n < 0 || readers < 1) return -1;
    if (readers > MAX_READERS) readers = MAX_READERS;
    span spans[MAX_READERS];
    pthread_t threads[MAX_READERS];
    int started[MAX_READERS] = {0};
    int64_t step = (n / readers + 4095) / 4096 * 4096;
    for (int i = 0; i < readers; i++) {
        int64_t a = i * step < n ? i * step : n, b = a + step < n ? a + step : n;
        spans[i] = (span){p + a, b - a};
        started[i] = i > 0 && !pthread_create(&threads[i], NULL, touch, &spans[i]);
        if (i > 0 && !started[i]) touch(&spans[i]); /* no thread: read it here */
    }
    touch(&spans[0]);
    for (int i = 1; i < readers; i++)
        if (started[i]) pthread_join(threads[i], NULL);
    return 0;
}
