# giftbench (issue 9): load generator and observer of the whole pipeline,
# and its trivial echo server (`giftbench echo`) for its own ceiling.
# Included by the top-level Makefile; bench/e2e.sh runs it.  It needs only
# the signature code of the input layer (HMAC-SHA256, OpenSSL).

BINS += $(BUILD)/giftbench

$(BUILD)/giftbench: $(OBJ)/tools/giftbench.o $(OBJ)/common/gift_signature.o
	$(CC) $(LDFLAGS) -o $@ $^ -lcrypto -lpthread
