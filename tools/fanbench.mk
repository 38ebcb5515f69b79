# fanbench (issue 8): SSE/WebSocket fan-out benchmark client and publisher
# (our module through JetStream, or nchan through HTTP).  Included by the
# top-level Makefile; bench/fanout.sh runs it.

BINS += $(BUILD)/fanbench

$(BUILD)/fanbench: $(OBJ)/tools/fanbench.o $(COMMON_OBJS)
	$(CC) $(LDFLAGS) -o $@ $^ -lnats -lprotobuf-c -ljansson -lcrypto -lpthread
