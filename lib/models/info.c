/*
 * info.c - a readable summary of a model (sd-info -m): its layout, its components with their parameter
 * counts and configs, the tokenizer and the scheduler config, for any layout sd_model_open reads.
 * Written to a FILE* the caller gives.
 */
#include <stdio.h>

#include "sd.h"

/* One config value per line, "    key: value", from the compact JSON text sd_config_json gives. */
static void show_config(FILE *out, const char *json)
{
	const char *p = json;
	int depth = 0, instr = 0;
	fputs("    ", out);
	for (; *p; p++) {
		char ch = *p;
		if (instr) {
			putc(ch, out);
			if (ch == '\\' && p[1]) putc(*++p, out);
			else if (ch == '"') instr = 0;
			continue;
		}
		if (ch == ' ' || ch == '\n' || ch == '\t' || ch == '\r') continue;
		if (ch == '"') { instr = 1; putc(ch, out); continue; }
		if (ch == '{' || ch == '[') { if (depth++ == 0 && ch == '{') continue; }
		if (ch == '}' || ch == ']') { if (--depth == 0 && ch == '}') continue; }
		if (ch == ',' && depth == 1) { fputs("\n    ", out); continue; }
		if (ch == ':' && depth == 1) { fputs(": ", out); continue; }
		putc(ch, out);
	}
	putc('\n', out);
}

int sd_model_summarize(FILE *out, const char *path, const char *config_dir)
{
	sd_model *m = sd_model_open(path, config_dir);
	char num[64];
	if (!m) return -1;
	fprintf(out, "model %s (%s)\n", sd_model_path(m), sd_model_format(m));
	int64_t total = 0;
	for (int c = 0; c < SD_COMPONENT_COUNT; c++) {
		const char *name = sd_component_name((enum sd_component)c);
		if (!sd_model_has(m, (enum sd_component)c)) {
			if (c == SD_TEXT_ENCODER_2) continue; /* SDXL's; not worth a line for the others */
			fprintf(out, "  %-12s  absent\n", name);
			continue;
		}
		sd_weights *w = sd_weights_load(m, (enum sd_component)c, SD_DEVICE_CPU);
		if (!w) {
			sd_preerr("%s: %s", sd_model_path(m), name);
			sd_model_close(m);
			return -1;
		}
		int64_t n = sd_weights_params(w);
		total += n;
		fprintf(out, "  %-12s  %s parameters in %d tensors\n", name, sd_num_grouped((uint64_t)n, num, sizeof num),
		        sd_weights_count(w));
		show_config(out, sd_config_json(w));
		sd_weights_free(w);
	}
	fprintf(out, "  %-12s  %s\n", "tokenizer", sd_model_tokenizer_dir(m) ? sd_model_tokenizer_dir(m)
	                                                                        : "(the shipped CLIP vocabulary)");
	const char *sched = sd_model_scheduler_json(m);
	fprintf(out, "  %-12s  %s\n", "scheduler", sched ? "" : "(none: the SD 1.5 defaults)");
	if (sched) show_config(out, sched);
	fprintf(out, "%s parameters\n", sd_num_grouped((uint64_t)total, num, sizeof num));
	sd_model_close(m);
	return 0;
}
