/*
 * value.c - the values a frame holds (sd-tensor(5)): nil, bool, numbers, strings, bins, arrays, maps with
 * string keys in insertion order, and tensors.  The tree mirrors a msgpack document the way Python's
 * msgpack.unpackb() sees one (a dict keeps its insertion order), with tensors as owned sd_tensors.
 * Every node is malloc'd and owned by its parent; sd_value_free() releases a whole tree.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "sd.h"

/* ==== constructors ==== */

static sd_value *node(enum sd_vtype type)
{
	sd_value *v = calloc(1, sizeof *v);
	if (!v) {
		sd_seterr("out of memory");
		return NULL;
	}
	v->type = type;
	return v;
}

sd_value *sd_value_nil(void)
{
	return node(SD_V_NIL);
}

sd_value *sd_value_bool(int b)
{
	sd_value *v = node(SD_V_BOOL);
	if (v) v->u.b = !!b;
	return v;
}

sd_value *sd_value_int(int64_t i)
{
	sd_value *v = node(SD_V_INT);
	if (v) v->u.i = i;
	return v;
}

sd_value *sd_value_float(double f)
{
	sd_value *v = node(SD_V_FLOAT);
	if (v) v->u.f = f;
	return v;
}

/* A STR or BIN node holding a copy of n bytes plus a NUL (so that a STR's p is a C string; a BIN gets
 * one too, harmlessly).  p may be NULL when n is 0.  NULL with a message when out of memory. */
static sd_value *bytes(enum sd_vtype type, const void *p, size_t n)
{
	if (n == SIZE_MAX) {
		sd_seterr("out of memory");
		return NULL;
	}
	sd_value *v = node(type);
	if (!v) return NULL;
	v->u.s.p = malloc(n + 1);
	if (!v->u.s.p) {
		free(v);
		sd_seterr("out of memory for a %zu-byte %s", n, type == SD_V_STR ? "string" : "bin");
		return NULL;
	}
	if (n) memcpy(v->u.s.p, p, n);
	v->u.s.p[n] = 0;
	v->u.s.n = n;
	return v;
}

sd_value *sd_value_str(const char *s)
{
	if (!s) {
		sd_seterr("sd_value_str: NULL string");
		return NULL;
	}
	return bytes(SD_V_STR, s, strlen(s));
}

sd_value *sd_value_strn(const char *s, size_t n)
{
	if (!s && n) {
		sd_seterr("sd_value_strn: NULL string");
		return NULL;
	}
	return bytes(SD_V_STR, s, n);
}

sd_value *sd_value_bin(const void *p, size_t n)
{
	if (!p && n) {
		sd_seterr("sd_value_bin: NULL data");
		return NULL;
	}
	return bytes(SD_V_BIN, p, n);
}

sd_value *sd_value_array(void)
{
	return node(SD_V_ARRAY);
}

sd_value *sd_value_map(void)
{
	return node(SD_V_MAP);
}

/* Takes t.  A NULL t (a constructor that failed just before) keeps that constructor's message, so that
 * sd_map_set(m, "k", sd_value_tensor(sd_tensor_new(…))) reports the first failure. */
sd_value *sd_value_tensor(sd_tensor *t)
{
	if (!t) {
		if (!*sd_errmsg()) sd_seterr("sd_value_tensor: NULL tensor");
		return NULL;
	}
	sd_value *v = node(SD_V_TENSOR);
	if (!v) {
		sd_tensor_free(t);
		return NULL;
	}
	v->u.t = t;
	return v;
}

void sd_value_free(sd_value *v)
{
	if (!v) return;
	switch (v->type) {
	case SD_V_STR:
	case SD_V_BIN:
		free(v->u.s.p);
		break;
	case SD_V_ARRAY:
		for (size_t i = 0; i < v->u.a.n; i++) sd_value_free(v->u.a.v[i]);
		free(v->u.a.v);
		break;
	case SD_V_MAP:
		for (size_t i = 0; i < v->u.m.n; i++) {
			free(v->u.m.k[i]);
			sd_value_free(v->u.m.v[i]);
		}
		free(v->u.m.k);
		free(v->u.m.v);
		break;
	case SD_V_TENSOR:
		sd_tensor_free(v->u.t);
		break;
	default:
		break;
	}
	free(v);
}

