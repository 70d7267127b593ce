/*
 * clip.c - the CLIP text encoder, transformers' CLIPTextModel (models/clip/modeling_clip.py:
 * CLIPTextEmbeddings, CLIPAttention, CLIPMLP, CLIPEncoderLayer, CLIPTextTransformer) as Stable Diffusion
 * pipelines call it: input_ids only, no attention_mask, so the causal mask is the only mask and padding
 * tokens are attended.  Written on the backend ops (lib/ops.c) as llm.c-style *_forward functions whose
 * activations can be recorded for a backward (the trainer's text-encoder LoRA on q_proj / v_proj).
 * Every linear goes through sd_lora_linear_forward (lora.c), so an adapter set on any of them
 * (sd_clip_find_linear) runs unmerged; the act's `lora` field is its scratch.
 *
 * Numbers: transformers multiplies q by head_dim^-0.5 before q·kᵀ; here the scale goes into the
 * attention's softmax (sd_attention), which keeps the recorded q the plain q_proj output a LoRA
 * backward wants.  The two agree to rounding (exactly when head_dim is a power of 4, as SD's 64).
 *
 * Memory: tensor headers always live in host memory and only the data comes from arenas, so the code
 * is the same for CPU and CUDA arenas.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "sd.h"

#define TRY(x) do { if ((x) < 0) return -1; } while (0)

struct sd_clip {
	sd_clip_config cfg;
	enum sd_device dev;
	const sd_tensor *tok_emb;   // (V, D)
	const sd_tensor *pos_emb;   // (P, D)
	const sd_tensor *final_w, *final_b; // (D)
	const sd_tensor *proj;      // (P, D) text_projection.weight (CLIPTextModelWithProjection), or NULL
	int eos_id;                 // config eos_token_id (2: transformers' legacy rule, the largest id)
	sd_clip_layer *layer;       // [layers]
	sd_arena *arena;            // sd_clip_encode's scratch, reset per call
	sd_arena *bw, *bws;         // sd_clip_backward's gradients and per-layer scratch
	void *rec;                  // host memory of the last sd_clip_encode_record (headers, arrays)
};

/* ==== layers ==== */

int sd_clip_embed_forward(sd_tensor *out, const sd_tensor *ids, const sd_tensor *token_embedding,
                          const sd_tensor *position_embedding)
{
	if (ids->ndim != 2 || position_embedding->ndim != 2)
		return sd_seterr("sd_clip_embed_forward: ids must be (N,L) and position_embedding (P,D)");
	int64_t L = ids->shape[1];
	if (L > position_embedding->shape[0])
		return sd_seterr("sd_clip_embed_forward: %lld tokens, but only %lld positions", (long long)L,
		                 (long long)position_embedding->shape[0]);
	TRY(sd_embedding(out, ids, token_embedding));
	sd_tensor pos = *position_embedding; /* rows 0..L-1: position_ids = arange(L) */
	pos.shape[0] = L;
	pos.owns = 0;
	return sd_add(out, out, &pos, 1.0f, 1.0f);
}

/* A linear with its LoRA adapter, when one is set (lora.c; act->lora is the adapter's scratch); in
 * training (l.train set) with the adapter's dropout (train/step.c). */
#define LINEAR(out, x, l) ((l).train ? sd_lora_train_forward((out), act->lora, (x), (l).w, (l).b, (l).lora, (l).train) \
                                     : sd_lora_linear_forward((out), (x), (l).w, (l).b, (l).lora, act->lora))

int sd_clip_layer_forward(sd_tensor *out, const sd_clip_layer_act *act, const sd_tensor *x,
                          const sd_clip_layer *p, const sd_clip_config *cfg)
{
	const float scale = (float)(1.0 / sqrt((double)(cfg->hidden / cfg->heads)));
	/* self-attention block: x + out_proj(attn(ln1(x))) */
	TRY(sd_layer_norm(act->ln1, x, p->ln1_w, p->ln1_b, cfg->eps));
	TRY(LINEAR(act->q, act->ln1, p->q));
	TRY(LINEAR(act->k, act->ln1, p->k));
	TRY(LINEAR(act->v, act->ln1, p->v));
	TRY(sd_attention(act->att, act->q, act->k, act->v, cfg->heads, scale, 1, act->probs));
	TRY(LINEAR(act->tmp, act->att, p->o));
	TRY(sd_add(act->res1, x, act->tmp, 1.0f, 1.0f));
	/* MLP block: res1 + fc2(act(fc1(ln2(res1)))) */
	TRY(sd_layer_norm(act->ln2, act->res1, p->ln2_w, p->ln2_b, cfg->eps));
	TRY(LINEAR(act->h, act->ln2, p->fc1));
	TRY(sd_act(act->a, act->h, cfg->act));
	TRY(LINEAR(act->tmp, act->a, p->fc2));
	return sd_add(out, act->res1, act->tmp, 1.0f, 1.0f);
}

