/*
 * What the C interfaces of every method (quest.h, sparq.h, qaq.h) share: the
 * element dtype of the float tensors, the error code of the CPU kernels and
 * the NaN / Inf policy.
 *
 * Plain C99, also valid C++ and CUDA C: no functions, no torch, no Python.
 * (The CPU kernels' dtype conversions are in ks_cpu_dtype.h.)
 *
 * Errors: the CPU functions that allocate scratch memory return 0, or
 * KS_ERR_NOMEM when an allocation failed (the outputs are then unspecified;
 * the bindings raise). The CUDA functions return 0 or a cudaError_t code.
 *
 * NaN / Inf (every method): min / max metadata propagate NaN (a page with a
 * NaN key has NaN kmin / kmax and a NaN score); selections rank NaN above
 * every number (so a NaN page or token is selected); an attention row whose
 * logits include a NaN or +inf, or are all -inf, is NaN, as dense softmax
 * attention gives; a row with no token at all is zeros.
 */
#ifndef KVSPARSE_KS_DTYPE_H
#define KVSPARSE_KS_DTYPE_H

/* Element type of q, k, v and the other float tensors of a kernel. */
typedef enum { KS_F32 = 0, KS_F16 = 1, KS_BF16 = 2 } ks_dtype;

/* Return code of a CPU kernel whose scratch allocation failed. */
#define KS_ERR_NOMEM 1
/* Return code of QAQ's CPU quantize when a group of finite values has a range
 * its fp16 (scale, zero) cannot hold (qaq.h, ks_qaq_quantize_cpu). */
#define KS_ERR_RANGE 2

#endif /* KVSPARSE_KS_DTYPE_H */
