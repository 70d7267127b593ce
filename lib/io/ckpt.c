/*
 * ckpt.c - reading PyTorch .ckpt files, the zip archive that torch.save has written since PyTorch 1.6
 * (torch/serialization.py, _save and _load; the zip layout is caffe2's PyTorchStreamWriter):
 *
 *   <prefix>/data.pkl        the object, pickled (protocol 2); tensors refer to storages by key
 *   <prefix>/byteorder       "little" or "big" (absent in files from torch < 2.1: little)
 *   <prefix>/data/<key>      one storage each: numel elements of its type, raw, in that byte order
 *   <prefix>/version, <prefix>/.data/…   bookkeeping, not needed here
 *
 * The archive is read with libarchive, one entry after another.  Each entry is read into memory with its
 * size counted as it arrives (the size the zip declares is not trusted) and capped: data.pkl at
 * MAX_PICKLE, one storage at MAX_STORAGE, all entries together at MAX_TOTAL (16 GiB); the tensors made
 * from them at OUT_FACTOR times the file's size (plus OUT_SLACK).  Entry names with
 * "..", absolute names, and entries outside data.pkl's folder are refused.
 *
 * data.pkl is read by a restricted unpickler that mirrors the part of Python's pickle machine (pickle.py,
 * _Unpickler; opcodes as pickletools documents them) that a state dict needs, and builds a small tree of
 * inert values.  Nothing is ever called or imported: GLOBAL may only name the callables in `globals`
 * below, and REDUCE on one of them is interpreted here (OrderedDict() makes an empty dict,
 * _rebuild_tensor_v2(storage, offset, size, stride, …) a description of a view), and BUILD only sets
 * attributes of a dict (the `_metadata` of a state dict), which are ignored.  BINPERSID is torch's
 * persistent_load and must be ('storage', torch.<Type>Storage, key, location, numel).  Every other
 * opcode or global is an error that names it.  The stack, the MARK nesting, the memo and the memory the
 * tree may take are capped, and every length is checked against the bytes that remain.
 *
 * Tensors: each view (storage offset, size, stride) is copied into a new contiguous CPU tensor of the
 * storage's dtype: Float f32, Half f16, BFloat16 bf16, Double f64, Long i64, Int i32, Byte u8, Bool u8
 * (0/1), and Short (int16) and Char (int8) widened to i32, the narrowest signed type sd_dtype has.  The
 * names are the string keys of the top-level dict, or of its "state_dict" entry when that is a dict (a
 * PyTorch Lightning / LDM checkpoint), in insertion order; values that are not tensors (global_step,
 * epoch, nested dicts) are ignored.
 */
#include <archive.h>
#include <archive_entry.h>
#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include "sd.h"

/* ==== limits ==== */

#define MAX_TOTAL ((uint64_t)16 << 30)      /* bytes read from all entries together */
#define MAX_STORAGE ((uint64_t)8 << 30)     /* one storage file */
#define MAX_PICKLE ((size_t)256 << 20)      /* data.pkl */
#define MAX_SMALL 64                        /* byteorder */
#define MAX_ENTRIES 1000000                 /* entries in the zip */
#define MAX_STACK ((size_t)1 << 20)         /* unpickler stack entries */
#define MAX_MARKS 64                        /* MARK nesting (a state dict needs 3) */
#define MAX_MEMO ((size_t)1 << 24)          /* memo slots (and no more than max(256, pickle bytes)) */
#define MAX_TREE ((size_t)1 << 30)          /* bytes of values the unpickler may allocate */
#define MAX_GLOBAL_NAME 256                 /* one line of a GLOBAL opcode */
/* Bytes of tensors made, all together: OUT_FACTOR × the file's size + OUT_SLACK.  A view may repeat a
 * storage's elements (stride 0, or many tensors over one storage), so without this a file of a few KB
 * could ask for terabytes; real checkpoints make about their own size (4× covers int8 widened to i32). */
#define OUT_FACTOR 4
#define OUT_SLACK ((uint64_t)64 << 20)

/* ==== the value tree ==== */

enum pkind { P_NONE, P_BOOL, P_INT, P_FLOAT, P_STR, P_TUPLE, P_LIST, P_DICT, P_GLOBAL, P_STORAGE, P_TENSOR };

static const char *const kind_names[] = {
	"None", "bool", "int", "float", "str", "tuple", "list", "dict", "global", "storage", "tensor",
};

enum gkind { G_ORDERED_DICT, G_REBUILD_TENSOR_V2, G_REBUILD_TENSOR, G_REBUILD_PARAMETER, G_STORAGE };

/* The only globals a checkpoint may name.  esize is a storage's element size in the file; when it is
 * smaller than the dtype's (Short, Char) the values are sign-extended. */
static const struct {
	const char *module, *name;
	enum gkind kind;
	enum sd_dtype dtype;
	int esize;
} globals[] = {
	{ "collections", "OrderedDict", G_ORDERED_DICT, 0, 0 },
	{ "torch._utils", "_rebuild_tensor_v2", G_REBUILD_TENSOR_V2, 0, 0 },
	{ "torch._utils", "_rebuild_tensor", G_REBUILD_TENSOR, 0, 0 },
	{ "torch._utils", "_rebuild_parameter", G_REBUILD_PARAMETER, 0, 0 },
	{ "torch", "FloatStorage", G_STORAGE, SD_DTYPE_F32, 4 },
	{ "torch", "HalfStorage", G_STORAGE, SD_DTYPE_F16, 2 },
	{ "torch", "BFloat16Storage", G_STORAGE, SD_DTYPE_BF16, 2 },
	{ "torch", "DoubleStorage", G_STORAGE, SD_DTYPE_F64, 8 },
	{ "torch", "LongStorage", G_STORAGE, SD_DTYPE_I64, 8 },
	{ "torch", "IntStorage", G_STORAGE, SD_DTYPE_I32, 4 },
	{ "torch", "ShortStorage", G_STORAGE, SD_DTYPE_I32, 2 },
	{ "torch", "CharStorage", G_STORAGE, SD_DTYPE_I32, 1 },
	{ "torch", "ByteStorage", G_STORAGE, SD_DTYPE_U8, 1 },
	{ "torch", "BoolStorage", G_STORAGE, SD_DTYPE_U8, 1 },
};
#define NGLOBALS ((int)(sizeof globals / sizeof globals[0]))

/* One value made by the unpickler.  Values are shared (the memo hands out the same one again), so none
 * owns another; all of them are chained through `next` and freed together. */
struct pv {
	enum pkind kind;
	struct pv *next;
	union {
		int64_t i;                                        /* BOOL, INT */
		double f;                                         /* FLOAT */
		struct { const char *p; size_t n; } s;           /* STR: points into the pickle's bytes */
		struct { struct pv **v; size_t n, cap; } a;      /* TUPLE, LIST, DICT (key, value, key, …) */
		int g;                                            /* GLOBAL: index into globals[] */
		struct { const char *key; size_t keyn; int g; int64_t numel; } st; /* STORAGE */
		struct {                                          /* TENSOR: a view of a storage */
			struct pv *st;
			int64_t offset, need; /* need: elements of the storage the view reaches (0 when empty) */
			int ndim;
			int64_t size[SD_MAX_DIMS], stride[SD_MAX_DIMS];
		} t;
	} u;
};

/* ==== the restricted unpickler ==== */