/* A scratch tensor like `like` with the last dimension d (0: like's), from the arena. */
static sd_tensor *tmp_like(sd_arena *a, const sd_tensor *like, int64_t d)
{
	sd_tensor *t = sd_arena_alloc(a, sizeof *t);
	if (!t) return NULL;
	*t = *like;
	t->owns = 0;
	t->aux = NULL;
	t->aux_free = NULL;
	if (d) t->shape[t->ndim - 1] = d;
	size_t bytes = sd_tensor_nbytes(t);
	return (t->data = sd_arena_alloc(a, bytes ? bytes : 1)) ? t : NULL;
}

/* The backward of a linear of the layer (frozen weight, the adapter's gradients when it is trained). */
#define LINEAR_BACK(dx, dy, x, l, acc) sd_lora_train_backward((dx), (dy), (x), (l).w, (l).lora, (l).train, (acc))

int sd_clip_layer_backward(sd_tensor *dx, const sd_tensor *dout, const sd_clip_layer_act *act, const sd_tensor *x,
                           const sd_clip_layer *p, const sd_clip_config *cfg, sd_arena *s, int acc)
{
	// dout (N,L,D) → dx (N,L,D); act as sd_clip_encode_record leaves it
	const float scale = (float)(1.0 / sqrt((double)(cfg->hidden / cfg->heads)));
	sd_tensor *dres = tmp_like(s, dout, 0), *da = tmp_like(s, act->a, 0), *dh = tmp_like(s, act->h, 0);
	sd_tensor *dln = tmp_like(s, dout, 0), *dq = tmp_like(s, dout, 0), *dk = tmp_like(s, dout, 0);
	sd_tensor *dv = tmp_like(s, dout, 0), *datt = tmp_like(s, dout, 0);
	if (!dres || !da || !dh || !dln || !dq || !dk || !dv || !datt) return -1;
	/* MLP block: out = res1 + fc2(act(fc1(ln2(res1)))) */
	TRY(sd_tensor_copy(dres, dout));
	TRY(LINEAR_BACK(da, dout, act->a, p->fc2, 0));
	TRY(sd_act_backward(dh, da, act->h, cfg->act, 0));
	TRY(LINEAR_BACK(dln, dh, act->ln2, p->fc1, 0));
	TRY(sd_layer_norm_backward(dres, NULL, NULL, dln, act->res1, p->ln2_w, cfg->eps, 1));
	/* attention block: res1 = x + out_proj(attn(q(ln1), k(ln1), v(ln1))) */
	TRY(LINEAR_BACK(datt, dres, act->att, p->o, 0));
	TRY(sd_attention_backward(dq, dk, dv, datt, act->q, act->k, act->v, act->probs, cfg->heads, scale, 1, 0));
	TRY(LINEAR_BACK(dln, dq, act->ln1, p->q, 0));
	TRY(LINEAR_BACK(dln, dk, act->ln1, p->k, 1));
	TRY(LINEAR_BACK(dln, dv, act->ln1, p->v, 1));
	if (!dx) return 0;
	if (acc) TRY(sd_add(dx, dx, dres, 1.0f, 1.0f));
	else TRY(sd_tensor_copy(dx, dres));
	return sd_layer_norm_backward(dx, NULL, NULL, dln, x, p->ln1_w, cfg->eps, 1);
}

/* ==== building the encoder from weights ==== */

/* Config integer `key` in [lo, hi] into *out; absent leaves *out (the value from the shapes) alone. */
static int cfg_int(const sd_weights *w, const char *key, int64_t lo, int64_t hi, int *out)
{
	int64_t v;
	int rc = sd_config_int(w, key, &v);
	if (rc < 0) return sd_preerr("text_encoder: config");
	if (rc > 0) return 0;
	if (v < lo || v > hi)
		return sd_seterr("text_encoder: config %s = %lld is out of range [%lld, %lld]", key, (long long)v,
		                 (long long)lo, (long long)hi);
	*out = (int)v;
	return 0;
}

/* The weight `name` with the given shape (d1 < 0: 1-D), or NULL with a message. */
static const sd_tensor *need(const sd_weights *w, const char *name, int64_t d0, int64_t d1)
{
	const sd_tensor *t = sd_weights_need(w, "%s", name);
	if (!t) return NULL;
	int nd = d1 < 0 ? 1 : 2;
	/* matrices may be kept as stored (f16, bf16: sd_weights_load_stored), vectors are f32 */
	int dt = t->dtype == SD_DTYPE_F32 || (nd == 2 && (t->dtype == SD_DTYPE_F16 || t->dtype == SD_DTYPE_BF16));
	if (!dt || t->ndim != nd || t->shape[0] != d0 || (nd == 2 && t->shape[1] != d1)) {
		char got[96], want[96];
		int64_t ws[2] = {d0, d1};
		sd_seterr("text_encoder: weight '%s' is %s %s, expected f32 %s", name, sd_dtype_name(t->dtype),
		          sd_shape_str(t->ndim, t->shape, got, sizeof got), sd_shape_str(nd, ws, want, sizeof want));
		return NULL;
	}
	return t;
}

