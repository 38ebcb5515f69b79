# giftnkey: NATS NKeys, JWTs and .creds files (tests, small set-ups).
# Included by the top-level Makefile.

BINS += $(BUILD)/giftnkey

$(BUILD)/giftnkey: $(OBJ)/tools/giftnkey.o $(OBJ)/common/gift_nkey.o
	$(CC) $(LDFLAGS) -o $@ $^ -ljansson -lcrypto
