/*
 * io.h - internal helpers shared by the files in lib/io (not part of the public sd.h).
 */
#ifndef SD_IO_H
#define SD_IO_H

#include <math.h>
#include <stddef.h>

/* A sample in [0,1] as an integer of 0..maxval: clamped (NaN as 0) and rounded half away from zero,
 * the one rounding of every image writer (PNM, PNG). */
static inline long sd_io_quantize(double v, double maxval)
{
	if (!(v > 0.0)) v = 0.0;
	if (v > 1.0) v = 1.0;
	return lround(v * maxval);
}

/* One piece of a file being written: n bytes at p (p may be NULL when n is 0). */
struct sd_io_chunk {
	const void *p;
	size_t n;
};

/*
 * Write the chunks, one after another, to path atomically: a temporary file in the same folder
 * (mkstemp), write, fsync, rename over path, then fsync the folder.  The new file gets the mode of the
 * file it replaces, else 0666 less the umask.  0 on success; -1 with a message naming path on any
 * failure, and then the temporary file is removed and path is untouched.
 */
int sd_io_write_atomic(const char *path, const struct sd_io_chunk *chunks, int n);

#endif
