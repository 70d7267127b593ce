#!/bin/sh
# tests/bench/run.sh - what `make bench` runs: each benchmark prints a table (seconds, GFLOP/s, peak
# RSS) for full-size SD 1.5 shapes with random weights.  Timings are measured, never asserted.
# BENCH_SIZES="256 512" picks the image sizes (default both).
B=${B:-build}
sizes=${BENCH_SIZES:-"256 512"}
echo "sdpipe benchmarks on $(nproc) cores, SD_THREADS=${SD_THREADS:-all}, $(date -u +%Y-%m-%d)"
OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}; export OMP_WAIT_POLICY
rc=0
for b in unet vae train; do
	[ -x "$B/bench/$b" ] || continue
	echo
	echo "== $b"
	for s in $sizes; do
		"$B/bench/$b" "$s" || rc=1
	done
done
# a training step at batch 4 too (the study's batch)
if [ -x "$B/bench/train" ]; then
	echo
	echo "== train, batch 4"
	"$B/bench/train" -b 4 256 || rc=1
fi
# the attention kernels on every Stable Diffusion shape, fused against the GEMM path
if [ -x "$B/bench/attention" ]; then
	echo
	echo "== attention"
	"$B/bench/attention" || rc=1
fi
exit $rc
