# sdpipe - Stable Diffusion as Unix pipes.  One non-recursive Makefile.
#
#   make                 libsd.a and every tool into bin/
#   make check           build and run every test (tests/run.sh), on the normal build and again under
#                        ASan + UBSan: "N passed, N failed, N skipped"
#   make demo            the main job (see README.md)
#   make bench           benchmarks (tests/bench/), printed as a table
#   make install PREFIX=/usr/local DESTDIR=
#   CUDA=1 / CUDA=0      force the CUDA backend on or off (default: on when nvcc is found)
#   SANITIZE=1           build with ASan + UBSan (into build-san/ and bin-san/)
#   make valgrind        the parser tests under valgrind (a CPU-only build in build-vg/)

PREFIX   ?= /usr/local
DESTDIR  ?=
CC       ?= cc
NVCC     ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(NVCC))
NVCCFLAGS ?= -O3 -std=c++17 -arch=sm_90 -Xcompiler -fPIC

ifeq ($(origin CUDA),undefined)
  CUDA := $(if $(NVCC),1,0)
endif

ifeq ($(VALGRIND),1)
  CUDA := 0
  B := build-vg
  BIN := bin-vg
  SANFLAGS :=
  OPT := -O1 -g -march=x86-64-v3
else ifeq ($(SANITIZE),1)
  B := build-san
  BIN := bin-san
  SANFLAGS := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
  OPT := -O1 -g -march=x86-64-v3
else
  B := build
  BIN := bin
  SANFLAGS :=
  OPT := -O3 -march=x86-64-v3 -mtune=native -g
endif

CFLAGS   ?= $(OPT)
CFLAGS   += -std=c11 -D_GNU_SOURCE -Wall -Wextra -Wno-unused-parameter -Wno-sign-compare -fopenmp $(SANFLAGS)
# OpenBLAS's OpenMP build shares libgomp's thread pool with our own OpenMP loops; the pthread build
# would keep a second pool spinning against it (2x slower on small models here).  Falls back to the
# pthread build where the OpenMP one is not installed (the GPU machine's carried packages).
BLASDIR  ?= $(firstword $(wildcard /usr/lib/x86_64-linux-gnu/openblas-openmp) $(wildcard /usr/lib/x86_64-linux-gnu/openblas-pthread))
BLASINC  := $(subst /usr/lib/,/usr/include/,$(BLASDIR))
CPPFLAGS += -DSD_DATADIR='"$(PREFIX)/share/sdpipe"' -Ilib -I/usr/include/netpbm $(if $(BLASINC),-I$(BLASINC))
comma    := ,
LDLIBS   := $(if $(BLASDIR),-L$(BLASDIR) -Wl$(comma)-rpath$(comma)$(BLASDIR)) -lopenblas -lnetpbm -lpng -ljpeg -lmsgpackc -larchive -ljansson -lm -lpthread
LDFLAGS  += -fopenmp $(SANFLAGS)