/* Opcode names for messages (pickletools' names), every opcode of protocols 0-5. */
static const char *const op_names[256] = {
	['('] = "MARK", ['.'] = "STOP", ['0'] = "POP", ['1'] = "POP_MARK", ['2'] = "DUP", ['F'] = "FLOAT",
	['I'] = "INT", ['J'] = "BININT", ['K'] = "BININT1", ['L'] = "LONG", ['M'] = "BININT2", ['N'] = "NONE",
	['P'] = "PERSID", ['Q'] = "BINPERSID", ['R'] = "REDUCE", ['S'] = "STRING", ['T'] = "BINSTRING",
	['U'] = "SHORT_BINSTRING", ['V'] = "UNICODE", ['X'] = "BINUNICODE", ['a'] = "APPEND", ['b'] = "BUILD",
	['c'] = "GLOBAL", ['d'] = "DICT", ['}'] = "EMPTY_DICT", ['e'] = "APPENDS", ['g'] = "GET",
	['h'] = "BINGET", ['i'] = "INST", ['j'] = "LONG_BINGET", ['l'] = "LIST", [']'] = "EMPTY_LIST",
	['o'] = "OBJ", ['p'] = "PUT", ['q'] = "BINPUT", ['r'] = "LONG_BINPUT", ['s'] = "SETITEM",
	['t'] = "TUPLE", [')'] = "EMPTY_TUPLE", ['u'] = "SETITEMS", ['G'] = "BINFLOAT",
	[0x80] = "PROTO", [0x81] = "NEWOBJ", [0x82] = "EXT1", [0x83] = "EXT2", [0x84] = "EXT4",
	[0x85] = "TUPLE1", [0x86] = "TUPLE2", [0x87] = "TUPLE3", [0x88] = "NEWTRUE", [0x89] = "NEWFALSE",
	[0x8a] = "LONG1", [0x8b] = "LONG4", ['B'] = "BINBYTES", ['C'] = "SHORT_BINBYTES",
	[0x8c] = "SHORT_BINUNICODE", [0x8d] = "BINUNICODE8", [0x8e] = "BINBYTES8", [0x8f] = "EMPTY_SET",
	[0x90] = "ADDITEMS", [0x91] = "FROZENSET", [0x92] = "NEWOBJ_EX", [0x93] = "STACK_GLOBAL",
	[0x94] = "MEMOIZE", [0x95] = "FRAME", [0x96] = "BYTEARRAY8", [0x97] = "NEXT_BUFFER",
	[0x98] = "READONLY_BUFFER",
};

struct up {
	const char *path;                 /* for messages */
	const unsigned char *start, *p, *end;
	size_t at;                        /* offset of the opcode being run */
	int op;
	struct pv **stack;
	size_t sp, scap;
	size_t marks[MAX_MARKS];
	int nmarks;
	struct pv **memo;
	size_t memocap, memoset, memomax;
	struct pv *all;                   /* every value, for up_free */
	size_t mem;                       /* bytes charged against MAX_TREE */
};

