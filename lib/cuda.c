/*
 * cuda.c - finding the CUDA backend at run time.  The kernels/ sources are built into libsd-cuda.so (when nvcc
 * is there), which links cuBLAS and the CUDA runtime; this file loads it with dlopen the first time a
 * CUDA device is asked for, and only when an NVIDIA device node exists.  So the tools start without
 * loading CUDA's libraries (~90 ms per process) on a CPU machine, and run on one where CUDA is not
 * installed at all.  Where it looks: $SD_CUDA_LIB, the install's lib/sdpipe, the build folder.
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include "backend.h"

#ifndef SD_LIBDIR
#define SD_LIBDIR "/usr/local/lib/sdpipe"
#endif

static pthread_once_t once = PTHREAD_ONCE_INIT;
static const struct sd_backend *backend;
static char why[512];

static void load(void)
{
#ifndef SD_CUDA
	snprintf(why, sizeof why, "this sdpipe was built without CUDA (make CUDA=1 with nvcc installed)");
#else
	if (access("/dev/nvidiactl", F_OK) != 0 && access("/dev/nvidia0", F_OK) != 0) {
		snprintf(why, sizeof why, "no CUDA device (no /dev/nvidia0)");
		return;
	}
	const char *env = getenv("SD_CUDA_LIB");
	const char *paths[] = {env && *env ? env : NULL, SD_LIBDIR "/libsd-cuda.so",
#ifdef SD_CUDA_SO
	                       SD_CUDA_SO,
#endif
	                       "libsd-cuda.so"};
	void *h = NULL;
	const char *err = "not found";
	for (size_t i = 0; i < sizeof paths / sizeof *paths && !h; i++) {
		if (!paths[i]) continue;
		h = dlopen(paths[i], RTLD_NOW | RTLD_LOCAL);
		if (!h) err = dlerror();
	}
	if (!h) {
		snprintf(why, sizeof why, "cannot load the CUDA backend libsd-cuda.so (%s; set SD_CUDA_LIB)", err);
		return;
	}
	const struct sd_backend *(*open)(int (*)(const char *, ...));
	*(void **)&open = dlsym(h, "sd_cuda_backend_open");
	if (!open) {
		snprintf(why, sizeof why, "libsd-cuda.so has no sd_cuda_backend_open");
		return;
	}
	backend = open(sd_seterr);
	if (!backend) snprintf(why, sizeof why, "%s", sd_errmsg());
#endif
}

const struct sd_backend *sd_cuda_backend(void)
{
	pthread_once(&once, load);
	if (!backend) sd_seterr("%s", why);
	return backend;
}
