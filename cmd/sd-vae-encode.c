/*
 * sd-vae-encode - images to latents with a Stable Diffusion VAE (see sd-vae-encode(1)).  A filter:
 *
 *   pnmtotensor in.ppm | sd-vae-encode -m MODEL | sd-info
 *
 * Every frame's "image" (f32 [N,3,H,W] in [0,1]) becomes "latent" = scaling_factor × the posterior mean
 * of AutoencoderKL.encode(2·image − 1) (diffusers' pipelines), or × a posterior sample with --sample,
 * drawn with torch's CPU generator (--seed, or the frame's "generator", which is written back so that
 * later tools continue the same stream).  Every other key is passed through.
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "sd.h"
#include "sd_cli.h"

struct opts {
	const char *model, *config, *device;
	int sample;
	int has_seed;
	uint64_t seed;
	int tile; /* sd_vae_tiling.tile: 0 auto, -1 never */
	const char **lora; /* --lora PATH[:SCALE], repeatable: adapters applied unmerged (lib/models/lora.c) */
	int nlora;
};

static void usage(void)
{
	printf("Usage: %s [OPTION]... [FILE]\n"
	       "Encode the \"image\" (f32 [N,3,H,W] in [0,1]) of every frame of a tensor stream into a \"latent\"\n"
	       "(f32 [N,4,H/8,W/8], multiplied by the VAE's scaling factor) with the VAE of a Stable Diffusion\n"
	       "model; other keys pass through.  With no FILE, or when FILE is -, read standard input.\n"
	       "\n"
	       "  -m, --model PATH   diffusers folder, single-file .safetensors or .ckpt (default $SD_MODEL)\n"
	       "      --config DIR   diffusers folder whose vae/config.json describes a single-file model\n"
	       "      --device DEV   cpu, cuda or auto (default $SD_DEVICE, else auto)\n"
	       "      --lora PATH[:SCALE]  apply a LoRA adapter's VAE part (a PEFT folder: vae/ or its\n"
	       "                     parent) with weight SCALE (default 1); repeatable\n"
	       "      --sample       take a sample of the posterior, not its mean\n"
	       "      --seed S       seed torch's generator for --sample (default: continue the frame's\n"
	       "                     \"generator\")\n"
	       "      --tile N       encode in overlapping tiles of NxN pixels (a multiple of 8); 0 never tiles\n"
	       "                     (default: tiles of %d above %dx%d pixels)\n"
	       "  -v, --verbose      report each frame and its time on standard error\n"
	       "  -h, --help         display this help and exit\n"
	       "      --version      output version information and exit\n"
	       "\n"
	       "Example: pnmtotensor in.ppm | %s -m sd15 | sd-vae-decode -m sd15 | tensortopnm > out.ppm\n",
	       sd_prog, SD_VAE_AUTO_TILE, 1024, 1024, sd_prog);
	exit(0);
}

