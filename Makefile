# Gift pipeline: nginx module, dispatcher daemon, tools and tests.
#
#   make run     set up and start the whole stack on loopback (Ctrl-C stops it)
#   make test    set up and run every test (unit: Check, integration: prove)
#   make bench   benchmarks (not timed tests)
#   make soak    long fault scenarios
#
# Sub-makefiles (*/*.mk) append to BINS and UNIT_TESTS; the module is built by
# nginx's own build system against Debian's nginx-dev.

SHELL       := /bin/bash
CC          ?= cc
SANITIZE    ?= 0
ifeq ($(SANITIZE),1)
BUILD       ?= build/asan
else
BUILD       ?= build
endif
GEN         := $(BUILD)/gen
OBJ         := $(BUILD)/obj
VERSION     := 0.1.0

SAN_FLAGS   :=
ifeq ($(SANITIZE),1)
SAN_FLAGS   := -fsanitize=address,undefined -fno-omit-frame-pointer
endif

CFLAGS      ?= -O2 -g
CFLAGS      += -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror \
               -DGIFT_VERSION='"$(VERSION)"' \
               -Icommon -I$(GEN) $(SAN_FLAGS)
LDFLAGS     += $(SAN_FLAGS)
LIBS_NATS   := -lnats -lprotobuf-c -ljansson -lcrypto -lpthread

# Debian packages the project needs (build, run and test; the tests need
# promtool from prometheus and systemd-analyze from systemd; make bench's
# seed-stack comparison, bench/seed.sh, needs redis-server).
DEB_PKGS    := build-essential pkg-config nginx nginx-dev libnats-dev nats-server \
               libprotobuf-c-dev protobuf-c-compiler libmosquitto-dev mosquitto \
               check libjansson-dev libconfig-dev libmicrohttpd-dev libssl-dev \
               curl wrk perl chromium prometheus clang libclang-rt-14-dev \
               systemd redis-server

# COMMON_OBJS: what every program links; INPUT_OBJS: the webhook's input
# layer (also compiled into the module), linked by the tests and fuzzers.
COMMON_SRCS := common/gift_provision.c common/gift_json.c common/gift_util.c \
               common/gift_natsconn.c
INPUT_SRCS  := common/gift_normalize.c common/gift_signature.c \
               common/gift_wsframe.c common/gift_ssereq.c
COMMON_OBJS := $(patsubst common/%.c,$(OBJ)/common/%.o,$(COMMON_SRCS)) \
               $(OBJ)/gen/gift.pb-c.o
INPUT_OBJS  := $(patsubst common/%.c,$(OBJ)/common/%.o,$(INPUT_SRCS))

BINS        := $(BUILD)/giftctl
UNIT_TESTS  := $(patsubst tests/%.c,$(BUILD)/tests/%,$(wildcard \
               tests/test_proto.c tests/test_normalize.c tests/test_signature.c \
               tests/test_nats.c tests/test_natsconn.c))

