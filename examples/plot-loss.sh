#!/bin/sh
# examples/plot-loss.sh - plot the loss log of sd-lora-train (--log loss.tsv) with gnuplot: the loss of
# every step and its running mean over a window, against the step.
#
# Usage: plot-loss.sh LOSS.TSV [OUT.png] [WINDOW]
#   OUT.png defaults to the log's name with .png; WINDOW (default 20) is the running mean's length.
set -eu
[ $# -ge 1 ] && [ $# -le 3 ] || { sed -n '5,6p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
log=$1 out=${2:-${1%.tsv}.png} win=${3:-20}
[ -r "$log" ] || { echo "plot-loss.sh: $log: cannot read it" >&2; exit 1; }
command -v gnuplot >/dev/null 2>&1 || { echo "plot-loss.sh: gnuplot is not installed" >&2; exit 1; }
# the running mean, computed with awk (column 7)
awk -v w="$win" 'NR == 1 { next } { s += $3; q[NR] = $3; if (NR - 1 > w) s -= q[NR - w]; n = NR - 1 < w ? NR - 1 : w
	print $1, $3, s / n }' "$log" > "$out.dat"
gnuplot <<GP
set terminal png size 900,500
set output "$out.tmp"
set xlabel "step"
set ylabel "loss"
set key top right
plot "$out.dat" using 1:2 with lines lc rgb "#b0b0b0" title "loss", \
     "$out.dat" using 1:3 with lines lw 2 lc rgb "#c03020" title "mean of $win"
GP
mv "$out.tmp" "$out"
rm -f "$out.dat"
echo "$out"