/* Weight and bias of a linear layer "<prefix>.weight" (O, I), "<prefix>.bias" (O). */
static int need_linear(const sd_weights *w, sd_clip_linear *l, const char *prefix, int64_t O, int64_t I)
{
	char n[256];
	snprintf(n, sizeof n, "%s.weight", prefix);
	if (!(l->w = need(w, n, O, I))) return -1;
	snprintf(n, sizeof n, "%s.bias", prefix);
	if (!(l->b = need(w, n, O, -1))) return -1;
	return 0;
}

static int need_norm(const sd_weights *w, const sd_tensor **g, const sd_tensor **b, const char *prefix,
                     int64_t D)
{
	char n[256];
	snprintf(n, sizeof n, "%s.weight", prefix);
	if (!(*g = need(w, n, D, -1))) return -1;
	snprintf(n, sizeof n, "%s.bias", prefix);
	if (!(*b = need(w, n, D, -1))) return -1;
	return 0;
}

static int parse_act(const char *s, enum sd_act *out)
{
	if (!strcmp(s, "quick_gelu")) *out = SD_ACT_QUICK_GELU;
	else if (!strcmp(s, "gelu")) *out = SD_ACT_GELU;
	else if (!strcmp(s, "gelu_new") || !strcmp(s, "gelu_pytorch_tanh") || !strcmp(s, "gelu_fast"))
		*out = SD_ACT_GELU_TANH;
	else return sd_seterr("text_encoder: config hidden_act '%s' is not supported (quick_gelu, gelu, "
		              "gelu_new, gelu_pytorch_tanh)", s);
	return 0;
}

/* Read the sizes (config first, shapes for what it lacks) and find every weight. */
static int build(sd_clip *c, const sd_weights *w)
{
	sd_clip_config *g = &c->cfg;
	const sd_tensor *te = sd_weights_need(w, "text_model.embeddings.token_embedding.weight");
	const sd_tensor *pe = sd_weights_need(w, "text_model.embeddings.position_embedding.weight");
	if (!te || !pe) return -1;
	if (te->ndim != 2 || pe->ndim != 2)
		return sd_seterr("text_encoder: the embeddings are not 2-D tables");
	g->vocab = (int)te->shape[0];
	g->hidden = (int)te->shape[1];
	g->max_pos = (int)pe->shape[0];
	g->layers = 0;
	for (char n[128]; g->layers < 1000; g->layers++) { /* counted, for weights without a config */
		snprintf(n, sizeof n, "text_model.encoder.layers.%d.self_attn.q_proj.weight", g->layers);
		if (!sd_weights_get(w, n)) break;
	}
	const sd_tensor *fc1 = sd_weights_need(w, "text_model.encoder.layers.0.mlp.fc1.weight");
	if (!fc1) return -1;
	g->intermediate = fc1->ndim == 2 ? (int)fc1->shape[0] : 0;
	g->heads = g->hidden >= 64 ? g->hidden / 64 : 1;
	g->eps = 1e-5f;
	g->act = SD_ACT_QUICK_GELU;

	int cfg_d = g->hidden, cfg_f = g->intermediate, cfg_v = g->vocab, cfg_p = g->max_pos;
	TRY(cfg_int(w, "hidden_size", 1, 1 << 20, &cfg_d));
	TRY(cfg_int(w, "intermediate_size", 1, 1 << 22, &cfg_f));
	TRY(cfg_int(w, "vocab_size", 1, 1 << 24, &cfg_v));
	TRY(cfg_int(w, "max_position_embeddings", 1, 1 << 20, &cfg_p));
	TRY(cfg_int(w, "num_hidden_layers", 1, 1000, &g->layers));
	TRY(cfg_int(w, "num_attention_heads", 1, 1 << 16, &g->heads));
	if (cfg_d != g->hidden || cfg_v != g->vocab || cfg_p != g->max_pos || cfg_f != g->intermediate)
		return sd_seterr("text_encoder: config (hidden_size %d, intermediate_size %d, vocab_size %d, "
		                 "max_position_embeddings %d) does not match the weights (%d, %d, %d, %d)",
		                 cfg_d, cfg_f, cfg_v, cfg_p, g->hidden, g->intermediate, g->vocab, g->max_pos);
	if (g->layers < 1) return sd_seterr("text_encoder: no encoder layers");
	if (g->hidden % g->heads)
		return sd_seterr("text_encoder: hidden_size %d does not split into %d heads", g->hidden, g->heads);
	double eps;
	int rc = sd_config_float(w, "layer_norm_eps", &eps);
	if (rc < 0) return sd_preerr("text_encoder: config");
	if (rc == 0) {
		if (!(eps > 0 && eps < 1)) return sd_seterr("text_encoder: config layer_norm_eps %g is out of range", eps);
		g->eps = (float)eps;
	}
	const char *act;
	rc = sd_config_str(w, "hidden_act", &act);
	if (rc < 0) return sd_preerr("text_encoder: config");
	if (rc == 0) TRY(parse_act(act, &g->act));

	const int64_t D = g->hidden, F = g->intermediate;
	c->tok_emb = te;
	c->pos_emb = pe;
	c->dev = te->device;
	if (!(c->layer = calloc(g->layers, sizeof *c->layer))) return sd_seterr("out of memory");
	for (int i = 0; i < g->layers; i++) {
		sd_clip_layer *p = &c->layer[i];
		char pre[128], n[192];
		snprintf(pre, sizeof pre, "text_model.encoder.layers.%d", i);
#define SUB(s) (snprintf(n, sizeof n, "%s.%s", pre, s), n)
		TRY(need_norm(w, &p->ln1_w, &p->ln1_b, SUB("layer_norm1"), D));
		TRY(need_linear(w, &p->q, SUB("self_attn.q_proj"), D, D));
		TRY(need_linear(w, &p->k, SUB("self_attn.k_proj"), D, D));
		TRY(need_linear(w, &p->v, SUB("self_attn.v_proj"), D, D));
		TRY(need_linear(w, &p->o, SUB("self_attn.out_proj"), D, D));
		TRY(need_norm(w, &p->ln2_w, &p->ln2_b, SUB("layer_norm2"), D));
		TRY(need_linear(w, &p->fc1, SUB("mlp.fc1"), F, D));
		TRY(need_linear(w, &p->fc2, SUB("mlp.fc2"), D, F));
#undef SUB
	}
	TRY(need_norm(w, &c->final_w, &c->final_b, "text_model.final_layer_norm", D));
	/* CLIPTextModelWithProjection (SDXL's text_encoder_2): text_projection, a Linear without bias */
	const sd_tensor *pj = sd_weights_get(w, "text_model.text_projection.weight");
	if (!pj) pj = sd_weights_get(w, "text_projection.weight");
	if (pj) {
		if (pj->ndim != 2 || pj->shape[1] != D)
			return sd_seterr("text_encoder: text_projection.weight does not take width %lld", (long long)D);
		if (!(c->proj = need(w, sd_weights_get(w, "text_projection.weight") ? "text_projection.weight"
		                                                                   : "text_model.text_projection.weight",
		                     pj->shape[0], D)))
			return -1;
	}
	c->eos_id = 2;
	TRY(cfg_int(w, "eos_token_id", 0, 1 << 24, &c->eos_id));
	return 0;
}

