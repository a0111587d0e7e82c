/*
 * QAQ's quantization of one group, CPU: shared by the two packed formats
 * (qaq_cpu.c: per-token offsets; qaqp_cpu.c: width-binned pages). Internal to
 * the CPU kernels; the semantics are qaq.h's "Quantization" and
 * "Dequantization".
 */
#ifndef KVSPARSE_QAQ_GROUP_CPU_H
#define KVSPARSE_QAQ_GROUP_CPU_H

#include <stdint.h>

#include "ks_dtype.h"

/* Picks the outliers of x[0..E) into idx[0..2*n_side) (-1 past the number of
 * elements); out[e] = 1 marks them (out: E bytes, cleared here); heap: n_side
 * scratch keys. */
void ks_qaqg_pick_outliers(const float *x, int64_t E, int64_t n_side, int16_t *idx, uint8_t *out,
                           uint64_t *heap);

/* Quantizes x[0..E) at width w, the elements marked in out[0..E) excluded from
 * the range (code 0); writes the E * w / 8 code bytes (if w > 0 and codes) and
 * sz (scale, zero). Returns 1 when the group's range does not fit fp16
 * (written with NaN scale / zero), 0 otherwise. */
int ks_qaqg_pack(const float *x, int64_t E, int w, const uint8_t *out, uint8_t *codes,
                 uint16_t *sz);

/* Dequantizes elements [e0, e0 + n) of a group into dst (outliers applied). */
void ks_qaqg_unpack(const uint8_t *codes, int w, const uint16_t *sz, const int16_t *oidx,
                    const void *oval, ks_dtype dt, int64_t n_out, int64_t E, int64_t e0,
                    int64_t n, float *dst);

#endif /* KVSPARSE_QAQ_GROUP_CPU_H */
