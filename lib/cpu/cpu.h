/*
 * cpu/cpu.h - what the CPU backend's two files share.
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
 * (0: im2col, 1: attention scores); NULL with a message when out of memory. */
void *sd_cpu_scratch(int slot, size_t bytes);

#endif