sd_clip *sd_clip_new(const sd_weights *w)
{
	if (!w) {
		sd_seterr("sd_clip_new: no weights");
		return NULL;
	}
	if (sd_weights_component(w) != SD_TEXT_ENCODER && sd_weights_component(w) != SD_TEXT_ENCODER_2) {
		sd_seterr("sd_clip_new: the weights are the %s, not the text_encoder",
		          sd_component_name(sd_weights_component(w)));
		return NULL;
	}
	sd_clip *c = calloc(1, sizeof *c);
	if (!c) {
		sd_seterr("out of memory");
		return NULL;
	}
	if (build(c, w) < 0 || !(c->arena = sd_arena_new(c->dev, 0))) {
		sd_clip_free(c);
		return NULL;
	}
	return c;
}

void sd_clip_free(sd_clip *c)
{
	if (!c) return;
	free(c->layer);
	free(c->rec);
	sd_arena_free(c->arena);
	sd_arena_free(c->bw);
	sd_arena_free(c->bws);
	free(c);
}

const sd_clip_config *sd_clip_get_config(const sd_clip *c)
{
	return &c->cfg;
}

int sd_clip_projection_dim(const sd_clip *c)
{
	return c->proj ? (int)c->proj->shape[0] : 0;
}

const sd_clip_layer *sd_clip_get_layer(const sd_clip *c, int i)
{
	return i >= 0 && i < c->cfg.layers ? &c->layer[i] : NULL;
}

size_t sd_clip_peak_bytes(const sd_clip *c)
{
	return sd_arena_peak(c->arena);
}

sd_clip_linear *sd_clip_find_linear(sd_clip *c, const char *module)
{
	static const char *const names[] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
	                                    "self_attn.out_proj", "mlp.fc1", "mlp.fc2"};
	const char *pre = "text_model.encoder.layers.";
	size_t n = strlen(pre);
	if (strncmp(module, pre, n)) return NULL;
	char *end;
	long i = strtol(module + n, &end, 10);
	if (end == module + n || *end != '.' || i < 0 || i >= c->cfg.layers) return NULL;
	sd_clip_layer *p = &c->layer[i];
	sd_clip_linear *l[] = {&p->q, &p->k, &p->v, &p->o, &p->fc1, &p->fc2};
	for (int k = 0; k < 6; k++)
		if (!strcmp(end + 1, names[k])) return l[k];
	return NULL;
}