/* Set the message "<path>: data.pkl, byte N (OPCODE): <what>"; returns -1. */
static int uerr(struct up *u, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int uerr(struct up *u, const char *fmt, ...)
{
	char what[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(what, sizeof what, fmt, ap);
	va_end(ap);
	const char *name = op_names[u->op & 0xff];
	return sd_seterr("%s: data.pkl, byte %zu (%s): %s", u->path, u->at, name ? name : "?", what);
}

/* Copy up to cap-1 bytes of a string from the file into buf for a message, printable ASCII only. */
static const char *shown(const char *p, size_t n, char *buf, size_t cap)
{
	size_t k = 0;
	for (size_t i = 0; i < n && k + 4 < cap; i++)
		buf[k++] = p[i] >= 0x20 && p[i] < 0x7f ? p[i] : '?';
	if (k + 4 >= cap && n > k) {
		memcpy(buf + k, "...", 3);
		k += 3;
	}
	buf[k] = 0;
	return buf;
}

/* Count bytes against MAX_TREE, so that a small pickle cannot make the tree huge. */
static int charge(struct up *u, size_t bytes)
{
	u->mem += bytes;
	if (u->mem > MAX_TREE)
		return uerr(u, "the pickle needs more than %zu MiB of memory to unpickle", MAX_TREE >> 20);
	return 0;
}

static struct pv *newv(struct up *u, enum pkind kind)
{
	if (charge(u, sizeof(struct pv)) < 0) return NULL;
	struct pv *v = calloc(1, sizeof *v);
	if (!v) {
		uerr(u, "out of memory");
		return NULL;
	}
	v->kind = kind;
	v->next = u->all;
	u->all = v;
	return v;
}

/* Free every value of u and its stack and memo. */
static void up_free(struct up *u)
{
	for (struct pv *v = u->all, *n; v; v = n) {
		n = v->next;
		if (v->kind == P_TUPLE || v->kind == P_LIST || v->kind == P_DICT) free(v->u.a.v);
		free(v);
	}
	u->all = NULL;
	free(u->stack);
	free(u->memo);
	u->stack = NULL;
	u->memo = NULL;
}

/* Append item to a TUPLE, LIST or DICT (whose array grows by doubling). */
static int add(struct up *u, struct pv *c, struct pv *item)
{
	if (c->u.a.n == c->u.a.cap) {
		size_t cap = c->u.a.cap ? 2 * c->u.a.cap : 4;
		if (charge(u, (cap - c->u.a.cap) * sizeof(struct pv *)) < 0) return -1;
		struct pv **v = realloc(c->u.a.v, cap * sizeof *v);
		if (!v) return uerr(u, "out of memory");
		c->u.a.v = v;
		c->u.a.cap = cap;
	}
	c->u.a.v[c->u.a.n++] = item;
	return 0;
}

static int push(struct up *u, struct pv *v)
{
	if (!v) return -1;
	if (u->sp == u->scap) {
		if (u->sp >= MAX_STACK) return uerr(u, "stack deeper than %zu entries", MAX_STACK);
		size_t cap = u->scap ? 2 * u->scap : 64;
		struct pv **s = realloc(u->stack, cap * sizeof *s);
		if (!s) return uerr(u, "out of memory");
		u->stack = s;
		u->scap = cap;
	}
	u->stack[u->sp++] = v;
	return 0;
}

/* The stack's floor: items below the innermost MARK belong to an enclosing frame (as in pickle.py). */
static size_t floor_of(const struct up *u)
{
	return u->nmarks ? u->marks[u->nmarks - 1] : 0;
}

static struct pv *pop(struct up *u)
{
	if (u->sp <= floor_of(u)) {
		uerr(u, "stack underflow");
		return NULL;
	}
	return u->stack[--u->sp];
}

static struct pv *top(struct up *u)
{
	if (u->sp <= floor_of(u)) {
		uerr(u, "stack underflow");
		return NULL;
	}
	return u->stack[u->sp - 1];
}

/* Close the innermost MARK: *from gets the index of the first item above it (the caller consumes
 * stack[from..sp) and sets sp = from). */
static int popmark(struct up *u, size_t *from)
{
	if (!u->nmarks) return uerr(u, "no MARK to close");
	*from = u->marks[--u->nmarks];
	return 0;
}

/* The value just below a closed MARK at `from` (the dict of SETITEMS, the list of APPENDS). */
static struct pv *below(struct up *u, size_t from)
{
	if (from <= floor_of(u)) {
		uerr(u, "stack underflow");
		return NULL;
	}
	return u->stack[from - 1];
}

/* Take n bytes of operand, or fail when the pickle ends first. */
static const unsigned char *take(struct up *u, uint64_t n)
{
	if (n > (uint64_t)(u->end - u->p)) {
		uerr(u, "the pickle is truncated (the opcode needs %llu more bytes, %zu are left)",
		     (unsigned long long)n, (size_t)(u->end - u->p));
		return NULL;
	}
	const unsigned char *q = u->p;
	u->p += n;
	return q;
}

/* Little-endian unsigned integer of n bytes (n <= 8). */
static uint64_t le(const unsigned char *q, int n)
{
	uint64_t v = 0;
	for (int i = n - 1; i >= 0; i--) v = v << 8 | q[i];
	return v;
}

static int memo_put(struct up *u, uint64_t idx)
{
	struct pv *v = top(u);
	if (!v) return -1;
	if (idx >= u->memomax)
		return uerr(u, "memo index %llu is out of range (below %zu for this pickle)",
		            (unsigned long long)idx, u->memomax);
	if (idx >= u->memocap) {
		size_t cap = u->memocap ? u->memocap : 256;
		while (cap <= idx) cap *= 2;
		if (cap > u->memomax) cap = u->memomax;
		if (charge(u, (cap - u->memocap) * sizeof(struct pv *)) < 0) return -1;
		struct pv **m = realloc(u->memo, cap * sizeof *m);
		if (!m) return uerr(u, "out of memory");
		memset(m + u->memocap, 0, (cap - u->memocap) * sizeof *m);
		u->memo = m;
		u->memocap = cap;
	}
	if (!u->memo[idx]) u->memoset++;
	u->memo[idx] = v;
	return 0;
}

static int memo_get(struct up *u, uint64_t idx)
{
	if (idx >= u->memocap || !u->memo[idx])
		return uerr(u, "memo index %llu was never set", (unsigned long long)idx);
	return push(u, u->memo[idx]);
}

static struct pv *new_int(struct up *u, enum pkind kind, int64_t i)
{
	struct pv *v = newv(u, kind);
	if (v) v->u.i = i;
	return v;
}

static struct pv *new_str(struct up *u, uint64_t n)
{
	const unsigned char *q = take(u, n);
	if (!q) return NULL;
	struct pv *v = newv(u, P_STR);
	if (v) {
		v->u.s.p = (const char *)q;
		v->u.s.n = n;
	}
	return v;
}

static int is_str(const struct pv *v, const char *s)
{
	return v->kind == P_STR && v->u.s.n == strlen(s) && memcmp(v->u.s.p, s, v->u.s.n) == 0;
}

/* Look module.name up in the allowlist and push it; anything else is refused by name. */
static int push_global(struct up *u, const char *mod, size_t modn, const char *name, size_t namen)
{
	for (int i = 0; i < NGLOBALS; i++)
		if (strlen(globals[i].module) == modn && memcmp(globals[i].module, mod, modn) == 0 &&
		    strlen(globals[i].name) == namen && memcmp(globals[i].name, name, namen) == 0) {
			struct pv *v = newv(u, P_GLOBAL);
			if (!v) return -1;
			v->u.g = i;
			return push(u, v);
		}
	char a[128], b[128];
	return uerr(u, "forbidden global '%s.%s' (a checkpoint may only name collections.OrderedDict, "
	            "torch._utils._rebuild_tensor_v2, _rebuild_tensor, _rebuild_parameter and "
	            "torch.<Type>Storage); nothing was run", shown(mod, modn, a, sizeof a),
	            shown(name, namen, b, sizeof b));
}

/* GLOBAL's operand: "module\nname\n". */
static int op_global(struct up *u)
{
	const char *line[2];
	size_t len[2];
	for (int k = 0; k < 2; k++) {
		size_t left = (size_t)(u->end - u->p), lim = left < MAX_GLOBAL_NAME ? left : MAX_GLOBAL_NAME;
		const unsigned char *nl = memchr(u->p, '\n', lim);
		if (!nl)
			return left < MAX_GLOBAL_NAME ? uerr(u, "the pickle is truncated (no newline after the name)")
			                              : uerr(u, "name longer than %d bytes", MAX_GLOBAL_NAME);
		line[k] = (const char *)u->p;
		len[k] = (size_t)(nl - u->p);
		u->p = nl + 1;
	}
	return push_global(u, line[0], len[0], line[1], len[1]);
}

/* An integer operand of a tensor description (offset, a size, a stride): a non-negative INT. */
static int get_nat(struct up *u, const struct pv *v, const char *what, int64_t *out)
{
	if (v->kind != P_INT || v->u.i < 0)
		return uerr(u, "%s is %s, not a non-negative integer", what,
		            v->kind == P_INT ? "negative" : kind_names[v->kind]);
	*out = v->u.i;
	return 0;
}

/*
 * _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
 * and _rebuild_tensor(storage, storage_offset, size, stride): a TENSOR value describing the view.  The
 * extent it reaches into the storage is computed here (overflow-checked) and compared with the
 * storage's size once the tensor's name is known.
 */
static struct pv *rebuild_tensor(struct up *u, const struct pv *args, int v2)
{
	size_t n = args->u.a.n;
	struct pv *const *a = args->u.a.v;
	if (v2 ? n != 6 && n != 7 : n != 4) {
		uerr(u, "%s takes %s arguments, not %zu", v2 ? "_rebuild_tensor_v2" : "_rebuild_tensor",
		     v2 ? "6 or 7" : "4", n);
		return NULL;
	}
	if (a[0]->kind != P_STORAGE) {
		uerr(u, "tensor storage is a %s, not a storage", kind_names[a[0]->kind]);
		return NULL;
	}
	if (a[2]->kind != P_TUPLE || a[3]->kind != P_TUPLE) {
		uerr(u, "tensor size and stride must be tuples (got %s and %s)", kind_names[a[2]->kind],
		     kind_names[a[3]->kind]);
		return NULL;
	}
	if (a[2]->u.a.n != a[3]->u.a.n) {
		uerr(u, "tensor size has %zu dimensions but stride %zu", a[2]->u.a.n, a[3]->u.a.n);
		return NULL;
	}
	if (a[2]->u.a.n > SD_MAX_DIMS) {
		uerr(u, "tensor with %zu dimensions (at most %d)", a[2]->u.a.n, SD_MAX_DIMS);
		return NULL;
	}
	if (v2 && (a[4]->kind != P_BOOL || a[5]->kind != P_DICT || (n == 7 && a[6]->kind != P_NONE &&
	                                                            a[6]->kind != P_DICT))) {
		uerr(u, "_rebuild_tensor_v2: requires_grad, backward_hooks, metadata are %s, %s, %s (want bool, "
		     "dict, None or dict)", kind_names[a[4]->kind], kind_names[a[5]->kind],
		     n == 7 ? kind_names[a[6]->kind] : "-");
		return NULL;
	}
	struct pv *t = newv(u, P_TENSOR);
	if (!t) return NULL;
	t->u.t.st = a[0];
	t->u.t.ndim = (int)a[2]->u.a.n;
	if (get_nat(u, a[1], "the storage offset", &t->u.t.offset) < 0) return NULL;
	int64_t last = 0, numel = 1;
	for (int d = 0; d < t->u.t.ndim; d++) {
		if (get_nat(u, a[2]->u.a.v[d], "a tensor size", &t->u.t.size[d]) < 0 ||
		    get_nat(u, a[3]->u.a.v[d], "a tensor stride", &t->u.t.stride[d]) < 0)
			return NULL;
	}
	if (sd_shape_numel(t->u.t.ndim, t->u.t.size, &numel) < 0) {
		uerr(u, "tensor shape overflows");
		return NULL;
	}
	if (numel > 0) {
		/* the last element's index: offset + sum (size - 1) * stride, each step overflow-checked */
		last = t->u.t.offset;
		for (int d = 0; d < t->u.t.ndim; d++) {
			int64_t step;
			if (__builtin_mul_overflow(t->u.t.size[d] - 1, t->u.t.stride[d], &step) ||
			    __builtin_add_overflow(last, step, &last)) {
				uerr(u, "tensor extent overflows");
				return NULL;
			}
		}
		if (last == INT64_MAX) {
			uerr(u, "tensor extent overflows");
			return NULL;
		}
		t->u.t.need = last + 1;
	}
	return t;
}

/* REDUCE: call an allowlisted global, interpreted here (nothing is looked up or run). */
static int op_reduce(struct up *u)
{
	struct pv *args = pop(u), *f = args ? pop(u) : NULL, *r = NULL;
	if (!f) return -1;
	if (f->kind != P_GLOBAL)
		return uerr(u, "REDUCE on a %s is not allowed (only on allowlisted callables)", kind_names[f->kind]);
	if (args->kind != P_TUPLE)
		return uerr(u, "REDUCE arguments are a %s, not a tuple", kind_names[args->kind]);
	switch (globals[f->u.g].kind) {
	case G_ORDERED_DICT:
		if (args->u.a.n != 0) return uerr(u, "OrderedDict with arguments is not supported");
		r = newv(u, P_DICT);
		break;
	case G_REBUILD_TENSOR_V2:
	case G_REBUILD_TENSOR:
		r = rebuild_tensor(u, args, globals[f->u.g].kind == G_REBUILD_TENSOR_V2);
		break;
	case G_REBUILD_PARAMETER: /* (data, requires_grad, backward_hooks) -> data */
		if (args->u.a.n != 3 || args->u.a.v[0]->kind != P_TENSOR)
			return uerr(u, "_rebuild_parameter takes (tensor, requires_grad, backward_hooks)");
		r = args->u.a.v[0];
		break;
	case G_STORAGE:
		return uerr(u, "calling torch.%s is not allowed", globals[f->u.g].name);
	}
	return push(u, r);
}

/* BINPERSID: torch's persistent_load, ('storage', torch.<Type>Storage, key, location, numel). */
static int op_persid(struct up *u)
{
	struct pv *pid = pop(u);
	if (!pid) return -1;
	struct pv *const *a = pid->u.a.v;
	if (pid->kind != P_TUPLE || pid->u.a.n != 5 || !is_str(a[0], "storage") || a[1]->kind != P_GLOBAL ||
	    globals[a[1]->u.g].kind != G_STORAGE || a[2]->kind != P_STR || a[3]->kind != P_STR ||
	    a[4]->kind != P_INT)
		return uerr(u, "unsupported persistent id (want ('storage', torch.<Type>Storage, key, location, "
		            "numel))");
	if (a[2]->u.s.n == 0 || a[2]->u.s.n > 255 || memchr(a[2]->u.s.p, '/', a[2]->u.s.n) ||
	    memchr(a[2]->u.s.p, 0, a[2]->u.s.n)) {
		char k[64];
		return uerr(u, "bad storage key '%s'", shown(a[2]->u.s.p, a[2]->u.s.n, k, sizeof k));
	}
	if (a[4]->u.i < 0) return uerr(u, "negative storage size %lld", (long long)a[4]->u.i);
	struct pv *s = newv(u, P_STORAGE);
	if (!s) return -1;
	s->u.st.key = a[2]->u.s.p;
	s->u.st.keyn = a[2]->u.s.n;
	s->u.st.g = a[1]->u.g;
	s->u.st.numel = a[4]->u.i;
	return push(u, s);
}

/* TUPLE from the items above the innermost MARK (from..sp). */
static int make_tuple(struct up *u, size_t from, size_t to)
{
	struct pv *t = newv(u, P_TUPLE);
	if (!t) return -1;
	for (size_t i = from; i < to; i++)
		if (add(u, t, u->stack[i]) < 0) return -1;
	u->sp = from;
	return push(u, t);
}

/*
 * Run the pickle start[0..n) and return the value STOP leaves (owned by u: freed by up_free), or NULL
 * with a message naming the byte offset and the opcode.
 */
static struct pv *unpickle(struct up *u, const unsigned char *start, size_t n)
{
	u->start = u->p = start;
	u->end = start + n;
	u->memomax = n < 256 ? 256 : n < MAX_MEMO ? n : MAX_MEMO; /* BINPUT can always say 0..255 */
	for (;;) {
		u->at = (size_t)(u->p - u->start);
		u->op = 0;
		if (u->p == u->end) {
			sd_seterr("%s: data.pkl, byte %zu: the pickle is truncated (no STOP)", u->path, u->at);
			return NULL;
		}
		int op = u->op = *u->p++;
		const unsigned char *q;
		struct pv *v, *w, *c;
		size_t from = 0;
		int rc = 0;
		switch (op) {
		case 0x80: /* PROTO */
			if (!(q = take(u, 1))) return NULL;
			if (*q < 2 || *q > 5) {
				uerr(u, "pickle protocol %d is not supported (2 to 5)", *q);
				return NULL;
			}
			break;
		case 0x95: /* FRAME: a length prefix; the opcodes inside are read as usual */
			if (!(q = take(u, 8))) return NULL;
			if (le(q, 8) > (uint64_t)(u->end - u->p)) {
				uerr(u, "frame of %llu bytes is longer than the rest of the pickle",
				     (unsigned long long)le(q, 8));
				return NULL;
			}
			break;
		case '}': rc = push(u, newv(u, P_DICT)); break;
		case ']': rc = push(u, newv(u, P_LIST)); break;
		case ')': rc = push(u, newv(u, P_TUPLE)); break;
		case '(':
			if (u->nmarks == MAX_MARKS) {
				uerr(u, "nesting deeper than %d MARKs", MAX_MARKS);
				return NULL;
			}
			u->marks[u->nmarks++] = u->sp;
			break;
		case 'X': rc = (q = take(u, 4)) ? push(u, new_str(u, le(q, 4))) : -1; break;
		case 0x8c: rc = (q = take(u, 1)) ? push(u, new_str(u, *q)) : -1; break;
		case 0x8d: rc = (q = take(u, 8)) ? push(u, new_str(u, le(q, 8))) : -1; break;
		case 'q': rc = (q = take(u, 1)) ? memo_put(u, *q) : -1; break;
		case 'r': rc = (q = take(u, 4)) ? memo_put(u, le(q, 4)) : -1; break;
		case 0x94: rc = memo_put(u, u->memoset); break;
		case 'h': rc = (q = take(u, 1)) ? memo_get(u, *q) : -1; break;
		case 'j': rc = (q = take(u, 4)) ? memo_get(u, le(q, 4)) : -1; break;
		case 'J': rc = (q = take(u, 4)) ? push(u, new_int(u, P_INT, (int32_t)(uint32_t)le(q, 4))) : -1; break;
		case 'K': rc = (q = take(u, 1)) ? push(u, new_int(u, P_INT, *q)) : -1; break;
		case 'M': rc = (q = take(u, 2)) ? push(u, new_int(u, P_INT, (int64_t)le(q, 2))) : -1; break;
		case 0x8a: /* LONG1: n bytes of little-endian two's complement */
			if (!(q = take(u, 1))) return NULL;
			if (*q > 8) {
				uerr(u, "integer of %d bytes does not fit in 64 bits", *q);
				return NULL;
			}
			{
				int nb = *q;
				if (!(q = take(u, nb))) return NULL;
				uint64_t x = le(q, nb);
				if (nb > 0 && nb < 8 && (q[nb - 1] & 0x80)) x |= ~(uint64_t)0 << (8 * nb);
				rc = push(u, new_int(u, P_INT, (int64_t)x));
			}
			break;
		case 'G': /* BINFLOAT: big-endian IEEE double */
			if (!(q = take(u, 8))) return NULL;
			if ((v = newv(u, P_FLOAT))) {
				uint64_t x = 0;
				for (int i = 0; i < 8; i++) x = x << 8 | q[i];
				memcpy(&v->u.f, &x, sizeof x);
			}
			rc = push(u, v);
			break;
		case 0x88: rc = push(u, new_int(u, P_BOOL, 1)); break;
		case 0x89: rc = push(u, new_int(u, P_BOOL, 0)); break;
		case 'N': rc = push(u, newv(u, P_NONE)); break;
		case 't': rc = popmark(u, &from) < 0 ? -1 : make_tuple(u, from, u->sp); break;
		case 0x85: case 0x86: case 0x87: /* TUPLE1..3 */
			if (u->sp < floor_of(u) + (size_t)(op - 0x84)) {
				uerr(u, "stack underflow");
				return NULL;
			}
			rc = make_tuple(u, u->sp - (size_t)(op - 0x84), u->sp);
			break;
		case 's': /* SETITEM */
			if (!(w = pop(u)) || !(v = pop(u)) || !(c = top(u))) return NULL;
			if (c->kind != P_DICT) {
				uerr(u, "SETITEM on a %s, not a dict", kind_names[c->kind]);
				return NULL;
			}
			rc = add(u, c, v) < 0 ? -1 : add(u, c, w);
			break;
		case 'u': /* SETITEMS */
			if (popmark(u, &from) < 0) return NULL;
			if ((u->sp - from) % 2) {
				uerr(u, "odd number of items (%zu)", u->sp - from);
				return NULL;
			}
			if (!(c = below(u, from))) return NULL;
			if (c->kind != P_DICT) {
				uerr(u, "SETITEMS on a %s, not a dict", kind_names[c->kind]);
				return NULL;
			}
			for (size_t i = from; i < u->sp && rc == 0; i++) rc = add(u, c, u->stack[i]);
			u->sp = from;
			break;
		case 'a': /* APPEND */
			if (!(v = pop(u)) || !(c = top(u))) return NULL;
			if (c->kind != P_LIST) {
				uerr(u, "APPEND on a %s, not a list", kind_names[c->kind]);
				return NULL;
			}
			rc = add(u, c, v);
			break;
		case 'e': /* APPENDS */
			if (popmark(u, &from) < 0 || !(c = below(u, from))) return NULL;
			if (c->kind != P_LIST) {
				uerr(u, "APPENDS on a %s, not a list", kind_names[c->kind]);
				return NULL;
			}
			for (size_t i = from; i < u->sp && rc == 0; i++) rc = add(u, c, u->stack[i]);
			u->sp = from;
			break;
		case 'c': rc = op_global(u); break;
		case 0x93: /* STACK_GLOBAL: module, name on the stack */
			if (!(w = pop(u)) || !(v = pop(u))) return NULL;
			if (v->kind != P_STR || w->kind != P_STR) {
				uerr(u, "STACK_GLOBAL needs two strings (got %s, %s)", kind_names[v->kind],
				     kind_names[w->kind]);
				return NULL;
			}
			rc = push_global(u, v->u.s.p, v->u.s.n, w->u.s.p, w->u.s.n);
			break;
		case 'R': rc = op_reduce(u); break;
		case 'b':
			/* BUILD: only on a dict, whose state is None, () or a dict of attributes, which is ignored:
			 * Module.state_dict() returns an OrderedDict with a `_metadata` attribute (versions), which
			 * pickles as BUILD {'_metadata': {...}}; in Python that only sets an attribute. */
			if (!(w = pop(u)) || !(c = top(u))) return NULL;
			if (c->kind != P_DICT) {
				uerr(u, "BUILD on a %s is not allowed (only on a dict)", kind_names[c->kind]);
				return NULL;
			}
			if (w->kind != P_NONE && w->kind != P_DICT && !(w->kind == P_TUPLE && w->u.a.n == 0)) {
				uerr(u, "BUILD with a %s state is not allowed (only None or a dict)", kind_names[w->kind]);
				return NULL;
			}
			break;
		case 'Q': rc = op_persid(u); break;
		case '.': /* STOP */
			if (u->nmarks) {
				uerr(u, "STOP inside an open MARK");
				return NULL;
			}
			if (u->sp != 1) {
				uerr(u, "STOP with %zu values on the stack (want 1)", u->sp);
				return NULL;
			}
			return u->stack[0];
		default:
			if (op_names[op])
				uerr(u, "opcode %s (0x%02x) is not allowed in a checkpoint", op_names[op], op);
			else
				uerr(u, "unknown opcode 0x%02x", op);
			return NULL;
		}
		if (rc < 0) return NULL;
	}
}

/* ==== the checkpoint ==== */

struct entry {
	char *name;
	sd_tensor *t;
	struct pv *view;   /* while loading */
};

struct sd_ckpt {
	char *path;
	int n;
	struct entry *e;
	int *byname;       /* indices of e sorted by name */
};

/* One storage file and the tensors that view it (ord[first..first+count) index c->e). */
struct group {
	const char *key;
	size_t keyn;
	int g;
	int64_t numel;
	int first, count;
	int found;
};

/* A storage entry met before data.pkl, kept until the pickle says what it is. */
struct pending {
	char *key;
	unsigned char *data;
	size_t n;
};

struct loader {
	sd_ckpt *c;
	const char *path;
	struct archive *a;
	char *prefix;
	size_t prefixn;
	uint64_t total;     /* bytes read from all entries */
	unsigned char *pkl;
	size_t npkl;
	int have_pkl;
	struct up u;
	int *ord;
	struct group *groups;
	int ngroups;
	struct pending *pend;
	int npend;
	uint64_t max_out;   /* bytes of tensors the file may make (OUT_FACTOR, OUT_SLACK) */
};

static int cmp_name(const void *a, const void *b, void *arg)
{
	const struct entry *e = arg;
	return strcmp(e[*(const int *)a].name, e[*(const int *)b].name);
}

static int cmp_key(const struct pv *a, const struct pv *b)
{
	size_t n = a->u.st.keyn < b->u.st.keyn ? a->u.st.keyn : b->u.st.keyn;
	int r = memcmp(a->u.st.key, b->u.st.key, n);
	return r ? r : (a->u.st.keyn > b->u.st.keyn) - (a->u.st.keyn < b->u.st.keyn);
}

/* Order entries by their storage's key, then by position (so that the sort is deterministic). */
static int cmp_storage(const void *a, const void *b, void *arg)
{
	const struct entry *e = arg;
	int i = *(const int *)a, j = *(const int *)b;
	int r = cmp_key(e[i].view->u.t.st, e[j].view->u.t.st);
	return r ? r : (i > j) - (i < j);
}

/*
 * From the unpickled root, list the tensors of the state dict (c->e, in insertion order), check each
 * view's extent against its storage's size and group the tensors by storage (L->groups).  -1 with a
 * message naming the tensor when something does not fit.
 */
static int plan(struct loader *L, struct pv *root)
{
	sd_ckpt *c = L->c;
	if (root->kind != P_DICT)
		return sd_seterr("%s: the pickle holds a %s, not a dict (a state dict)", L->path,
		                 kind_names[root->kind]);
	for (size_t i = 0; i + 1 < root->u.a.n; i += 2)
		if (is_str(root->u.a.v[i], "state_dict") && root->u.a.v[i + 1]->kind == P_DICT) {
			root = root->u.a.v[i + 1];
			break;
		}
	size_t n = 0;
	for (size_t i = 0; i + 1 < root->u.a.n; i += 2)
		n += root->u.a.v[i]->kind == P_STR && root->u.a.v[i + 1]->kind == P_TENSOR;
	if (n > INT32_MAX / 2) return sd_seterr("%s: too many tensors", L->path);
	uint64_t out = 0;
	c->e = calloc(n ? n : 1, sizeof *c->e);
	c->byname = calloc(n ? n : 1, sizeof *c->byname);
	L->ord = calloc(n ? n : 1, sizeof *L->ord);
	L->groups = calloc(n ? n : 1, sizeof *L->groups);
	if (!c->e || !c->byname || !L->ord || !L->groups) return sd_seterr("%s: out of memory", L->path);
	for (size_t i = 0; i + 1 < root->u.a.n; i += 2) {
		struct pv *k = root->u.a.v[i], *v = root->u.a.v[i + 1];
		if (k->kind != P_STR || v->kind != P_TENSOR) continue;
		char shown_key[128];
		if (memchr(k->u.s.p, 0, k->u.s.n))
			return sd_seterr("%s: tensor name '%s' holds a NUL byte", L->path,
			                 shown(k->u.s.p, k->u.s.n, shown_key, sizeof shown_key));
		struct entry *e = &c->e[c->n];
		if (!(e->name = strndup(k->u.s.p, k->u.s.n))) return sd_seterr("%s: out of memory", L->path);
		e->view = v;
		c->byname[c->n] = c->n;
		L->ord[c->n] = c->n;
		c->n++;
		const struct pv *st = v->u.t.st;
		if (v->u.t.need > st->u.st.numel)
			return sd_seterr("%s: storage '%s' has %lld elements but tensor '%s' needs %lld", L->path,
			                 shown(st->u.st.key, st->u.st.keyn, shown_key, sizeof shown_key),
			                 (long long)st->u.st.numel, e->name, (long long)v->u.t.need);
	}
	qsort_r(c->byname, c->n, sizeof *c->byname, cmp_name, c->e);
	for (int i = 1; i < c->n; i++)
		if (strcmp(c->e[c->byname[i - 1]].name, c->e[c->byname[i]].name) == 0)
			return sd_seterr("%s: duplicate tensor name '%s'", L->path, c->e[c->byname[i]].name);

	qsort_r(L->ord, c->n, sizeof *L->ord, cmp_storage, c->e);
	for (int i = 0; i < c->n; i++) {
		const struct pv *st = c->e[L->ord[i]].view->u.t.st;
		struct group *gr = L->ngroups ? &L->groups[L->ngroups - 1] : NULL;
		if (gr && gr->keyn == st->u.st.keyn && memcmp(gr->key, st->u.st.key, gr->keyn) == 0) {
			if (gr->g != st->u.st.g || gr->numel != st->u.st.numel) {
				char k[64];
				return sd_seterr("%s: storage '%s' is used as %s of %lld and %s of %lld elements",
				                 L->path, shown(gr->key, gr->keyn, k, sizeof k), globals[gr->g].name,
				                 (long long)gr->numel, globals[st->u.st.g].name, (long long)st->u.st.numel);
			}
			gr->count++;
			continue;
		}
		uint64_t bytes = (uint64_t)st->u.st.numel * (uint64_t)globals[st->u.st.g].esize;
		if ((uint64_t)st->u.st.numel > MAX_STORAGE || bytes > MAX_STORAGE) {
			char k[64];
			return sd_seterr("%s: storage '%s' has %lld elements, more than the %llu GiB limit of one "
			                 "storage", L->path, shown(st->u.st.key, st->u.st.keyn, k, sizeof k),
			                 (long long)st->u.st.numel, (unsigned long long)(MAX_STORAGE >> 30));
		}
		gr = &L->groups[L->ngroups++];
		*gr = (struct group){ st->u.st.key, st->u.st.keyn, st->u.st.g, st->u.st.numel, i, 1, 0 };
	}
	/* Every storage fits its limit; now the bytes the views make together (see OUT_FACTOR).  numel * 8
	 * fits in int64 (sd_shape_numel), and out <= max_out < 2^62 before each add. */
	for (int i = 0; i < c->n; i++) {
		const struct pv *v = c->e[i].view;
		int64_t numel;
		sd_shape_numel(v->u.t.ndim, v->u.t.size, &numel);
		out += (uint64_t)numel * sd_dtype_size(globals[v->u.t.st->u.st.g].dtype);
		if (out > L->max_out)
			return sd_seterr("%s: the tensors up to '%s' need %llu bytes, more than %d times the file's "
			                 "size (views that repeat a storage's elements?)", L->path, c->e[i].name,
			                 (unsigned long long)out, OUT_FACTOR);
	}
	return 0;
}

/* The group of storage key (k, n), or NULL (groups are sorted by key). */
static struct group *find_group(struct loader *L, const char *k, size_t n)
{
	int lo = 0, hi = L->ngroups;
	while (lo < hi) {
		int mid = (lo + hi) / 2;
		struct group *g = &L->groups[mid];
		size_t m = g->keyn < n ? g->keyn : n;
		int r = memcmp(g->key, k, m);
		if (!r) r = (g->keyn > n) - (g->keyn < n);
		if (!r) return g;
		if (r < 0) lo = mid + 1;
		else hi = mid;
	}
	return NULL;
}

/* Copy n elements of esize bytes, src stride `stride` elements, into dst (contiguous, of dsize bytes
 * each); a narrower signed source (int8, int16) is sign-extended to int32. */
static void copy_row(unsigned char *dst, size_t dsize, const unsigned char *src, int esize, int64_t stride,
                     int64_t n)
{
	if ((size_t)esize == dsize && stride == 1) {
		memcpy(dst, src, (size_t)n * dsize);
		return;
	}
	for (int64_t i = 0; i < n; i++, dst += dsize, src += stride * esize) {
		if ((size_t)esize == dsize) {
			memcpy(dst, src, dsize);
		} else {
			int32_t x = esize == 1 ? (int8_t)src[0] : (int16_t)(uint16_t)(src[0] | src[1] << 8);
			memcpy(dst, &x, sizeof x);
		}
	}
}

/* Copy the view of entry e out of its storage's bytes (already checked to be large enough) into a new
 * tensor e->t. */
static int fill(struct loader *L, struct entry *e, const unsigned char *base)
{
	const struct pv *v = e->view;
	int g = v->u.t.st->u.st.g, esize = globals[g].esize;
	e->t = sd_tensor_new(globals[g].dtype, v->u.t.ndim, v->u.t.size);
	if (!e->t) return sd_preerr("%s: tensor '%s'", L->path, e->name);
	int64_t numel = sd_tensor_numel(e->t);
	if (numel == 0) return 0;
	int nd = v->u.t.ndim;
	size_t dsize = sd_dtype_size(e->t->dtype);
	int64_t inner = nd ? v->u.t.size[nd - 1] : 1, istride = nd ? v->u.t.stride[nd - 1] : 1;
	int64_t idx[SD_MAX_DIMS] = { 0 }, pos = v->u.t.offset;
	unsigned char *dst = e->t->data;
	for (int64_t o = 0; o < numel / inner; o++, dst += (size_t)inner * dsize) {
		copy_row(dst, dsize, base + (size_t)pos * esize, esize, istride, inner);
		for (int d = nd - 2; d >= 0; d--) { /* next index of the outer dimensions, like an odometer */
			pos += v->u.t.stride[d];
			if (++idx[d] < v->u.t.size[d]) break;
			pos -= v->u.t.stride[d] * v->u.t.size[d];
			idx[d] = 0;
		}
	}
	return 0;
}

static int fill_group(struct loader *L, struct group *gr, const unsigned char *data)
{
	for (int i = 0; i < gr->count; i++)
		if (fill(L, &L->c->e[L->ord[gr->first + i]], data) < 0) return -1;
	gr->found = 1;
	return 0;
}

/*
 * Read the current entry's data, counting the bytes as they come: into *buf (malloc'd, the caller
 * frees) with *n set.  With want != (uint64_t)-1 the entry must hold exactly want bytes (into dst
 * when dst is not NULL, else a new buffer); otherwise at most cap bytes, in a buffer that grows as data
 * arrives.  Every byte counts against MAX_TOTAL.  -1 with a message naming `what`.
 */
static int read_entry(struct loader *L, const char *what, uint64_t want, uint64_t cap, void *dst,
                      unsigned char **buf, size_t *n)
{
	uint64_t left = MAX_TOTAL - L->total;
	int exact = want != (uint64_t)-1;
	uint64_t lim = exact ? want : cap;
	size_t have = 0, size = 0;
	unsigned char *b = NULL;
	*buf = NULL;
	*n = 0;
	if (exact) {
		if (want > left) goto total;
		b = dst ? dst : malloc(want ? want : 1);
		size = want;
		if (!b) return sd_seterr("%s: %s: out of memory (%llu bytes)", L->path, what,
		                         (unsigned long long)want);
	}
	for (;;) {
		if (have == size) {
			if (exact || have >= lim) { /* full: the entry must end here */
				char c;
				la_ssize_t r = archive_read_data(L->a, &c, 1);
				if (r < 0) goto readerr;
				if (r == 0) break;
				if (exact) {
					sd_seterr("%s: %s holds more than the %llu bytes it should", L->path, what,
					          (unsigned long long)want);
				} else {
					sd_seterr("%s: %s is larger than the %llu MiB limit", L->path, what,
					          (unsigned long long)(cap >> 20));
				}
				goto fail;
			}
			size_t ns = size ? 2 * size : 65536;
			if (ns > lim) ns = (size_t)lim;
			unsigned char *nb = realloc(b, ns);
			if (!nb) {
				sd_seterr("%s: %s: out of memory (%zu bytes)", L->path, what, ns);
				goto fail;
			}
			b = nb;
			size = ns;
		}
		la_ssize_t r = archive_read_data(L->a, b + have, size - have);
		if (r < 0) goto readerr;
		if (r == 0) break;
		have += (size_t)r;
		if (have > left) goto total;
	}
	L->total += have;
	if (exact && have != want) {
		sd_seterr("%s: %s holds %zu bytes, but %llu are needed", L->path, what, have,
		          (unsigned long long)want);
		goto fail;
	}
	*buf = b;
	*n = have;
	return 0;
total:
	sd_seterr("%s: the archive holds more than %llu GiB of data (the limit)", L->path,
	          (unsigned long long)(MAX_TOTAL >> 30));
	goto fail;
readerr:
	sd_seterr("%s: %s: cannot read: %s", L->path, what, archive_error_string(L->a));
fail:
	if (b != dst) free(b);
	return -1;
}

/* A storage entry <prefix>/data/<key>: fill the tensors that view it, keep it for later when data.pkl
 * has not been read yet, or skip it when no tensor of the state dict needs it. */
static int storage_entry(struct loader *L, const char *key, const char *name)
{
	char what[512];
	snprintf(what, sizeof what, "storage '%s'", name);
	if (!L->have_pkl) {
		unsigned char *b;
		size_t n;
		struct pending *p = realloc(L->pend, (L->npend + 1) * sizeof *p);
		if (!p) return sd_seterr("%s: out of memory", L->path);
		L->pend = p;
		if (read_entry(L, what, (uint64_t)-1, MAX_STORAGE, NULL, &b, &n) < 0) return -1;
		if (!(p[L->npend].key = strdup(key))) {
			free(b);
			return sd_seterr("%s: out of memory", L->path);
		}
		p[L->npend].data = b;
		p[L->npend++].n = n;
		return 0;
	}
	struct group *gr = find_group(L, key, strlen(key));
	if (!gr) return archive_read_data_skip(L->a) == ARCHIVE_OK ? 0 :
	                sd_seterr("%s: %s: cannot read: %s", L->path, what, archive_error_string(L->a));
	if (gr->found) return sd_seterr("%s: duplicate entry '%s'", L->path, name);
	uint64_t want = (uint64_t)gr->numel * globals[gr->g].esize;
	/* one tensor that is the whole storage, contiguous and not widened: read straight into it */
	struct entry *e = &L->c->e[L->ord[gr->first]];
	const struct pv *v = e->view;
	int whole = gr->count == 1 && v->u.t.offset == 0 && v->u.t.need == gr->numel &&
	            sd_dtype_size(globals[gr->g].dtype) == (size_t)globals[gr->g].esize;
	int64_t s = 1;
	for (int d = v->u.t.ndim - 1; whole && d >= 0; d--) {
		if (v->u.t.size[d] != 1 && v->u.t.stride[d] != s) whole = 0;
		s *= v->u.t.size[d];
	}
	unsigned char *b;
	size_t n;
	if (whole) {
		if (!(e->t = sd_tensor_new(globals[gr->g].dtype, v->u.t.ndim, v->u.t.size)))
			return sd_preerr("%s: tensor '%s'", L->path, e->name);
		if (read_entry(L, what, want, 0, e->t->data, &b, &n) < 0) return -1;
		gr->found = 1;
		return 0;
	}
	if (read_entry(L, what, want, 0, NULL, &b, &n) < 0) return -1;
	int rc = fill_group(L, gr, b);
	free(b);
	return rc;
}

/* After data.pkl: use the storages that came before it, free them all. */
static int drain_pending(struct loader *L)
{
	int rc = 0;
	for (int i = 0; i < L->npend; i++) {
		struct pending *p = &L->pend[i];
		struct group *gr = rc < 0 ? NULL : find_group(L, p->key, strlen(p->key));
		if (gr) {
			uint64_t want = (uint64_t)gr->numel * globals[gr->g].esize;
			if (gr->found)
				rc = sd_seterr("%s: duplicate entry '%s/data/%s'", L->path, L->prefix, p->key);
			else if (p->n != want)
				rc = sd_seterr("%s: storage '%s/data/%s' holds %zu bytes, but %llu are needed", L->path,
				               L->prefix, p->key, p->n, (unsigned long long)want);
			else
				rc = fill_group(L, gr, p->data);
		}
		free(p->key);
		free(p->data);
	}
	free(L->pend);
	L->pend = NULL;
	L->npend = 0;
	return rc;
}

/* <prefix>/data.pkl: read it, unpickle it, list the tensors. */
static int pickle_entry(struct loader *L, const char *name)
{
	if (L->have_pkl) return sd_seterr("%s: duplicate entry '%s'", L->path, name);
	L->have_pkl = 1;
	if (read_entry(L, name, (uint64_t)-1, MAX_PICKLE, NULL, &L->pkl, &L->npkl) < 0) return -1;
	L->u.path = L->path;
	struct pv *root = unpickle(&L->u, L->pkl, L->npkl);
	if (!root || plan(L, root) < 0) return -1;
	return drain_pending(L);
}

/* <prefix>/byteorder: storages are read as little-endian, so only "little" is accepted. */
static int byteorder_entry(struct loader *L, const char *name)
{
	unsigned char *b;
	size_t n;
	if (read_entry(L, name, (uint64_t)-1, MAX_SMALL, NULL, &b, &n) < 0) return -1;
	int ok = (n == 6 && memcmp(b, "little", 6) == 0) || (n == 7 && memcmp(b, "little\n", 7) == 0);
	char s[32];
	if (!ok) sd_seterr("%s: byte order is '%s'; only little-endian checkpoints are supported", L->path,
	                   shown((const char *)b, n, s, sizeof s));
	free(b);
	return ok ? 0 : -1;
}

/*
 * Check an entry's name: not empty, not absolute, no "..", no backslash; the first one sets the
 * archive's folder (<prefix>/, as torch's reader takes it from the first entry) and every other one must
 * be inside it.  Returns the part after "<prefix>/", or NULL with a message.
 */
static const char *entry_rest(struct loader *L, const char *name)
{
	char s[256];
	if (!name || !*name) {
		sd_seterr("%s: an entry without a name", L->path);
		return NULL;
	}
	if (name[0] == '/' || strstr(name, "..") || strchr(name, '\\')) {
		sd_seterr("%s: refusing entry '%s' (an absolute name, '..' or '\\')", L->path,
		          shown(name, strlen(name), s, sizeof s));
		return NULL;
	}
	if (!L->prefix) {
		const char *slash = strchr(name, '/');
		if (!slash || slash == name) {
			sd_seterr("%s: entry '%s' is not inside a folder (not a torch.save archive?)", L->path,
			          shown(name, strlen(name), s, sizeof s));
			return NULL;
		}
		L->prefixn = (size_t)(slash - name);
		if (!(L->prefix = strndup(name, L->prefixn))) {
			sd_seterr("%s: out of memory", L->path);
			return NULL;
		}
	}
	if (strncmp(name, L->prefix, L->prefixn) != 0 || name[L->prefixn] != '/') {
		char p[128];
		sd_seterr("%s: entry '%s' is outside the archive's folder '%s/'", L->path,
		          shown(name, strlen(name), s, sizeof s), shown(L->prefix, L->prefixn, p, sizeof p));
		return NULL;
	}
	return name + L->prefixn + 1;
}

/* Before libarchive: a clear message for a folder, an empty file, and the pre-1.6 torch.save format
 * (a bare pickle stream, not a zip). */
static int precheck(const char *path)
{
	struct stat st;
	if (stat(path, &st) < 0) return sd_seterr("%s: cannot open: %s", path, strerror(errno));
	if (S_ISDIR(st.st_mode)) return sd_seterr("%s: is a folder, not a .ckpt file", path);
	if (S_ISREG(st.st_mode) && st.st_size == 0)
		return sd_seterr("%s: empty file (0 bytes), not a .ckpt (torch.save zip) file", path);
	FILE *f = fopen(path, "rb");
	if (!f) return sd_seterr("%s: cannot open: %s", path, strerror(errno));
	unsigned char m[2] = { 0, 0 };
	size_t n = fread(m, 1, 2, f);
	fclose(f);
	if (n == 2 && m[0] == 0x80 && m[1] >= 2 && m[1] <= 5)
		return sd_seterr("%s: a legacy (PyTorch < 1.6) torch.save file, not a zip; not supported (re-save "
		                 "it with a newer torch, or convert it to safetensors)", path);
	return 0;
}

/* Read every entry of the archive (see the top of this file). */
static int load(struct loader *L)
{
	struct archive_entry *ae;
	long count = 0;
	if (precheck(L->path) < 0) return -1;
	struct stat st;
	L->max_out = OUT_SLACK + (stat(L->path, &st) == 0 && st.st_size > 0 ? OUT_FACTOR * (uint64_t)st.st_size : 0);
	if (!(L->a = archive_read_new())) return sd_seterr("%s: out of memory", L->path);
	archive_read_support_format_zip(L->a);
	if (archive_read_open_filename(L->a, L->path, 1 << 16) != ARCHIVE_OK)
		return sd_seterr("%s: not a zip archive (a torch.save .ckpt): %s", L->path,
		                 archive_error_string(L->a));
	for (;;) {
		int r = archive_read_next_header(L->a, &ae);
		if (r == ARCHIVE_EOF) break;
		if (r != ARCHIVE_OK && r != ARCHIVE_WARN)
			return sd_seterr("%s: %s archive: %s", L->path, count ? "bad" : "not a zip (torch.save)",
			                 archive_error_string(L->a));
		if (++count > MAX_ENTRIES)
			return sd_seterr("%s: more than %d entries in the archive", L->path, MAX_ENTRIES);
		const char *name = archive_entry_pathname(ae);
		const char *rest = entry_rest(L, name);
		if (!rest) return -1;
		if (archive_entry_filetype(ae) == AE_IFDIR) continue;
		if (archive_entry_filetype(ae) != AE_IFREG)
			return sd_seterr("%s: entry '%s' is not a regular file", L->path, name);
		int rc = 0;
		if (strcmp(rest, "data.pkl") == 0)
			rc = pickle_entry(L, name);
		else if (strcmp(rest, "byteorder") == 0)
			rc = byteorder_entry(L, name);
		else if (strncmp(rest, "data/", 5) == 0 && rest[5])
			rc = storage_entry(L, rest + 5, name);
		else if (archive_read_data_skip(L->a) != ARCHIVE_OK) /* version, .data/…: not needed */
			rc = sd_seterr("%s: %s: cannot read: %s", L->path, name, archive_error_string(L->a));
		if (rc < 0) return -1;
	}
	if (!count) return sd_seterr("%s: an empty zip archive, not a torch.save checkpoint", L->path);
	if (!L->have_pkl)
		return sd_seterr("%s: no %s/data.pkl in the archive (not a torch.save checkpoint?)", L->path,
		                 L->prefix);
	for (int i = 0; i < L->ngroups; i++)
		if (!L->groups[i].found) {
			struct group *gr = &L->groups[i];
			char k[64];
			return sd_seterr("%s: storage '%s' (%s/data/%s) of tensor '%s' is missing from the archive",
			                 L->path, shown(gr->key, gr->keyn, k, sizeof k), L->prefix, k,
			                 L->c->e[L->ord[gr->first]].name);
		}
	return 0;
}

/*
 * Open a torch.save checkpoint: read the whole archive and copy every tensor of its state dict out (see
 * the top of this file).  The caller owns the result (sd_ckpt_close).  NULL with a message naming the
 * file, and the entry, opcode or tensor at fault.
 */
sd_ckpt *sd_ckpt_open(const char *path)
{
	if (!path) {
		sd_seterr("ckpt: no file name given");
		return NULL;
	}
	sd_ckpt *c = calloc(1, sizeof *c);
	if (!c || !(c->path = strdup(path))) {
		free(c);
		sd_seterr("%s: out of memory", path);
		return NULL;
	}
	struct loader L = { .c = c, .path = c->path };
	int rc = load(&L);
	if (L.a) archive_read_free(L.a);
	for (int i = 0; i < L.npend; i++) {
		free(L.pend[i].key);
		free(L.pend[i].data);
	}
	free(L.pend);
	up_free(&L.u);
	free(L.pkl);
	free(L.prefix);
	free(L.ord);
	free(L.groups);
	for (int i = 0; i < c->n; i++) c->e[i].view = NULL;
	if (rc < 0) {
		sd_ckpt_close(c);
		return NULL;
	}
	return c;
}

int sd_ckpt_count(const sd_ckpt *c)
{
	return c ? c->n : 0;
}

const char *sd_ckpt_name(const sd_ckpt *c, int i)
{
	return c && i >= 0 && i < c->n ? c->e[i].name : NULL;
}

/* Index of name (binary search over the sorted names), or -1. */
int sd_ckpt_find(const sd_ckpt *c, const char *name)
{
	if (!c || !name) return -1;
	int lo = 0, hi = c->n;
	while (lo < hi) {
		int mid = (lo + hi) / 2, r = strcmp(c->e[c->byname[mid]].name, name);
		if (!r) return c->byname[mid];
		if (r < 0) lo = mid + 1;
		else hi = mid;
	}
	return -1;
}

const sd_tensor *sd_ckpt_tensor(const sd_ckpt *c, int i)
{
	return c && i >= 0 && i < c->n ? c->e[i].t : NULL;
}

void sd_ckpt_close(sd_ckpt *c)
{
	if (!c) return;
	for (int i = 0; i < c->n; i++) {
		free(c->e[i].name);
		sd_tensor_free(c->e[i].t);
	}
	free(c->e);
	free(c->byname);
	free(c->path);
	free(c);
}
