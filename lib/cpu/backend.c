/*
 * cpu/backend.c - the reference backend's memory slots, its scratch buffers and sgemm (OpenBLAS).  The
 * table itself, with the op slots, is at the end of cpu/kernels.c.
 */
#include <cblas.h>
#include <stdlib.h>
#include <string.h>
#include "../backend.h"
#include "cpu.h"

void *sd_cpu_alloc(size_t bytes)
{
	void *p = NULL;
	if (posix_memalign(&p, 64, bytes ? bytes : 1) != 0) return NULL;
	return p;
}

void sd_cpu_free(void *p)
{
	free(p);
}

int sd_cpu_memset0(void *p, size_t bytes)
{
	memset(p, 0, bytes);
	return 0;
}

int sd_cpu_copy(void *dst, int dst_dev, const void *src, int src_dev, size_t n)
{
	if (dst_dev || src_dev) return sd_seterr("cpu backend: cannot copy device memory");
	memmove(dst, src, n);
	return 0;
}

int sd_cpu_sync(void)
{
	return 0;
}

/* Row-major strided batched sgemm through cblas.  With a shared B (strideB 0) and no transposed A, the
 * batch folds into one large GEMM (M·batch rows) when A and C are contiguous across the batch. */
int sd_cpu_gemm(int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha, const float *A,
                    int64_t lda, int64_t sA, const float *B, int64_t ldb, int64_t sB, float beta, float *C,
                    int64_t ldc, int64_t sC, int64_t batch)
{
	if (M > INT32_MAX || N > INT32_MAX || K > INT32_MAX)
		return sd_seterr("sd_matmul: dimension too large for BLAS");
	if (sB == 0 && !ta && sA == M * lda && sC == M * ldc && (M * batch) <= INT32_MAX) {
		M *= batch;
		batch = 1;
	}
	for (int64_t i = 0; i < batch; i++) {
		if (K == 0) { /* BLAS may skip beta scaling quirks: do it explicitly */
			float *c = C + i * sC;
			for (int64_t r = 0; r < M; r++)
				for (int64_t j = 0; j < N; j++) c[r * ldc + j] = beta == 0 ? 0 : beta * c[r * ldc + j];
			continue;
		}
		cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, (int)M,
		            (int)N, (int)K, alpha, A + i * sA, (int)lda, B + i * sB, (int)ldb, beta, C + i * sC,
		            (int)ldc);
	}
	return 0;
}

/* Per-thread scratch buffers that only grow: slot 0 is im2col, 1 attention scores, 2.. free. */
void *sd_cpu_scratch(int slot, size_t bytes)
{
	static _Thread_local struct { void *p; size_t n; } bufs[6];
	if (slot < 0 || slot >= 6) {
		sd_seterr("scratch slot %d", slot);
		return NULL;
	}
	if (bufs[slot].n < bytes) {
		free(bufs[slot].p);
		bufs[slot].p = sd_cpu_alloc(bytes);
		bufs[slot].n = bufs[slot].p ? bytes : 0;
		if (!bufs[slot].p) {
			sd_seterr("out of memory (%zu bytes of scratch)", bytes);
			return NULL;
		}
	}
	return bufs[slot].p;
}