/* The largest LoRA rank over the first n layers (0: no adapter, no scratch). */
static int lora_rank(const sd_clip *c, int n)
{
	int r = 0;
	for (int i = 0; i < n && i < c->cfg.layers; i++) {
		const sd_clip_layer *p = &c->layer[i];
		const sd_clip_linear *l[] = {&p->q, &p->k, &p->v, &p->o, &p->fc1, &p->fc2};
		for (int k = 0; k < 6; k++)
			if (sd_lora_rank(l[k]->lora) > r) r = sd_lora_rank(l[k]->lora);
	}
	return r;
}

/* ==== encoding ==== */

/* Fill the host header h with a tensor of arena memory on the arena's device `dev`. */
static sd_tensor *mk(sd_tensor *h, sd_arena *a, enum sd_device dev, enum sd_dtype dt, int ndim, int64_t d0,
                     int64_t d1, int64_t d2, int64_t d3)
{
	memset(h, 0, sizeof *h);
	h->dtype = dt;
	h->ndim = ndim;
	h->shape[0] = d0, h->shape[1] = d1, h->shape[2] = d2, h->shape[3] = d3;
	h->device = dev;
	size_t bytes = sd_tensor_nbytes(h);
	if (!(h->data = sd_arena_alloc(a, bytes ? bytes : 1))) return NULL;
	return h;
}

/* A (N, L, D) view of entry k of a stacked (K, N, L, D) tensor. */
static sd_tensor slice0(const sd_tensor *t, int64_t k)
{
	sd_tensor v = *t;
	v.ndim = t->ndim - 1;
	memmove(v.shape, t->shape + 1, sizeof(int64_t) * v.ndim);
	v.data = (char *)t->data + k * sd_tensor_nbytes(&v);
	v.owns = 0;
	return v;
}

static int check_shape(const char *what, const sd_tensor *t, int ndim, const int64_t *shape, enum sd_device dev)
{
	char got[96], want[96];
	int ok = t->dtype == SD_DTYPE_F32 && t->ndim == ndim && (t->device == SD_DEVICE_CPU || t->device == dev);
	for (int i = 0; ok && i < ndim; i++) ok = t->shape[i] == shape[i];
	if (!ok)
		return sd_seterr("text_encoder: %s is %s %s on %s, expected f32 %s on cpu%s%s", what,
		                 sd_dtype_name(t->dtype), sd_shape_str(t->ndim, t->shape, got, sizeof got),
		                 sd_device_name(t->device), sd_shape_str(ndim, shape, want, sizeof want),
		                 dev == SD_DEVICE_CPU ? "" : " or ", dev == SD_DEVICE_CPU ? "" : sd_device_name(dev));
	return 0;
}

/* Validate token ids (N, L) and place them, as i32 on the encoder's device, into h (arena memory) or
 * use them as they are. */
static const sd_tensor *place_ids(sd_clip *c, sd_tensor *h, const sd_tensor *tokens)
{
	const sd_clip_config *g = &c->cfg;
	char s[96];
	if (tokens->ndim != 2 || tokens->shape[0] < 1 || tokens->shape[1] < 1 || tokens->shape[1] > g->max_pos) {
		sd_seterr("text_encoder: tokens are %s, expected (N, L) with 1 <= L <= %d",
		          sd_shape_str(tokens->ndim, tokens->shape, s, sizeof s), g->max_pos);
		return NULL;
	}
	if (tokens->device != SD_DEVICE_CPU) {
		if (tokens->device != c->dev || tokens->dtype != SD_DTYPE_I32) {
			sd_seterr("text_encoder: tokens on %s must be i32 on the encoder's device (%s)",
			          sd_device_name(tokens->device), sd_device_name(c->dev));
			return NULL;
		}
		return tokens; /* not range-checked here: sd_embedding's backend does it */
	}
	if (tokens->dtype != SD_DTYPE_I32 && tokens->dtype != SD_DTYPE_I64) {
		sd_seterr("text_encoder: tokens are %s, expected i32 or i64", sd_dtype_name(tokens->dtype));
		return NULL;
	}
	int64_t n = sd_tensor_numel(tokens), L = tokens->shape[1];
	if (!mk(h, c->arena, c->dev, SD_DTYPE_I32, 2, tokens->shape[0], L, 0, 0)) return NULL;
	/* a host copy first (CPU arena memory or a staging buffer) */
	int32_t *ids = c->dev == SD_DEVICE_CPU ? h->data : malloc(n * sizeof *ids);
	if (!ids) {
		sd_seterr("out of memory");
		return NULL;
	}
	for (int64_t i = 0; i < n; i++) {
		int64_t v = tokens->dtype == SD_DTYPE_I32 ? ((const int32_t *)tokens->data)[i]
		                                          : ((const int64_t *)tokens->data)[i];
		if (v < 0 || v >= g->vocab) {
			sd_seterr("text_encoder: token id %lld at [%lld,%lld] is out of range [0, %d)", (long long)v,
			          (long long)(i / L), (long long)(i % L), g->vocab);
			if (ids != h->data) free(ids);
			return NULL;
		}
		ids[i] = (int32_t)v;
	}
	if (c->dev != SD_DEVICE_CPU) {
		sd_tensor host = *h;
		host.device = SD_DEVICE_CPU;
		host.data = ids;
		int rc = sd_tensor_copy(h, &host);
		free(ids);
		if (rc < 0) return NULL;
	}
	return h;
}

