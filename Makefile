# sdpipe - Stable Diffusion as Unix pipes.  One non-recursive Makefile.
#
#   make                 libsd.a and every tool into bin/
#   make check           build and run every test (tests/run.sh): "N passed, N failed, N skipped"
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
LDLIBS   := $(if $(BLASDIR),-L$(BLASDIR) -Wl$(comma)-rpath$(comma)$(BLASDIR)) -lopenblas -lnetpbm -lmsgpackc -larchive -ljansson -lm -lpthread
LDFLAGS  += -fopenmp $(SANFLAGS)

LIB_SRC  := $(sort $(wildcard lib/*.c lib/*/*.c))
LIB_OBJ  := $(LIB_SRC:%.c=$(B)/%.o)
CU_SRC   := $(sort $(wildcard kernels/*.cu))

ifeq ($(CUDA),1)
  CPPFLAGS += -DSD_CUDA=1
  CU_OBJ   := $(CU_SRC:%.cu=$(B)/%.o)
  LDLIBS   += -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcublas -lcudart -lstdc++
  $(info sdpipe: CUDA backend on ($(NVCC)))
else
  CU_OBJ   :=
  $(info sdpipe: CPU backend only (CUDA=0 or no nvcc))
endif

TOOLS    := $(patsubst cmd/%.c,$(BIN)/%,$(sort $(wildcard cmd/*.c)))
UNIT_SRC := $(sort $(wildcard tests/unit/test_*.c))
UNIT     := $(patsubst tests/unit/%.c,$(B)/tests/%,$(UNIT_SRC))
BENCH    := $(patsubst tests/bench/%.c,$(B)/bench/%,$(sort $(wildcard tests/bench/*.c)))
MAN1     := $(sort $(wildcard man/man1/*.1))
MAN5     := $(sort $(wildcard man/man5/*.5))
DATA     := $(sort $(wildcard lib/models/data/*))

DEBS     := libopenblas-dev libopenblas-openmp-dev libnetpbm-dev libmsgpack-dev libarchive-dev libjansson-dev netpbm

.PHONY: all check demo bench install deps clean tests valgrind
.DELETE_ON_ERROR:

all: $(B)/libsd.a $(TOOLS)

$(B)/%.o: %.c $(wildcard lib/*.h) | deps-ok
	@mkdir -p $(@D)
	$(CC) $(CPPFLAGS) $(CFLAGS) -MMD -MP -c $< -o $@

$(B)/kernels/%.o: kernels/%.cu lib/sd.h lib/backend.h
	@mkdir -p $(@D)
	$(NVCC) $(NVCCFLAGS) -Ilib -DSD_CUDA=1 -c $< -o $@

$(B)/libsd.a: $(LIB_OBJ) $(CU_OBJ)
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

check: deps
	@$(MAKE) --no-print-directory tests
	@BIN=$(BIN) B=$(B) sh tests/run.sh

demo: deps
	@$(MAKE) --no-print-directory all
	@BIN=$(BIN) sh examples/demo.sh

bench: deps
	@$(MAKE) --no-print-directory all $(BENCH)
	@BIN=$(BIN) B=$(B) sh tests/bench/run.sh

VG_TESTS ?= test_stream test_safetensors test_ckpt test_model
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
	install -m 755 $(TOOLS) $(DESTDIR)$(PREFIX)/bin/
	install -m 644 $(B)/libsd.a $(DESTDIR)$(PREFIX)/lib/
	install -m 644 lib/sd.h $(DESTDIR)$(PREFIX)/include/
	$(if $(MAN1),install -m 644 $(MAN1) $(DESTDIR)$(PREFIX)/share/man/man1/)
	$(if $(MAN5),install -m 644 $(MAN5) $(DESTDIR)$(PREFIX)/share/man/man5/)
	$(if $(DATA),install -m 644 $(DATA) $(DESTDIR)$(PREFIX)/share/sdpipe/)

clean:
	rm -rf build build-san build-vg bin bin-san bin-vg

-include $(LIB_OBJ:.o=.d) $(TOOLS:$(BIN)/%=$(B)/cmd/%.d)

