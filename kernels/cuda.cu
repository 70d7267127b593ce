/*
 * cuda.cu - the CUDA backend: device memory (cudaMalloc/cudaMemcpy) and the ops it can do on the GPU
 * (for now sgemm through cuBLAS).  Built only when nvcc is found (make CUDA=1).  Every CUDA call's status
 * is checked and turned into an sd_seterr message; an empty slot in the table is reported by lib/ops.c.
 * This file is built into libsd-cuda.so, which lib/cuda.c loads with dlopen only when an NVIDIA device
 * is present: the tools neither link nor load the CUDA libraries on a CPU machine.  libsd's sd_seterr
 * is handed over at load time (the shared object does not link libsd).
 * cuBLAS is column-major: a row-major C = op(A)·op(B) is computed as the column-major Cᵀ = op(B)ᵀ·op(A)ᵀ,
 * i.e. cublasSgemm with A and B swapped.
 */
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <pthread.h>
#include <stdint.h>

extern "C" {
#include "sd.h"
#include "backend.h"
}

/* libsd's sd_seterr, handed over by sd_cuda_backend_open (this object does not link libsd) */
static int (*seterr_fn)(const char *fmt, ...);
#define sd_seterr (*seterr_fn)

static cublasHandle_t handle;
static int state; /* 0 unknown, 1 usable, -1 not usable */
static char why[256];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static int cuda_err(const char *what, cudaError_t e)
{
	return sd_seterr("cuda: %s: %s", what, cudaGetErrorString(e));
}

static void *cuda_alloc(size_t bytes)
{
	void *p = NULL;
	cudaError_t e = cudaMalloc(&p, bytes ? bytes : 1);
	if (e != cudaSuccess) {
		cuda_err("cudaMalloc", e);
		return NULL;
	}
	return p;
}

static void cuda_free(void *p)
{
	cudaFree(p);
}

static int cuda_memset0(void *p, size_t bytes)
{
	cudaError_t e = cudaMemset(p, 0, bytes);
	return e == cudaSuccess ? 0 : cuda_err("cudaMemset", e);
}

static int cuda_copy(void *dst, int dst_dev, const void *src, int src_dev, size_t n)
{
	cudaMemcpyKind k = dst_dev ? (src_dev ? cudaMemcpyDeviceToDevice : cudaMemcpyHostToDevice)
	                           : (src_dev ? cudaMemcpyDeviceToHost : cudaMemcpyHostToHost);
	cudaError_t e = cudaMemcpy(dst, src, n, k);
	return e == cudaSuccess ? 0 : cuda_err("cudaMemcpy", e);
}

static int cuda_sync(void)
{
	cudaError_t e = cudaDeviceSynchronize();
	return e == cudaSuccess ? 0 : cuda_err("synchronize", e);
}

static int cuda_gemm(int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha, const float *A,
                     int64_t lda, int64_t sA, const float *B, int64_t ldb, int64_t sB, float beta,
                     float *C, int64_t ldc, int64_t sC, int64_t batch)
{
	if (M > INT32_MAX || N > INT32_MAX || K > INT32_MAX || batch > INT32_MAX)
		return sd_seterr("sd_matmul: dimension too large for cuBLAS");
	cublasStatus_t s = cublasSgemmStridedBatched(
		handle, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, (int)N, (int)M, (int)K,
		&alpha, B, (int)ldb, sB, A, (int)lda, sA, &beta, C, (int)ldc, sC, (int)batch);
	if (s != CUBLAS_STATUS_SUCCESS)
		return sd_seterr("cuda: cublasSgemmStridedBatched failed (status %d)", (int)s);
	cudaError_t e = cudaGetLastError();
	return e == cudaSuccess ? 0 : cuda_err("sgemm", e);
}

static const struct sd_backend cuda_backend = {
	"cuda", SD_DEVICE_CUDA, cuda_alloc, cuda_free, cuda_memset0, cuda_copy, cuda_sync, cuda_gemm,
};

extern "C" const struct sd_backend *sd_cuda_backend_open(int (*seterr)(const char *fmt, ...))
{
	seterr_fn = seterr;
	pthread_mutex_lock(&lock);
	if (state == 0) {
		int n = 0;
		cudaError_t e = cudaGetDeviceCount(&n);
		if (e != cudaSuccess || n == 0) {
			snprintf(why, sizeof why, "no CUDA device (%s)",
			         e != cudaSuccess ? cudaGetErrorString(e) : "none found");
			state = -1;
		} else if (cublasCreate(&handle) != CUBLAS_STATUS_SUCCESS) {
			snprintf(why, sizeof why, "cuBLAS could not be initialised");
			state = -1;
		} else {
			/* the reference numbers are plain fp32: keep TF32 off */
			cublasSetMathMode(handle, CUBLAS_DEFAULT_MATH);
			state = 1;
		}
	}
	pthread_mutex_unlock(&lock);
	if (state < 0) {
		sd_seterr("%s", why);
		return NULL;
	}
	return &cuda_backend;
}