int sd_clip_encode(sd_clip *c, sd_tensor *out, const sd_tensor *tokens, int clip_skip, sd_tensor *hidden)
{
	const sd_clip_config *g = &c->cfg;
	if (clip_skip < 0 || clip_skip > g->layers)
		return sd_seterr("text_encoder: clip skip %d is out of range [1, %d] (the model has %d layers)",
		                 clip_skip, g->layers, g->layers);
	const int sel = g->layers + 1 - (clip_skip ? clip_skip : 1); /* hidden state under the final LN */
	const int run = hidden ? g->layers : sel;
	sd_arena_reset(c->arena);

	enum { IDS, X, LN, Q, K, V, ATT, H, OUT, LORA, NH };
	sd_tensor hd[NH];
	const sd_tensor *ids = place_ids(c, &hd[IDS], tokens);
	if (!ids) return -1;
	const int64_t N = ids->shape[0], L = ids->shape[1], D = g->hidden, F = g->intermediate;
	const int64_t shape[4] = {N, L, D}, hshape[4] = {g->layers + 1, N, L, D};
	TRY(check_shape("out", out, 3, shape, c->dev));
	if (hidden) TRY(check_shape("hidden", hidden, 4, hshape, c->dev));

	sd_arena *A = c->arena;
	const enum sd_device dev = c->dev;
	for (int i = X; i <= ATT; i++)
		if (!mk(&hd[i], A, dev, SD_DTYPE_F32, 3, N, L, D, 0)) return -1;
	if (!mk(&hd[H], A, dev, SD_DTYPE_F32, 3, N, L, F, 0)) return -1;
	sd_tensor *res = out;
	if (out->device != dev && !(res = mk(&hd[OUT], A, dev, SD_DTYPE_F32, 3, N, L, D, 0))) return -1;
	const int rank = lora_rank(c, run);
	if (rank && !mk(&hd[LORA], A, dev, SD_DTYPE_F32, 3, N, L, rank, 0)) return -1;

	/* inference aliases: residuals in place in x, ln2 over ln1, activation in place, tmp over q */
	sd_tensor *x = &hd[X];
	const sd_clip_layer_act act = {
		.ln1 = &hd[LN], .q = &hd[Q], .k = &hd[K], .v = &hd[V], .probs = NULL, .att = &hd[ATT],
		.res1 = x, .ln2 = &hd[LN], .h = &hd[H], .a = &hd[H], .tmp = &hd[Q], .lora = rank ? &hd[LORA] : NULL,
	};
	TRY(sd_clip_embed_forward(x, ids, c->tok_emb, c->pos_emb));
	for (int l = 0; l <= run; l++) {
		if (l > 0) TRY(sd_clip_layer_forward(x, &act, x, &c->layer[l - 1], g));
		if (hidden) {
			sd_tensor hs = slice0(hidden, l);
			TRY(sd_tensor_copy(&hs, x));
		}
		if (l == sel) TRY(sd_layer_norm(res, x, c->final_w, c->final_b, g->eps));
	}
	if (res != out) TRY(sd_tensor_copy(out, res));
	return 0;
}

