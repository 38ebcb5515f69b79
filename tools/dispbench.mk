# dispbench (issue 6): fill GIFTS, the JetStream pull-and-ack and Mosquitto
# round-trip ceilings, and watching GIFT_ACKS, for bench/dispatcher.sh.
# Included by the top-level Makefile.

BINS += $(BUILD)/dispbench

$(BUILD)/dispbench: $(OBJ)/tools/dispbench.o $(COMMON_OBJS)
	$(CC) $(LDFLAGS) -o $@ $^ $(LIBS_NATS) -lmosquitto