int main(int argc, char **argv)
{
	static const struct option longopts[] = {
		{"model", required_argument, NULL, 'm'},
		{"config", required_argument, NULL, 'C'},
		{"device", required_argument, NULL, 'D'},
		{"sample", no_argument, NULL, 'S'},
		{"seed", required_argument, NULL, 's'},
		{"tile", required_argument, NULL, 'T'},
		{"lora", required_argument, NULL, 'L'},
		{"verbose", no_argument, NULL, 'v'},
		{"help", no_argument, NULL, 'h'},
		{"version", no_argument, NULL, 'V'},
		{NULL, 0, NULL, 0},
	};
	static struct opts o; /* static: what it points to stays reachable until exit */
	int c;

	sd_cli_init_compute(argc, argv);
	if (!(o.lora = calloc(argc, sizeof *o.lora))) sd_die("out of memory");
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":m:vh", longopts, NULL)) != -1) {
		switch (c) {
		case 'm': o.model = optarg; break;
		case 'C': o.config = optarg; break;
		case 'D': o.device = optarg; break;
		case 'S': o.sample = 1; break;
		case 's': o.seed = (uint64_t)sd_parse_int("--seed", optarg, 0, INT64_MAX); o.has_seed = 1; break;
		case 'T': o.tile = (int)sd_parse_int("--tile", optarg, 0, 1 << 20); if (o.tile == 0) o.tile = -1; break;
		case 'L': o.lora[o.nlora++] = optarg; break;
		case 'v': sd_verbose = 1; break;
		case 'h': usage(); break;
		case 'V': sd_print_version(); break;
		default: sd_bad_option(c, argv);
		}
	}
	if (argc - optind > 1) sd_usage_error("too many files (one stream at a time)");
	if (o.has_seed && !o.sample) sd_usage_error("--seed applies only with --sample");

	enum sd_device dev;
	if (sd_device_parse(o.device, &dev)) sd_usage_error("--device: %s", sd_errmsg());
	double t0 = sd_now();
	sd_model *m = sd_model_open(o.model, o.config);
	if (!m) sd_die("%s", sd_errmsg());
	if (!sd_model_has(m, SD_VAE)) sd_die("%s: the model has no VAE", sd_model_path(m));
	sd_weights *w = sd_weights_load_stored(m, SD_VAE, dev);
	sd_vae *vae = w ? sd_vae_new(w) : NULL;
	if (!vae) sd_die("%s: %s", sd_model_path(m), sd_errmsg());
	sd_lora *lora = sd_lora_load(o.lora, o.nlora);
	if (!lora || sd_lora_attach_vae(lora, vae, w) < 0) sd_die("--lora: %s", sd_errmsg());
	if (o.nlora && !sd_lora_count(lora, SD_VAE)) sd_info("--lora: no VAE adapter in the files given");
	const sd_vae_config *cfg = sd_vae_get_config(vae);
	int f = sd_vae_factor(vae);
	sd_info("%s: VAE of %lld parameters on %s, %d blocks, scaling factor %g (%.2f s)", sd_model_path(m),
	        (long long)sd_weights_params(w), sd_device_name(dev), cfg->nblocks, cfg->scaling_factor, sd_now() - t0);
	if (o.tile > 0 && o.tile % f) sd_usage_error("--tile: %d is not a multiple of %d", o.tile, f);
	if (o.tile > 0 && o.tile < 2 * f) sd_usage_error("--tile: %d is below %d", o.tile, 2 * f);
	sd_vae_tiling tiling = {o.tile, 0};

	const char *path = optind < argc ? argv[optind] : NULL;
	const char *name = !path || !strcmp(path, "-") ? "stdin" : path;
	FILE *in = sd_open_in(path);
	sd_reader *r = sd_reader_new(in, name);
	if (!r) sd_die_lib("%s", name);
	sd_value *frame;
	long nframes = 0;
	int rc;
	while ((rc = sd_reader_next(r, &frame)) == 1) {
		long idx = sd_reader_index(r);
		sd_tensor *conv;
		const sd_tensor *img = sd_frame_f32(frame, "image", "(images come in through pnmtotensor)", name, idx, &conv);
		char s[96], s2[96];
		if (img->ndim != 4) sd_die("%s: frame %ld: \"image\" has shape %s, want [N,3,H,W]", name, idx,
		                           sd_shape_str(img->ndim, img->shape, s, sizeof s));
		int64_t shape[4] = {img->shape[0], cfg->latent_channels, img->shape[2] / f, img->shape[3] / f};
		sd_tensor *latent = sd_tensor_new(SD_DTYPE_F32, 4, shape), *eps = NULL;
		if (!latent) sd_die_lib("%s: frame %ld", name, idx);
		sd_rng rng;
		if (o.sample) {
			const sd_value *g = sd_map_get(frame, "generator");
			if (o.has_seed)
				sd_rng_seed(&rng, o.seed);
			else if (!g)
				sd_die("%s: frame %ld: --sample needs --seed S or a \"generator\" in the frame", name, idx);
			else if (sd_rng_from_value(&rng, g))
				sd_die_lib("%s: frame %ld", name, idx);
			/* diffusers: randn_tensor(mean.shape, generator) — one draw over the whole batch */
			if (!(eps = sd_tensor_new(SD_DTYPE_F32, 4, shape))) sd_die_lib("%s: frame %ld", name, idx);
			sd_rng_randn(&rng, eps->data, sd_tensor_numel(eps));
		}
		double t1 = sd_now();
		if (sd_vae_encode_image(vae, latent, img, eps, &tiling)) sd_die_lib("%s: frame %ld", name, idx);
		sd_info("frame %ld: %s -> %s in %.2f s, %.0f MiB of activations", idx,
		        sd_shape_str(img->ndim, img->shape, s, sizeof s), sd_shape_str(4, shape, s2, sizeof s2), sd_now() - t1,
		        sd_vae_peak_bytes(vae) / 1048576.0);
		sd_tensor_free(conv);
		sd_tensor_free(eps);
		if (sd_map_set_tensor(frame, "latent", latent)) sd_die_lib("%s: frame %ld", name, idx);
		if (o.sample && sd_map_set(frame, "generator", sd_rng_to_value(&rng)))
			sd_die_lib("%s: frame %ld", name, idx);
		sd_write_frame_or_die(frame);
		sd_value_free(frame);
		nframes++;
	}
	if (rc < 0) sd_die("%s", sd_errmsg());
	if (nframes == 0) sd_die("%s: no frames on input", name);
	sd_reader_free(r);
	sd_vae_free(vae);
	sd_lora_free(lora);
	sd_weights_free(w);
	sd_model_close(m);
	sd_info("%ld frame%s", nframes, nframes == 1 ? "" : "s");
	sd_close_stdout();
	return 0;
}
