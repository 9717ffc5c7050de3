# strata: a plain Makefile.
#   make            build build/strata (CUDA backend too when nvcc is found; CUDA=0 skips it)
#   make test       unit + golden + end-to-end tests (no GPU needed)
#   make serve      build and serve the bundled model on 127.0.0.1:8100
#   make bench      CPU benchmark (Qwen3-1.7B shape, generated 8-bit weights)
#   make asan       the test suite under AddressSanitizer + UBSan (build-asan/)
#   make fuzz       each libFuzzer target for FUZZ_SECONDS (clang)
#   make test-cuda  GPU parity + golden tests (run on a machine with an NVIDIA GPU)

BUILD    ?= build
CC       ?= gcc
WERROR   ?= 0
SANITIZE ?= 0
OPT      ?= -O2

PKGS     := libmicrohttpd jansson libpcre2-8 libutf8proc libxxhash
PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   := $(shell pkg-config --libs $(PKGS) 2>/dev/null || echo -lmicrohttpd -ljansson -lpcre2-8 -lutf8proc -lxxhash)

WARN     := -Wall -Wextra -Wshadow -Wno-unused-parameter -Wno-missing-field-initializers -Wvla -Wno-format-truncation
ifeq ($(WERROR),1)
WARN     += -Werror
endif
CFLAGS   ?=
CFLAGS   += -std=c11 -D_GNU_SOURCE -g $(OPT) -fno-strict-aliasing -pthread $(WARN) -Iinclude -Isrc $(PKG_CFLAGS)
LDLIBS   += $(PKG_LIBS) -lm -lpthread -ldl

ifeq ($(SANITIZE),1)
CFLAGS   += -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
LDFLAGS  += -fsanitize=address,undefined
endif

# CUDA: built when nvcc is present unless CUDA=0.
NVCC     ?= $(shell command -v nvcc 2>/dev/null || (test -x /usr/local/cuda/bin/nvcc && echo /usr/local/cuda/bin/nvcc))
CU_SRC   := $(sort $(wildcard src/backend/cuda/*.cu))
CUDA     ?= $(if $(and $(NVCC),$(CU_SRC)),1,0)
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(NVCC))
CUDA_ARCH ?= -gencode arch=compute_90,code=sm_90 -gencode arch=compute_90,code=compute_90
ifeq ($(SANITIZE),1)
CUDA     := 0
endif

LIB_SRC  := $(sort $(shell find src -name '*.c' -not -path 'src/cli/*'))
CLI_SRC  := $(sort $(wildcard src/cli/*.c))
TEST_SRC := $(sort $(wildcard tests/test_*.c))
FUZZ_SRC := $(sort $(wildcard tests/fuzz/fuzz_*.c))

LIB_OBJ  := $(LIB_SRC:%.c=$(BUILD)/obj/%.o)
CLI_OBJ  := $(CLI_SRC:%.c=$(BUILD)/obj/%.o)
ifeq ($(CUDA),1)
CU_OBJ   := $(CU_SRC:%.cu=$(BUILD)/obj/%.o)
CFLAGS   += -DSTRATA_CUDA=1 -I$(CUDA_HOME)/include
LDLIBS   += -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcudart -lstdc++
endif
TESTS    := $(TEST_SRC:tests/%.c=$(BUILD)/tests/%)
LIB      := $(BUILD)/libstrata.a
BIN      := $(BUILD)/strata

FIXTURES := $(BUILD)/fixtures/.stamp

.PHONY: all test serve bench asan fuzz fixtures clean test-cuda tests
all: $(BIN)

$(BUILD)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -MMD -MP -c $< -o $@

$(BUILD)/obj/%.o: %.cu
	@mkdir -p $(dir $@)
	$(NVCC) -O3 -std=c++17 $(CUDA_ARCH) -Isrc -Iinclude -Xcompiler -fPIC,-Wall -lineinfo -MMD -MP -c $< -o $@

$(LIB): $(LIB_OBJ) $(CU_OBJ)
	@mkdir -p $(dir $@)
	@rm -f $@
	ar rcs $@ $^

$(BIN): $(CLI_OBJ) $(LIB)
	$(CC) $(LDFLAGS) -o $@ $(CLI_OBJ) $(LIB) $(LDLIBS)

$(BUILD)/tests/%: tests/%.c $(LIB) tests/check.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Itests $(LDFLAGS) -o $@ $< $(LIB) $(LDLIBS)

tests: $(TESTS) $(BIN)

# Fixtures are kept compressed in tests/fixtures; the bundled model lives in models/.
$(FIXTURES): $(wildcard tests/fixtures/*.tar.xz) $(wildcard models/kjv-qwen3-21m-8bit/*)
	scripts/unpack-fixtures.sh $(BUILD)/fixtures
	@touch $@

fixtures: $(FIXTURES)

test: tests $(FIXTURES)
	scripts/run-tests.sh $(BUILD)

serve: $(BIN)
	$(BIN) serve -m models/kjv-qwen3-21m-8bit

bench: $(BIN)
	$(BIN) bench --config configs/qwen3-1.7b.config.json --bits 8 --random-weights

asan:
	$(MAKE) BUILD=build-asan SANITIZE=1 OPT=-O1 CUDA=0 test

FUZZ_SECONDS ?= 60
fuzz:
	scripts/fuzz.sh $(FUZZ_SECONDS)

test-cuda: tests $(FIXTURES)
	STRATA_TEST_CUDA=1 scripts/run-tests.sh $(BUILD) cuda

# GPU benchmark driver (scripts/gpu-check.sh runs it)
$(BUILD)/cuda_bench: tools/cuda_bench.c $(LIB)
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $< $(LIB) $(LDLIBS)

clean:
	rm -rf build build-asan build-fuzz

-include $(LIB_OBJ:.o=.d) $(CLI_OBJ:.o=.d) $(CU_OBJ:.o=.d)