/*
 * A deep copy: strings, bins, children and tensor data are all copied (a tensor view becomes an owned
 * tensor on the same device).  NULL with a message when out of memory; nothing is leaked then.
 */
sd_value *sd_value_dup(const sd_value *v)
{
	if (!v) {
		sd_seterr("sd_value_dup: NULL value");
		return NULL;
	}
	sd_value *c;
	switch (v->type) {
	case SD_V_STR:
	case SD_V_BIN:
		return bytes(v->type, v->u.s.p, v->u.s.n);
	case SD_V_ARRAY:
		if (!(c = sd_value_array())) return NULL;
		for (size_t i = 0; i < v->u.a.n; i++)
			if (sd_array_push(c, sd_value_dup(v->u.a.v[i])) < 0) {
				sd_value_free(c);
				return NULL;
			}
		return c;
	case SD_V_MAP:
		if (!(c = sd_value_map())) return NULL;
		for (size_t i = 0; i < v->u.m.n; i++)
			if (sd_map_set(c, v->u.m.k[i], sd_value_dup(v->u.m.v[i])) < 0) {
				sd_value_free(c);
				return NULL;
			}
		return c;
	case SD_V_TENSOR:
		return sd_value_tensor(sd_tensor_to_device(v->u.t, v->u.t->device));
	default:
		if (!(c = node(v->type))) return NULL;
		c->u = v->u;
		return c;
	}
}

/* ==== arrays ==== */

/* Make room for one more entry in the parallel arrays *a (and *b when not NULL) of *cap entries. */
static int grow(void ***a, void ***b, size_t n, size_t *cap)
{
	if (n < *cap) return 0;
	size_t nc = *cap ? *cap * 2 : 4;
	if (nc > SIZE_MAX / sizeof(void *) / 2) return sd_seterr("out of memory");
	void **na = realloc(*a, nc * sizeof *na);
	if (!na) return sd_seterr("out of memory");
	*a = na;
	if (b) {
		void **nb = realloc(*b, nc * sizeof *nb);
		if (!nb) return sd_seterr("out of memory");
		*b = nb;
	}
	*cap = nc;
	return 0;
}

int sd_array_push(sd_value *arr, sd_value *item)
{
	if (!item) {
		if (!*sd_errmsg()) sd_seterr("sd_array_push: NULL item");
		return -1;
	}
	if (!arr || arr->type != SD_V_ARRAY) {
		sd_value_free(item);
		return sd_seterr("sd_array_push: not an array");
	}
	if (grow((void ***)&arr->u.a.v, NULL, arr->u.a.n, &arr->u.a.cap) < 0) {
		sd_value_free(item);
		return -1;
	}
	arr->u.a.v[arr->u.a.n++] = item;
	return 0;
}

/* ==== maps ==== */

/* Position of key in map, or -1.  Maps are small (a frame has tens of keys), so a linear scan. */
static long find(const sd_value *map, const char *key)
{
	if (!map || map->type != SD_V_MAP || !key) return -1;
	for (size_t i = 0; i < map->u.m.n; i++)
		if (strcmp(map->u.m.k[i], key) == 0) return (long)i;
	return -1;
}

sd_value *sd_map_get(const sd_value *map, const char *key)
{
	long i = find(map, key);
	return i < 0 ? NULL : map->u.m.v[i];
}