int sd_clip_encode_record(sd_clip *c, sd_clip_act *act, sd_arena *a, const sd_tensor *ids, int clip_skip)
{
	const sd_clip_config *g = &c->cfg;
	char s[96];
	memset(act, 0, sizeof *act);
	if (clip_skip < 0 || clip_skip > g->layers)
		return sd_seterr("text_encoder: clip skip %d is out of range [1, %d]", clip_skip, g->layers);
	if (ids->dtype != SD_DTYPE_I32 || ids->device != c->dev || ids->ndim != 2 || ids->shape[1] > g->max_pos)
		return sd_seterr("text_encoder: record: ids are %s %s on %s, expected i32 (N, L<=%d) on %s",
		                 sd_dtype_name(ids->dtype), sd_shape_str(ids->ndim, ids->shape, s, sizeof s),
		                 sd_device_name(ids->device), g->max_pos, sd_device_name(c->dev));
	const int nl = g->layers + 1 - (clip_skip ? clip_skip : 1);
	const int64_t N = ids->shape[0], L = ids->shape[1], D = g->hidden, F = g->intermediate, H = g->heads;
	const enum sd_device dev = c->dev;

	/* host memory for headers and arrays: nl+1 hidden, 12 per layer, out */
	const int nhdr = (nl + 1) + 12 * nl + 1, rank = lora_rank(c, nl);
	free(c->rec);
	c->rec = calloc(1, nhdr * sizeof(sd_tensor) + (nl + 1) * sizeof(sd_tensor *) + nl * sizeof(sd_clip_layer_act));
	if (!c->rec) return sd_seterr("out of memory");
	sd_tensor *hd = c->rec;
	act->hidden = (sd_tensor **)(hd + nhdr);
	act->layer = (sd_clip_layer_act *)(act->hidden + nl + 1);
	act->ids = ids;
	act->nlayers = nl;
#define T3(d) mk(hd++, a, dev, SD_DTYPE_F32, 3, N, L, (d), 0)
	for (int l = 0; l <= nl; l++)
		if (!(act->hidden[l] = T3(D))) return -1;
	for (int l = 0; l < nl; l++) {
		sd_clip_layer_act *la = &act->layer[l];
		if (!(la->ln1 = T3(D)) || !(la->q = T3(D)) || !(la->k = T3(D)) || !(la->v = T3(D)) ||
		    !(la->probs = mk(hd++, a, dev, SD_DTYPE_F32, 4, N, H, L, L)) || !(la->att = T3(D)) ||
		    !(la->res1 = T3(D)) || !(la->ln2 = T3(D)) || !(la->h = T3(F)) || !(la->a = T3(F)) ||
		    !(la->tmp = T3(D)) || (rank && !(la->lora = T3(rank))))
			return -1;
	}
	if (!(act->out = T3(D))) return -1;
#undef T3
	TRY(sd_clip_embed_forward(act->hidden[0], ids, c->tok_emb, c->pos_emb));
	for (int l = 0; l < nl; l++)
		TRY(sd_clip_layer_forward(act->hidden[l + 1], &act->layer[l], act->hidden[l], &c->layer[l], g));
	return sd_layer_norm(act->out, act->hidden[nl], c->final_w, c->final_b, g->eps);
}

int sd_clip_backward(sd_clip *c, const sd_clip_act *act, const sd_tensor *dout)
{
	const sd_clip_config *g = &c->cfg;
	const int nl = act->nlayers;
	if (!act->out || !act->hidden || nl < 1) return sd_seterr("text_encoder: backward: no recorded forward");
	if (!sd_tensor_same_shape(dout, act->out) || dout->device != c->dev)
		return sd_seterr("text_encoder: backward: dout must be shaped as the output, on the encoder's device");
	/* the earliest layer with a trained adapter: nothing before it needs a gradient */
	int first = nl;
	for (int l = 0; l < nl && first == nl; l++) {
		const sd_clip_layer *p = &c->layer[l];
		const sd_clip_linear *ls[] = {&p->q, &p->k, &p->v, &p->o, &p->fc1, &p->fc2};
		for (int k = 0; k < 6; k++)
			if (ls[k]->train) first = l;
	}
	if (first == nl) return 0;
	if (!c->bw && !(c->bw = sd_arena_new(c->dev, 0))) return -1;
	sd_arena *s = c->bw;
	sd_arena_reset(s);
	/* two gradient buffers of the residual stream, used in turn, outside the per-layer scratch */
	sd_tensor gh[2];
	for (int i = 0; i < 2; i++)
		if (!mk(&gh[i], s, c->dev, SD_DTYPE_F32, 3, dout->shape[0], dout->shape[1], dout->shape[2], 0)) return -1;
	if (!c->bws && !(c->bws = sd_arena_new(c->dev, 0))) return -1;
	TRY(sd_layer_norm_backward(&gh[nl & 1], NULL, NULL, dout, act->hidden[nl], c->final_w, g->eps, 0));
	for (int l = nl - 1; l >= first; l--) {
		sd_arena_reset(c->bws);
		sd_tensor *dx = l > first ? &gh[l & 1] : NULL;
		if (sd_clip_layer_backward(dx, &gh[(l + 1) & 1], &act->layer[l], act->hidden[l], &c->layer[l], g, c->bws, 0))
			return sd_preerr("text_encoder: layer %d backward", l);
	}
	sd_arena_reset(c->bws);
	return 0;
}

/* ==== SDXL's use of an encoder ==== */

