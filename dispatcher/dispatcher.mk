# gift-dispatcher (issues 5, 6, 10): the daemon and its unit tests.
# Included by the top-level Makefile, which provides CC, CFLAGS, LDFLAGS,
# OBJ, BUILD, COMMON_OBJS, LIBS_NATS, CHECK_LIBS and the $(OBJ)/%.o rule.

DISPATCHER_LIBS     := -lmosquitto -lconfig -lmicrohttpd
# The pure parts (no connection, no thread): what the unit tests link.
DISPATCHER_LIB_OBJS := $(OBJ)/dispatcher/conf.o $(OBJ)/dispatcher/rules.o \
                       $(OBJ)/dispatcher/rpc.o $(OBJ)/dispatcher/util.o \
                       $(OBJ)/dispatcher/streaks.o $(OBJ)/dispatcher/limits.o \
                       $(OBJ)/common/gift_kvkey.o $(OBJ)/common/gift_nkey.o
DISPATCHER_OBJS     := $(DISPATCHER_LIB_OBJS) $(OBJ)/dispatcher/main.o \
                       $(OBJ)/dispatcher/dispatch.o $(OBJ)/dispatcher/scheduler.o \
                       $(OBJ)/dispatcher/publish.o $(OBJ)/dispatcher/timers.o \
                       $(OBJ)/dispatcher/nats_in.o $(OBJ)/dispatcher/mqtt_out.o \
                       $(OBJ)/dispatcher/kv.o $(OBJ)/dispatcher/ctl.o \
                       $(OBJ)/dispatcher/metrics.o \
                       $(OBJ)/dispatcher/identity.o $(OBJ)/dispatcher/lease.o

BINS        += $(BUILD)/gift-dispatcher
DISPATCHER_TESTS := $(BUILD)/tests/test_rules $(BUILD)/tests/test_dconf \
                    $(BUILD)/tests/test_rpc $(BUILD)/tests/test_streaks \
                    $(BUILD)/tests/test_limits
UNIT_TESTS  += $(DISPATCHER_TESTS)

$(DISPATCHER_OBJS): dispatcher/dispatcher.h
$(OBJ)/dispatcher/dispatch.o $(OBJ)/dispatcher/scheduler.o \
$(OBJ)/dispatcher/publish.o $(OBJ)/dispatcher/timers.o: dispatcher/dispatch_int.h

$(BUILD)/gift-dispatcher: $(DISPATCHER_OBJS) $(COMMON_OBJS)
	$(CC) $(LDFLAGS) -o $@ $^ $(LIBS_NATS) $(DISPATCHER_LIBS)

# Explicit rules: these tests need the dispatcher's objects too.
$(DISPATCHER_TESTS): $(BUILD)/tests/test_%: tests/test_%.c \
                     $(DISPATCHER_LIB_OBJS) $(COMMON_OBJS) dispatcher/dispatcher.h
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) -Idispatcher $(LDFLAGS) -o $@ $< $(DISPATCHER_LIB_OBJS) \
	    $(COMMON_OBJS) $(LIBS_NATS) $(DISPATCHER_LIBS) $(CHECK_LIBS)
