/*
 * cpu/cpu.h - what the CPU backend's files share.
 */
#ifndef SD_CPU_H
#define SD_CPU_H

#include "../backend.h"

void *sd_cpu_alloc(size_t bytes);
void sd_cpu_free(void *p);
int sd_cpu_memset0(void *p, size_t bytes);
int sd_cpu_copy(void *dst, int dst_dev, const void *src, int src_dev, size_t n);
int sd_cpu_sync(void);
int sd_cpu_gemm(int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha, const float *A, int64_t lda,
                int64_t sA, const float *B, int64_t ldb, int64_t sB, float beta, float *C, int64_t ldc,
                int64_t sC, int64_t batch);
/* A buffer of at least `bytes` owned by the calling thread, reused by later calls with the same slot
 * (0: im2col, 1: attention: packed k, v and per-thread tiles); NULL with a message when out of memory. */
void *sd_cpu_scratch(int slot, size_t bytes);

/* cpu/attention.c: the fused attention slot (see lib/backend.h) */
int sd_cpu_attention(float *out, const float *q, const float *k, const float *v, int64_t N, int64_t Lq, int64_t Lk,
                     int64_t H, int64_t d, int64_t dv, float scale, int causal);

/* cpu/backward.c: the training slots (see lib/backend.h) */
int sd_cpu_conv2d_backward_input(float *dx, const float *dy, const float *w, int64_t N, int64_t C, int64_t H,
                                 int64_t W, int64_t O, int kh, int kw, int stride, int pt, int pl, int64_t Ho,
                                 int64_t Wo, int acc);
int sd_cpu_group_norm_backward(float *dx, float *dgamma, float *dbeta, const float *dy, const float *x,
                               const float *gamma, const float *beta, int64_t N, int64_t C, int64_t S, int groups,
                               float eps, int silu, int acc);
int sd_cpu_layer_norm_backward(float *dx, float *dgamma, float *dbeta, const float *dy, const float *x,
                               const float *gamma, int64_t rows, int64_t D, float eps, int acc);
int sd_cpu_act_backward(float *dx, const float *dy, const float *x, int64_t n, enum sd_act act, int acc);
int sd_cpu_geglu_backward(float *dx, const float *dy, const float *x, int64_t rows, int64_t F, int acc);
int sd_cpu_softmax_backward(float *dx, const float *dy, const float *y, int64_t rows, int64_t cols, int64_t ld,
                            float scale, int acc);
int sd_cpu_upsample2x_backward(float *dx, const float *dy, int64_t P, int64_t H, int64_t W, int acc);
int sd_cpu_reduce(float *out, const float *x, int64_t A, int64_t m, int64_t S, float alpha, int acc);
int sd_cpu_gaussian_sample_backward(float *dmoments, const float *dz, const float *moments, const float *eps,
                                    int64_t N, int64_t C, int64_t S, int acc);
int sd_cpu_mse_loss(double *loss, float *dpred, const float *pred, const float *target, const float *w, int64_t N,
                    int64_t per, float gscale);
int sd_cpu_dropout_mask(float *mask, int64_t n, float p, uint64_t seed, uint64_t stream);
int sd_cpu_adam_step(float *p, const float *g, float *m, float *v, int64_t n, const struct sd_adam_coef *k);
int sd_cpu_sumsq(double *out, const float *x, int64_t n);

#endif
