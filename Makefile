# apm-ext: a Lambda extension for Elastic APM. See README.md.
# all: the static musl binary; test: unit (sanitizers) + end-to-end;
# bench: cold start, memory, latency; fuzz: libFuzzer targets; layer: zips.

ARCH       ?= x86_64
MUSL_CC    ?= musl-gcc
BEARSSL_A  ?= /usr/lib/$(ARCH)-linux-gnu/libbearssl.a
# Hardening: stack canaries on functions with arrays (-fstack-protector-strong:
# 280 bytes here). Not -z relro -z now: a read-only GOT after start protects
# nothing in this static, non-PIE binary (no dynamic relocations: the linker
# makes no GNU_RELRO segment on x86_64), and on aarch64 it pads a segment to
# a 64 KiB page (+30 KiB, over the layer's 256 KiB bound). Not -z
# separate-code: it puts code in pages of its own, away from read-only data,
# for about 8 KiB of padding in a 200 KiB binary that runs no untrusted code
# and parses every input with bounds; those bytes are worth more as
# cold-start page faults saved.
CFLAGS_REL  = -std=c11 -Os -Wall -Wextra -Wshadow -ffunction-sections \
              -fdata-sections -fno-asynchronous-unwind-tables \
              -fstack-protector-strong -D_GNU_SOURCE -I/usr/include/bearssl
LDFLAGS_REL = -static -s -Wl,--gc-sections -Wl,-z,norelro \
              -Wl,-z,noseparate-code
# Nothing unwinds the stack (no C++, no thread cancellation): the unwind
# tables BearSSL's objects bring are dropped after the link (8 KiB).
POSTLINK    = -R .eh_frame -R .eh_frame_hdr
OBJCOPY    ?= objcopy
HOST_CC    ?= cc
TEST_FLAGS  = -std=c11 -g -O1 -Wall -Wextra -Wshadow -Werror -D_GNU_SOURCE \
              -DAPM_EXT_TEST -fsanitize=address,undefined,float-cast-overflow -fno-sanitize-recover=all \
              -fno-omit-frame-pointer \
              -I/usr/include/bearssl -I.

.PHONY: all deps test unit e2e bench fuzz layer demo clean sandbox syscalls \
        sim coverage mutate
SEEDS      ?= 2000
N          ?= 40

all: apm-ext

deps:
	@sh test/deps.sh

apm-ext: apm-ext.c apm-ext.h
	@command -v $(MUSL_CC) >/dev/null && [ -f $(BEARSSL_A) ] || sh test/deps.sh
	$(MUSL_CC) $(CFLAGS_REL) -o $@ apm-ext.c $(BEARSSL_A) $(LDFLAGS_REL)
	$(OBJCOPY) $(POSTLINK) $@
	@echo "apm-ext: $$(stat -c %s $@) bytes"

build/unit: test/unit/unit.c apm-ext.c apm-ext.h
	@mkdir -p build
	$(HOST_CC) $(TEST_FLAGS) -o $@ test/unit/unit.c $(BEARSSL_A)

build/sigv4: test/unit/sigv4.c apm-ext.c apm-ext.h
	@mkdir -p build
	$(HOST_CC) $(TEST_FLAGS) -o $@ test/unit/sigv4.c apm-ext.c $(BEARSSL_A)

# The seeded simulation of the whole loop (test/sim/sim.c), with sanitizers.
build/sim: test/sim/sim.c apm-ext.c apm-ext.h
	@mkdir -p build
	$(HOST_CC) $(TEST_FLAGS) -o $@ test/sim/sim.c $(BEARSSL_A)

# The real binary built by the host compiler with sanitizers, for e2e runs.
build/apm-ext-asan: apm-ext.c apm-ext.h
	@mkdir -p build
	$(HOST_CC) $(TEST_FLAGS) -UAPM_EXT_TEST -o $@ apm-ext.c $(BEARSSL_A)

unit: build/unit
	./build/unit

e2e: apm-ext
	python3 test/e2e/e2e.py --binary ./apm-ext

# make test: the last line of its output is the totals ("N passed, N failed",
# see test/run-all.sh), on failure too, and make then exits 2. GNU make prints
# "make: *** [Makefile:NN: test] Error 1" when a recipe fails, whatever the
# flags (-s too); so the totals line comes from a double-colon rule of its
# own: a target's double-colon rules run one after the other, in the order
# written, and with -k make goes on to the next one after a failure (-k only
# when test is a goal). Without the tests having run (a build failed above)
# the last rule says so: "0 passed, 1 failed". Rejected: killing make from the
# recipe (no error line, but exit status 130/141/143, "Terminated"), $(error)
# (its own "*** ...  Stop." line).
ifneq ($(filter test,$(MAKECMDGOALS)),)
MAKEFLAGS += -k
endif
TEST_TOTAL  = build/test-total

test::
	@rm -f $(TEST_TOTAL)
test:: apm-ext build/unit build/sigv4 build/sim build/apm-ext-asan
	@sh test/run-all.sh --total $(TEST_TOTAL)
test::
	@cat $(TEST_TOTAL) 2>/dev/null || \
		{ echo "make test: the suites did not run (see the errors above)"; \
		  echo "0 passed, 1 failed"; }

# make sim SEEDS=N: N random seeds (a failing one replays with build/sim --seed S)
sim: build/sim
	./build/sim --seeds $(SEEDS) --start $$(( $$(date +%s) % 1000000 ))

# Line and branch coverage of apm-ext.c (unit, SigV4, simulator, e2e)
coverage:
	@sh test/quality/coverage.sh

# make mutate N=...: a seeded sample of mutants of apm-ext.c against the fast tests
mutate: build/sim
	python3 test/quality/mutate.py --n $(N)

bench: apm-ext
	python3 test/bench/bench.py --binary ./apm-ext

fuzz:
	@sh test/fuzz/fuzz.sh $(FUZZ_SECONDS)

layer:
	@sh layer/build.sh

demo: apm-ext
	@sh test/e2e/demo.sh

sandbox: layer
	@sh test/e2e/sandbox.sh

syscalls: apm-ext
	python3 test/e2e/coldstart_syscalls.py --binary ./apm-ext

clean:
	rm -rf build apm-ext layer/*.zip
