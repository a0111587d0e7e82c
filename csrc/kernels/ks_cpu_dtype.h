/*
 * Scalar dtype helpers for the CPU kernels: fp16 / bf16 <-> float32 by bit
 * manipulation (float -> fp16 / bf16 round to nearest even; inf, nan and
 * subnormals handled), and row load / store between a dtype buffer and a
 * float32 buffer. The dtype itself (ks_dtype) is in ks_dtype.h.
 *
 * Plain C99, header-only (static inline). No torch, Python or CUDA headers.
 */
#ifndef KVSPARSE_KS_CPU_DTYPE_H
#define KVSPARSE_KS_CPU_DTYPE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "ks_dtype.h"

static inline uint32_t ks_f2u(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float ks_u2f(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* IEEE binary16 -> float32 (exact). Branch-free so that row loops vectorise:
 * the magnitude bits shifted into float position read as a float whose
 * exponent is biased by 15 instead of 127; multiplying by 2^112 rebiases it,
 * exactly, for normals and subnormals alike. inf / nan (exponent 31) are
 * patched to a float exponent of 255, keeping the payload. */
static inline float ks_half_to_float(uint16_t h)
{
    const uint32_t mag = (uint32_t)(h & 0x7fffu) << 13;
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t scaled = ks_f2u(ks_u2f(mag) * 0x1p112f);
    const uint32_t bits = mag >= 0x0f800000u ? (mag | 0x7f800000u) : scaled;
    return ks_u2f(sign | bits);
}

/* float32 -> IEEE binary16, round to nearest even; overflow -> inf, nan -> quiet nan. */
static inline uint16_t ks_float_to_half(float f)
{
    uint32_t x = ks_f2u(f);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) { /* inf or nan */
        if (ax == 0x7f800000u)
            return (uint16_t)(sign | 0x7c00u);
        return (uint16_t)(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
    }
    if (ax >= 0x477ff000u) /* >= 65520: rounds to inf */
        return (uint16_t)(sign | 0x7c00u);
    if (ax < 0x38800000u) {
        /* result is a half subnormal (or zero / the smallest normal after
         * rounding). Adding 0.5f puts the half subnormal unit 2^-24 in the
         * last float mantissa bit, so the FPU rounds to nearest even for us. */
        float t = ks_u2f(ax) + 0.5f;
        return (uint16_t)(sign | (ks_f2u(t) - 0x3f000000u));
    }
    {
        uint32_t odd = (ax >> 13) & 1u;
        ax += 0xc8000fffu; /* rebias exponent (15 - 127) << 23, mod 2^32, plus rounding */
        ax += odd;
        return (uint16_t)(sign | (ax >> 13));
    }
}

/* bfloat16 -> float32 (exact). */
static inline float ks_bf16_to_float(uint16_t h)
{
    return ks_u2f((uint32_t)h << 16);
}

/* float32 -> bfloat16, round to nearest even; nan -> quiet nan. */
static inline uint16_t ks_float_to_bf16(float f)
{
    uint32_t x = ks_f2u(f);
    if ((x & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((x >> 16) | 0x0040u);
    x += 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}

/* Bytes per element. */
static inline size_t ks_dtype_size(ks_dtype dt)
{
    return dt == KS_F32 ? 4 : 2;
}

/* Address of element idx of a buffer of dtype dt. */
static inline const void *ks_cptr(const void *base, ks_dtype dt, int64_t idx)
{
    return (const char *)base + (size_t)idx * ks_dtype_size(dt);
}

static inline void *ks_ptr(void *base, ks_dtype dt, int64_t idx)
{
    return (char *)base + (size_t)idx * ks_dtype_size(dt);
}

/* dst[0..n) = (float)src[0..n). */
static inline void ks_load_row(const void *src, ks_dtype dt, int64_t n, float *dst)
{
    int64_t i;
    if (dt == KS_F32) {
        memcpy(dst, src, (size_t)n * sizeof(float));
    } else if (dt == KS_F16) {
        const uint16_t *s = (const uint16_t *)src;
        for (i = 0; i < n; i++)
            dst[i] = ks_half_to_float(s[i]);
    } else {
        const uint16_t *s = (const uint16_t *)src;
        for (i = 0; i < n; i++)
            dst[i] = ks_bf16_to_float(s[i]);
    }
}

/* dst[0..n) = (dt)src[0..n), rounding to nearest even. */
static inline void ks_store_row(const float *src, ks_dtype dt, int64_t n, void *dst)
{
    int64_t i;
    if (dt == KS_F32) {
        memcpy(dst, src, (size_t)n * sizeof(float));
    } else if (dt == KS_F16) {
        uint16_t *d = (uint16_t *)dst;
        for (i = 0; i < n; i++)
            d[i] = ks_float_to_half(src[i]);
    } else {
        uint16_t *d = (uint16_t *)dst;
        for (i = 0; i < n; i++)
            d[i] = ks_float_to_bf16(src[i]);
    }
}

/* Row of a float32 buffer, converting only when needed: returns src itself
 * for float32, else converts into buf and returns buf. */
static inline const float *ks_row_f32(const void *src, ks_dtype dt, int64_t n, float *buf)
{
    if (dt == KS_F32)
        return (const float *)src;
    ks_load_row(src, dt, n, buf);
    return buf;
}

#endif /* KVSPARSE_KS_CPU_DTYPE_H */
