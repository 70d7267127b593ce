/*
 * file.c - whole-file reading and atomic file writing (temporary file + fsync + rename, the pattern
 * that makes a file appear whole or not at all, as sd-tensor(5)'s rules ask of every tool).
 * sd_io_write_atomic is shared with the safetensors writer (lib/io/io.h).
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include "sd.h"
#include "io.h"

#define READ_CAP_DEFAULT ((size_t)256 << 20)

/* Write all n bytes to fd, retrying on short writes and EINTR.  0, or -1 with errno set. */
static int write_all(int fd, const void *p, size_t n)
{
	const char *s = p;
	while (n > 0) {
		size_t part = n > ((size_t)1 << 30) ? ((size_t)1 << 30) : n;
		ssize_t w = write(fd, s, part);
		if (w < 0) {
			if (errno == EINTR) continue;
			return -1;
		}
		if (w == 0) {
			errno = EIO;
			return -1;
		}
		s += w;
		n -= (size_t)w;
	}
	return 0;
}

/* The mode a new file gets from open(…, 0666): 0666 less the process umask (read by setting it and
 * putting it back, the only portable way; harmless unless another thread creates files meanwhile). */
static mode_t default_mode(void)
{
	mode_t mask = umask(022);
	umask(mask);
	return 0666 & ~mask;
}

/* Fsync the folder that holds a file (so that the rename itself is on disk); errors are ignored,
 * since some file systems refuse to fsync a folder and the data is already safe. */
static void sync_dir(const char *dir)
{
	int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0) return;
	(void)fsync(fd);
	close(fd);
}

int sd_io_write_atomic(const char *path, const struct sd_io_chunk *chunks, int n)
{
	if (!path || !*path)
		return sd_seterr("write: no file name given");
	/* the temporary lives in path's folder so that rename() stays on one file system */
	const char *slash = strrchr(path, '/');
	size_t dirlen = slash ? (size_t)(slash - path) : 0;
	const char *base = slash ? slash + 1 : path;
	if (!*base)
		return sd_seterr("%s: not a file name (ends in '/')", path);
	char dir[PATH_MAX];
	if (!slash) strcpy(dir, ".");
	else if (dirlen == 0) strcpy(dir, "/");
	else if (dirlen < sizeof dir) { memcpy(dir, path, dirlen); dir[dirlen] = 0; }
	else return sd_seterr("%s: path too long", path);

	size_t tlen = strlen(dir) + strlen(base) + 16;
	char *tmp = malloc(tlen);
	if (!tmp)
		return sd_seterr("%s: out of memory", path);
	snprintf(tmp, tlen, "%s/.%s.XXXXXX", dir, base);
	int fd = mkstemp(tmp);
	if (fd < 0) {
		int e = errno;
		sd_seterr("%s: cannot create a temporary file in '%s': %s", path, dir, strerror(e));
		free(tmp);
		return -1;
	}

	const char *what = "write";
	int e = 0;
	struct stat st;
	mode_t mode = (stat(path, &st) == 0 && S_ISREG(st.st_mode)) ? (st.st_mode & 07777) : default_mode();
	if (fchmod(fd, mode) < 0) { what = "chmod"; e = errno; goto fail; }
	for (int i = 0; i < n; i++)
		if (chunks[i].n && write_all(fd, chunks[i].p, chunks[i].n) < 0) { e = errno; goto fail; }
	if (fsync(fd) < 0) { what = "fsync"; e = errno; goto fail; }
	if (close(fd) < 0) { fd = -1; what = "close"; e = errno; goto fail; }
	fd = -1;
	if (rename(tmp, path) < 0) { what = "rename"; e = errno; goto fail; }
	free(tmp);
	sync_dir(dir);
	return 0;
fail:
	if (fd >= 0) close(fd);
	unlink(tmp);
	free(tmp);
	return sd_seterr("%s: %s failed: %s", path, what, strerror(e));
}

int sd_write_file_atomic(const char *path, const void *data, size_t len)
{
	struct sd_io_chunk c = { data, len };
	return sd_io_write_atomic(path, &c, 1);
}

/*
 * Read the whole file at path into a new NUL-terminated buffer the caller frees; *len (when not NULL)
 * gets the length without the NUL.  Works for regular files and for pipes or /proc files whose size is
 * unknown.  NULL with a message naming path when it cannot be opened, is a folder, holds more than cap
 * bytes (0 = 256 MiB), or a read fails.
 */
char *sd_read_file(const char *path, size_t cap, size_t *len)
{
	if (!path) {
		sd_seterr("read: no file name given");
		return NULL;
	}
	if (cap == 0) cap = READ_CAP_DEFAULT;
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		sd_seterr("%s: cannot open: %s", path, strerror(errno));
		return NULL;
	}
	struct stat st;
	if (fstat(fd, &st) < 0) {
		sd_seterr("%s: cannot stat: %s", path, strerror(errno));
		close(fd);
		return NULL;
	}
	if (S_ISDIR(st.st_mode)) {
		sd_seterr("%s: is a folder, not a file", path);
		close(fd);
		return NULL;
	}
	if (S_ISREG(st.st_mode) && (uintmax_t)st.st_size > cap) {
		sd_seterr("%s: file too large (%lld bytes, at most %zu)", path, (long long)st.st_size, cap);
		close(fd);
		return NULL;
	}
	/* start from the size stat reports (0 for pipes and /proc) and grow while data keeps coming */
	size_t size = S_ISREG(st.st_mode) ? (size_t)st.st_size + 1 : 4096;
	if (size > cap + 1) size = cap + 1;
	size_t used = 0;
	char *buf = malloc(size);
	if (!buf) goto nomem;
	for (;;) {
		if (used + 1 >= size) {
			/* the buffer is full: probe for one more byte before growing it */
			char probe;
			ssize_t r = read(fd, &probe, 1);
			if (r < 0 && errno == EINTR) continue;
			if (r < 0) {
				sd_seterr("%s: read failed: %s", path, strerror(errno));
				goto fail;
			}
			if (r == 0) break;
			if (used + 1 > cap) {
				sd_seterr("%s: file too large (more than %zu bytes)", path, cap);
				goto fail;
			}
			size_t ns = size * 2 > cap + 1 ? cap + 1 : size * 2;
			char *nb = realloc(buf, ns);
			if (!nb) goto nomem;
			buf = nb;
			size = ns;
			buf[used++] = probe;
			continue;
		}
		ssize_t r = read(fd, buf + used, size - 1 - used);
		if (r < 0) {
			if (errno == EINTR) continue;
			sd_seterr("%s: read failed: %s", path, strerror(errno));
			goto fail;
		}
		if (r == 0) break;
		used += (size_t)r;
	}
	close(fd);
	buf[used] = 0;
	if (len) *len = used;
	return buf;
nomem:
	sd_seterr("%s: out of memory", path);
fail:
	free(buf);
	close(fd);
	return NULL;
}
