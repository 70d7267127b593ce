/*
 * sd.h - the public interface of libsd, the core library of sdpipe.
 *
 * Conventions (after stb and libarchive): the library never prints and never exits.  A function that can
 * fail returns 0 on success and -1 on failure (or NULL for constructors) and leaves a one-line message for
 * sd_errmsg().  The caller owns what a *_new / *_open returns and releases it with the matching *_free /
 * *_close; every *_free(NULL) is a no-op.  Shapes are in PyTorch order (row-major, NCHW for images).
 */
#ifndef SD_H
#define SD_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define SD_VERSION "0.1.0"

/* ==== errors ==== */

/* The last error message of the calling thread ("" when none). */
const char *sd_errmsg(void);
/* Set the calling thread's error message (printf-style); always returns -1 so that callers can write
 * `return sd_seterr("…")`. */
int sd_seterr(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Prefix the current message with "<prefix>: " (used to add context while an error travels up). */
int sd_preerr(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* ==== dtypes ==== */

enum sd_dtype {
	SD_DTYPE_F32 = 0,
	SD_DTYPE_F16,
	SD_DTYPE_BF16,
	SD_DTYPE_I32,
	SD_DTYPE_I64,
	SD_DTYPE_U8,
	SD_DTYPE_F64, /* not in sd-tensor(5)'s core list, but safetensors files (torch float64) carry it */
	SD_DTYPE_COUNT
};

size_t sd_dtype_size(enum sd_dtype t);
/* Stream names: "f32", "f16", "bf16", "i32", "i64", "u8", "f64". */
const char *sd_dtype_name(enum sd_dtype t);
/* Parse a stream dtype name of length n; 0 on success, -1 (with a message) on an unknown name. */
int sd_dtype_parse(const char *name, size_t n, enum sd_dtype *out);
int sd_dtype_is_float(enum sd_dtype t);

float sd_f16_to_f32(uint16_t h);
uint16_t sd_f32_to_f16(float f); /* round to nearest even, overflow to inf, NaN kept */
float sd_bf16_to_f32(uint16_t h);
uint16_t sd_f32_to_bf16(float f); /* round to nearest even, NaN kept */

/* ==== tensors ==== */

#define SD_MAX_DIMS 8

enum sd_device { SD_DEVICE_CPU = 0, SD_DEVICE_CUDA = 1 };

typedef struct sd_tensor {
	enum sd_dtype dtype;
	int ndim;
	int64_t shape[SD_MAX_DIMS];
	void *data;            /* host memory for CPU, device memory for CUDA */
	enum sd_device device;
	int owns;              /* 1: data is freed with the tensor; 0: a view (mmap, arena, caller memory) */
	/* A backend's cache derived from the data (a convolution's repacked weight), freed with the tensor
	 * by aux_free; only on owned tensors whose data does not change afterwards (model weights). */
	void *aux;
	void (*aux_free)(void *aux);
} sd_tensor;

/* Product of a shape with overflow checking: 0 and *numel set, or -1 when it overflows int64 or a
 * dimension is negative or ndim is out of [0, SD_MAX_DIMS]. */
int sd_shape_numel(int ndim, const int64_t *shape, int64_t *numel);

/* A new zero-filled CPU tensor (64-byte aligned data).  NULL with a message on a bad shape or no memory. */
sd_tensor *sd_tensor_new(enum sd_dtype dtype, int ndim, const int64_t *shape);
/* Same on a device (memory from that device's backend, not zeroed on CUDA unless stated). */
sd_tensor *sd_tensor_new_on(enum sd_device dev, enum sd_dtype dtype, int ndim, const int64_t *shape);
/* A view: the tensor does not own data and will not free it. */
sd_tensor *sd_tensor_wrap(enum sd_dtype dtype, int ndim, const int64_t *shape, void *data);
/* Convenience for up to 4 dimensions: sd_tensor_new4(SD_DTYPE_F32, 2, 3, 4, 0, 0) is shape [2,3,4]. */
sd_tensor *sd_tensor_newv(enum sd_dtype dtype, int ndim, ...);
void sd_tensor_free(sd_tensor *t);

int64_t sd_tensor_numel(const sd_tensor *t);
size_t sd_tensor_nbytes(const sd_tensor *t);
/* 1 when the shapes are equal. */
int sd_tensor_same_shape(const sd_tensor *a, const sd_tensor *b);
/* Human-readable shape "[1,4,64,64]" into buf (always NUL-terminated); returns buf. */
char *sd_shape_str(int ndim, const int64_t *shape, char *buf, size_t n);

/* A new CPU tensor of dtype `to` holding src's values converted (f16/bf16/f32/f64/ints).  Float→int
 * conversion truncates toward zero; src must be on the CPU. */
sd_tensor *sd_tensor_convert(const sd_tensor *src, enum sd_dtype to);
/* An f16 or bf16 CPU tensor widened to f32 in place (same object, new owned data; packed caches
 * dropped): for a weight that is about to be written (a merged LoRA).  f32 is left alone. */
int sd_tensor_widen(sd_tensor *t);
/* A deep copy on device `dev` (same dtype). */
sd_tensor *sd_tensor_to_device(const sd_tensor *src, enum sd_device dev);
/* Copy src's bytes into dst (same dtype and element count; any devices). */
int sd_tensor_copy(sd_tensor *dst, const sd_tensor *src);

/* ==== arena: scratch memory for one step, reset each step ==== */

typedef struct sd_arena sd_arena;

/* An arena on `dev` that grows in blocks of at least `block` bytes (0 = 64 MiB). */
sd_arena *sd_arena_new(enum sd_device dev, size_t block);
/* 64-byte aligned memory valid until the next reset; NULL with a message when out of memory. */
void *sd_arena_alloc(sd_arena *a, size_t bytes);
/* A tensor whose header and data both live in the arena (do not sd_tensor_free it). */
sd_tensor *sd_arena_tensor(sd_arena *a, enum sd_dtype dtype, int ndim, const int64_t *shape);
/* Forget every allocation (keeps the largest block for reuse). */
void sd_arena_reset(sd_arena *a);
size_t sd_arena_used(const sd_arena *a);
size_t sd_arena_peak(const sd_arena *a);
void sd_arena_free(sd_arena *a);

/* ==== threads ==== */

/* Number of worker threads: $SD_THREADS when set (1..1024), else every online core.  Also applied to
 * OpenBLAS and OpenMP the first time a backend is used. */
int sd_threads(void);
void sd_set_threads(int n);

/* ==== backends and ops ==== */

/* The table a backend fills (see lib/backend.h for the slots).  The CPU backend is the reference and
 * fills every slot; CUDA fills what it can and an empty slot is a clear "not implemented on cuda" error. */
struct sd_backend;
const struct sd_backend *sd_backend_get(enum sd_device dev);
const char *sd_device_name(enum sd_device dev);
/* 1 when a CUDA device is usable in this process (built with CUDA and a GPU present). */
int sd_cuda_available(void);
/* Parse "cpu"/"cuda"/"auto" (NULL or "" = $SD_DEVICE, else auto: CUDA when available). */
int sd_device_parse(const char *s, enum sd_device *out);

/*
 * out = alpha · op(a) · op(b) + beta · out, f32, where op(x) is x or its transpose over the last two dims.
 *   a   (…, M, K)  or (…, K, M) when trans_a
 *   b   (…, K, N)  or (…, N, K) when trans_b; b may also be 2-D and is then shared by every batch entry
 *   out (…, M, N)  same leading (batch) dims as a
 * All three on one device.  beta = 0 overwrites out (its old contents may be NaN).
 */
int sd_matmul(sd_tensor *out, const sd_tensor *a, const sd_tensor *b, int trans_a, int trans_b,
              float alpha, float beta);

/*
 * The ops below are f32 and write into an `out` the caller allocated (sd_tensor_new_on or an arena) of
 * the stated shape; in-place use (out == x) is allowed where marked.  All tensors of one call are on one
 * device.  Shapes are checked once here and every violation is an error naming the op and the shapes.
 */

/* out (…, O) = x (…, I) · w (O, I)ᵀ + b (O) (b may be NULL) — torch.nn.Linear. */
int sd_linear(sd_tensor *out, const sd_tensor *x, const sd_tensor *w, const sd_tensor *b);

/* 2-D convolution, torch.nn.Conv2d with zero padding (top, bottom, left, right may differ, for the
 * VAE's asymmetric (0,1,0,1) downsampling pad), dilation 1, groups 1.
 *   out (N, O, Ho, Wo), x (N, C, H, W), w (O, C, kh, kw), b (O) or NULL;
 *   Ho = (H + pt + pb - kh) / stride + 1, Wo likewise. */
int sd_conv2d(sd_tensor *out, const sd_tensor *x, const sd_tensor *w, const sd_tensor *b, int stride,
              int pad_top, int pad_bottom, int pad_left, int pad_right);

/* GroupNorm over (N, C, *): groups divide C; gamma, beta (C) or NULL; in place allowed.  With
 * silu != 0 the result goes through SiLU too (the fused norm→SiLU of every ResNet block). */
int sd_group_norm(sd_tensor *out, const sd_tensor *x, int groups, const sd_tensor *gamma,
                  const sd_tensor *beta, float eps, int silu);

/* LayerNorm over the last dimension D of x (…, D); gamma, beta (D) or NULL; in place allowed. */
int sd_layer_norm(sd_tensor *out, const sd_tensor *x, const sd_tensor *gamma, const sd_tensor *beta,
                  float eps);

enum sd_act {
	SD_ACT_SILU = 0,   /* x·σ(x) */
	SD_ACT_GELU,       /* exact, erf form (torch's default) */
	SD_ACT_GELU_TANH,  /* tanh approximation */
	SD_ACT_QUICK_GELU, /* x·σ(1.702x) (CLIP) */
	SD_ACT_COUNT
};
/* out = act(x), same shape; in place allowed. */
int sd_act(sd_tensor *out, const sd_tensor *x, enum sd_act act);
/* GEGLU: x (…, 2F) = [a | g] → out (…, F) = a · gelu(g) (diffusers' GEGLU: hidden, gate = chunk(2)). */
int sd_geglu(sd_tensor *out, const sd_tensor *x);

/* out = alpha·a + beta·b where b has a's shape, or a's trailing dimensions (broadcast over the leading
 * ones: CLIP's position embeddings), or is (N, C) with a (N, C, *) (broadcast over space: the time
 * embedding into a ResNet block).  In place allowed (out == a). */
int sd_add(sd_tensor *out, const sd_tensor *a, const sd_tensor *b, float alpha, float beta);
/* out = x · s (in place allowed). */
int sd_scale(sd_tensor *out, const sd_tensor *x, float s);
/* Elementwise product out = a ⊙ b, same shapes (in place allowed). */
int sd_mul(sd_tensor *out, const sd_tensor *a, const sd_tensor *b);
/* Softmax over the last dimension (in place allowed). */
int sd_softmax(sd_tensor *out, const sd_tensor *x);

/*
 * Multi-head scaled dot-product attention, GEMM-shaped (QKᵀ and PV through the backend's sgemm, the
 * softmax fused on row blocks, so memory is O(block·Lk) not O(Lq·Lk) per head):
 *   q (N, Lq, H·d), k (N, Lk, H·d), v (N, Lk, H·dv) → out (N, Lq, H·dv),
 * heads laid out as torch's view(N, L, H, d).transpose(1, 2); scale is usually 1/sqrt(d); causal masks
 * keys j > i (CLIP).  `probs`, when not NULL, receives the attention weights (N, H, Lq, Lk) for backward.
 */
int sd_attention(sd_tensor *out, const sd_tensor *q, const sd_tensor *k, const sd_tensor *v, int heads,
                 float scale, int causal, sd_tensor *probs);

/* Layout moves.  (N, C, H, W) → (N, H·W, C) and back (the Transformer2D / VAE attention reshapes). */
int sd_nchw_to_nlc(sd_tensor *out, const sd_tensor *x);
int sd_nlc_to_nchw(sd_tensor *out, const sd_tensor *x);
/* Nearest-neighbour ×2 upsampling: (N, C, H, W) → (N, C, 2H, 2W). */
int sd_upsample2x(sd_tensor *out, const sd_tensor *x);
/* Concatenate along dim 1: (N, Ca, *) ++ (N, Cb, *) → (N, Ca+Cb, *) (the UNet skip connections). */
int sd_concat1(sd_tensor *out, const sd_tensor *a, const sd_tensor *b);
/* Rows of a table: out (…, D) = table (V, D)[ids (…)], ids i32 (each in [0, V) or an error). */
int sd_embedding(sd_tensor *out, const sd_tensor *ids, const sd_tensor *table);

/* ==== values and frames (sd-tensor(5)) ==== */

enum sd_vtype {
	SD_V_NIL = 0,
	SD_V_BOOL,
	SD_V_INT,    /* int64 */
	SD_V_UINT,   /* uint64 above INT64_MAX (msgpack positive fixint/uint64) */
	SD_V_FLOAT,  /* double (msgpack float32 is widened; written back as float64) */
	SD_V_STR,
	SD_V_BIN,
	SD_V_ARRAY,
	SD_V_MAP,    /* string keys, insertion order kept */
	SD_V_TENSOR
};

typedef struct sd_value sd_value;
struct sd_value {
	enum sd_vtype type;
	union {
		int b;
		int64_t i;
		uint64_t u;
		double f;
		struct { char *p; size_t n; } s;                   /* STR (NUL-terminated too) and BIN */
		struct { sd_value **v; size_t n, cap; } a;         /* ARRAY */
		struct { char **k; sd_value **v; size_t n, cap; } m; /* MAP */
		sd_tensor *t;                                      /* TENSOR (owned) */
	} u;
};

sd_value *sd_value_nil(void);
sd_value *sd_value_bool(int b);
sd_value *sd_value_int(int64_t i);
sd_value *sd_value_float(double f);
sd_value *sd_value_str(const char *s);
sd_value *sd_value_strn(const char *s, size_t n);
sd_value *sd_value_bin(const void *p, size_t n);
sd_value *sd_value_array(void);
sd_value *sd_value_map(void);
sd_value *sd_value_tensor(sd_tensor *t); /* takes ownership of t (also on failure) */
sd_value *sd_value_dup(const sd_value *v); /* deep copy */
void sd_value_free(sd_value *v);

/* Append to an ARRAY (takes ownership of item, also on failure). */
int sd_array_push(sd_value *arr, sd_value *item);

/* MAP access.  Getters return borrowed pointers, NULL when absent (or of another type). */
sd_value *sd_map_get(const sd_value *map, const char *key);
/* Set key (takes ownership of v, also on failure); replaces in place, keeping the key's position. */
int sd_map_set(sd_value *map, const char *key, sd_value *v);
int sd_map_del(sd_value *map, const char *key); /* 1 removed, 0 absent */
sd_tensor *sd_map_tensor(const sd_value *map, const char *key);
const char *sd_map_str(const sd_value *map, const char *key);
/* Numbers: 0 and *out set when present and numeric (int or float; get_int refuses non-integral floats),
 * 1 when absent, -1 (with a message) when present but of the wrong type. */
int sd_map_get_int(const sd_value *map, const char *key, int64_t *out);
int sd_map_get_float(const sd_value *map, const char *key, double *out);
int sd_map_set_tensor(sd_value *map, const char *key, sd_tensor *t);
int sd_map_set_str(sd_value *map, const char *key, const char *s);
int sd_map_set_int(sd_value *map, const char *key, int64_t i);
int sd_map_set_float(sd_value *map, const char *key, double f);

/* ==== streams ==== */

/* Largest frame a reader accepts unless $SD_MAX_FRAME_MB says otherwise (MiB). */
#define SD_STREAM_MAX_FRAME ((size_t)4 << 30)

typedef struct sd_reader sd_reader;

/* Read frames from f (not closed by sd_reader_free); `name` ("stdin", a path) prefixes messages. */
sd_reader *sd_reader_new(FILE *f, const char *name);
/* Next frame into *frame (a MAP the caller owns): 1 = a frame, 0 = clean end of stream, -1 = error
 * (truncated frame, not a map, bad tensor, too large, …) with a message naming the frame index. */
int sd_reader_next(sd_reader *r, sd_value **frame);
/* Index of the frame last returned (0-based). */
long sd_reader_index(const sd_reader *r);
void sd_reader_free(sd_reader *r);

/* Serialise frame (a MAP) and write it whole to f; -1 with a message on a write error. */
int sd_frame_write(FILE *f, const sd_value *frame);
/* Serialise into a malloc'd buffer (*buf, *len); the caller frees *buf. */
int sd_frame_pack(const sd_value *frame, char **buf, size_t *len);
/* Parse exactly one frame from a buffer. */
int sd_frame_unpack(const void *buf, size_t len, sd_value **frame);

/* ==== safetensors ==== */

typedef struct sd_st sd_st;

/* mmap a .safetensors file and parse its header (F32, F16, BF16, I32, I64, U8, F64; BOOL is read as u8).
 * Every offset is checked against the file size and the dtype×shape; the tensors are read-only views. */
sd_st *sd_st_open(const char *path);
int sd_st_count(const sd_st *f);
const char *sd_st_name(const sd_st *f, int i);
/* Index of name, or -1. */
int sd_st_find(const sd_st *f, const char *name);
/* A view into the mapping (owns = 0, do not write, valid until sd_st_close). */
const sd_tensor *sd_st_tensor(const sd_st *f, int i);
/* The header's __metadata__ (string → string): count, i-th key/value, lookup (NULL if absent). */
int sd_st_meta_count(const sd_st *f);
const char *sd_st_meta_key(const sd_st *f, int i);
const char *sd_st_meta_val(const sd_st *f, int i);
const char *sd_st_meta(const sd_st *f, const char *key);
const char *sd_st_path(const sd_st *f);
void sd_st_close(sd_st *f);

/* Write n tensors (CPU) with their names and optional metadata (meta: key, value, key, value, …, NULL;
 * may be NULL) to path atomically: a temporary file in the same folder, fsync, rename.  Tensors are
 * named in the header in the order given; the data section starts 8-byte
 * aligned, tensors are packed without gaps and each starts at a multiple of its element size. */
int sd_st_write(const char *path, int n, const char *const *names, const sd_tensor *const *tensors,
                const char *const *meta);

/* ==== summaries of streams and safetensors files (lib/io/info.c, for sd-info) ==== */

/* These write readable text to out and nothing elsewhere; -1 with a message on bad input (what was
 * written before stays written: a stream's good frames come before its bad one). */

/* 1234567 → "1,234,567" into buf (n bytes), returned. */
char *sd_num_grouped(uint64_t v, char *buf, size_t n);
/* "frame <idx>", then per key "  key  dtype  shape  min … max … mean …" for tensors (computed in
 * double over every element, NaN and inf counted apart) or the value for metadata. */
int sd_frame_summarize(FILE *out, const sd_value *frame, long idx);
/* Every frame of the stream in (not closed; name in messages), then "<N> frames". */
int sd_stream_summarize(FILE *out, FILE *in, const char *name);
/* Totals over the .safetensors files of a folder. */
typedef struct sd_st_totals {
	long files;
	int64_t tensors;
	uint64_t params, bytes;
} sd_st_totals;
/* A .safetensors file: every tensor's name, dtype and shape, the __metadata__, the parameter count;
 * added to *tot when not NULL.  Messages start with path. */
int sd_st_summarize(FILE *out, const char *path, sd_st_totals *tot);
/* A folder: its config.json names and every .safetensors file in name order, recursively (not into
 * hidden folders nor through symbolic links), then the totals. */
int sd_folder_summarize(FILE *out, const char *dir);

/* ==== images (libnetpbm) ==== */

typedef struct sd_pnm_reader sd_pnm_reader;

/* Read PBM/PGM/PPM/PAM images (any maxval, plain or raw, several images one after another) from f. */
sd_pnm_reader *sd_pnm_reader_new(FILE *f, const char *name);
/* Next image as a new f32 tensor [1,C,H,W] with values sample/maxval in [0,1] (C = the file's depth:
 * 1 for PBM/PGM, 3 for PPM, PAM's depth; PBM black = 0); *maxval gets the file's maxval when not NULL.
 * 1 = an image, 0 = end of input, -1 = error (libnetpbm's message, never an exit). */
int sd_pnm_read(sd_pnm_reader *r, sd_tensor **image, int *maxval);
void sd_pnm_reader_free(sd_pnm_reader *r);
/* Write one image (f32 [C,H,W] or [1,C,H,W], C = 1 → PGM, 3 → PPM) as raw PNM of the given maxval
 * (1..65535), clamping to [0,1] and rounding to nearest. */
int sd_pnm_write(FILE *f, const sd_tensor *image, int maxval);
/* The same image encoded into a malloc'd buffer (*buf, *len) that the caller frees (for files written
 * atomically, or one write per image). */
int sd_pnm_pack(const sd_tensor *image, int maxval, char **buf, size_t *len);

/* ==== PNG and JPEG (lib/io/image.c) ==== */

enum { SD_IMAGE_PNM = 1, SD_IMAGE_PNG = 2, SD_IMAGE_JPEG = 3 };

/* The format of the n bytes at buf by their magic: SD_IMAGE_PNM ("P1".."P7"), SD_IMAGE_PNG (the 8-byte
 * signature), SD_IMAGE_JPEG (FF D8 FF), or 0 when unknown or too short. */
int sd_image_sniff(const void *buf, size_t n);
/* The largest image read, in pixels: 2^28 unless $SD_MAX_PIXELS says otherwise (pnm.c's cap). */
int64_t sd_image_max_pixels(void);
/*
 * Decode one PNG (1-16 bits; gray, gray+alpha, RGB, RGBA, palette), JPEG (gray, YCbCr, RGB; not CMYK)
 * or PNM image (the first of the buffer) into a new f32 [1,C,H,W] tensor, values sample/maxval in [0,1]:
 * C = 1 for gray, 3 otherwise (palette expanded, alpha ignored as PIL's convert("RGB") does).  *maxval
 * (when not NULL) gets 255 or 65535 (PNM: the file's).  *text (when not NULL) gets a new MAP of the PNG's
 * text chunks (key → UTF-8 string; NULL when none or not a PNG) that the caller frees.  An image over
 * sd_image_max_pixels() is refused before its raster is allocated; corrupt or truncated data is an error.
 * NULL with "<name>: …" on failure.
 */
sd_tensor *sd_image_decode(const void *buf, size_t len, const char *name, int *maxval, sd_value **text);
/* The same for the rest of stream f (read to its end, at most 1 GiB), and for a file. */
sd_tensor *sd_image_read(FILE *f, const char *name, int *maxval, sd_value **text);
sd_tensor *sd_image_read_file(const char *path, int *maxval, sd_value **text);
/*
 * Encode an f32 [C,H,W] or [1,C,H,W] image (C = 1 gray, 3 RGB) as a PNG of 8 or 16 bits into a malloc'd
 * buffer (*buf, *len) the caller frees: clamped to [0,1] (NaN and -Inf as 0) and rounded like
 * sd_pnm_pack, so a PNG and a PPM of one tensor hold the same samples.  text: key, value, …, NULL (may be
 * NULL); keys printable ASCII (1-79 characters), values UTF-8, written as tEXt when ASCII, else iTXt;
 * a "Software: sdpipe <version>" chunk is added unless text has one.  -1 with a message.
 */
int sd_png_pack(const sd_tensor *image, int bits, const char *const *text, char **buf, size_t *len);
/* 1 when path is a PNG whose first Software text (before the image data) starts with "sdpipe"; 0 when
 * it is not (another PNG, not a PNG, no such file); -1 with a message on another read error. */
int sd_png_made_by_sdpipe(const char *path);
/*
 * The AUTOMATIC1111 "parameters" text of image `index` of `count` (the batch) of a frame, width x height:
 * the prompt with " <lora:NAME:SCALE>" tags, "Negative prompt: …" when there is one, and the line
 * "Steps: …, Sampler: …, CFG scale: …, Seed: …, Size: WxH, Model: …, Batch size: …, Batch pos: …,
 * Denoising strength: …, Eta: …, Version: sdpipe …" from the frame's prompt, negative_prompt, model,
 * lora [{name, scale}], sampler {name, steps, seed, karras, guidance, strength, eta} and generator {seed},
 * each field only when its source is there.  A new string the caller frees; NULL only when out of memory.
 */
char *sd_a1111_parameters(const sd_value *frame, int64_t index, int64_t count, int64_t width, int64_t height);

/* ==== CLIP tokenizer (lib/models/tokenizer.c) ==== */

#define SD_CLIP_BOS 49406
#define SD_CLIP_EOS 49407

typedef struct sd_tokenizer sd_tokenizer;

/* Load the byte-level BPE from a folder holding vocab.json + merges.txt (a diffusers tokenizer/
 * folder), or, when dir is NULL, the standard CLIP vocabulary that ships with sdpipe (found through
 * $SD_DATADIR, the install's share/sdpipe, or the source tree next to the executable). */
sd_tokenizer *sd_tokenizer_load(const char *dir);
void sd_tokenizer_free(sd_tokenizer *tok);
/* Number of vocabulary entries, and the id of one entry given in its byte-level BPE spelling ("cat</w>",
 * "<|endoftext|>"), -1 when the vocabulary lacks it. */
int sd_tokenizer_vocab_size(const sd_tokenizer *tok);
int32_t sd_tokenizer_token_id(const sd_tokenizer *tok, const char *token);
/* Offset of the first byte of s (n bytes) that is not well-formed UTF-8 (no overlongs, surrogates, code
 * points above U+10FFFF or cut sequences), -1 when all of it is. */
long sd_utf8_invalid_at(const char *s, size_t n);
/* Untruncated ids of text (len bytes of UTF-8): BOS, the BPE tokens, EOS.  *ids is malloc'd (caller
 * frees), *n its length.  Invalid UTF-8 is an error. */
int sd_tokenize(const sd_tokenizer *tok, const char *text, size_t len, int32_t **ids, int *n);
/* The SD form: exactly max_len ids (77), truncated keeping a final EOS, padded with pad_id (EOS for
 * SD 1.x).  *untruncated gets the full count when not NULL. */
int sd_tokenize_padded(const sd_tokenizer *tok, const char *text, size_t len, int32_t *out, int max_len,
                       int32_t pad_id, int *untruncated);

/* ==== PyTorch .ckpt files (lib/io/ckpt.c) ==== */

/*
 * A torch.save zip (<name>/data.pkl + <name>/data/<key> storages) read with libarchive and a restricted
 * unpickler: only the opcodes and globals a state dict needs (collections.OrderedDict,
 * torch._utils._rebuild_tensor_v2, torch.*Storage, …) are accepted, anything else is refused with a
 * message naming it, and nothing is ever executed.  A top-level {"state_dict": …} is followed.  Tensors
 * are copied out of the archive (contiguous, in the storage dtype); other values (global_step, …) are
 * ignored.  The interface mirrors sd_st_*.
 */
typedef struct sd_ckpt sd_ckpt;

sd_ckpt *sd_ckpt_open(const char *path);
int sd_ckpt_count(const sd_ckpt *c);
const char *sd_ckpt_name(const sd_ckpt *c, int i);
int sd_ckpt_find(const sd_ckpt *c, const char *name);
const sd_tensor *sd_ckpt_tensor(const sd_ckpt *c, int i);
void sd_ckpt_close(sd_ckpt *c);

/* ==== models (lib/models/model.c) ==== */

/* SD_TEXT_ENCODER_2: SDXL's second text encoder (CLIPTextModelWithProjection, diffusers folders only). */
enum sd_component { SD_TEXT_ENCODER = 0, SD_VAE, SD_UNET, SD_TEXT_ENCODER_2, SD_COMPONENT_COUNT };

/* "text_encoder", "vae", "unet", "text_encoder_2" (the diffusers folder names). */
const char *sd_component_name(enum sd_component c);

/*
 * An opened checkpoint in any of the three layouts, mapped to one internal naming (diffusers'):
 *   - a diffusers folder (model_index.json; <component>/config.json and
 *     <component>/{model,diffusion_pytorch_model}[.fp16].safetensors, the plain file preferred),
 *   - a single-file original (CompVis/LDM) .safetensors (cond_stage_model.transformer.*,
 *     first_stage_model.*, model.diffusion_model.*),
 *   - a .ckpt (torch zip, see sd_ckpt_open).
 * Opening only reads the index (file names, headers); weights are read per component by
 * sd_weights_load, so a tool loads only the part it needs.  `path` NULL or "" means $SD_MODEL.
 * `config_dir`, when not NULL (else $SD_MODEL_CONFIG when set), is a diffusers folder whose
 * <component>/config.json files describe a single-file checkpoint (as diffusers' from_single_file
 * config=…); without one, sizes come from tensor shapes, and what shapes cannot tell (head counts) from
 * the Stable Diffusion 1.x conventions (CLIP heads = hidden/64, an error asking for --config when
 * hidden is not a multiple of 64; UNet attention_head_dim 8).  A given config must agree with the
 * shapes (else an error naming the key); its tokenizer/ and scheduler/ then serve the single file too.
 * A diffusers component folder without a .safetensors may hold a torch .bin (read like a .ckpt).
 */
typedef struct sd_model sd_model;

sd_model *sd_model_open(const char *path, const char *config_dir);
void sd_model_close(sd_model *m);
/* "diffusers", "single-file" or "ckpt". */
const char *sd_model_format(const sd_model *m);
const char *sd_model_path(const sd_model *m);
/* 1 when the model holds weights for c.  For a .ckpt the first call reads (unpickles) the file, which is
 * kept for sd_weights_load; 0 when it cannot be read (the reason is left in sd_errmsg()). */
int sd_model_has(const sd_model *m, enum sd_component c);
/* The tokenizer folder of a diffusers model (holding vocab.json + merges.txt), or NULL for single files
 * (then the shipped CLIP vocabulary applies). */
const char *sd_model_tokenizer_dir(const sd_model *m);
/* SDXL: the second tokenizer's folder (tokenizer_2/), NULL when the model has none. */
const char *sd_model_tokenizer_2_dir(const sd_model *m);
/* model_index.json's force_zeros_for_empty_prompt (SDXL): 1 when true, else 0. */
int sd_model_force_zeros(const sd_model *m);
/* scheduler/scheduler_config.json as text (NULL when the model has none). */
const char *sd_model_scheduler_json(const sd_model *m);

/* What text to image and training need to size their tensors: the VAE's factor 2^(blocks-1), its latent
 * channels, and the UNet's sample_size in latent pixels (so the model's own image size is
 * sample_size x factor: 512 for SD 1.x).  From the config files of a diffusers folder when it has them
 * (no weights are read), else from the VAE's weights and config as the loader infers them, with
 * sample_size 64 (a single file carries none; the SD 1.x value).  -1 with a message when the model has
 * no VAE or its config is unusable. */
typedef struct sd_geometry {
	int factor, channels, sample_size;
} sd_geometry;
int sd_model_geometry(sd_model *m, sd_geometry *g);

/*
 * One component's weights, named as diffusers names them (e.g. "text_model.encoder.layers.0.mlp.fc1.weight",
 * "encoder.down_blocks.0.resnets.0.conv1.weight"), converted to f32 on `dev`, with its config.  The
 * tensors are copies (they outlive sd_model_close), sorted by name; float tensors become f32, others
 * keep their dtype; text_model.embeddings.position_ids (an arange buffer) is dropped in every layout,
 * so the parameter count is transformers' num_parameters().  NULL with "<path>: model has no vae (…)"
 * when the model lacks the component.
 */
typedef struct sd_weights sd_weights;

sd_weights *sd_weights_load(sd_model *m, enum sd_component c, enum sd_device dev);
/* The same, but on the CPU the f16 and bf16 matrices and kernels (2 or more dimensions) stay in their
 * stored dtype, half the memory of f32: the ops (sd_linear, sd_conv2d, sd_embedding, sd_add's b) widen
 * them at use, so the numbers are sd_weights_load's.  For inference; training and merging want
 * sd_weights_load (their backward ops and arithmetic read f32).  Those weights are read-only views into
 * the model's mapped file, valid until sd_model_close (the others are copies, as sd_weights_load's). */
sd_weights *sd_weights_load_stored(sd_model *m, enum sd_component c, enum sd_device dev);
void sd_weights_free(sd_weights *w);
enum sd_component sd_weights_component(const sd_weights *w);
int sd_weights_count(const sd_weights *w);
const char *sd_weights_name(const sd_weights *w, int i);
const sd_tensor *sd_weights_at(const sd_weights *w, int i);
/* NULL when absent (no message). */
const sd_tensor *sd_weights_get(const sd_weights *w, const char *name);
/* The tensor named by the printf-style name; NULL with "<component>: missing weight '<name>'" when absent. */
const sd_tensor *sd_weights_need(const sd_weights *w, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int64_t sd_weights_params(const sd_weights *w);
/* Config values (from config.json, or inferred and filled in for single files, under the same keys):
 * 0 and *out set when present, 1 when absent, -1 with a message when of another type.  Integer arrays
 * accept a scalar too (broadcast to *n = 1 entry); int getters refuse non-integers. */
int sd_config_int(const sd_weights *w, const char *key, int64_t *out);
int sd_config_float(const sd_weights *w, const char *key, double *out);
int sd_config_bool(const sd_weights *w, const char *key, int *out);
int sd_config_str(const sd_weights *w, const char *key, const char **out);
int sd_config_int_array(const sd_weights *w, const char *key, int64_t *out, int max, int *n);
int sd_config_str_array(const sd_weights *w, const char *key, const char **out, int max, int *n);
/* The whole config as compact JSON text (owned by w). */
const char *sd_config_json(const sd_weights *w);

/* ==== model summaries (lib/models/info.c, for sd-info -m) ==== */

/* The model at path (config_dir as for sd_model_open) to out: its layout, each component with its
 * parameter count, tensor count and config, the tokenizer and the scheduler config, the total.  -1
 * with a message when it cannot be opened or a component cannot be read. */
int sd_model_summarize(FILE *out, const char *path, const char *config_dir);

/* ==== random numbers as torch makes them (lib/rng.c) ==== */

/*
 * torch.Generator('cpu').manual_seed(seed): mt19937 seeded with the low 32 bits, plus the cached normal
 * of torch's double path.  The state is plain data; a frame carries it compactly as (seed, draws,
 * has_cached, cached) and sd_rng_restore rebuilds it exactly (replaying the words drawn).
 */
typedef struct sd_rng {
	uint32_t mt[624];
	int idx;               /* next word of mt to temper; 624 = twist first */
	uint64_t seed;         /* as given (only the low 32 bits seed mt19937) */
	uint64_t draws;        /* 32-bit words consumed since the seed */
	int has_cached;        /* torch's cached normal (double path: numel < 16 or non-float) */
	double cached;
} sd_rng;

/* manual_seed(seed): also drops the cached normal. */
void sd_rng_seed(sd_rng *r, uint64_t seed);
/* The state after seeding with `seed` and drawing `draws` words, with the given cache: what a frame
 * carries is enough (1e7 words replay in milliseconds). */
void sd_rng_restore(sd_rng *r, uint64_t seed, uint64_t draws, int has_cached, double cached);
/* Discard the next n 32-bit words (as if drawn; counted in draws). */
void sd_rng_skip(sd_rng *r, uint64_t n);
uint32_t sd_rng_u32(sd_rng *r);
/* torch's random64(): two words, the first one high. */
uint64_t sd_rng_u64(sd_rng *r);
/* torch.randn(shape, generator=g) for a contiguous float32 tensor of n elements: n >= 16 is torch's
 * vectorised Box-Muller (AVX2 build, bit-exact), n < 16 the per-element double path cast to float. */
void sd_rng_randn(sd_rng *r, float *out, int64_t n);
/* torch.randn(..., dtype=torch.float64): n >= 16 Box-Muller on 53-bit uniforms, else per element. */
void sd_rng_randn_f64(sd_rng *r, double *out, int64_t n);
/* torch.rand(n) float32: (u32 & 0xFFFFFF) * 2^-24 per element. */
void sd_rng_rand(sd_rng *r, float *out, int64_t n);
/* torch.randint(lo, hi, (n,)) int64: lo + word % (hi - lo) (a 64-bit word when hi - lo >= 2^32).
 * -1 with a message when hi <= lo (nothing drawn). */
int sd_rng_randint(sd_rng *r, int64_t lo, int64_t hi, int64_t *out, int64_t n);

/* The generator as frames carry it (lib/rng-frame.c): a map {"seed": int, "draws": int,
 * "cached": float or nil} under the frame key "generator".  sd_rng_from_value rebuilds the exact state
 * (sd_rng_restore); -1 with a message when the map is malformed. */
sd_value *sd_rng_to_value(const sd_rng *r);
int sd_rng_from_value(sd_rng *r, const sd_value *v);

/* ==== files ==== */

/* Read a whole file into a NUL-terminated malloc'd buffer (at most `cap` bytes, 0 = 256 MiB). */
char *sd_read_file(const char *path, size_t cap, size_t *len);
/* Write len bytes to path atomically (temporary + fsync + rename). */
int sd_write_file_atomic(const char *path, const void *data, size_t len);

/* ==== VAE (lib/models/vae.c) ==== */

/*
 * AutoencoderKL as diffusers builds it from vae/config.json (autoencoder_kl.py, vae.py, resnet.py,
 * attention_processor.py): Encoder → quant_conv → diagonal Gaussian; post_quant_conv → Decoder.  Any
 * number of blocks and layers; sizes come from the weights' shapes, checked against the config.
 * Images in the model's own range [-1, 1]; latents unscaled (multiply by scaling_factor for the UNet).
 */
#define SD_VAE_MAX_BLOCKS 8

typedef struct sd_vae_config {
	int in_channels, out_channels, latent_channels; /* 3, 3, 4 for SD 1.x */
	int nblocks, block_out[SD_VAE_MAX_BLOCKS];      /* block_out_channels */
	int layers_per_block;                           /* decoder blocks have one more resnet */
	int groups;                                     /* norm_num_groups */
	float eps;                                      /* GroupNorm eps: 1e-6 everywhere in the VAE */
	float scaling_factor;                           /* 0.18215 for SD 1.x */
	int quant_conv, post_quant_conv, mid_attention; /* 1 when the module is there */
} sd_vae_config;

/* The weights of one conv (w (O, C, kh, kw), b (O) or NULL) or linear (w (O, I), b (O)); lora: an
 * adapter on an attention linear (see sd_lora_layer), NULL when none. */
typedef struct sd_vae_conv {
	const sd_tensor *w, *b;
	const struct sd_lora_layer *lora;
	const struct sd_lora_train *train; /* the adapter's training state (gradients, dropout), NULL: frozen */
} sd_vae_conv;

/* ResnetBlock2D without time embedding: norm1 → SiLU → conv1 → norm2 → SiLU → conv2, plus x or
 * conv_shortcut(x) (1×1, only when cin != cout; shortcut.w is NULL otherwise). */
typedef struct sd_vae_resnet {
	int cin, cout;
	const sd_tensor *norm1_w, *norm1_b, *norm2_w, *norm2_b;
	sd_vae_conv conv1, conv2, shortcut;
} sd_vae_resnet;

/*
 * The activations of one ResnetBlock2D forward, allocated by the caller.  A recorded forward (for a
 * backward) gives every field its own tensor; inference aliases them to save memory: n1 == h1 and
 * n2 == h2 select the fused GroupNorm+SiLU, a1 == n2 normalises in place, sc may alias a1/n2/h2
 * (dead by then).
 */
typedef struct sd_vae_resnet_act {
	sd_tensor *n1; // (N,Cin,H,W)  norm1(x), before SiLU
	sd_tensor *h1; // (N,Cin,H,W)  silu(n1)
	sd_tensor *a1; // (N,Cout,H,W) conv1(h1)
	sd_tensor *n2; // (N,Cout,H,W) norm2(a1), before SiLU
	sd_tensor *h2; // (N,Cout,H,W) silu(n2)
	sd_tensor *sc; // (N,Cout,H,W) conv_shortcut(x), NULL without a shortcut
} sd_vae_resnet_act;

/* out (N,Cout,H,W) = resnet(x (N,Cin,H,W)).  out may alias act->n1/h1 (dead when out is written), never
 * x, a1, n2, h2 or sc.  0 or -1 with a message. */
int sd_vae_resnet_forward(sd_tensor *out, const sd_vae_resnet_act *act, const sd_tensor *x,
                          const sd_vae_resnet *p, int groups, float eps);

/* The mid block's single-head self-attention (diffusers' Attention with group_norm, residual
 * connection, rescale_output_factor 1, scale 1/sqrt(C)); linear weights (C, C). */
typedef struct sd_vae_attn {
	int c;
	const sd_tensor *norm_w, *norm_b;
	sd_vae_conv q, k, v, out;
} sd_vae_attn;

/* Its activations; inference aliases q = n, o = nl, p = q, and out may alias k or v. */
typedef struct sd_vae_attn_act {
	sd_tensor *n;     // (N,C,H,W) group_norm(x)
	sd_tensor *nl;    // (N,L,C)   n with pixels as rows, L = H·W
	sd_tensor *q, *k, *v; // (N,L,C)
	sd_tensor *o;     // (N,L,C)   softmax(q·kᵀ/√C)·v
	sd_tensor *probs; // (N,1,L,L) the attention weights, or NULL (not kept)
	sd_tensor *p;     // (N,L,C)   to_out(o)
	sd_tensor *lora;  // (N,L,r)   scratch for LoRA adapters, NULL when none is set
} sd_vae_attn_act;

/* out (N,C,H,W) = x + attention(x).  out must not alias x, n, nl, o or p. */
int sd_vae_attn_forward(sd_tensor *out, const sd_vae_attn_act *act, const sd_tensor *x,
                        const sd_vae_attn *p, int groups, float eps);

/* Downsample2D: out (N,C,⌈H/2⌉,⌈W/2⌉) = conv3×3 stride 2 of x (N,C,H,W) zero-padded by (0,1,0,1). */
int sd_vae_down_forward(sd_tensor *out, const sd_tensor *x, const sd_vae_conv *conv);
/* Upsample2D: up (N,C,2H,2W) = nearest ×2 of x (N,C,H,W); out (N,C,2H,2W) = conv3×3(up). */
int sd_vae_up_forward(sd_tensor *out, sd_tensor *up, const sd_tensor *x, const sd_vae_conv *conv);

typedef struct sd_vae sd_vae;

/* Build the VAE over loaded weights (sd_weights_load(m, SD_VAE, dev)): reads the config, finds every
 * weight and checks its shape (a clear "vae: …" error otherwise).  Borrows w, which must outlive the
 * VAE.  Accepts attention weights as linear (C,C) or 1×1 conv (C,C,1,1), named to_q/to_k/to_v/to_out.0
 * or the older query/key/value/proj_attn. */
sd_vae *sd_vae_new(const sd_weights *w);
/* A VAE of the given sizes with random weights it owns (uniform, torch's default scale), on dev: for
 * benchmarks and tests that need a shape no fixture has (the full SD 1.5 VAE). */
sd_vae *sd_vae_new_random(const sd_vae_config *c, enum sd_device dev, uint64_t seed);
void sd_vae_free(sd_vae *v);
const sd_vae_config *sd_vae_get_config(const sd_vae *v);
/* The spatial factor between image and latent: 2^(nblocks-1) (8 for SD 1.x). */
int sd_vae_factor(const sd_vae *v);
/* Weights of the blocks, for a trainer's backward: i-th resnet of the encoder (down blocks in order,
 * then the two of the mid block) and the encoder's mid attention; NULL when out of range. */
const sd_vae_resnet *sd_vae_encoder_resnet(const sd_vae *v, int i);
const sd_vae_attn *sd_vae_encoder_attn(const sd_vae *v);
/* Bytes of activation memory held at the peak of the last call (scratch pool + arena). */
size_t sd_vae_peak_bytes(const sd_vae *v);

/*
 * Tiling for large images: the image is cut into overlapping square tiles of `tile` image pixels
 * (a multiple of sd_vae_factor; decoding tiles the latent by tile/factor), tiles overlap by `overlap`
 * pixels (0 = a quarter of the tile, rounded down to the factor, at least one latent pixel) and are
 * blended with linear ramps across the overlaps.  tile = 0 chooses: untiled up to SD_VAE_AUTO_TILE_AREA
 * image pixels, tiles of SD_VAE_AUTO_TILE above; tile < 0 never tiles.  Tiles see their own GroupNorm
 * statistics, so a tiled result differs a little from an untiled one (as in diffusers' tiled VAE).
 */
#define SD_VAE_AUTO_TILE_AREA (1024 * 1024)
#define SD_VAE_AUTO_TILE 512
typedef struct sd_vae_tiling {
	int tile, overlap;
} sd_vae_tiling;

/* Called with the output of each top-level module (diffusers' names: "encoder.conv_in",
 * "encoder.down_blocks.<i>" (after its downsampler), "encoder.mid_block", "encoder.conv_norm_out"
 * (before SiLU), "encoder.conv_out", "quant_conv", "post_quant_conv", "decoder.conv_in",
 * "decoder.mid_block", "decoder.up_blocks.<i>", "decoder.conv_norm_out", "decoder.conv_out"), like
 * torch forward hooks; the tensor lives on the VAE's device until the hook returns.  NULL removes it.
 * Untiled calls only. */
typedef void (*sd_vae_hook)(void *ctx, const char *module, const sd_tensor *out);
void sd_vae_set_hook(sd_vae *v, sd_vae_hook fn, void *ctx);

/* moments (N, 2·latent, H/f, W/f) = quant_conv(encoder(x (N, in, H, W))), x in [-1,1]; H and W
 * multiples of f.  Tensors on the CPU or on the VAE's device; t NULL = automatic tiling. */
int sd_vae_encode(sd_vae *v, sd_tensor *moments, const sd_tensor *x, const sd_vae_tiling *t);
/* x (N, out, H·f, W·f) = decoder(post_quant_conv(z (N, latent, H, W))), raw (not rescaled or clamped). */
int sd_vae_decode(sd_vae *v, sd_tensor *x, const sd_tensor *z, const sd_vae_tiling *t);
/* DiagonalGaussianDistribution of moments (N, 2L, h, w) (CPU): mean, logvar clamped to [-30, 20],
 * std = exp(logvar/2), each (N, L, h, w) or NULL when not wanted. */
int sd_vae_posterior(sd_tensor *mean, sd_tensor *logvar, sd_tensor *std, const sd_tensor *moments);

/* The pipelines' forms (CPU tensors): latent (N, L, H/f, W/f) = scaling_factor · (mean + std·eps)
 * for image (N, in, H, W) in [0,1] (x = 2·image − 1); eps (N, L, H/f, W/f) or NULL for the mean. */
int sd_vae_encode_image(sd_vae *v, sd_tensor *latent, const sd_tensor *image, const sd_tensor *eps,
                        const sd_vae_tiling *t);
/* image (N, out, H·f, W·f) = clamp(decode(latent / scaling_factor) / 2 + 0.5, 0, 1). */
int sd_vae_decode_image(sd_vae *v, sd_tensor *image, const sd_tensor *latent, const sd_vae_tiling *t);

/*
 * The encoder's forward with every activation a backward needs, in the arena `a` (the caller resets
 * it): the trainer's path when gradients flow through vae.encode (VAE LoRA).  Untiled, on the VAE's
 * device.  x (N, in, H, W) in [-1, 1].
 */
#define SD_VAE_MAX_RESNETS 64 /* nblocks·layers_per_block + 2 at most */
typedef struct sd_vae_enc_act {
	const sd_tensor *x;      // (N,in,H,W) the input (borrowed)
	sd_tensor *conv_in;      // (N,C0,H,W)
	int nres;                // nblocks·layers_per_block + 2 (the mid block's two last)
	sd_vae_resnet_act res[SD_VAE_MAX_RESNETS];  // [nres] in order
	sd_tensor *res_in[SD_VAE_MAX_RESNETS];      // each resnet's input (the tensor before it)
	sd_tensor *res_out[SD_VAE_MAX_RESNETS];     // each resnet's output
	sd_tensor *down[SD_VAE_MAX_BLOCKS];         // [nblocks-1] downsampler outputs
	sd_vae_attn_act attn;    // the mid block's attention (probs kept)
	sd_tensor *attn_out;     // (N,Cl,h,w)
	sd_tensor *norm_out;     // (N,Cl,h,w) conv_norm_out, before SiLU
	sd_tensor *act_out;      // (N,Cl,h,w) silu(norm_out)
	sd_tensor *conv_out;     // (N,2L,h,w)
	sd_tensor *moments;      // (N,2L,h,w) quant_conv(conv_out) (conv_out itself without quant_conv)
} sd_vae_enc_act;
int sd_vae_encode_record(sd_vae *v, sd_vae_enc_act *act, sd_arena *a, const sd_tensor *x);

/*
 * Backwards of the encoder path (llm.c style: input gradient first, then the forward's activations and
 * inputs).  The weights are frozen; an adapter with a training state (sd_vae_conv.train, see "training
 * step") gets its dA/dB added (+=).  dx is written with `acc` (0 overwrite, 1 add); temporaries come
 * from `scratch` (on the VAE's device), which the caller resets afterwards.
 */
/* ResnetBlock2D: dx (N,Cin,H,W) from dout (N,Cout,H,W); act as recorded (every field distinct). */
int sd_vae_resnet_backward(sd_tensor *dx, const sd_tensor *dout, const sd_vae_resnet_act *act, const sd_tensor *x,
                           const sd_vae_resnet *p, int groups, float eps, sd_arena *scratch, int acc);
/* The mid-block attention: dx (N,C,H,W) from dout (N,C,H,W); act with probs kept (or NULL: recomputed). */
int sd_vae_attn_backward(sd_tensor *dx, const sd_tensor *dout, const sd_vae_attn_act *act, const sd_tensor *x,
                         const sd_vae_attn *p, int groups, float eps, sd_arena *scratch, int acc);
/*
 * The whole encoder after sd_vae_encode_record: dmoments (N,2L,h,w) = dLoss/dmoments (see
 * sd_gaussian_sample_backward for the posterior sample) → adapter gradients (+=), and dx (N,in,H,W)
 * (overwritten) when not NULL.  Without dx the walk stops at the earliest layer that has a training
 * state (the mid-block attention), since nothing before it has parameters to train.
 */
int sd_vae_encode_backward(sd_vae *v, const sd_vae_enc_act *act, const sd_tensor *dmoments, sd_tensor *dx);

/*
 * The decoder's forward with every activation a backward needs, in the arena `a` (the caller resets
 * it): the trainer's reconstruction loss (decoder-side VAE LoRA, --vae-recon-weight).  Untiled, on the
 * VAE's device.  z (N, latent, h, w) unscaled; out (N, out, h·f, w·f) raw, as sd_vae_decode.
 */
typedef struct sd_vae_dec_act {
	const sd_tensor *z;      // (N,L,h,w) the input (borrowed)
	sd_tensor *pq;           // post_quant_conv(z) (NULL without it)
	sd_tensor *conv_in;      // (N,Cl,h,w)
	int nres;                // 2 + nblocks·(layers_per_block+1): the mid block's two, then the up blocks'
	sd_vae_resnet_act res[SD_VAE_MAX_RESNETS];
	sd_tensor *res_in[SD_VAE_MAX_RESNETS];
	sd_tensor *res_out[SD_VAE_MAX_RESNETS];
	sd_vae_attn_act attn;    // the mid block's attention (input res_out[0], probs kept)
	sd_tensor *attn_out;
	sd_tensor *up[SD_VAE_MAX_BLOCKS];      // [nblocks-1] upsample2x outputs (the conv's input)
	sd_tensor *up_out[SD_VAE_MAX_BLOCKS];  // [nblocks-1] upsampler outputs
	sd_tensor *head_in;      // the last up block's output
	sd_tensor *norm_out, *act_out;
	sd_tensor *out;          // (N,out,H,W)
} sd_vae_dec_act;
int sd_vae_decode_record(sd_vae *v, sd_vae_dec_act *act, sd_arena *a, const sd_tensor *z);
/*
 * The decoder after sd_vae_decode_record: dout (N,out,H,W) = dLoss/dout → the gradients (+=) of the
 * mid-block attention's adapters with a training state.  The walk stops at that attention (nothing
 * before it in the decoder has parameters to train; no gradient for z); without a trained adapter
 * there it does nothing.
 */
int sd_vae_decode_backward(sd_vae *v, const sd_vae_dec_act *act, const sd_tensor *dout);

/* ==== CLIP text encoder (lib/models/clip.c) ==== */

/*
 * transformers' CLIPTextModel (modeling_clip.py) as Stable Diffusion uses it: token + position
 * embeddings, pre-LN transformer layers with causal self-attention and NO padding mask (the pipelines
 * pass no attention_mask, so padding tokens are attended), an MLP with quick_gelu (or hidden_act from
 * the config), final_layer_norm.  Sizes come from the config and the weights' shapes.
 *
 * clip_skip follows A1111: 1 (or 0) is the last layer, what SD uses by default; k takes the output of
 * the layer k-1 before the last (hidden_states[-k]) and then applies final_layer_norm.  diffusers'
 * clip_skip=c is A1111's c+1.
 */
#define SD_CLIP_MAX_LEN 77 /* tokens per prompt in SD 1.x (the tokenizer's model_max_length) */

typedef struct sd_clip_config {
	int vocab;        /* vocab_size (rows of token_embedding) */
	int max_pos;      /* max_position_embeddings: the longest token sequence */
	int hidden;       /* hidden_size D */
	int intermediate; /* intermediate_size F (the MLP's width) */
	int layers;       /* num_hidden_layers */
	int heads;        /* num_attention_heads (D / 64 when a single file has no config) */
	float eps;        /* layer_norm_eps */
	enum sd_act act;  /* hidden_act: quick_gelu, gelu (erf), gelu_new / gelu_pytorch_tanh (tanh) */
} sd_clip_config;

/* A linear layer: w (O, I), b (O); lora: an adapter (see sd_lora_layer), NULL when none. */
typedef struct sd_clip_linear {
	const sd_tensor *w, *b;
	const struct sd_lora_layer *lora;
	const struct sd_lora_train *train; /* the adapter's training state (gradients, dropout), NULL: frozen */
} sd_clip_linear;

/* The weights of one CLIPEncoderLayer (borrowed from the sd_weights). */
typedef struct sd_clip_layer {
	const sd_tensor *ln1_w, *ln1_b;    // (D) layer_norm1
	sd_clip_linear q, k, v, o;         // (D, D) self_attn.{q,k,v,out}_proj
	const sd_tensor *ln2_w, *ln2_b;    // (D) layer_norm2
	sd_clip_linear fc1, fc2;           // (F, D), (D, F) mlp.fc1, mlp.fc2
} sd_clip_layer;

/*
 * The activations of one layer's forward, allocated by the caller.  A recorded forward (for a backward)
 * gives every field its own tensor; inference may alias them: res1 == x (the residual added in place),
 * ln2 == ln1, a == h (activation in place), tmp == q (dead after the attention), probs NULL.
 */
typedef struct sd_clip_layer_act {
	sd_tensor *ln1;   // (N,L,D) layer_norm1(x)
	sd_tensor *q;     // (N,L,D) q_proj(ln1), unscaled (the attention applies head_dim^-0.5)
	sd_tensor *k;     // (N,L,D) k_proj(ln1)
	sd_tensor *v;     // (N,L,D) v_proj(ln1)
	sd_tensor *probs; // (N,H,L,L) softmax(q·kᵀ·scale + causal mask), or NULL (not kept)
	sd_tensor *att;   // (N,L,D) probs·v, heads concatenated (the input of out_proj)
	sd_tensor *res1;  // (N,L,D) x + out_proj(att)
	sd_tensor *ln2;   // (N,L,D) layer_norm2(res1)
	sd_tensor *h;     // (N,L,F) fc1(ln2)
	sd_tensor *a;     // (N,L,F) act(h)
	sd_tensor *tmp;   // (N,L,D) scratch for the out_proj and fc2 outputs (not needed by a backward)
	sd_tensor *lora;  // (N,L,r) scratch for LoRA adapters (x·Aᵀ of the last one), NULL when none is set
} sd_clip_layer_act;

/* out (N,L,D) = layer(x (N,L,D)): x += out_proj(attn(ln1(x))), then x += fc2(act(fc1(ln2(x)))).
 * out may alias res1 (and so x when res1 == x), never the other fields.  0 or -1 with a message. */
int sd_clip_layer_forward(sd_tensor *out, const sd_clip_layer_act *act, const sd_tensor *x,
                          const sd_clip_layer *p, const sd_clip_config *cfg);

/* out (N,L,D) = token_embedding[ids (N,L) i32] + position_embedding[0..L) (L <= max_pos); ids on the
 * tables' device, each in [0, vocab). */
int sd_clip_embed_forward(sd_tensor *out, const sd_tensor *ids, const sd_tensor *token_embedding,
                          const sd_tensor *position_embedding);

typedef struct sd_clip sd_clip;

/* Build the encoder over loaded weights (sd_weights_load(m, SD_TEXT_ENCODER, dev)), names as
 * transformers' (text_model.embeddings.token_embedding.weight, text_model.encoder.layers.<i>.…,
 * text_model.final_layer_norm.*): reads the config, finds every weight and checks its shape (a clear
 * "text_encoder: …" error otherwise).  Borrows w, which must outlive the encoder. */
sd_clip *sd_clip_new(const sd_weights *w);
void sd_clip_free(sd_clip *c);
const sd_clip_config *sd_clip_get_config(const sd_clip *c);
/* The weights of layer i (NULL when out of range), for a trainer's backward or LoRA. */
const sd_clip_layer *sd_clip_get_layer(const sd_clip *c, int i);
/* Bytes of activation memory held at the peak of the last call. */
size_t sd_clip_peak_bytes(const sd_clip *c);

/*
 * out (N,L,D) = final_layer_norm(hidden_states[layers + 1 - clip_skip]) for tokens (N,L) (i32, or i64
 * converted; 1 <= L <= max_pos; typically L = 77), clip_skip in [0, layers] (0 and 1 both mean the last
 * layer).  `hidden`, when not NULL, is (layers+1, N, L, D) and receives every hidden state as
 * transformers' output_hidden_states gives them (hidden[0] = the embeddings, hidden[k] = the output of
 * layer k, before the final LN); then every layer runs whatever clip_skip is, otherwise the layers past
 * the chosen one are skipped.  Tensors on the CPU or on the encoder's device.  0 or -1 with a message.
 */
int sd_clip_encode(sd_clip *c, sd_tensor *out, const sd_tensor *tokens, int clip_skip, sd_tensor *hidden);

/* ==== Prompt weighting and long prompts (lib/models/prompt.c) ==== */

/* A1111's attention syntax: "(a)" x1.1, "[a]" /1.1, "(a:1.3)", "\\(" escapes.  One piece of text with the
 * weight it carries (text NUL-terminated, malloc'd). */
typedef struct sd_prompt_span {
	char *text;
	size_t len;
	float weight;
} sd_prompt_span;

/* Parse len bytes of text into *n spans (at least one; neighbours of equal weight merged); the caller
 * frees them with sd_prompt_spans_free.  0 or -1 with a message. */
int sd_prompt_parse(const char *text, size_t len, sd_prompt_span **spans, int *n);
void sd_prompt_spans_free(sd_prompt_span *s, int n);
/* The tokens of a prompt in 77-token chunks as A1111 makes them (BOS, up to 75 tokens, EOS, padding;
 * a full chunk ends after a comma among its last 20 tokens): *ids i32 and *weights f32, both
 * 77 * *nchunks long, malloc'd (caller frees).  weighting = 0 takes the text as it is (weights all 1).
 * A prompt of at most 75 tokens without brackets gives what sd_tokenize_padded gives. */
int sd_prompt_tokenize(const sd_tokenizer *tok, const char *text, size_t len, int weighting, int32_t pad_id,
                       int32_t **ids, float **weights, int *nchunks);
/* Append chunks of the empty prompt until there are `want` (the negative prompt padded to the prompt's
 * length, as A1111 does); realloc'd in place. */
int sd_prompt_pad_chunks(int32_t **ids, float **weights, int *nchunks, int want, int32_t pad_id);
/* out (N,L,D) for tokens (N,L), L a multiple of 77: each chunk encoded on its own (sd_clip_encode) and
 * concatenated; with weights (f32 (N,L), or NULL) each chunk of each row multiplied by its token weights
 * and rescaled to its former mean (A1111's original emphasis).  L <= 77 without weights is exactly
 * sd_clip_encode.  out on the CPU.  0 or -1 with a message. */
int sd_prompt_encode(sd_clip *c, sd_tensor *out, const sd_tensor *tokens, const sd_tensor *weights, int clip_skip);

/*
 * SDXL's use of one encoder (StableDiffusionXLPipeline.encode_prompt): penult (N,L,D) =
 * hidden_states[-2] (the penultimate layer's output, no final LN); pooled (N,P), when not NULL, = the
 * final-LN state at the EOS position (transformers' pooler_output) through text_projection (P its rows)
 * when the encoder has one (CLIPTextModelWithProjection's text_embeds), else the pooled state (P = D).
 * Host tensors; tokens i32 or i64.  0 or -1 with a message.
 */
int sd_clip_encode_sdxl(sd_clip *c, sd_tensor *penult, sd_tensor *pooled, const sd_tensor *tokens);
/* Both SDXL encoders on their own tokens (N,L): *context (N,L,D1+D2) = the two penultimate states
 * concatenated on channels, *pooled (N,P) = te2's text_embeds; new host tensors the caller frees. */
int sd_clip_encode_sdxl_pair(sd_clip *te1, sd_clip *te2, const sd_tensor *tok1, const sd_tensor *tok2,
                             sd_tensor **context, sd_tensor **pooled);
/* Rows of text_projection (projection_dim), 0 when the encoder has none. */
int sd_clip_projection_dim(const sd_clip *c);

/*
 * The forward with every activation a backward needs (the trainer's path for a text-encoder LoRA):
 * tensor data in the arena `a` (on the encoder's device; the caller resets it), tensor headers and the
 * arrays in host memory owned by c, valid until the next record call or sd_clip_free.  ids (N,L) i32 on
 * the encoder's device.  Runs nlayers = layers + 1 - max(clip_skip, 1) layers.
 */
typedef struct sd_clip_act {
	const sd_tensor *ids;     // (N,L) the input (borrowed)
	int nlayers;              // layers run
	sd_tensor **hidden;       // [nlayers+1] (N,L,D): hidden[0] embeddings, hidden[k] output of layer k
	sd_clip_layer_act *layer; // [nlayers] every field distinct, probs kept
	sd_tensor *out;           // (N,L,D) final_layer_norm(hidden[nlayers])
} sd_clip_act;
int sd_clip_encode_record(sd_clip *c, sd_clip_act *act, sd_arena *a, const sd_tensor *ids, int clip_skip);

/*
 * One layer's backward: dx (N,L,D) (acc: 0 overwrite, 1 add) from dout (N,L,D), given the recorded act
 * (probs kept, or NULL: recomputed) and the layer input x.  Frozen weights; adapters with a training
 * state (sd_clip_linear.train) get dA/dB += .  dx NULL: only the adapter gradients.  Temporaries from
 * `scratch` (the encoder's device), which the caller resets afterwards.
 */
int sd_clip_layer_backward(sd_tensor *dx, const sd_tensor *dout, const sd_clip_layer_act *act, const sd_tensor *x,
                           const sd_clip_layer *p, const sd_clip_config *cfg, sd_arena *scratch, int acc);
/* The encoder's backward after sd_clip_encode_record: dout (N,L,D) = dLoss/d act->out → the adapter
 * gradients (+=) of every layer (no gradient into the token ids).  Scratch is the encoder's own. */
int sd_clip_backward(sd_clip *c, const sd_clip_act *act, const sd_tensor *dout);

/* ==== UNet (lib/models/unet.c) ==== */

/*
 * UNet2DConditionModel as diffusers 0.25 builds it from unet/config.json (unet_2d_condition.py,
 * unet_2d_blocks.py, resnet.py, transformer_2d.py, attention.py, attention_processor.py, embeddings.py):
 * sinusoidal time projection → TimestepEmbedding; conv_in; down blocks (DownBlock2D,
 * CrossAttnDownBlock2D); the UNetMidBlock2DCrossAttn; up blocks (UpBlock2D, CrossAttnUpBlock2D) that
 * concatenate the skips in reverse; conv_norm_out → SiLU → conv_out.  Every size comes from the config
 * and is checked against the weights' shapes: any number of blocks, layers and transformer layers,
 * per-block head counts, cross-attention widths, linear or 1×1-conv projections.
 *
 * Heads: diffusers' SD 1.x configs name the head COUNT attention_head_dim (num_attention_heads is null),
 * so heads = num_attention_heads, else attention_head_dim (an int or one per down block); the head
 * width is channels / heads.  upcast_attention is a no-op here: everything is f32.
 */
#define SD_UNET_MAX_BLOCKS 8
#define SD_UNET_MAX_TLAYERS 16 /* transformer (BasicTransformerBlock) layers per Transformer2DModel */

typedef struct sd_unet_config {
	int in_channels, out_channels;        /* 4, 4 */
	int nblocks;                          /* len(block_out_channels) = len(down_block_types) */
	int block_out[SD_UNET_MAX_BLOCKS];    /* block_out_channels */
	int down_attn[SD_UNET_MAX_BLOCKS];    /* 1: CrossAttnDownBlock2D, 0: DownBlock2D */
	int up_attn[SD_UNET_MAX_BLOCKS];      /* 1: CrossAttnUpBlock2D, 0: UpBlock2D (up block order) */
	int layers[SD_UNET_MAX_BLOCKS];       /* layers_per_block per down block (up blocks: reversed, +1) */
	int heads[SD_UNET_MAX_BLOCKS];        /* attention heads per down block (see above) */
	int cross_dim[SD_UNET_MAX_BLOCKS];    /* cross_attention_dim per down block */
	int tlayers[SD_UNET_MAX_BLOCKS];      /* transformer_layers_per_block per down block */
	int up_tlayers[SD_UNET_MAX_BLOCKS];   /* per up block (reverse_transformer_layers_per_block) */
	int mid_attn;                         /* 1: UNetMidBlock2DCrossAttn, 0: no mid block (null) */
	int linear_proj;                      /* use_linear_projection */
	int upcast_attention;                 /* read and accepted; no effect in f32 */
	int groups;                           /* norm_num_groups */
	float eps;                            /* norm_eps (resnets, conv_norm_out) */
	int flip_sin_to_cos;
	float freq_shift;                     /* downscale_freq_shift of the time projection */
	int time_proj_dim, temb_dim;          /* block_out[0]; time_embedding_dim or 4·block_out[0] */
	int conv_in_kernel, conv_out_kernel;
	float mid_scale;                      /* mid_block_scale_factor: the mid resnets' output_scale_factor */
	int center_input_sample;              /* sample = 2·sample − 1 first */
} sd_unet_config;

/* A conv (w (O, C, kh, kw), b (O)). */
typedef struct sd_unet_conv {
	const sd_tensor *w, *b;
} sd_unet_conv;

/*
 * A linear layer: out = x·wᵀ + b (w (O, I), b (O) or NULL: to_q/to_k/to_v have none).  The place for a
 * LoRA adapter: when lora_a (r, I) and lora_b (O, r) are set, out += lora_scale · (x·Aᵀ)·Bᵀ (PEFT's
 * scaling alpha/r); sd_unet_new leaves them NULL, a LoRA loader or trainer fills them in.
 */
typedef struct sd_unet_linear {
	const sd_tensor *w, *b;
	const sd_tensor *lora_a, *lora_b;
	float lora_scale;
	const struct sd_lora_train *train; /* the adapter's training state (gradients, dropout), NULL: frozen */
} sd_unet_linear;

/* ResnetBlock2D with the time embedding ("default" time_embedding_norm). */
typedef struct sd_unet_resnet {
	int cin, cout;
	const sd_tensor *norm1_w, *norm1_b, *norm2_w, *norm2_b; // (Cin), (Cout)
	sd_unet_conv conv1, conv2;  // 3×3: (Cout, Cin), (Cout, Cout)
	sd_unet_linear temb;        // time_emb_proj (Cout, T)
	sd_unet_conv shortcut;      // conv_shortcut 1×1 when cin != cout, else w = NULL
	float out_scale;            // output_scale_factor
} sd_unet_resnet;

/*
 * The activations of one ResnetBlock2D forward, allocated by the caller.  A recorded forward gives each
 * field its own tensor; inference aliases: n1 == h1 and n2 == h2 select the fused GroupNorm+SiLU, and
 * a1 == n2 normalises in place.
 */
typedef struct sd_unet_resnet_act {
	sd_tensor *n1; // (N,Cin,H,W)  norm1(x), before SiLU
	sd_tensor *h1; // (N,Cin,H,W)  silu(n1)
	sd_tensor *tp; // (N,Cout)     time_emb_proj(silu(temb))
	sd_tensor *a1; // (N,Cout,H,W) conv1(h1) + tp (broadcast over space)
	sd_tensor *n2; // (N,Cout,H,W) norm2(a1), before SiLU
	sd_tensor *h2; // (N,Cout,H,W) silu(n2)
	sd_tensor *sc; // (N,Cout,H,W) conv_shortcut(x), NULL without a shortcut
} sd_unet_resnet_act;

/* out (N,Cout,H,W) = (shortcut(x) + conv2(h2)) / out_scale for x (N,Cin,H,W) and temb_act (N,T) =
 * silu(time embedding) (shared by every resnet).  out must not alias x or any act field. */
int sd_unet_resnet_forward(sd_tensor *out, const sd_unet_resnet_act *act, const sd_tensor *x,
                           const sd_tensor *temb_act, const sd_unet_resnet *p, int groups, float eps);

/* Attention (attention_processor.py) without bias on to_q/to_k/to_v, scale dim_head^-0.5. */
typedef struct sd_unet_attn {
	int heads, dim_head;            // inner = heads·dim_head
	sd_unet_linear q, k, v, out;    // (inner, Dq), (inner, Dkv), (inner, Dkv), to_out.0 (Dq, inner)
} sd_unet_attn;

typedef struct sd_unet_attn_act {
	sd_tensor *q;     // (N,Lq,inner) to_q(x)
	sd_tensor *k, *v; // (N,Lk,inner) to_k(kv), to_v(kv)
	sd_tensor *probs; // (N,heads,Lq,Lk) softmax(q·kᵀ·scale), or NULL (not kept)
	sd_tensor *o;     // (N,Lq,inner) probs·v, heads concatenated (the input of to_out)
	sd_tensor *lora;  // (N,L,r) scratch for LoRA adapters, NULL when none is set
} sd_unet_attn_act;

/* BasicTransformerBlock (layer_norm, eps 1e-5): self-attention, cross-attention on the context, GEGLU
 * feed-forward, each pre-normed with a residual. */
typedef struct sd_unet_tblock {
	const sd_tensor *ln1_w, *ln1_b, *ln2_w, *ln2_b, *ln3_w, *ln3_b; // (D)
	sd_unet_attn attn1, attn2;
	sd_unet_linear ff1;  // ff.net.0.proj (2F, D), F = 4·D
	sd_unet_linear ff2;  // ff.net.2 (D, F)
} sd_unet_tblock;

/* Inference aliases ln1 == ln2 == ln3, r1 == r2 == x (residuals added in place), attn2's q/o == attn1's,
 * tmp shared; out may then be x. */
typedef struct sd_unet_tblock_act {
	sd_tensor *ln1;         // (N,L,D) norm1(x)
	sd_unet_attn_act a1;    // self-attention on ln1
	sd_tensor *r1;          // (N,L,D) x + to_out(a1.o)
	sd_tensor *ln2;         // (N,L,D) norm2(r1)
	sd_unet_attn_act a2;    // cross-attention: q from ln2, k/v from the context
	sd_tensor *r2;          // (N,L,D) r1 + to_out(a2.o)
	sd_tensor *ln3;         // (N,L,D) norm3(r2)
	sd_tensor *ffh;         // (N,L,2F) ff.net.0.proj(ln3)
	sd_tensor *ffg;         // (N,L,F)  geglu(ffh)
	sd_tensor *tmp;         // (N,L,D) scratch for the to_out / ff.net.2 outputs (not needed by a backward)
} sd_unet_tblock_act;

/* out (N,L,D) = r2 + ff(ln3) for x (N,L,D), context (N,Lc,Dc).  out may alias x/r1/r2 (inference). */
int sd_unet_tblock_forward(sd_tensor *out, const sd_unet_tblock_act *act, const sd_tensor *x,
                           const sd_tensor *context, const sd_unet_tblock *p);

/* Transformer2DModel (continuous input): GroupNorm(groups, eps 1e-6) → proj_in → blocks → proj_out,
 * plus the input.  proj_in/proj_out are kept as linear weights (I, C) / (C, I) whether the checkpoint
 * stores them as 1×1 convs or as linears (a 1×1 conv on NCHW is the same linear on the pixels). */
typedef struct sd_unet_transformer {
	int c, inner, nlayers;
	const sd_tensor *norm_w, *norm_b;  // (C)
	sd_unet_linear proj_in, proj_out;  // (I, C), (C, I)
	sd_unet_tblock blk[SD_UNET_MAX_TLAYERS];
} sd_unet_transformer;

typedef struct sd_unet_transformer_act {
	sd_tensor *n;    // (N,C,H,W) norm(x)
	sd_tensor *nl;   // (N,L,C)   n with pixels as rows, L = H·W
	sd_tensor *h[SD_UNET_MAX_TLAYERS + 1]; // (N,L,I) h[0] = proj_in(nl), h[k+1] = blk[k](h[k])
	sd_unet_tblock_act blk[SD_UNET_MAX_TLAYERS];
	sd_tensor *p;    // (N,L,C)   proj_out(h[nlayers])
} sd_unet_transformer_act;

/* out (N,C,H,W) = x + proj_out(...) as NCHW; context (N,Lc,Dc).  out must not alias x or act fields. */
int sd_unet_transformer_forward(sd_tensor *out, const sd_unet_transformer_act *act, const sd_tensor *x,
                                const sd_tensor *context, const sd_unet_transformer *p, int groups);

typedef struct sd_unet sd_unet;

/* Build the UNet over loaded weights (sd_weights_load(m, SD_UNET, dev)): reads the config, finds every
 * weight and checks its shape (a clear "unet: …" error otherwise; unsupported config options such as
 * class or addition embeddings are refused by name).  Borrows w, which must outlive the UNet. */
sd_unet *sd_unet_new(const sd_weights *w);
/* A UNet of the given sizes with random weights it owns (uniform at torch's default scale), on dev:
 * for benchmarks and tests that need a shape no fixture has (the full SD 1.5 UNet).  Fields left 0 take
 * diffusers' defaults (layers 2, heads 8, cross_dim 768, 1 transformer layer, 32 groups, eps 1e-5,
 * 3×3 conv_in/out, temb 4·block_out[0]); set down_attn/up_attn/mid_attn for the block types. */
sd_unet *sd_unet_new_random(const sd_unet_config *c, enum sd_device dev, uint64_t seed);
void sd_unet_free(sd_unet *u);
const sd_unet_config *sd_unet_get_config(const sd_unet *u);
/* The layers in network order, for a trainer or a LoRA loader (mutable: adapters are set on the
 * sd_unet_linear fields): resnets — down blocks, the mid block's two, up blocks; transformers — down
 * blocks, mid block, up blocks.  NULL when out of range. */
int sd_unet_resnet_count(const sd_unet *u);
sd_unet_resnet *sd_unet_get_resnet(sd_unet *u, int i);
int sd_unet_transformer_count(const sd_unet *u);
sd_unet_transformer *sd_unet_get_transformer(sd_unet *u, int i);
/* A linear layer by its diffusers module name ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
 * "time_embedding.linear_1", "mid_block.resnets.0.time_emb_proj", …), NULL when there is none.  LoRA
 * adapters (lora_a, lora_b, lora_scale) are honoured on the attention projections to_q, to_k, to_v and
 * to_out.0; the caller keeps the adapter tensors alive (f32, on the UNet's device). */
sd_unet_linear *sd_unet_find_linear(sd_unet *u, const char *module);
/* Bytes of activation memory held at the peak of the last call (every arena the call used). */
size_t sd_unet_peak_bytes(const sd_unet *u);

/* Called with the output of each module as diffusers' forward hooks see it: "time_proj",
 * "time_embedding", "conv_in", "down_blocks.<i>" (after its downsampler), "down_blocks.<i>.res_samples.<j>"
 * (the skips that block pushes), "mid_block", "up_blocks.<i>", "conv_norm_out" (before SiLU),
 * "conv_act", "conv_out".  The tensor is on the UNet's device and lives until the hook returns. */
typedef void (*sd_unet_hook)(void *ctx, const char *module, const sd_tensor *out);
void sd_unet_set_hook(sd_unet *u, sd_unet_hook fn, void *ctx);

/*
 * eps (N,out,h,w) = unet(latent (N,in,h,w), t, context (N,Lc,Dc)): t holds nt timesteps, nt = N (one
 * per sample, as training draws them) or 1 (broadcast), integer or fractional.  Any h, w ≥ 1 (the up
 * blocks resize to the skips' sizes as diffusers does).  Tensors on the CPU or on the UNet's device.
 * Activations come from `a` (on the UNet's device; the caller resets it; NULL = the UNet's own) plus
 * per-layer scratch the UNet owns.  0 or -1 with a message (wrong channels or context width included).
 */
int sd_unet_forward(sd_unet *u, sd_arena *a, sd_tensor *eps, const sd_tensor *latent, const float *t, int nt,
                    const sd_tensor *context);

/*
 * The forward with every activation a backward needs, all in the arena `a` (on the UNet's device,
 * the caller resets it); headers and arrays in host memory owned by u, valid until the next forward.
 * Tensors latent/context on the UNet's device.  Layers in network order (as sd_unet_get_resnet /
 * sd_unet_get_transformer count them); each resnet's and transformer's input is recorded (an up
 * block resnet's input is the concatenation with its skip).
 */
typedef struct sd_unet_act {
	const sd_tensor *latent, *context; // the inputs (borrowed)
	sd_tensor *time_proj;   // (N,T0) sinusoidal embedding
	sd_tensor *temb_h;      // (N,T)  linear_1(time_proj)
	sd_tensor *temb_a;      // (N,T)  silu(temb_h)
	sd_tensor *temb;        // (N,T)  linear_2(temb_a)
	sd_tensor *temb_act;    // (N,T)  silu(temb), the input of every time_emb_proj
	sd_tensor *conv_in;     // (N,C0,h,w)
	int nres, ntr;
	sd_unet_resnet_act *res;        // [nres]
	sd_tensor **res_in, **res_out;  // [nres]
	sd_unet_transformer_act *tr;    // [ntr]
	sd_tensor **tr_in, **tr_out;    // [ntr]
	sd_tensor *down[SD_UNET_MAX_BLOCKS]; // downsampler outputs (NULL for the last block)
	sd_tensor *up[SD_UNET_MAX_BLOCKS];   // up-block i: the nearest-resized input of its upsampler conv
	sd_tensor *upconv[SD_UNET_MAX_BLOCKS]; // its conv output
	sd_tensor *norm_out;    // (N,C0,h,w) conv_norm_out, before SiLU
	sd_tensor *act_out;     // (N,C0,h,w) silu(norm_out)
	sd_tensor *out;         // (N,out,h,w) conv_out
	int checkpointed;       // 1: sd_unet_forward_checkpointed (res/tr acts, up-block res_in, up[] not kept)
} sd_unet_act;
int sd_unet_forward_record(sd_unet *u, sd_unet_act *act, sd_arena *a, const sd_tensor *latent, const float *t,
                           int nt, const sd_tensor *context);
/*
 * Gradient checkpointing: the same walk keeping only what the backward cannot recompute cheaply — the
 * time embedding and every resnet's / transformer's / resampler's output (the block inputs) — in `a`;
 * act->res[i] / act->tr[i] are left zero (act->checkpointed = 1) and sd_unet_backward recomputes each
 * block's activations just before its backward (one block at a time: memory O(one block)).
 */
int sd_unet_forward_checkpointed(sd_unet *u, sd_unet_act *act, sd_arena *a, const sd_tensor *latent,
                                 const float *t, int nt, const sd_tensor *context);

/*
 * Backwards (llm.c style: gradients first, then the recorded activations and inputs, then sizes).  The
 * weights are frozen; an adapter with a training state (sd_unet_linear.train) gets dA/dB added (+=).  dx
 * is written with `acc` (0 overwrite, 1 add); dctx, the cross-attention context's gradient, always
 * accumulates (+=: every transformer adds to it); NULL when not wanted.  Temporaries come from
 * `scratch` (the UNet's device), which the caller resets afterwards.  No gradient flows into the time
 * embedding (timesteps are not differentiated, time_emb_proj is frozen).
 */
/* ResnetBlock2D: dx (N,Cin,H,W) from dout (N,Cout,H,W). */
int sd_unet_resnet_backward(sd_tensor *dx, const sd_tensor *dout, const sd_unet_resnet_act *act, const sd_tensor *x,
                            const sd_unet_resnet *p, int groups, float eps, sd_arena *scratch, int acc);
/* BasicTransformerBlock: dx (N,L,D) from dout (N,L,D); ctx (N,Lc,Dc), dctx += . */
int sd_unet_tblock_backward(sd_tensor *dx, sd_tensor *dctx, const sd_tensor *dout, const sd_unet_tblock_act *act,
                            const sd_tensor *x, const sd_tensor *ctx, const sd_unet_tblock *p, sd_arena *scratch, int acc);
/* Transformer2DModel: dx (N,C,H,W) from dout (N,C,H,W); dctx += . */
int sd_unet_transformer_backward(sd_tensor *dx, sd_tensor *dctx, const sd_tensor *dout,
                                 const sd_unet_transformer_act *act, const sd_tensor *x, const sd_tensor *ctx,
                                 const sd_unet_transformer *p, int groups, sd_arena *scratch, int acc);
/*
 * The whole UNet after sd_unet_forward_record / _checkpointed (act as they left it, the arena not yet
 * reset): deps (N,out,h,w) = dLoss/d eps → adapter gradients (+=), dlatent (N,in,h,w) and dcontext
 * (N,Lc,Dc) (both overwritten; NULL: not wanted — without dlatent the walk skips what lies before the
 * first trainable layer).  Scratch arenas are the UNet's own.
 */
int sd_unet_backward(sd_unet *u, const sd_unet_act *act, const sd_tensor *deps, sd_tensor *dlatent,
                     sd_tensor *dcontext);
/* The module names of the linear layers (diffusers' paths, in build order), for a trainer choosing
 * LoRA targets; NULL when i is out of range.  Adapters act unmerged on the attention projections only. */
int sd_unet_linear_count(const sd_unet *u);
const char *sd_unet_linear_name(const sd_unet *u, int i);

/* ==== samplers (lib/models/sampler.c) ==== */

/*
 * The noise schedulers of diffusers 0.25, equal to them step for step (float32 arithmetic in diffusers'
 * order, timestep and sigma tables as numpy computes them): PNDMScheduler (PLMS with skip_prk_steps, the
 * SD 1.x default; PRK warm-up otherwise), DDIMScheduler (eta 0 or > 0), DDPMScheduler, EulerDiscrete,
 * EulerAncestralDiscrete, DPMSolverMultistep (DPM++ 2M: dpmsolver++, midpoint, lower_order_final) and
 * LMSDiscrete (order 4), with Karras sigmas for euler, dpmpp_2m and lms; timestep_spacing leading /
 * trailing / linspace, steps_offset, set_alpha_to_one, prediction_type epsilon / v_prediction / sample.
 *
 * A run is a list of sd_sched_calls() steps (PNDM makes N + 1 model calls for N steps: its timestep list
 * repeats one entry).  Per step i: feed the UNet sd_sched_scale_model_input(x, i) at timestep
 * sd_sched_timestep(i), then sd_sched_step(x, model_output, i).  Steps go in order from a begin index
 * (0 for text-to-image, sd_sched_strength_begin for image-to-image); the first step of a fresh scheduler
 * may be any index, which then becomes the begin.  Latents are f32 CPU tensors of any shape.
 */
enum sd_sampler_kind {
	SD_SAMPLER_PNDM = 0,
	SD_SAMPLER_DDIM,
	SD_SAMPLER_DDPM,
	SD_SAMPLER_EULER,
	SD_SAMPLER_EULER_A,
	SD_SAMPLER_DPMPP_2M,
	SD_SAMPLER_LMS,
	SD_SAMPLER_COUNT
};

/* "pndm", "ddim", "ddpm", "euler", "euler_a", "dpmpp_2m", "lms". */
const char *sd_sampler_name(enum sd_sampler_kind k);
/* Parse a name (or the aliases "plms", "euler_ancestral", "dpm++2m", "dpm++_2m", "dpmpp2m"); -1 with
 * "unknown sampler 'x' (known: …)" otherwise. */
int sd_sampler_parse(const char *name, enum sd_sampler_kind *out);

typedef struct sd_sched sd_sched;

/*
 * A scheduler of `kind` for `steps` inference steps, configured from a scheduler_config.json text
 * (sd_model_scheduler_json; NULL = the SD 1.x config) the way diffusers' from_config resolves it: keys
 * the class does not take are ignored, absent ones get the class's defaults (timestep_spacing "leading"
 * for pndm/ddim/ddpm, "linspace" for the others).  karras: < 0 = the config's use_karras_sigmas, 0 = off,
 * > 0 = on (euler, dpmpp_2m, lms only).  eta: DDIM's η (0 = deterministic; must be 0 for the others).
 * NULL with a message on a bad config, an unsupported option, steps < 1 or > num_train_timesteps.
 */
sd_sched *sd_sched_new(const char *config_json, enum sd_sampler_kind kind, int steps, int karras, double eta);
void sd_sched_free(sd_sched *s);

enum sd_sampler_kind sd_sched_kind(const sd_sched *s);
int sd_sched_steps(const sd_sched *s);     /* num_inference_steps as given */
int sd_sched_calls(const sd_sched *s);     /* len(scheduler.timesteps): model calls of a full run */
int sd_sched_karras(const sd_sched *s);    /* 1 when Karras sigmas are in use */
double sd_sched_eta(const sd_sched *s);
/* scheduler.timesteps[i] (integer-valued except for euler/euler_a/lms; NaN out of range). */
double sd_sched_timestep(const sd_sched *s, int i);
/* scheduler.sigmas[i], i in [0, calls] (euler, euler_a, lms, dpmpp_2m; NaN for the others). */
float sd_sched_sigma(const sd_sched *s, int i);
/* The factor for the initial noise: 1, or the largest sigma (≈14.61 for euler with SD 1.x). */
float sd_sched_init_noise_sigma(const sd_sched *s);
/* The training schedule, num_train_timesteps entries (*n), float32 as torch makes it. */
const float *sd_sched_betas(const sd_sched *s, int *n);
const float *sd_sched_alphas_cumprod(const sd_sched *s, int *n);

/* Image-to-image: the first step index for `strength` in [0, 1], as StableDiffusionImg2ImgPipeline
 * computes it (init_timestep = int(steps·strength), t_start = steps − init_timestep, index t_start·order);
 * -1 with a message when strength is out of range or leaves no step to run. */
int sd_sched_strength_begin(const sd_sched *s, double strength);
/* Start a run at step i (forgets the history). */
int sd_sched_set_begin(sd_sched *s, int i);
int sd_sched_begin(const sd_sched *s);
/* The next step to take (= the step index reached). */
int sd_sched_index(const sd_sched *s);

/* out = the UNet input for step i: x / (σ_i² + 1)^½ for euler/euler_a/lms, x otherwise (out may be x). */
int sd_sched_scale_model_input(const sd_sched *s, sd_tensor *out, const sd_tensor *x, int i);
/* out = x0 noised to step i's timestep with the sampler's own add_noise (√ᾱ·x0 + √(1−ᾱ)·noise, or
 * x0 + σ·noise for the sigma samplers, α_t·x0 + σ_t·noise for dpmpp_2m); out may alias x0. */
int sd_sched_add_noise(const sd_sched *s, sd_tensor *out, const sd_tensor *x0, const sd_tensor *noise, int i);

/*
 * One step at index i (the next one, see above): x ← prev_sample given the model output (same shape).
 * Stochastic steps (ddim with eta > 0, ddpm, euler_a) add `noise` when given, else draw it from `rng` as
 * diffusers' randn_tensor does (torch.randn of x's shape), else fail; euler also draws (and, with
 * s_churn 0, discards) one randn per step when given only a generator, as diffusers does, so a seeded
 * run stays on diffusers' stream.  pred_x0, when not NULL, receives pred_original_sample (DPM-Solver's
 * converted x0; left untouched by pndm).  On failure x may be partly written.
 */
int sd_sched_step(sd_sched *s, sd_tensor *x, const sd_tensor *model_output, int i, const sd_tensor *noise,
                  sd_rng *rng, sd_tensor *pred_x0);

/*
 * The state in a frame's sampler map: sets "name", "steps", "karras", "eta", "begin", "step" (the next
 * step index) and the history: pndm "ets" (array of tensors, oldest first), "cur_sample",
 * "cur_model_output"; dpmpp_2m "model_outputs" (array, nil for none), "lower_order_nums"; lms
 * "derivatives".  Other keys of the map are kept.  sd_sched_load restores it into a scheduler made with
 * the same sampler and steps (checked), so a run continued in another process is bit-identical.
 */
int sd_sched_save(const sd_sched *s, sd_value *map);
int sd_sched_load(sd_sched *s, const sd_value *map);

/* ==== LoRA adapters and merging (lib/models/lora.c, lib/models/merge.c) ==== */

/*
 * A LoRA adapter on one linear layer, as PEFT defines it (peft/tuners/lora/layer.py):
 *   y = x·Wᵀ + b + scale · dropout(x)·Aᵀ·Bᵀ,   scale = user scale · alpha / r (alpha / √r with rsLoRA)
 * A = lora_A / lora_down (r, I), B = lora_B / lora_up (O, r), f32 on the layer's device.  Dropout acts
 * on the adapter's input only and only in training (a trainer's forward); inference ignores it.  Several
 * adapters on one layer add up: a loader hands the model one sd_lora_layer whose A and B are the
 * adapters stacked along r (each A row block pre-multiplied by its own scale, scale = 1).  The model's
 * linear holds a pointer to it (sd_clip_linear.lora, sd_vae_conv.lora; the UNet's sd_unet_linear has
 * lora_a/lora_b/lora_scale fields of its own); the owner keeps it alive.
 */
typedef struct sd_lora_layer {
	const sd_tensor *a; // (r, I)
	const sd_tensor *b; // (O, r)
	float scale;        // applied to B·(A·x)
	float dropout;      // lora_dropout p (training only)
} sd_lora_layer;

/* The rank r of a layer's adapter, 0 for NULL. */
int sd_lora_rank(const sd_lora_layer *l);

/*
 * out (…, O) = x (…, I)·wᵀ + b + l->scale · (x·Aᵀ)·Bᵀ; w (O, I), b (O) or NULL, l NULL = a plain linear.
 * ax (…, r) is the caller's scratch and receives x·Aᵀ (kept for a backward; it may be longer than
 * needed: a view of its first elements is used).  out must not alias x or ax.  0 or -1 with a message.
 */
int sd_lora_linear_forward(sd_tensor *out, const sd_tensor *x, const sd_tensor *w, const sd_tensor *b,
                           const sd_lora_layer *l, sd_tensor *ax);

/* The linear layers a LoRA loader can set an adapter on, by their diffusers / transformers module name
 * ("text_model.encoder.layers.0.self_attn.q_proj"; "encoder.mid_block.attentions.0.to_q"), NULL when
 * there is none: every linear of the text encoder, the VAE's attention projections. */
sd_clip_linear *sd_clip_find_linear(sd_clip *c, const char *module);
sd_vae_conv *sd_vae_find_linear(sd_vae *v, const char *module);

/*
 * A set of adapters, from any number of files or folders, each with its own user scale, for every
 * component they hold.  Formats (told apart by their keys):
 *   - PEFT folders (PeftModel.save_pretrained): adapter_config.json (r, lora_alpha, rank_pattern,
 *     alpha_pattern, use_rslora; other fields ignored) + adapter_model.safetensors with keys
 *     base_model.model.<module>.lora_A.weight / .lora_B.weight; the component comes from the folder's
 *     name (unet, text_encoder, vae), else the config's auto_mapping, else the module names.  A folder
 *     holding unet/, text_encoder/ and/or vae/ loads each of them.
 *   - kohya / A1111 files: lora_unet_<module with '_'>, lora_te_<module>, .lora_down.weight (A),
 *     .lora_up.weight (B), .alpha (missing: alpha = r); the module may be the diffusers path or the
 *     original LDM one (lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q), resolved against
 *     the model's weights when the set is applied.
 *   - diffusers files (save_lora_weights): unet.<module>.lora_A.weight / text_encoder.<module>…, also
 *     .lora.down/.lora.up, .lora_linear_layer.down/.up and processor.to_q_lora.down spellings; alpha = r
 *     unless a <module>.alpha key is present (as diffusers loads them).
 * A folder holding pytorch_lora_weights.safetensors is read as that file.  .ckpt/.pt/.bin files are read
 * with the restricted unpickler.  Conv adapters (4-D down (r,C,kh,kw), up (O,r,1,1)) are accepted and
 * merged into the weights (exact); 1×1 ones on linear layers act as linear adapters.
 * Any key that is not part of an adapter, an A without its B, or a shape that does not fit is an error
 * naming the first such key: nothing is silently ignored.
 */
typedef struct sd_lora sd_lora;

sd_lora *sd_lora_new(void);
void sd_lora_free(sd_lora *s);
/* Read the adapters at path with user scale `scale` into s.  -1 with "<path>: <key>: what" on failure. */
int sd_lora_add(sd_lora *s, const char *path, float scale);
/* Split a --lora argument "PATH[:SCALE]": the text after the last ':' is the scale when it is a number
 * (else the whole argument is the path, scale 1).  *path is malloc'd.  -1 on an empty path. */
int sd_lora_parse_arg(const char *arg, char **path, float *scale);
/* sd_lora_add on each "PATH[:SCALE]" argument: a new set, or NULL with a message.  n = 0 gives an
 * empty set (applying it changes nothing). */
sd_lora *sd_lora_load(const char *const *args, int n);
/* Number of adapter layers (A/B pairs) the set holds for component c. */
int sd_lora_count(const sd_lora *s, enum sd_component c);

/*
 * Apply the set's adapters for the model's component, unmerged (run-time) where the model has a slot
 * for the layer — every text-encoder linear; the VAE's and the UNet's attention projections to_q,
 * to_k, to_v, to_out.0 — and merged into the weights w (which the model borrows and which must be the
 * same ones it was built on; they are modified in place) elsewhere.  Adapter tensors are copied to the
 * weights' device and owned by s, which must outlive the model.  An adapter for a layer the model lacks,
 * or of the wrong shape, is an error naming its key; the model may then hold part of the set.
 */
int sd_lora_attach_clip(sd_lora *s, sd_clip *c, sd_weights *w);
int sd_lora_attach_vae(sd_lora *s, sd_vae *v, sd_weights *w);
int sd_lora_attach_unet(sd_lora *s, sd_unet *u, sd_weights *w);
/* Merge the set's adapters for w's component into w: W ← W + scale·B·A (conv adapters reshaped). */
int sd_lora_merge(sd_lora *s, sd_weights *w);

/* ---- checkpoint arithmetic and writing (lib/models/merge.c, for sd-merge) ---- */

/* dst ← a·dst + b·src for every tensor, names and shapes equal (else an error naming the first tensor
 * that differs); non-float tensors must be equal.  Same device. */
int sd_weights_axpby(sd_weights *dst, float a, const sd_weights *src, float b);
/* A mutable view of w's i-th tensor (w owns it; for merging tools). */
sd_tensor *sd_weights_at_mut(sd_weights *w, int i);

/*
 * The original (CompVis/LDM single-file) name of a diffusers-named weight of w's component, the inverse
 * of the renaming sd_model_open does for single files (e.g. "down_blocks.1.attentions.0.proj_in.weight"
 * → "model.diffusion_model.input_blocks.4.1.proj_in.weight").  *unsqueeze is set to the number of 1-sized
 * dimensions the tensor gains (the VAE's attention linears are 1×1 convs there).  1 mapped, 0 when the
 * weight has no LDM name, -1 on error.
 */
int sd_ldm_name(const sd_weights *w, const char *name, char *out, size_t n, int *unsqueeze);

/*
 * Write components (ws[c], NULL when absent) as a diffusers folder (model_index.json,
 * <component>/config.json + weights, the tokenizer copied from tokenizer_dir when not NULL, the
 * scheduler config given as text or SD 1.x's PNDM config), built in "<dir>.tmp-XXXXXX" and renamed into
 * place (dir must not exist); or as one single-file LDM .safetensors written atomically.  dtype
 * SD_DTYPE_F32, F16 or BF16 for float tensors.
 */
int sd_model_write_diffusers(const char *dir, sd_weights *const ws[SD_COMPONENT_COUNT], enum sd_dtype dtype,
                             const char *tokenizer_dir, const char *scheduler_json);
int sd_model_write_single(const char *path, sd_weights *const ws[SD_COMPONENT_COUNT], enum sd_dtype dtype);

/* ==== generation plans (lib/models/plan.c, for sd-noise and sd-unet-step) ==== */

/* diffusers' SD 1.x scheduler_config.json text (what sd_sched_new uses for NULL; no timestep_spacing). */
const char *sd_sched_sd15_config(void);
/* 0 when spacing is "leading", "trailing" or "linspace", else -1 with a message. */
int sd_spacing_check(const char *spacing);
/* A malloc'd copy of the scheduler config text json (NULL = sd_sched_sd15_config()) with
 * timestep_spacing set to spacing (NULL = unchanged), as Scheduler.from_config(config,
 * timestep_spacing=…) reads it.  NULL with a message on a bad spacing or text that is no JSON object. */
char *sd_sched_config_spacing(const char *json, const char *spacing);

/* ==== the denoising loop (lib/sched/denoise.c, for sd-unet-step) ==== */

/* A remark for -v: one line, without the program's name (the tool prints it, or not). */
typedef void sd_note_fn(void *user, const char *msg);

/* The sampler flags a user gave (sd-noise, sd-unet-step): what is left unset comes from the frame's
 * plan (its "sampler" map), else diffusers' defaults. */
typedef struct sd_plan_flags {
	const char *sampler;  /* NULL = not given, else a name as sd_sampler_name writes it */
	const char *spacing;  /* NULL = not given (the plan's, else the model's scheduler config) */
	int steps;            /* 0 = not given */
	int karras;           /* -1 not given, 0 off, 1 on */
	int has_eta, has_guidance;
	double eta, guidance; /* DDIM's eta; the classifier-free guidance scale (sd-unet-step) */
} sd_plan_flags;

/* A plan resolved: flags, else the frame's plan, else pndm, 50 steps, eta 0, guidance 7.5. */
typedef struct sd_plan {
	enum sd_sampler_kind kind;
	int steps, karras, started; /* karras as sd_sched_new takes it; started: the plan has a "step" */
	double eta, guidance;
	char *spacing;              /* NULL = the model's config (malloc'd: sd_plan_clear frees it) */
} sd_plan;

/* Resolve the plan pm (a frame's "sampler" map, or NULL) with the flags; a started plan must not be
 * contradicted.  -1 with "<where>: …" (e.g. "--steps 8: the frame's plan has 4 steps and has begun"). */
int sd_plan_resolve(sd_plan *p, const sd_plan_flags *f, const sd_value *pm, const char *where);
void sd_plan_clear(sd_plan *p);

/* The context cf[key] f32 [N,L,D] for a batch of B latents as a new f32 [B,L,D] in *out: each row
 * repeated B/N times (diffusers' num_images_per_prompt order); *out = NULL when the key is absent.
 * -1 with "<where>: …" when it is no float tensor of 3 dimensions or N does not divide B. */
int sd_context_batch(sd_tensor **out, const sd_value *cf, const char *key, int64_t B, const char *where);

/* What a run of sd_denoise_frame is made of.  Nothing here is owned. */
typedef struct sd_denoise_job {
	sd_unet *unet;
	const char *sched_json;     /* the model's scheduler config (sd_model_scheduler_json; NULL = SD 1.x) */
	sd_plan_flags plan;
	int has_seed;               /* the generator of a frame that carries none */
	uint64_t seed;
	int count;                  /* run at most this many steps (0 = every remaining step) */
	int has_predict;            /* write the UNet's raw output at timestep `predict`; take no step */
	double predict;
	/* the conditioning frames ("context", + "uncond_context"): none = each frame's own, one for every
	 * frame, or one each; cond_name names their stream in messages */
	sd_value *const *cond;
	long ncond;
	const char *cond_name;
	sd_note_fn *note;           /* -v remarks, one per step (may be NULL) */
	void *user;
} sd_denoise_job;

/*
 * Frame number idx of stream `name` through the UNet: its "latent" f32 [B,C,h,w] and its plan, the
 * context of its conditioning frame (*cond, may be NULL, is set to it), classifier-free guidance when
 * the guidance scale is > 1 and there is an "uncond_context"; the plan's remaining steps (at most
 * count) are run and "latent", "sampler" (the plan, continued) and "generator" are written back, so
 * K calls of one step give the bytes of one call of K steps.  With has_predict "eps" (+ "uncond_eps")
 * is written instead.  -1 with "<name>: frame <idx>: …" (or "<cond_name>: frame <j>: …") on bad input.
 */
int sd_denoise_frame(const sd_denoise_job *j, sd_value *frame, const char *name, long idx, const sd_value **cond);

/* ==== the starting noise (lib/sched/noise.c, for sd-noise) ==== */

/* What a run of sd_noise_txt2img / sd_noise_img2img is made of.  Nothing here is owned. */
typedef struct sd_noise_job {
	sd_plan_flags plan;          /* written into the frame's plan (guidance is not used) */
	int width, height, batch;    /* text to image: the image size in pixels, B samples in one draw */
	const sd_geometry *geometry; /* text to image: the model's (sd_model_geometry) */
	double strength;             /* image to image: how much of the schedule to run, in [0, 1] */
	const char *sched_json;      /* image to image: the model's scheduler config (NULL = SD 1.x) */
	int has_seed;                /* restart the generator from seed, else continue the frame's, else */
	uint64_t seed;               /* seed it at random (noted) */
	sd_note_fn *note;            /* -v remarks (may be NULL) */
	void *user;
} sd_noise_job;

/* Text to image: frame number idx of stream `name` gets "latent" = torch.randn([B,C,H/f,W/f]) in one
 * draw, "generator" and a plan with nothing run yet.  -1 with "<name>: frame <idx>: …" when the frame
 * has a "latent" already or its plan has run. */
int sd_noise_txt2img(const sd_noise_job *j, sd_value *frame, const char *name, long idx);
/* Image to image: the frame's clean "latent" noised to the start step of its plan for `strength`
 * (StableDiffusionImg2ImgPipeline), with "generator" and the plan written.  -1 with "<name>: frame
 * <idx>: …" on a missing or bad latent, a plan that has run, or a strength that leaves no step. */
int sd_noise_img2img(const sd_noise_job *j, sd_value *frame, const char *name, long idx);

/* ==== backward ops (lib/ops-backward.c, lib/nn/linear.c), loss and optimizers (lib/train/) ==== */

/*
 * The backward of each op of "backends and ops" on the training path (llm.c style: gradients first,
 * then the forward's inputs, then sizes and flags), validated once and dispatched to the backend like
 * the forwards.  Shapes are those of the forward: dx has x's shape, dy out's.
 *
 * Contract: every input gradient (dx, da, db of an add, dq/dk/dv, …) is written with `acc`: 0 overwrites
 * (its old contents are never read and may be NaN: arena memory), 1 adds (+=), for a tensor that several
 * paths feed (a residual stream, a context used by every cross-attention).  Parameter gradients
 * (dw, db of a linear, dA/dB of LoRA, dgamma/dbeta) always accumulate (+=), as torch's .grad does; the
 * trainer zeroes them once per optimizer step (sd_grad_zero).  An optional gradient passed as NULL is
 * not computed.  Frozen base weights need no gradient: pass NULL.
 */

/* linear: dx (…, I) (acc) dy (…, O) · w (O, I);  dw (O, I) += dyᵀ·x;  db (O) += Σ rows dy.
 * x only when dw is wanted (else may be NULL). */
int sd_linear_backward(sd_tensor *dx, sd_tensor *dw, sd_tensor *db, const sd_tensor *dy, const sd_tensor *x,
                       const sd_tensor *w, int acc);

/* conv2d (sd_conv2d's stride and pads): dx (N, C, H, W) (acc) the input gradient given dy (N, O, Ho, Wo)
 * and w (O, C, kh, kw).  No weight gradient (frozen convolutions). */
int sd_conv2d_backward(sd_tensor *dx, const sd_tensor *dy, const sd_tensor *w, int stride, int pad_top,
                       int pad_bottom, int pad_left, int pad_right, int acc);

/* GroupNorm (with silu: through the fused SiLU), statistics recomputed from x: dx (acc);
 * dgamma, dbeta (C) += (NULL to skip). */
int sd_group_norm_backward(sd_tensor *dx, sd_tensor *dgamma, sd_tensor *dbeta, const sd_tensor *dy,
                           const sd_tensor *x, int groups, const sd_tensor *gamma, const sd_tensor *beta, float eps,
                           int silu, int acc);
/* LayerNorm over the last dimension: dx (acc); dgamma, dbeta (D) += (NULL to skip). */
int sd_layer_norm_backward(sd_tensor *dx, sd_tensor *dgamma, sd_tensor *dbeta, const sd_tensor *dy,
                           const sd_tensor *x, const sd_tensor *gamma, float eps, int acc);

/* out = act(x): dx (acc) dy ⊙ act'(x). */
int sd_act_backward(sd_tensor *dx, const sd_tensor *dy, const sd_tensor *x, enum sd_act act, int acc);
/* GEGLU, x (…, 2F) = [a | g]: dx (…, 2F) (acc) [dy·gelu(g) | dy·a·gelu'(g)], dy (…, F). */
int sd_geglu_backward(sd_tensor *dx, const sd_tensor *dy, const sd_tensor *x, int acc);
/* Softmax over the last dimension, given its output y: dx (acc) y ⊙ (dy − Σ_row dy⊙y).  dx may be dy
 * when acc = 0. */
int sd_softmax_backward(sd_tensor *dx, const sd_tensor *dy, const sd_tensor *y, int acc);
/* out = alpha·a + beta·b (sd_add's broadcasts): da (acc) alpha·dout; db (acc) beta·dout summed over the
 * dimensions b was broadcast over.  Either may be NULL. */
int sd_add_backward(sd_tensor *da, sd_tensor *db, const sd_tensor *dout, float alpha, float beta, int acc);
/* out = a ⊙ b: da (acc) dout ⊙ b, db (acc) dout ⊙ a (either NULL); dropout's backward is this with
 * b = its mask. */
int sd_mul_backward(sd_tensor *da, sd_tensor *db, const sd_tensor *dout, const sd_tensor *a, const sd_tensor *b,
                    int acc);

/*
 * Attention (sd_attention's layout, scale and causal mask): dq (N, Lq, H·d), dk (N, Lk, H·d),
 * dv (N, Lk, H·dv) (acc; any may be NULL) from dout (N, Lq, H·dv).  probs (N, H, Lq, Lk) are the
 * forward's attention weights; NULL recomputes them block by block from q and k (memory O(block·Lk)
 * instead of O(Lq·Lk) per head).  dS = scale · P ⊙ (dP − Σ_row dP⊙P) with dP = dout·vᵀ, then
 * dq = dS·k, dk = dSᵀ·q, dv = Pᵀ·dout per head, all GEMMs.
 */
int sd_attention_backward(sd_tensor *dq, sd_tensor *dk, sd_tensor *dv, const sd_tensor *dout, const sd_tensor *q,
                          const sd_tensor *k, const sd_tensor *v, const sd_tensor *probs, int heads, float scale,
                          int causal, int acc);

/* Layout moves: dx (acc) the gradient mapped back.  nchw_to_nlc: dx (N, C, H, W), dy (N, H·W, C);
 * nlc_to_nchw: dx (N, L, C), dy (N, C, H, W); upsample2x: dx (N, C, H, W) = each 2×2 block of
 * dy (N, C, 2H, 2W) summed; concat1: da (N, Ca, *), db (N, Cb, *) (either NULL) split from dout. */
int sd_nchw_to_nlc_backward(sd_tensor *dx, const sd_tensor *dy, int acc);
int sd_nlc_to_nchw_backward(sd_tensor *dx, const sd_tensor *dy, int acc);
int sd_upsample2x_backward(sd_tensor *dx, const sd_tensor *dy, int acc);
int sd_concat1_backward(sd_tensor *da, sd_tensor *db, const sd_tensor *dout, int acc);

/* The VAE posterior sample z = mean + exp(½·clamp(logvar, −30, 20))·eps (diffusers'
 * DiagonalGaussianDistribution.sample with the noise given), moments (N, 2C, H, W) = [mean | logvar]:
 * dmoments (acc) from dz (N, C, H, W); no gradient flows where logvar was clamped. */
int sd_gaussian_sample_backward(sd_tensor *dmoments, const sd_tensor *dz, const sd_tensor *moments,
                                const sd_tensor *eps, int acc);

/* ---- LoRA layer in training (PEFT's forward with dropout, and its backward) ---- */

/*
 * Dropout masks from a counter-based generator: mask[i] = 1/(1−p) (kept) or 0, each element an
 * independent draw from (seed, stream, i), so a mask is reproducible from its numbers alone (any order,
 * any device, after a resume).  A trainer uses one stream per (step, layer, use).  p in [0, 1); p = 0
 * keeps everything.  Applying it is sd_mul(out, x, mask) (torch's x · (bernoulli(1−p) / (1−p))).
 */
int sd_dropout_mask(sd_tensor *mask, float p, uint64_t seed, uint64_t stream);
/* A stream number for sd_dropout_mask from (step, layer index, use): distinct for distinct triples. */
uint64_t sd_dropout_stream(uint64_t step, uint32_t layer, uint32_t use);

/*
 * The training forward of a LoRA linear, as PEFT computes it:
 *   out (…, O) = x·wᵀ + b + l->scale · ((x ⊙ mask)·Aᵀ)·Bᵀ,   ax (…, r) = (x ⊙ mask)·Aᵀ (kept for the
 * backward; may be longer than needed, as in sd_lora_linear_forward).  mask (…, I) from sd_dropout_mask
 * or NULL (no dropout: p = 0, or evaluation).  l NULL: a plain linear.  out must not alias x or ax.
 */
int sd_lora_linear_forward_train(sd_tensor *out, sd_tensor *ax, const sd_tensor *x, const sd_tensor *w,
                                 const sd_tensor *b, const sd_lora_layer *l, const sd_tensor *mask);
/*
 * Its backward, with g = dy·B (…, r) and s = l->scale:
 *   dx (…, I) (acc) dy·w + s·(g·A) ⊙ mask      (NULL: not needed)
 *   dA (r, I) += s · gᵀ · (x ⊙ mask)             (NULL: skip)
 *   dB (O, r) += s · dyᵀ · ax                    (NULL: skip)
 * x, ax and mask as the forward had them.  l NULL or rank 0: only dx (a frozen linear).
 */
int sd_lora_linear_backward(sd_tensor *dx, sd_tensor *da, sd_tensor *db, const sd_tensor *dy, const sd_tensor *x,
                            const sd_tensor *w, const sd_lora_layer *l, const sd_tensor *ax, const sd_tensor *mask,
                            int acc);

/* ---- loss (lib/train/loss.c) ---- */

/*
 * MSE as F.mse_loss(pred.float(), target.float(), reduction='mean') (weights NULL), or diffusers'
 * min-SNR form: mean over samples of weights[n] · mean over sample n's elements (weights: N host
 * floats, pred (N, …)).  *loss (host, may be NULL) in double; dpred (pred's shape, NULL to skip) is
 * overwritten with gscale · d loss / d pred = gscale · 2·w[n]·(pred − target)/numel (gscale 1, or
 * 1/accumulation steps).  On pred's device.
 */
int sd_mse_loss(double *loss, sd_tensor *dpred, const sd_tensor *pred, const sd_tensor *target,
                const float *weights, float gscale);

/*
 * Per-sample noising for training with integer timesteps t[n] in [0, nt): with a = √ᾱ_t and
 * s = √(1 − ᾱ_t) in float as DDPMScheduler computes them (alphas_cumprod from sd_sched_alphas_cumprod):
 *   sd_train_add_noise: noisy = a·x0 + s·noise   (DDPMScheduler.add_noise)
 *   sd_v_target:        v     = a·noise − s·x0   (get_velocity, the v-prediction target)
 * All (N, …) on one device; out may alias x0 or noise.
 */
int sd_train_add_noise(sd_tensor *noisy, const sd_tensor *x0, const sd_tensor *noise, const float *alphas_cumprod,
                       int nt, const int64_t *t);
int sd_v_target(sd_tensor *v, const sd_tensor *x0, const sd_tensor *noise, const float *alphas_cumprod, int nt,
                const int64_t *t);
/* Min-SNR-γ loss weights (diffusers' compute_snr, float): snr = (√ᾱ/√(1−ᾱ))², w[n] = min(snr, γ)/snr for
 * epsilon prediction, min(snr, γ)/(snr + 1) for v-prediction.  -1 on a timestep out of range. */
int sd_min_snr_weights(float *w, const float *alphas_cumprod, int nt, const int64_t *t, int n, float gamma,
                       int v_prediction);

/* ---- optimizers (lib/train/optim.c) ---- */

enum sd_optim_kind { SD_OPTIM_ADAM = 0, SD_OPTIM_ADAMW, SD_OPTIM_COUNT };

/* torch.optim.Adam / AdamW hyper-parameters (torch's defaults from sd_optim_defaults: lr 1e-3,
 * betas (0.9, 0.999), eps 1e-8, weight_decay 0 for Adam and 1e-2 for AdamW). */
typedef struct sd_optim_config {
	enum sd_optim_kind kind;
	double lr, beta1, beta2, eps, weight_decay;
} sd_optim_config;

void sd_optim_defaults(sd_optim_config *c, enum sd_optim_kind kind);
/* "adam", "adamw"; parse: 0 or -1 with a message. */
const char *sd_optim_name(enum sd_optim_kind k);
int sd_optim_parse(const char *name, enum sd_optim_kind *out);

/*
 * An optimizer over n f32 parameters (borrowed, updated in place, on any device; names used by the
 * saved state, unique), with torch's state per parameter: step count, exp_avg, exp_avg_sq (zeros on the
 * parameter's device).  A step is torch's single-tensor path (foreach=False):
 *   AdamW: p ← p·(1 − lr·wd);  Adam: g ← g + wd·p
 *   m ← m·β1 + (1−β1)·g;  v ← v·β2 + (1−β2)·g·g;  t ← t + 1
 *   p ← p − (lr/(1−β1ᵗ)) · m / (√v/√(1−β2ᵗ) + eps)
 * grads[i] NULL: parameter i has no gradient and is skipped (step count unchanged), as torch skips
 * p.grad None.
 */
typedef struct sd_optim sd_optim;

sd_optim *sd_optim_new(const sd_optim_config *c, int n, sd_tensor *const *params, const char *const *names);
void sd_optim_free(sd_optim *o);
const sd_optim_config *sd_optim_get_config(const sd_optim *o);
/* Change the learning rate (a schedule). */
void sd_optim_set_lr(sd_optim *o, double lr);
int sd_optim_step(sd_optim *o, const sd_tensor *const *grads);
/* State of parameter i: its step count, exp_avg, exp_avg_sq (owned by o). */
int64_t sd_optim_steps(const sd_optim *o, int i);
const sd_tensor *sd_optim_exp_avg(const sd_optim *o, int i);
const sd_tensor *sd_optim_exp_avg_sq(const sd_optim *o, int i);

/*
 * The state for --resume.  A safetensors file: "<name>.exp_avg", "<name>.exp_avg_sq" (f32, the
 * parameter's shape) and "<name>.step" (i64 [1]) per parameter, metadata format "sdpipe-optim", kind
 * and hyper-parameters; or a value: {"kind", "lr", "beta1", "beta2", "eps", "weight_decay",
 * "state": {name: {"step", "exp_avg", "exp_avg_sq"}}}.  Loading needs an optimizer of the same kind
 * over parameters of the same names and shapes (else an error naming the first mismatch); it restores
 * the state, not the hyper-parameters (the caller's options stay in force, as with a new command line).
 */
int sd_optim_save(const sd_optim *o, const char *path);
int sd_optim_load(sd_optim *o, const char *path);
sd_value *sd_optim_to_value(const sd_optim *o);
int sd_optim_from_value(sd_optim *o, const sd_value *v);

/* Zero n gradients (NULL entries skipped). */
int sd_grad_zero(sd_tensor *const *grads, int n);
/*
 * torch.nn.utils.clip_grad_norm_(max_norm, norm_type 2): total = ‖(‖g_1‖, …, ‖g_n‖)‖₂, coef =
 * max_norm/(total + 1e-6) clamped to 1, every g ← g·coef.  *total_norm (may be NULL) gets the norm
 * before clipping.  NULL grads are skipped.
 */
int sd_clip_grad_norm(float *total_norm, sd_tensor *const *grads, int n, float max_norm);

/* ==== training step (lib/train/step.c) ==== */

/*
 * The training state of one LoRA adapter, pointed to by a model's linear (sd_clip_linear.train,
 * sd_vae_conv.train, sd_unet_linear.train): where the model backwards add its gradients, and its
 * dropout.  With dropout p > 0 the training forwards apply PEFT's dropout on the adapter's input with
 * the mask sd_dropout_mask(p, seed, sd_dropout_stream(*step, id, 0)), and the backwards regenerate the
 * same mask (nothing is stored; a checkpointed recompute sees it too).  Inference (sd_*_encode,
 * sd_unet_forward) never sets it.
 */
typedef struct sd_lora_train {
	sd_tensor *da, *db;    // (r, I), (O, r): += by the backwards; NULL: this adapter is not trained
	float dropout;         // lora_dropout p in [0, 1)
	uint64_t seed;         // the dropout masks' seed
	const uint64_t *step;  // the trainer's micro-step counter (NULL: step 0)
	uint32_t id;           // the adapter's index in the trainer (distinct streams)
} sd_lora_train;

/* A LoRA linear in training: out (…, O) = x·wᵀ + b + l->scale·((x ⊙ mask)·Aᵀ)·Bᵀ with t's mask (t NULL or
 * p = 0: sd_lora_linear_forward).  ax (…, r) scratch as there. */
int sd_lora_train_forward(sd_tensor *out, sd_tensor *ax, const sd_tensor *x, const sd_tensor *w, const sd_tensor *b,
                          const sd_lora_layer *l, const sd_lora_train *t);
/* Its backward: dx (…, I) (acc; NULL: not needed) from dy (…, O) through w and the adapter; t->da, t->db
 * += (when t and they are set).  x·Aᵀ is recomputed (the forward's scratch is shared). */
int sd_lora_train_backward(sd_tensor *dx, const sd_tensor *dy, const sd_tensor *x, const sd_tensor *w,
                           const sd_lora_layer *l, const sd_lora_train *t, int acc);

/* Components a trainer puts LoRA on (bit flags for sd_train_config.train). */
enum { SD_TRAIN_UNET = 1, SD_TRAIN_TEXT = 2, SD_TRAIN_VAE = 4 };

/*
 * What one training run does (diffusers' train_text_to_image_lora.py with PEFT adapters): the study's
 * recipe from sd_train_defaults (rank 8, alpha 16, dropout 0.05, targets UNet to_q/to_v (+query/value),
 * CLIP q_proj/v_proj, VAE to_q/to_k/to_v; Adam lr 1e-4, weight decay 0; epsilon MSE).  Targets follow
 * PEFT's target_modules: a module matches when its name is the target or ends with "." + target.
 */
typedef struct sd_train_config {
	int train;                      // SD_TRAIN_* flags: components whose adapters are trained
	const char *const *targets[3];  // per component [SD_TEXT_ENCODER, SD_VAE, SD_UNET]: NULL-terminated
	                                // module names (NULL = the study's)
	int rank;
	float alpha;                    // scale = alpha / rank
	float dropout;
	uint64_t seed;                  // adapter init (PEFT: A Kaiming-uniform(a=√5), B = 0) and dropout masks
	sd_optim_config optim;
	float max_grad_norm;            // > 0: clip_grad_norm_ before the step; 0: no clipping
	int v_prediction;               // target = get_velocity(latents, noise) instead of the noise
	float min_snr_gamma;            // > 0: min-SNR-γ loss weights
	int checkpointing;              // recompute each UNet block's forward in the backward
	int clip_skip;                  // A1111's (0/1 = the last layer)
	const char *sched_json;         // scheduler_config.json (betas); NULL = SD 1.x's
	float vae_recon_weight;         // > 0 (with SD_TRAIN_VAE): the decoder-side VAE adapters train on
	                                // W·mean((decode(z) − x)²), z the step's posterior sample (detached),
	                                // x the pixels (sd_trainer_recon_loss); 0: they get no gradient
} sd_train_config;

void sd_train_defaults(sd_train_config *c);

/* One batch.  Either pixels (N,3,H,W) in [-1,1] with eps_posterior (N,4,H/8,W/8) (the posterior's noise:
 * latents = sf·(mean + std·eps)), or latents (N,4,h,w) already scaled (cached when the VAE is frozen).
 * input_ids (N,L) i32/i64 (L ≤ 77, the study pads to the longest), timesteps N integers in [0, 1000),
 * noise like the latents.  CPU tensors. */
typedef struct sd_train_batch {
	const sd_tensor *pixels, *eps_posterior, *latents;
	const sd_tensor *input_ids;
	const int64_t *timesteps;
	const sd_tensor *noise;
} sd_train_batch;

typedef struct sd_trainer sd_trainer;

/*
 * A trainer over built models (borrowed; a component not trained may be NULL when the batches do not
 * need it: the VAE with cached latents).  Creates one adapter (rank, alpha/rank, dropout) per targeted
 * linear of every component in c->train, attached unmerged to the models (which must carry no other
 * adapter on those linears), their gradients and the optimizer.  The VAE's decoder-side adapters are
 * created (PEFT targets them too) but get no gradient from the diffusion loss: the optimizer skips
 * them, as torch skips params whose .grad is None.  NULL with a message on failure.
 */
sd_trainer *sd_trainer_new(const sd_train_config *c, sd_unet *u, sd_clip *te, sd_vae *vae);
/* Detaches the adapters from the models and frees everything the trainer made. */
void sd_trainer_free(sd_trainer *t);

/* The trainable parameters, in the optimizer's order (UNet, text encoder, VAE), named as PEFT's state
 * dict with the component first: "unet.<module>.lora_A.weight" / ".lora_B.weight",
 * "text_encoder.text_model.…", "vae.encoder.mid_block.attentions.0.to_q.lora_A.weight".  Tensors on
 * the models' device, owned by the trainer (set them to load an adapter); grad NULL when the parameter
 * gets no gradient (decoder-side VAE adapters). */
int sd_trainer_param_count(const sd_trainer *t);
const char *sd_trainer_param_name(const sd_trainer *t, int i);
sd_tensor *sd_trainer_param(sd_trainer *t, int i);
const sd_tensor *sd_trainer_grad(const sd_trainer *t, int i);
int sd_trainer_find(const sd_trainer *t, const char *name); /* -1 when absent */
sd_optim *sd_trainer_optim(sd_trainer *t);
/* The last accumulate's reconstruction loss W·mean((decode(z) − x)²) (vae_recon_weight > 0 and a
 * pixel batch), else 0. */
double sd_trainer_recon_loss(const sd_trainer *t);
/* Training mode on (the default: adapters' dropout active, recorded forwards) or off (inference with the
 * adapters, e.g. preview images: the models' ordinary forwards, no dropout). */
int sd_trainer_set_training(sd_trainer *t, int on);

/*
 * One optimizer step on one batch: zero the gradients, sd_trainer_accumulate(batch, 1), clip when
 * max_grad_norm > 0, optimizer step.  *loss (may be NULL) the batch's loss; the gradients stay readable
 * until the next step.  Steps count from 0 (the dropout masks' step).
 */
int sd_train_step(sd_trainer *t, const sd_train_batch *b, double *loss);
/*
 * The parts of a step, for gradient accumulation: add gscale·dLoss/dparam of one batch to the gradients
 * (a forward recorded for the backward, or checkpointed); then sd_trainer_apply clips and steps the
 * optimizer; sd_trainer_zero_grad zeroes.  Each accumulate advances the micro-step (dropout masks).
 *   latents = sf·(mean + std·eps) (VAE recorded when trained, else encoded without recording, or given)
 *   noisy = √ᾱ_t·latents + √(1−ᾱ_t)·noise;  ehs = CLIP(ids) (recorded when trained)
 *   pred = UNet(noisy, t, ehs) (recorded);  loss = mse(pred, noise or v) (min-SNR weights optional)
 * and the backward through the UNet into ehs and the latents, through CLIP and the VAE encoder.
 */
int sd_trainer_accumulate(sd_trainer *t, const sd_train_batch *b, float gscale, double *loss);
int sd_trainer_apply(sd_trainer *t);
int sd_trainer_zero_grad(sd_trainer *t);
/* The total gradient norm of the last sd_trainer_apply (before clipping, as clip_grad_norm_ returns it). */
float sd_trainer_grad_norm(const sd_trainer *t);
/* The last accumulate's tensors (CPU copies owned by the trainer, NULL before the first):
 * "latents", "noisy_latents", "encoder_hidden_states", "model_pred". */
const sd_tensor *sd_trainer_last(const sd_trainer *t, const char *what);
/* Bytes of activation memory of the last accumulate (the recorded/checkpointed forward's arena plus the
 * backward's scratch), for reports. */
size_t sd_trainer_peak_bytes(const sd_trainer *t);

/* ==== LoRA training data and outputs (lib/train/dataset.c, lib/train/trainio.c, for sd-lora-train) ==== */

/* How images become square training pixels: squash (resize both sides, aspect not kept; the study's,
 * bilinear as PIL's Image.resize with its antialiasing support) or crop (resize the short side, then
 * take the centre square). */
enum sd_resize_mode { SD_RESIZE_SQUASH = 0, SD_RESIZE_CROP };

/* A data set in memory: n images f32 (3, res, res) in [-1, 1] (grey replicated, alpha dropped), each
 * with a caption (malloc'd; NULL when none was found) and a name (file or "stdin:frame N"). */
typedef struct sd_dataset {
	int n, res;
	sd_tensor **pixels;
	char **captions, **names;
} sd_dataset;

/*
 * Read a data set from path: a folder (every non-hidden regular file must be a PNM/PAM image or a
 * .txt caption for the image of the same base name), an archive libarchive reads (tar, tar.gz, zip;
 * same rules on its entries), or, for "-", a tensor stream on stdin (frames with "image" f32 [N,C,H,W]
 * in [0,1] and an optional "prompt").  Images are resized to res × res.  Entries are sorted by name.
 * NULL with "<file>: what is wrong" on a missing path, a file that is not an image, or no images.
 */
sd_dataset *sd_dataset_read(const char *path, int res, enum sd_resize_mode mode);
void sd_dataset_free(sd_dataset *d);
/* FNV-1a 64 of the pixels and captions, as 16 hex digits (buf ≥ 17 bytes). */
void sd_dataset_hash(const sd_dataset *d, char *buf);
/* out (C, oh, ow) = in (C, ih, iw) resized with a triangle (bilinear) filter whose support widens by
 * the scale when shrinking (PIL's resample=BILINEAR). */
int sd_resize_bilinear(sd_tensor *out, const sd_tensor *in);

/* The trainer's micro-step counter (the dropout masks' step), read and restored for --resume. */
uint64_t sd_trainer_micro(const sd_trainer *t);
void sd_trainer_set_micro(sd_trainer *t, uint64_t micro);

/*
 * Write the trainer's adapters.  kohya: one .safetensors with lora_unet_<module, '.' → '_'> and
 * lora_te_<module> keys (.lora_down.weight = A, .lora_up.weight = B, .alpha f32 scalar); VAE adapters
 * have no kohya spelling and are left out (*skipped counts them).  PEFT: folder dir holding unet/,
 * text_encoder/ and vae/ (those trained) with adapter_config.json and adapter_model.safetensors
 * (base_model.model.<module>.lora_A.weight / .lora_B.weight): a new dir is built in a temporary folder
 * and renamed into place; into an existing one only those component folders are written (each file
 * atomically), nothing else in it is touched.  Both refuse, as sd_train_check_output, to replace what
 * sd-lora-train did not write.  meta (key, value, …, NULL) goes into every __metadata__; an adapter
 * counts as the trainer's when its metadata holds "sdpipe_train".
 */
int sd_lora_write_kohya(const sd_trainer *t, const sd_train_config *c, const char *path, const char *const *meta,
                        int *skipped);
int sd_lora_write_peft(const sd_trainer *t, const sd_train_config *c, const char *dir, const char *const *meta);

/* The files the trainer writes, and whether one may be (re)written: 0 when path is absent or holds what
 * sd-lora-train wrote there before (a kohya file or PEFT component folders whose metadata holds
 * "sdpipe_train", a state file, a --log TSV); -1 with "<path>: exists and was not written by
 * sd-lora-train; …" otherwise.  A PEFT dir may hold anything else besides its component folders. */
enum sd_train_file { SD_TRAIN_FILE_KOHYA, SD_TRAIN_FILE_PEFT, SD_TRAIN_FILE_STATE, SD_TRAIN_FILE_LOG };
int sd_train_check_output(const char *path, enum sd_train_file kind);

/* ==== a LoRA training run (lib/train/run.c, lib/train/state.c, lib/train/output.c, for sd-lora-train) ==== */

/* The recipe of a run beyond the trainer's: how batches are drawn and the learning rate scheduled.
 * cfg.seed seeds every draw of the run (the adapters, the batches, the epochs' order). */
typedef struct sd_train_recipe {
	sd_train_config cfg;
	const char *caption;          // every image's caption (NULL: the data set's own)
	int res;                      // training size in pixels (a multiple of the VAE's factor)
	enum sd_resize_mode resize;
	int flip;                     // flip each image horizontally with probability 1/2
	int batch, epochs, accum;     // images per micro-batch (≤ 256), passes, micro-batches per step
	long long max_steps;          // optimizer steps (0: from epochs)
	int warmup, cosine;           // linear warm-up steps; then cosine (1) or constant (0)
	int pad77;                    // pad the token ids to 77 (else to the batch's longest)
	double noise_offset;          // + noise_offset · per-channel N(0, 1) on the noise
} sd_train_recipe;

/* A run's state: everything a step reads besides the trainer.  The tokenizer and trainer are borrowed
 * (tr set by the caller after sd_train_run_cache); step counts the optimizer steps done. */
typedef struct sd_train_run {
	const sd_train_recipe *rc;
	sd_dataset *ds;               // owned (sd_train_run_init)
	sd_tokenizer *tok;
	sd_trainer *tr;
	sd_rng rng;                   // noise, timesteps, posterior samples, flips
	int nt, lh, lw, lc;           // training timesteps; latent size
	float sf;                     // the VAE's scaling factor
	sd_tensor **mean, **std;      // (1,lc,lh,lw) cached posterior per image (flipped at n + i), VAE frozen
	int ncache;
	char hash[17];                // sd_dataset_hash after the captions
	long long step, total;
	int *perm;                    // the images' order in epoch perm_epoch
	long long perm_epoch;
} sd_train_run;

/* What sd_train_run_step did: the step's loss (mean over its micro-batches), reconstruction loss, lr,
 * epoch of its last micro-batch and gradient norm. */
typedef struct sd_train_step_info {
	double loss, recon, lr, grad_norm;
	long long epoch;
} sd_train_step_info;

/* Returned by the run's functions for a failure of the training step itself (an allocation there
 * cannot succeed: the caller may say what to lower); -1 for other failures.  Both leave a message. */
#define SD_TRAIN_ESTEP (-2)

/* The parts of a model a run needs: the weights of all three components on dev, the networks and the
 * tokenizer.  -1 with "<model>: …" or "tokenizer: …" (free what was loaded with sd_train_models_free). */
typedef struct sd_train_models {
	sd_weights *w[3];
	sd_clip *te;
	sd_vae *vae;
	sd_unet *unet;
	sd_tokenizer *tok;
} sd_train_models;
int sd_train_models_load(sd_train_models *t, sd_model *m, enum sd_device dev);
void sd_train_models_free(sd_train_models *t);

/* --train's list ("unet,text,vae"; text_encoder for text): SD_TRAIN_* flags, or -1 with "'x' is not …".
 * --targets' "COMPONENT=MODULE,MODULE…" into c->targets[component]: a NULL-terminated list in one
 * malloc'd block (the caller frees it with free((void *)c->targets[k])), -1 with a message. */
int sd_train_parse_components(const char *s);
int sd_train_parse_targets(sd_train_config *c, const char *s);

/* --optimizer NAME: its defaults (sd_optim_defaults) with c's lr kept and weight decay 0; -1 with
 * "'x' is not adam or adamw". */
int sd_train_set_optimizer(sd_train_config *c, const char *name);

/* Start a run: read the data set at data (sd_dataset_read at rc->res; the run owns it), rc->caption
 * (when set) replaces every caption (*replaced counts those that had one); then every image must have
 * a caption ("<name>: no caption (…)"); then the hash. */
int sd_train_run_init(sd_train_run *r, const sd_train_recipe *rc, const char *data, int *replaced);
/* The latent geometry from the VAE, the training timesteps from sched_json (scheduler_config.json,
 * NULL: 1000), the generator seeded, total steps. */
int sd_train_run_setup(sd_train_run *r, sd_tokenizer *tok, const sd_vae *vae, const char *sched_json);
/* With the VAE frozen: encode every image (and its flip with rc->flip) once and keep the posteriors
 * (the same draws as encoding each step).  Nothing when the VAE trains.  SD_TRAIN_ESTEP when encoding
 * fails ("<image>: encoding: …"). */
int sd_train_run_cache(sd_train_run *r, sd_vae *vae);
/* Frees what the run made (the data set, the cache, the order), not what it borrows. */
void sd_train_run_free(sd_train_run *r);
/* The learning rate of step (from 0) of total: linear warm-up, then constant or cosine. */
double sd_train_lr(const sd_train_recipe *rc, long long step, long long total);
/* The loss on the fixed evaluation batch (the first images, seed-fixed noise, evenly spread timesteps),
 * without dropout and without touching the training state. */
int sd_train_run_eval(sd_train_run *r, double *loss);
/* One optimizer step (rc->accum micro-batches, the lr of sd_train_lr): 0 with r->step advanced; 1 when
 * the loss is not finite (no step taken; the run rewound to before it and that last good state saved to
 * state_path, the message says where); -1 or SD_TRAIN_ESTEP with "step N: …". */
int sd_train_run_step(sd_train_run *r, const char *state_path, sd_train_step_info *info);
/* The state file at path (written atomically; the format is in train/state.c), and back: the
 * parameters, optimizer, generator, step and micro-step.  Load fails with "<path>: …" (saved for
 * another data set, seed, --train/--targets/--rank) and leaves the run unusable then. */
int sd_train_run_save(const sd_train_run *r, const char *path);
int sd_train_run_load(sd_train_run *r, const char *path);
/* The adapters to path as a PEFT folder (peft) or a kohya file (*skipped: VAE adapters left out), with
 * kohya's ss_* and sdpipe_* metadata (the recipe, the steps, the data-set hash). */
int sd_train_run_write(const sd_train_run *r, const char *path, int peft, int *skipped);
/* A preview image prefix-stepN.png (its name into out) of prompt (NULL: the first caption) with the
 * current adapters: the tools next to this program (then on PATH) as a txt2img pipe of steps sampler
 * steps, seed fixed.  -1 with "preview…" when it failed (the run goes on). */
int sd_train_run_preview(sd_train_run *r, const char *model, const char *prompt, const char *prefix, int steps,
                         char *out, size_t outsz);
/* 0 when the folder path would go into exists and is writable; else -1 with "<folder>: …".  For an
 * adapter output, also sd_train_check_output of its kind (sd_train_is_peft). */
int sd_train_check_dir(const char *path);
int sd_train_check_adapter(const char *format, const char *path);
/* output without its trailing slashes (and, with strip_ext, its ".safetensors") + suffix, malloc'd. */
char *sd_train_path(const char *output, const char *suffix, int strip_ext);
/* Whether output is a PEFT folder: format "peft" or "kohya" when given, else a trailing '/' or a folder. */
int sd_train_is_peft(const char *format, const char *output);
/* The --log TSV (step, epoch, loss, lr, grad_norm, seconds[, recon]): opened for appending (a resumed
 * run) or anew with its header line; NULL with "<path>: …".  Then one row per step. */
FILE *sd_train_log_open(const char *path, int append, int recon);
void sd_train_log_step(FILE *f, const sd_train_run *r, const sd_train_step_info *s, double seconds, int recon);

/* ==== models with random weights (lib/models/init.c, for sd-init) ==== */

/* What sd_model_write_random reports as it goes (either callback may be NULL): a warning (no shipped
 * CLIP merges: no tokenizer/ folder) and each component written (its tensors, parameters, seconds). */
typedef struct sd_model_random_report {
	void (*warn)(void *ctx, const char *msg);
	void (*component)(void *ctx, const char *name, int tensors, long long params, double seconds);
	void *ctx;
} sd_model_random_report;

/*
 * Write a Stable Diffusion 1.x model with deterministic random weights as the diffusers folder out
 * (which must not exist; it is built under a temporary name beside it and renamed into place, or
 * removed on failure).  config: "tiny" (the test fixture's sizes), "sd15" (SD 1.5's) or a JSON file
 * {"text_encoder": {…}, "unet": {…}, "vae": {…}} of transformers/diffusers configs.  The weights come
 * from torch's generator seeded with seed + the component's index.  -1 with a message ("<config>: …",
 * "unet: config: …", "<out>: already exists", a write error).
 */
int sd_model_write_random(const char *config, const char *out, uint64_t seed, const sd_model_random_report *rep);

#endif