LIB_SRC  := $(sort $(wildcard lib/*.c lib/*/*.c))
LIB_OBJ  := $(LIB_SRC:%.c=$(B)/%.o)
CU_SRC   := $(sort $(wildcard kernels/*.cu))

# The CUDA backend is a shared object (libsd-cuda.so, linking cuBLAS and the CUDA runtime) that
# lib/cuda.c loads with dlopen when an NVIDIA device is present; the tools themselves do not link CUDA.
ifeq ($(CUDA),1)
  CPPFLAGS += -DSD_CUDA=1 -DSD_CUDA_SO='"$(abspath $(B))/libsd-cuda.so"' -DSD_LIBDIR='"$(PREFIX)/lib/sdpipe"'
  CU_OBJ   := $(CU_SRC:%.cu=$(B)/%.o)
  CUDA_SO  := $(B)/libsd-cuda.so
  $(info sdpipe: CUDA backend on ($(NVCC)), loaded at run time from libsd-cuda.so)
else
  CU_OBJ   :=
  CUDA_SO  :=
  $(info sdpipe: CPU backend only (CUDA=0 or no nvcc))
endif
LDLIBS   += -ldl

TOOLS    := $(patsubst cmd/%.c,$(BIN)/%,$(sort $(wildcard cmd/*.c)))
# sd-txt2img and sd-img2img: one bash script over the tools (cmd/sd-txt2img.sh), installed under both names
SCRIPTS  := $(BIN)/sd-txt2img $(BIN)/sd-img2img
VERSION  := $(shell sed -n 's/^\#define SD_VERSION "\(.*\)"/\1/p' lib/sd.h)
EXAMPLES := $(sort $(wildcard examples/*.sh))
UNIT_SRC := $(sort $(wildcard tests/unit/test_*.c))
UNIT     := $(patsubst tests/unit/%.c,$(B)/tests/%,$(UNIT_SRC))
BENCH    := $(patsubst tests/bench/%.c,$(B)/bench/%,$(sort $(wildcard tests/bench/*.c)))
MAN1     := $(sort $(wildcard man/man1/*.1))
MAN5     := $(sort $(wildcard man/man5/*.5))
DATA     := $(sort $(wildcard lib/models/data/*))

DEBS     := libopenblas-dev libopenblas-openmp-dev libnetpbm-dev libmsgpack-dev libarchive-dev libjansson-dev netpbm \
            libpng-dev libjpeg62-turbo-dev python3-pil python3-numpy python3-msgpack

.PHONY: all check demo bench install deps clean tests valgrind
.DELETE_ON_ERROR:
# the tools' objects are intermediates of a pattern chain: keep them, or every make relinks every tool
.SECONDARY: $(TOOLS:$(BIN)/%=$(B)/cmd/%.o)

all: $(B)/libsd.a $(CUDA_SO) $(TOOLS) $(SCRIPTS)

$(SCRIPTS): cmd/sd-txt2img.sh lib/sd.h
	@mkdir -p $(@D)
	sed 's/@VERSION@/$(VERSION)/' $< > $@.tmp && chmod 755 $@.tmp && mv $@.tmp $@

$(B)/%.o: %.c $(wildcard lib/*.h) | deps-ok
	@mkdir -p $(@D)
	$(CC) $(CPPFLAGS) $(CFLAGS) -MMD -MP -c $< -o $@

$(B)/kernels/%.o: kernels/%.cu lib/sd.h lib/backend.h
	@mkdir -p $(@D)
	$(NVCC) $(NVCCFLAGS) -Ilib -DSD_CUDA=1 -c $< -o $@

$(B)/libsd-cuda.so: $(CU_OBJ)
	$(NVCC) -shared $^ -L$(CUDA_HOME)/lib64 -Xlinker -rpath=$(CUDA_HOME)/lib64 -lcublas -lcudart -o $@

$(B)/libsd.a: $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BIN)/%: $(B)/cmd/%.o $(B)/libsd.a
	@mkdir -p $(@D)
	$(CC) $(LDFLAGS) $< $(B)/libsd.a $(LDLIBS) -o $@

$(B)/tests/%: tests/unit/%.c tests/test.h $(B)/libsd.a
	@mkdir -p $(@D)
	$(CC) $(CPPFLAGS) -Itests $(CFLAGS) -DTEST_NAME='"$*"' $< $(B)/libsd.a $(LDFLAGS) $(LDLIBS) -o $@

$(B)/bench/%: tests/bench/%.c $(B)/libsd.a
	@mkdir -p $(@D)
	$(CC) $(CPPFLAGS) -Itests $(CFLAGS) $< $(B)/libsd.a $(LDFLAGS) $(LDLIBS) -o $@

tests: all $(UNIT)

# The suite runs twice: on the normal build and on an ASan + UBSan build (every parser and tool under
# the sanitizers; about as long again).  `make check SANITIZE=1` runs only the sanitized one.
check: deps
	@$(MAKE) --no-print-directory tests
ifeq ($(SANITIZE),1)
	@BUILDS="$(B):$(BIN)" sh tests/run.sh
else
	@$(MAKE) --no-print-directory SANITIZE=1 tests
	@BUILDS="$(B):$(BIN) build-san:bin-san" sh tests/run.sh
endif

demo: deps
	@$(MAKE) --no-print-directory all
	@BIN=$(BIN) bash examples/demo.sh

bench: deps
	@$(MAKE) --no-print-directory all $(BENCH)
	@BIN=$(BIN) B=$(B) sh tests/bench/run.sh

VG_TESTS ?= test_stream test_safetensors test_ckpt test_model test_hostile
valgrind: deps
	@$(MAKE) --no-print-directory VALGRIND=1 $(VG_TESTS:%=build-vg/tests/%)
	@for t in $(VG_TESTS); do \
	  echo "== valgrind $$t"; \
	  SD_FIXTURES=tests/fixtures SHARED=../shared/fixtures valgrind -q --error-exitcode=1 --leak-check=full \
	    --errors-for-leak-kinds=definite build-vg/tests/$$t > build-vg/$$t.log 2>&1; rc=$$?; \
	  grep -E '^(PASS|FAIL|SKIP)|^==' build-vg/$$t.log; [ $$rc -eq 0 ] || exit 1; \
	done

# Make sure the Debian packages are there: install the missing ones as root, else print the command.
deps:
	@missing=""; for p in $(DEBS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "sdpipe: installing$$missing"; \
	    (apt-get install -y $$missing || (apt-get update && apt-get install -y $$missing)) >/dev/null || exit 1; \
	  else \
	    echo "sdpipe: missing Debian packages; run: sudo apt-get install -y$$missing"; exit 1; \
	  fi; \
	fi

deps-ok: ;

install: all
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/lib $(DESTDIR)$(PREFIX)/include \
	  $(DESTDIR)$(PREFIX)/share/man/man1 $(DESTDIR)$(PREFIX)/share/man/man5 $(DESTDIR)$(PREFIX)/share/sdpipe
	install -m 755 $(TOOLS) $(SCRIPTS) $(DESTDIR)$(PREFIX)/bin/
	install -d $(DESTDIR)$(PREFIX)/share/sdpipe/examples
	install -m 755 $(EXAMPLES) $(DESTDIR)$(PREFIX)/share/sdpipe/examples/
	install -m 644 $(B)/libsd.a $(DESTDIR)$(PREFIX)/lib/
	$(if $(CUDA_SO),install -d $(DESTDIR)$(PREFIX)/lib/sdpipe && install -m 755 $(CUDA_SO) $(DESTDIR)$(PREFIX)/lib/sdpipe/)
	install -m 644 lib/sd.h $(DESTDIR)$(PREFIX)/include/
	$(if $(MAN1),install -m 644 $(MAN1) $(DESTDIR)$(PREFIX)/share/man/man1/)
	$(if $(MAN5),install -m 644 $(MAN5) $(DESTDIR)$(PREFIX)/share/man/man5/)
	$(if $(DATA),install -m 644 $(DATA) $(DESTDIR)$(PREFIX)/share/sdpipe/)

clean:
	rm -rf build build-san build-vg bin bin-san bin-vg

-include $(LIB_OBJ:.o=.d) $(TOOLS:$(BIN)/%=$(B)/cmd/%.d)

# ==== fuzzing (issue 9): tests/fuzz/fuzz_<parser>.c are libFuzzer targets ====
#
#   make fuzz                   build them with clang (ASan + UBSan + libFuzzer, into build-fuzz/) and run
#                               each for FUZZ_SECONDS (default 60) on its corpus tests/fuzz/corpus/<t>/;
#                               what crashes, leaks or hangs is left in build-fuzz/artifacts/<t>/
#   make fuzz-build             only build them (build-fuzz/fuzz_<t>)
#   FUZZ_TARGETS="stream ckpt"  a subset
#
# The same targets are linked with tests/fuzz/replay.c (a plain main that feeds them saved inputs) in
# every normal build ($(B)/fuzz/replay-<t>), and tests/pipeline/fuzz-replay.sh replays the regression
# corpus tests/fuzz/crashes/<t>/ and the seed corpus under `make check` (and SANITIZE=1, valgrind).
# A crash found by `make fuzz` goes into tests/fuzz/crashes/<t>/ with its fix.

FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= stream safetensors ckpt config tokenizer pnm
FUZZ_CC      ?= clang
FUZZ_SAN     := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
FUZZ_CFLAGS  := -O1 -g -march=x86-64-v3 -std=c11 -D_GNU_SOURCE -Wall -Wno-unused-parameter -Wno-sign-compare -fopenmp $(FUZZ_SAN)
FUZZ_CPPFLAGS := -DSD_DATADIR='"$(PREFIX)/share/sdpipe"' -Ilib -Itests/fuzz -I/usr/include/netpbm \
                 -I/usr/include/x86_64-linux-gnu/openblas-pthread
FUZZ_LDLIBS  := -lopenblas -lnetpbm -lpng -ljpeg -lmsgpackc -larchive -ljansson -lm -lpthread
FUZZ_LIBOBJ  := $(LIB_SRC:%.c=build-fuzz/%.o)
FUZZ_BIN     := $(FUZZ_TARGETS:%=build-fuzz/fuzz_%)
FUZZ_REPLAY  := $(FUZZ_TARGETS:%=$(B)/fuzz/replay-%)

.PHONY: fuzz fuzz-build

# the library without CUDA, with coverage for libFuzzer (-fsanitize=fuzzer-no-link)
build-fuzz/lib/%.o: lib/%.c $(wildcard lib/*.h)
	@mkdir -p $(@D)
	$(FUZZ_CC) $(FUZZ_CPPFLAGS) $(FUZZ_CFLAGS) -fsanitize=fuzzer-no-link -MMD -MP -c $< -o $@

build-fuzz/libsd.a: $(FUZZ_LIBOBJ)
	@rm -f $@
	ar rcs $@ $^

build-fuzz/fuzz_%: tests/fuzz/fuzz_%.c tests/fuzz/fuzz.h build-fuzz/libsd.a
	$(FUZZ_CC) $(FUZZ_CPPFLAGS) $(FUZZ_CFLAGS) -fsanitize=fuzzer $< build-fuzz/libsd.a $(FUZZ_LDLIBS) -o $@

fuzz-build: $(FUZZ_BIN)

fuzz: deps
	@$(MAKE) --no-print-directory fuzz-build
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p build-fuzz/artifacts/$$t build-fuzz/corpus/$$t; \
	  echo "== fuzz $$t ($(FUZZ_SECONDS) s)"; \
	  build-fuzz/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -timeout=10 -max_len=65536 -print_final_stats=1 \
	    -artifact_prefix=build-fuzz/artifacts/$$t/ build-fuzz/corpus/$$t tests/fuzz/corpus/$$t \
	    > build-fuzz/fuzz_$$t.log 2>&1; rc=$$?; \
	  grep -E '^stat::number_of_executed_units|^SUMMARY|^==[0-9]+==ERROR' build-fuzz/fuzz_$$t.log; \
	  [ $$rc -eq 0 ] || { echo "fuzz $$t: failed (exit $$rc), see build-fuzz/fuzz_$$t.log and build-fuzz/artifacts/$$t/"; exit 1; }; \
	done

# the replay drivers, built by the normal compiler with the normal flags (so SANITIZE=1 sanitizes them)
$(B)/fuzz/replay-%: tests/fuzz/fuzz_%.c tests/fuzz/replay.c tests/fuzz/fuzz.h $(B)/libsd.a
	@mkdir -p $(@D)
	$(CC) $(CPPFLAGS) -Itests/fuzz $(CFLAGS) tests/fuzz/replay.c $< $(B)/libsd.a $(LDFLAGS) $(LDLIBS) -o $@

tests: $(FUZZ_REPLAY)

clean: clean-fuzz
.PHONY: clean-fuzz
clean-fuzz:
	rm -rf build-fuzz

-include $(FUZZ_LIBOBJ:.o=.d)
