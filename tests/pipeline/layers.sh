#!/bin/sh
# tests/pipeline/layers.sh - libsd's floors call only downward (ARCHITECTURE.md, "libsd: layers"),
# measured on the built objects: a global symbol defined in one folder of $B/lib and used (undefined)
# in an object of another folder is an edge "user -> definer" (the top files of lib/ are the folder
# "lib").  Fails, naming the symbols, on any two folders with edges both ways and on any longer circle.
# The one allowed way up is the backend registry: lib/ops.c names each backend's table
# (sd_cpu_backend; the CUDA table comes through dlopen, sd_cuda_backend is in lib/cuda.c), so a use
# in folder "lib" of a REGISTRY symbol is not an edge.  Objects whose source is gone (a moved or
# removed .c leaves its old .o in $B) are not counted.
. tests/pipeline/lib.sh

B=${B:-build}
REGISTRY="sd_cpu_backend sd_cuda_backend"

command -v nm >/dev/null 2>&1 || { skip layers "nm is not installed"; exit 0; }
[ -d "$B/lib" ] || { skip layers "no $B/lib: run make first"; exit 0; }

# "D folder symbol" for each global definition, "U folder symbol" for each use
n=0
for o in $(cd "$B/lib" && find . -name '*.o' | sort); do
	o=${o#./}
	[ -f "lib/${o%.o}.c" ] || continue
	d=$(dirname "$o"); [ "$d" = . ] && d=lib
	nm -P -g "$B/lib/$o" | awk -v d="$d" '
		$2 == "U" || $2 == "w" || $2 == "v" { print "U", d, $1; next }
		$2 ~ /^[A-Z]$/ { print "D", d, $1 }'
	n=$((n + 1))
done >"$T/syms"
[ "$n" -gt 0 ] || { skip layers "no objects under $B/lib: run make first"; exit 0; }

# "from to sym1,sym2,..." per folder edge (registry uses left out)
awk -v reg="$REGISTRY" '
	BEGIN { nr = split(reg, r, " "); for (i = 1; i <= nr; i++) isreg[r[i]] = 1 }
	$1 == "D" { if (!($3 in def)) def[$3] = $2; next }
	{ use[++nu] = $2 " " $3 }
	END {
		for (i = 1; i <= nu; i++) {
			split(use[i], a, " ")
			if (!(a[2] in def) || def[a[2]] == a[1]) continue
			if (a[1] == "lib" && (a[2] in isreg)) continue
			k = a[1] " " def[a[2]]
			if (index("," syms[k] ",", "," a[2] ",")) continue
			syms[k] = syms[k] (syms[k] == "" ? "" : ",") a[2]
		}
		for (k in syms) print k, syms[k]
	}' "$T/syms" | sort >"$T/edges"

# every pair with edges both ways, then every longer circle (an edge a -> b with a path back b => a)
awk '
	function few(s,   n, a) { n = split(s, a, ","); return n > 3 ? a[1] "," a[2] "," a[3] ",... (" n ")" : s }
	{ e[$1, $2] = $3; if (!($1 in seen)) { seen[$1] = 1; node[++nn] = $1 } if (!($2 in seen)) { seen[$2] = 1; node[++nn] = $2 } }
	END {
		bad = 0
		for (k in e) {
			split(k, p, SUBSEP)
			if (p[1] < p[2] && ((p[2], p[1]) in e)) {
				print "FAIL: layers:" p[1] "<->" p[2] " (" p[1] " -> " p[2] ": " e[p[1], p[2]] "; " p[2] " -> " p[1] ": " e[p[2], p[1]] ")"
				two[p[1], p[2]] = two[p[2], p[1]] = 1; bad++
			}
		}
		for (k in e) {
			split(k, p, SUBSEP); a = p[1]; b = p[2]
			if ((a, b) in two) continue
			# breadth-first from b back to a
			delete prev; delete q; qh = 1; qt = 1; q[1] = b; prev[b] = ""; found = 0
			while (qh <= qt && !found) {
				x = q[qh++]
				for (i = 1; i <= nn; i++) {
					y = node[i]
					if (!((x, y) in e) || (y in prev)) continue
					prev[y] = x; q[++qt] = y
					if (y == a) { found = 1; break }
				}
			}
			if (!found) continue
			# the circle a -> b -> ... -> a, started at its smallest folder so that it is named once
			m = 1; c[1] = a; y = a; cn = 1
			while (y != b) { y = prev[y]; c[++cn] = y }
			for (i = 1; i <= cn; i++) r[i] = c[i == 1 ? 1 : cn + 2 - i]
			for (i = 2; i <= cn; i++) if (r[i] < r[m]) m = i
			name = ""; why = ""
			for (i = 0; i < cn; i++) {
				x = r[(m + i - 1) % cn + 1]; y = r[(m + i) % cn + 1]
				name = name x " -> "
				why = why (i ? "; " : "") x " -> " y ": " few(e[x, y])
			}
			name = name r[m]
			if (name in done) continue
			done[name] = 1
			print "FAIL: layers:circle " name " (" why ")"
			bad++
		}
		exit bad ? 1 : 0
	}' "$T/edges" >"$T/verdict"
if [ $? -eq 0 ]; then
	pass no-circles
else
	sort -u "$T/verdict"
	nfail=$((nfail + $(sort -u "$T/verdict" | wc -l)))
fi
[ -n "${V:-}" ] && sed 's/^/  edge: /' "$T/edges"
finish
