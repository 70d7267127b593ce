/*
 * nocuda.c - sd_cuda_backend() for builds without kernels/ (CUDA=0 or no nvcc): always NULL.
 */
#include "backend.h"

#ifndef SD_CUDA
const struct sd_backend *sd_cuda_backend(void)
{
	sd_seterr("this sdpipe was built without CUDA (make CUDA=1 with nvcc installed)");
	return NULL;
}
#endif