int sd_clip_encode_sdxl(sd_clip *c, sd_tensor *penult, sd_tensor *pooled, const sd_tensor *tokens)
{
	const sd_clip_config *g = &c->cfg;
	char s1[96];
	if (g->layers < 2) return sd_seterr("text_encoder: %d layer: no penultimate hidden state", g->layers);
	if (tokens->ndim != 2 || tokens->device != SD_DEVICE_CPU || penult->device != SD_DEVICE_CPU ||
	    (pooled && pooled->device != SD_DEVICE_CPU))
		return sd_seterr("text_encoder: SDXL encoding takes host tensors, tokens (N, L)");
	const int64_t N = tokens->shape[0], L = tokens->shape[1], D = g->hidden;
	const int64_t P = c->proj ? c->proj->shape[0] : D;
	if (pooled && (pooled->dtype != SD_DTYPE_F32 || pooled->ndim != 2 || pooled->shape[0] != N || pooled->shape[1] != P))
		return sd_seterr("text_encoder: pooled is %s, expected f32 (%lld, %lld)",
		                 sd_shape_str(pooled->ndim, pooled->shape, s1, sizeof s1), (long long)N, (long long)P);
	sd_tensor *hidden = sd_tensor_newv(SD_DTYPE_F32, 4, (int64_t)g->layers + 1, N, L, D);
	sd_tensor *last = sd_tensor_newv(SD_DTYPE_F32, 3, N, L, D);
	sd_tensor *ps = pooled ? sd_tensor_newv(SD_DTYPE_F32, 2, N, D) : NULL;
	int rc = !hidden || !last || (pooled && !ps) ? -1 : sd_clip_encode(c, last, tokens, 0, hidden);
	if (rc == 0) {
		sd_tensor h = slice0(hidden, g->layers - 1);
		rc = sd_tensor_copy(penult, &h);
	}
	for (int64_t b = 0; rc == 0 && pooled && b < N; b++) {
		/* transformers: eos_token_id 2 (the configs SD ships) takes argmax(input_ids), the first
		 * largest id (<|endoftext|>); other ids take the first position holding eos_token_id */
		int64_t at = -1, best = INT64_MIN;
		for (int64_t k = 0; k < L; k++) {
			int64_t v = tokens->dtype == SD_DTYPE_I64 ? ((const int64_t *)tokens->data)[b * L + k]
			                                          : ((const int32_t *)tokens->data)[b * L + k];
			if (c->eos_id == 2 ? v > best : v == c->eos_id && at < 0) at = k, best = v;
		}
		if (at < 0) at = L - 1;
		memcpy((float *)ps->data + b * D, (const float *)last->data + (b * L + at) * D, (size_t)D * sizeof(float));
	}
	if (rc == 0 && pooled) rc = c->proj ? sd_linear(pooled, ps, c->proj, NULL) : sd_tensor_copy(pooled, ps);
	sd_tensor_free(hidden);
	sd_tensor_free(last);
	sd_tensor_free(ps);
	return rc;
}

int sd_clip_encode_sdxl_pair(sd_clip *te1, sd_clip *te2, const sd_tensor *tok1, const sd_tensor *tok2,
                             sd_tensor **context, sd_tensor **pooled)
{
	char s1[96], s2[96];
	*context = *pooled = NULL;
	if (tok1->ndim != 2 || tok2->ndim != 2 || tok1->shape[0] != tok2->shape[0] || tok1->shape[1] != tok2->shape[1])
		return sd_seterr("the two token tensors are %s and %s, expected the same (N, L)",
		                 sd_shape_str(tok1->ndim, tok1->shape, s1, sizeof s1),
		                 sd_shape_str(tok2->ndim, tok2->shape, s2, sizeof s2));
	const int64_t N = tok1->shape[0], L = tok1->shape[1], D1 = te1->cfg.hidden, D2 = te2->cfg.hidden;
	const int64_t P = te2->proj ? te2->proj->shape[0] : D2;
	sd_tensor *a = sd_tensor_newv(SD_DTYPE_F32, 3, N, L, D1), *b = sd_tensor_newv(SD_DTYPE_F32, 3, N, L, D2);
	sd_tensor *ctx = sd_tensor_newv(SD_DTYPE_F32, 3, N, L, D1 + D2), *pl = sd_tensor_newv(SD_DTYPE_F32, 2, N, P);
	int rc = !a || !b || !ctx || !pl ? -1 : 0;
	if (rc == 0 && sd_clip_encode_sdxl(te1, a, NULL, tok1) < 0) rc = sd_preerr("text_encoder");
	if (rc == 0 && sd_clip_encode_sdxl(te2, b, pl, tok2) < 0) rc = sd_preerr("text_encoder_2");
	for (int64_t r = 0; rc == 0 && r < N * L; r++) { /* torch.cat([e1, e2], dim=-1) */
		float *o = (float *)ctx->data + r * (D1 + D2);
		memcpy(o, (const float *)a->data + r * D1, (size_t)D1 * sizeof(float));
		memcpy(o + D1, (const float *)b->data + r * D2, (size_t)D2 * sizeof(float));
	}
	sd_tensor_free(a);
	sd_tensor_free(b);
	if (rc < 0) {
		sd_tensor_free(ctx);
		sd_tensor_free(pl);
		return -1;
	}
	*context = ctx;
	*pooled = pl;
	return 0;
}