/* Replace the value in place when key is there (its position kept), else append a copy of key. */
int sd_map_set(sd_value *map, const char *key, sd_value *v)
{
	if (!v) {
		if (!*sd_errmsg()) sd_seterr("sd_map_set: NULL value for key '%s'", key ? key : "(null)");
		return -1;
	}
	if (!map || map->type != SD_V_MAP || !key) {
		sd_value_free(v);
		return sd_seterr("sd_map_set: %s", key ? "not a map" : "NULL key");
	}
	long i = find(map, key);
	if (i >= 0) {
		sd_value_free(map->u.m.v[i]);
		map->u.m.v[i] = v;
		return 0;
	}
	char *k = strdup(key);
	if (!k || grow((void ***)&map->u.m.k, (void ***)&map->u.m.v, map->u.m.n, &map->u.m.cap) < 0) {
		free(k);
		sd_value_free(v);
		return sd_seterr("out of memory");
	}
	map->u.m.k[map->u.m.n] = k;
	map->u.m.v[map->u.m.n++] = v;
	return 0;
}

int sd_map_del(sd_value *map, const char *key)
{
	long i = find(map, key);
	if (i < 0) return 0;
	free(map->u.m.k[i]);
	sd_value_free(map->u.m.v[i]);
	size_t rest = map->u.m.n - (size_t)i - 1;
	memmove(map->u.m.k + i, map->u.m.k + i + 1, rest * sizeof *map->u.m.k);
	memmove(map->u.m.v + i, map->u.m.v + i + 1, rest * sizeof *map->u.m.v);
	map->u.m.n--;
	return 1;
}

sd_tensor *sd_map_tensor(const sd_value *map, const char *key)
{
	sd_value *v = sd_map_get(map, key);
	return v && v->type == SD_V_TENSOR ? v->u.t : NULL;
}

const char *sd_map_str(const sd_value *map, const char *key)
{
	sd_value *v = sd_map_get(map, key);
	return v && v->type == SD_V_STR ? v->u.s.p : NULL;
}

static const char *type_name(enum sd_vtype t)
{
	static const char *names[] = {"nil", "a bool", "an integer", "an integer", "a float", "a string",
	                              "a bin", "an array", "a map", "a tensor"};
	return (unsigned)t < sizeof names / sizeof *names ? names[t] : "?";
}

/* An integer: exact for INT, for UINT when it fits, for FLOAT when integral and within int64. */
int sd_map_get_int(const sd_value *map, const char *key, int64_t *out)
{
	sd_value *v = sd_map_get(map, key);
	if (!v) return 1;
	switch (v->type) {
	case SD_V_INT:
		*out = v->u.i;
		return 0;
	case SD_V_UINT:
		if (v->u.u > INT64_MAX)
			return sd_seterr("key '%s': %llu is too large (at most %lld)", key,
			                 (unsigned long long)v->u.u, (long long)INT64_MAX);
		*out = (int64_t)v->u.u;
		return 0;
	case SD_V_FLOAT:
		/* -2^63 is exact in a double; 2^63 is the first value out of range */
		if (v->u.f != floor(v->u.f) || !(v->u.f >= -9223372036854775808.0 && v->u.f < 9223372036854775808.0))
			return sd_seterr("key '%s': %g is not an integer", key, v->u.f);
		*out = (int64_t)v->u.f;
		return 0;
	default:
		return sd_seterr("key '%s': expected an integer, got %s", key, type_name(v->type));
	}
}

int sd_map_get_float(const sd_value *map, const char *key, double *out)
{
	sd_value *v = sd_map_get(map, key);
	if (!v) return 1;
	switch (v->type) {
	case SD_V_INT:
		*out = (double)v->u.i;
		return 0;
	case SD_V_UINT:
		*out = (double)v->u.u;
		return 0;
	case SD_V_FLOAT:
		*out = v->u.f;
		return 0;
	default:
		return sd_seterr("key '%s': expected a number, got %s", key, type_name(v->type));
	}
}

int sd_map_set_tensor(sd_value *map, const char *key, sd_tensor *t)
{
	return sd_map_set(map, key, sd_value_tensor(t));
}

int sd_map_set_str(sd_value *map, const char *key, const char *s)
{
	return sd_map_set(map, key, sd_value_str(s));
}

int sd_map_set_int(sd_value *map, const char *key, int64_t i)
{
	return sd_map_set(map, key, sd_value_int(i));
}

int sd_map_set_float(sd_value *map, const char *key, double f)
{
	return sd_map_set(map, key, sd_value_float(f));
}
