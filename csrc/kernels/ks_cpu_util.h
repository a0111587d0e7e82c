/*
 * Helpers shared by the CPU kernels: a vectorisable dot product and the
 * total order / binary min-heap used by the top-k selections (Quest pages,
 * SparQ positions).
 *
 * Plain C99, header-only (static inline). No torch, Python or CUDA headers.
 */
#ifndef KVSPARSE_KS_CPU_UTIL_H
#define KVSPARSE_KS_CPU_UTIL_H

#include <math.h>
#include <stdint.h>

/* dot product with 8 independent accumulators, so that gcc vectorises it
 * without -ffast-math (the summation order is fixed, hence reproducible) */
static inline float ks_dot(const float *a, const float *b, int64_t n)
{
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    int64_t d = 0, j;
    for (; d + 8 <= n; d += 8)
        for (j = 0; j < 8; j++)
            acc[j] += a[d + j] * b[d + j];
    for (; d < n; d++)
        acc[0] += a[d] * b[d];
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

/* Order key: NaN ranks as +inf (above every number, see ks_dtype.h's NaN
 * policy) so that the order stays total. */
static inline float ks_key(float s)
{
    return s != s ? INFINITY : s;
}

/* strict "index a ranks above index b" by key[]: higher key, ties to the lower index */
static inline int ks_above(const float *key, int32_t a, int32_t b)
{
    const float ka = ks_key(key[a]), kb = ks_key(key[b]);
    return ka > kb || (ka == kb && a < b);
}

/* min-heap (the worst-ranked index at the root) of n indices into key[] */
static inline void ks_heap_down(int32_t *heap, int64_t n, int64_t i, const float *key)
{
    for (;;) {
        int64_t l = 2 * i + 1, r = l + 1, w = i;
        int32_t tmp;
        if (l < n && ks_above(key, heap[w], heap[l]))
            w = l;
        if (r < n && ks_above(key, heap[w], heap[r]))
            w = r;
        if (w == i)
            return;
        tmp = heap[i];
        heap[i] = heap[w];
        heap[w] = tmp;
        i = w;
    }
}

static inline void ks_heap_up(int32_t *heap, int64_t i, const float *key)
{
    while (i > 0) {
        int64_t parent = (i - 1) / 2;
        int32_t tmp;
        if (!ks_above(key, heap[parent], heap[i]))
            return;
        tmp = heap[i];
        heap[i] = heap[parent];
        heap[parent] = tmp;
        i = parent;
    }
}

#endif /* KVSPARSE_KS_CPU_UTIL_H */