MODULE      := $(BUILD)/ngx_http_gift_module.so
NGX_SRC     := $(BUILD)/nginx
MODULE_SRCS := $(wildcard ngx_gift_module/*.c ngx_gift_module/*.h) config \
               $(INPUT_SRCS) common/gift_json.c common/gift_nkey.c \
               $(wildcard common/*.h)

.PHONY: all deps deps-quiet node-deps node-check build run test unit itest bench soak \
        fuzz clean install

# Two steps, so that nothing the build decides (pkg-config flags, which
# compilers and fuzz targets exist) is computed before the packages it
# depends on are installed: an entry target installs what is missing
# (`deps-quiet`), then re-invokes make, which only then reads the build
# rules below.  GIFT_DEPS_DONE=1 skips the first step (the inner make).
ENTRY_TARGETS := all build run test unit itest bench soak fuzz install

ifneq ($(GIFT_DEPS_DONE),1)

$(ENTRY_TARGETS): deps-quiet
	@$(MAKE) --no-print-directory GIFT_DEPS_DONE=1 $@

# any other target (a single file under build/, say) also after deps
.DEFAULT: deps-quiet
	@$(MAKE) --no-print-directory GIFT_DEPS_DONE=1 $@

# ---------------------------------------------------------------- deps
# Quick when everything is installed (one dpkg-query); installs the rest.
# npm packages for the browser and WebSocket tests (node and npm come with
# the machine; never apt-get install npm)
NODE_DEPS   := node_modules/.package-lock.json
$(NODE_DEPS): package.json package-lock.json
	@command -v npm >/dev/null || { echo "npm not found (node and npm come with this machine)" >&2; exit 1; }
	npm ci --no-audit --no-fund

FORWARDER_DEPS := tools/forwarder/node_modules/.package-lock.json
$(FORWARDER_DEPS): tools/forwarder/package.json tools/forwarder/package-lock.json
	cd tools/forwarder && npm ci --no-audit --no-fund

TBSTANDIN_DEPS := tools/tbstandin/node_modules/.package-lock.json
$(TBSTANDIN_DEPS): tools/tbstandin/package.json tools/tbstandin/package-lock.json
	cd tools/tbstandin && npm ci --no-audit --no-fund

# Debian's packages first (npm ci needs nothing from them, but the order is
# the user's: system, then node packages).
deps:
	@scripts/deps.sh $(DEB_PKGS)
	@$(MAKE) --no-print-directory node-deps

deps-quiet:
	@scripts/deps.sh $(DEB_PKGS) >/dev/null
	@$(MAKE) --no-print-directory node-deps

node-deps: node-check $(NODE_DEPS) $(FORWARDER_DEPS) $(TBSTANDIN_DEPS)

# node and npm come with the machine (never apt-get install npm)
node-check:
	@for p in node npm; do command -v $$p >/dev/null || { echo "$$p not found:" \
	    "node and npm come with this machine (the tests need both)" >&2; exit 1; }; done

clean:
	rm -rf $(BUILD)

else

.SECONDARY:
all: build

include $(wildcard dispatcher/*.mk tools/*.mk fuzz/*.mk)

build: $(MODULE) $(BINS) $(UNIT_TESTS)

# ---------------------------------------------------------------- protobuf
# one run of protoc-c writes both files
$(GEN)/gift.pb-c.c: proto/gift.proto
	@mkdir -p $(GEN)
	protoc-c --proto_path=proto --c_out=$(GEN) proto/gift.proto

$(GEN)/gift.pb-c.h: $(GEN)/gift.pb-c.c
	@touch $@

$(OBJ)/gen/gift.pb-c.o: $(GEN)/gift.pb-c.c
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) -Wno-unused-parameter -c -o $@ $<

$(OBJ)/%.o: %.c $(GEN)/gift.pb-c.h $(wildcard common/*.h)
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) -c -o $@ $<

# ---------------------------------------------------------------- tools
$(BUILD)/giftctl: $(OBJ)/tools/giftctl.o $(OBJ)/common/gift_nkey.o \
        $(COMMON_OBJS)
	$(CC) $(LDFLAGS) -o $@ $^ $(LIBS_NATS)

# ---------------------------------------------------------------- module
# Debian's recipe: copy nginx-dev's tree, configure with Debian's own flags
# plus our module, build modules only.  Reconfigured when `config` changes.
NGX_CC_OPT  := -fPIC -Wno-error=unused-parameter $(SAN_FLAGS)
$(NGX_SRC)/objs/Makefile: config | $(GEN)/gift.pb-c.c
	rm -rf $(NGX_SRC) && mkdir -p $(BUILD) && cp -r /usr/share/nginx/src $(NGX_SRC)
	cd $(NGX_SRC) && . ./conf_flags && \
	    GIFT_GEN_DIR=$(CURDIR)/$(GEN) ./configure "$${NGX_CONF_FLAGS[@]}" \
	    --with-cc-opt="$(NGX_CC_OPT)" --with-ld-opt="-fPIC $(SAN_FLAGS)" \
	    --add-dynamic-module=$(CURDIR) >configure.log 2>&1 || \
	    { tail -30 configure.log; exit 1; }

$(MODULE): $(NGX_SRC)/objs/Makefile $(MODULE_SRCS) $(GEN)/gift.pb-c.c
	$(MAKE) -s -C $(NGX_SRC) -f objs/Makefile modules
	cp $(NGX_SRC)/objs/ngx_http_gift_module.so $@.tmp && mv -f $@.tmp $@

# ---------------------------------------------------------------- tests
CHECK_LIBS  := $(shell pkg-config --libs check)
ifeq ($(CHECK_LIBS),)
$(error pkg-config knows no 'check': run 'make deps')
endif

$(BUILD)/tests/test_%: tests/test_%.c $(INPUT_OBJS) $(COMMON_OBJS)
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $^ $(LIBS_NATS) $(CHECK_LIBS)

# the module's NATS parser is plain C: tested without nginx
$(BUILD)/tests/test_nats: tests/test_nats.c \
        ngx_gift_module/ngx_http_gift_nats_parse.c \
        ngx_gift_module/ngx_http_gift_nats_parse.h $(OBJ)/common/gift_nkey.o
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) -Ingx_gift_module $(LDFLAGS) -o $@ tests/test_nats.c \
	    ngx_gift_module/ngx_http_gift_nats_parse.c $(OBJ)/common/gift_nkey.o \
	    -lcrypto $(CHECK_LIBS)

# a stand-in NATS server in a thread, NKeys to choose its nonces
$(BUILD)/tests/test_natsconn: tests/test_natsconn.c \
        $(OBJ)/common/gift_natsconn.o $(OBJ)/common/gift_nkey.o
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $^ $(LIBS_NATS) $(CHECK_LIBS)

unit: build
	@set -e; for t in $(UNIT_TESTS); do echo "== $$t"; $$t; done

itest: build
	prove -v -Ilib t/

test: build
	@BUILD=$(BUILD) SANITIZE=$(SANITIZE) scripts/test.sh

run: build
	@scripts/run.sh

bench: build
	@scripts/bench.sh

soak: build
	@BUILD=$(BUILD) SANITIZE=$(SANITIZE) GIFT_SOAK=1 scripts/test.sh

# ---------------------------------------------------------------- install
# DESTDIR=/some/root for a staged install (packaging, tests)
install: build
	DESTDIR="$(DESTDIR)" BUILD="$(BUILD)" scripts/install.sh

endif
