# tbsim: ThingsBoard + N motors on a real Mosquitto broker (tests, make run,
# benchmarks).  Included by the top-level Makefile.

BINS += $(BUILD)/tbsim

$(BUILD)/tbsim: $(OBJ)/tools/tbsim.o $(OBJ)/common/gift_util.o
	$(CC) $(LDFLAGS) -o $@ $^ -lmosquitto -ljansson
