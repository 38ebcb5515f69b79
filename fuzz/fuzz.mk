# libFuzzer targets (clang, -fsanitize=fuzzer with ASan and UBSan).
#   make fuzz                     run each for FUZZ_SECONDS (default 60)
#   make test                     runs each over its saved corpus (fuzz/corpus)
# clang and its fuzzer runtime (libclang-rt-14-dev) come with `make deps`;
# without them the build fails (a missing fuzzer is not a skip).

FUZZ_CC      := $(shell command -v clang-14 || command -v clang)
FUZZ_FLAGS   := -g -O1 -fsanitize=fuzzer,address,undefined \
                -fno-sanitize-recover=undefined -std=c11 -D_GNU_SOURCE \
                -Icommon -I$(GEN)
FUZZ_TARGETS := $(BUILD)/fuzz/fuzz_normalize $(BUILD)/fuzz/fuzz_signature \
                $(BUILD)/fuzz/fuzz_wsframe $(BUILD)/fuzz/fuzz_wsreader \
                $(BUILD)/fuzz/fuzz_ssereq $(BUILD)/fuzz/fuzz_ackframe \
                $(BUILD)/fuzz/fuzz_nats
FUZZ_SECONDS ?= 60

ifeq ($(FUZZ_CC),)
$(error clang not found: run 'make deps')
endif
BINS += $(FUZZ_TARGETS)

$(BUILD)/fuzz/fuzz_normalize: fuzz/fuzz_normalize.c common/gift_normalize.c \
        $(GEN)/gift.pb-c.c $(wildcard common/*.h)
	@mkdir -p $(@D)
	$(FUZZ_CC) $(FUZZ_FLAGS) -o $@ fuzz/fuzz_normalize.c \
	    common/gift_normalize.c $(GEN)/gift.pb-c.c -ljansson -lprotobuf-c \
	    -lcrypto

$(BUILD)/fuzz/fuzz_signature: fuzz/fuzz_signature.c common/gift_signature.c \
        $(wildcard common/*.h)
	@mkdir -p $(@D)
	$(FUZZ_CC) $(FUZZ_FLAGS) -o $@ fuzz/fuzz_signature.c \
	    common/gift_signature.c -lcrypto

$(BUILD)/fuzz/fuzz_wsframe: fuzz/fuzz_wsframe.c common/gift_wsframe.c \
        $(wildcard common/*.h)
	@mkdir -p $(@D)
	$(FUZZ_CC) $(FUZZ_FLAGS) -o $@ fuzz/fuzz_wsframe.c common/gift_wsframe.c

# What browsers send: WebSocket streams (reassembly, control frames, close
# codes, UTF-8), SSE/WebSocket URLs and Last-Event-ID; and what they get:
# an acknowledgement's JSON in its SSE frame.
$(BUILD)/fuzz/fuzz_wsreader: fuzz/fuzz_wsreader.c common/gift_wsframe.c \
        $(wildcard common/*.h)
	@mkdir -p $(@D)
	$(FUZZ_CC) $(FUZZ_FLAGS) -o $@ fuzz/fuzz_wsreader.c common/gift_wsframe.c

$(BUILD)/fuzz/fuzz_ssereq: fuzz/fuzz_ssereq.c common/gift_ssereq.c \
        $(wildcard common/*.h)
	@mkdir -p $(@D)
	$(FUZZ_CC) $(FUZZ_FLAGS) -o $@ fuzz/fuzz_ssereq.c common/gift_ssereq.c

$(BUILD)/fuzz/fuzz_ackframe: fuzz/fuzz_ackframe.c common/gift_json.c \
        $(GEN)/gift.pb-c.c $(wildcard common/*.h)
	@mkdir -p $(@D)
	$(FUZZ_CC) $(FUZZ_FLAGS) -o $@ fuzz/fuzz_ackframe.c common/gift_json.c \
	    $(GEN)/gift.pb-c.c -lprotobuf-c

# the module's NATS protocol parser: plain C, no nginx in it
$(BUILD)/fuzz/fuzz_nats: fuzz/fuzz_nats.c \
        ngx_gift_module/ngx_http_gift_nats_parse.c \
        ngx_gift_module/ngx_http_gift_nats_parse.h
	@mkdir -p $(@D)
	$(FUZZ_CC) $(FUZZ_FLAGS) -Ingx_gift_module -o $@ fuzz/fuzz_nats.c \
	    ngx_gift_module/ngx_http_gift_nats_parse.c

# New inputs go to build/fuzz/new/<name> (not the committed corpus); a
# crash leaves its input in build/fuzz/ and fails the target.
fuzz: $(FUZZ_TARGETS)
	@set -e; for f in $(FUZZ_TARGETS); do \
	    n=$$(basename $$f); n=$${n#fuzz_}; \
	    mkdir -p $(BUILD)/fuzz/new/$$n; \
	    echo "== $$n ($(FUZZ_SECONDS)s)"; \
	    $$f -max_total_time=$(FUZZ_SECONDS) -artifact_prefix=$(BUILD)/fuzz/ \
	        $(BUILD)/fuzz/new/$$n fuzz/corpus/$$n; \
	done
