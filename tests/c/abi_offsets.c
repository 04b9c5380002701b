/*
 * abi_offsets - print the C compiler's view of pico_abi.h as one JSON object:
 *
 *   {"pico_seg_header": {"sizeof": 128, "fields": {"magic": 0, ...},
 *                        "field_sizes": {"magic": 8, ...}},
 *    ...,
 *    "constants": {"PICO_ABI_MAJOR": 1, ...}}
 *
 * tests/test_abi_offsets.py compares it with the numpy dtypes of shared/abi.py. Every field of
 * every struct is listed, reserved and pad fields included; keep this in step with pico_abi.h.
 */
#include <stdio.h>

#include "pico_abi.h"

static int first_struct = 1, first_field;

static void begin(const char *name, size_t size)
{
    printf("%s\n  \"%s\": {\"sizeof\": %zu, ", first_struct ? "{" : ",", name, size);
    first_struct = 0;
}

/* Fields are printed twice (offsets, then sizes), so each struct is a list of X-macros. */
#define FIELD_OFF(T, f)                                                         \
    printf("%s\"%s\": %zu", first_field ? "" : ", ", #f, offsetof(T, f));       \
    first_field = 0;
#define FIELD_SIZE(T, f)                                                        \
    printf("%s\"%s\": %zu", first_field ? "" : ", ", #f, sizeof(((T *)0)->f));  \
    first_field = 0;

#define EMIT(T, LIST)                                                           \
    do {                                                                        \
        begin(#T, sizeof(T));                                                   \
        printf("\"fields\": {");                                                \
        first_field = 1;                                                        \
        LIST(T, FIELD_OFF)                                                      \
        printf("}, \"field_sizes\": {");                                        \
        first_field = 1;                                                        \
        LIST(T, FIELD_SIZE)                                                     \
        printf("}}");                                                           \
    } while (0)

#define SEG_HEADER_FIELDS(T, F)                                                 \
    F(T, magic) F(T, abi_major) F(T, abi_minor) F(T, kind) F(T, header_size)   \
    F(T, segment_size) F(T, owner_pid) F(T, owner_start_time) F(T, created_ns)  \
    F(T, owner_replica) F(T, reserved0) F(T, reserved) F(T, ready) F(T, reserved1)

#define FLOW_DESC_FIELDS(T, F)                                                  \
    F(T, n_slots) F(T, capacity) F(T, slot_size) F(T, state_size) F(T, n_stripes) \
    F(T, slots_per_stripe) F(T, max_per_stripe) F(T, lock_timeout_ms)           \
    F(T, clients_offset) F(T, stripes_offset) F(T, slots_offset) F(T, sem_prefix) \
    F(T, reserved)

#define FLOW_COUNTERS_FIELDS(T, F)                                              \
    F(T, standby_installed) F(T, activated) F(T, lock_recoveries)               \
    F(T, txn_recoveries) F(T, client_recoveries) F(T, heartbeat_ns) F(T, reserved)

#define CLIENT_FIELDS(T, F)                                                     \
    F(T, pid) F(T, start_time) F(T, attached_ns) F(T, lang) F(T, reserved0) F(T, name)

#define STRIPE_FIELDS(T, F)                                                     \
    F(T, holder_pid) F(T, acquisitions) F(T, live) F(T, tombstones) F(T, recoveries) \
    F(T, dirty) F(T, pad)

#define FLOW_KEY_FIELDS(T, F)                                                   \
    F(T, addr_a) F(T, addr_b) F(T, port_a) F(T, port_b) F(T, proto) F(T, family) \
    F(T, pad)

#define FLOW_SLOT_FIELDS(T, F)                                                  \
    F(T, key) F(T, status) F(T, owner) F(T, flags) F(T, group) F(T, refcount)   \
    F(T, version) F(T, ckpt_epoch) F(T, modified) F(T, txn_pid) F(T, hash)      \
    F(T, reserved)

#define PKT_DESC_FIELDS(T, F)                                                   \
    F(T, max_groups) F(T, ring_slots) F(T, slot_size) F(T, mtu) F(T, groups_offset) \
    F(T, rings_offset) F(T, ring_bytes) F(T, n_rings) F(T, consumer_pid)           \
    F(T, groups_generation) F(T, sem_prefix) F(T, in_waiting) F(T, out_waiting)   \
    F(T, view) F(T, alive_mask)

#define PKT_COUNTERS_FIELDS(T, F)                                               \
    F(T, rx_packets) F(T, rx_bytes) F(T, malformed) F(T, default_group)         \
    F(T, input_drops) F(T, released) F(T, unwritten_drops) F(T, raw_sent)       \
    F(T, verdict_errors) F(T, heartbeat_ns) F(T, pending) F(T, output_errors)   \
    F(T, standby_held) F(T, standby_drops) F(T, rm_waiting) F(T, reserved0)  \
    F(T, reserved1)

#define GROUP_FIELDS(T, F)                                                      \
    F(T, id) F(T, state) F(T, frequency_hz) F(T, target) F(T, buffering)        \
    F(T, suspended) F(T, protected_) F(T, discard) F(T, epoch) F(T, committed) \
    F(T, reserved1) F(T, rx_packets) F(T, rx_bytes) F(T, input_drops)           \
    F(T, released) F(T, held) F(T, reserved2) F(T, pkts_read) F(T, pkts_done)   \
    F(T, written) F(T, written_direct) F(T, dropped) F(T, output_full)          \
    F(T, created) F(T, reserved3) F(T, reserved4)

#define RING_HEADER_FIELDS(T, F)                                                \
    F(T, tail) F(T, full_drops) F(T, pad0) F(T, head) F(T, pad1) F(T, pad2)

#define PKT_META_FIELDS(T, F)                                                   \
    F(T, len) F(T, flags) F(T, packet_id) F(T, group) F(T, flow_hash) F(T, epoch) \
    F(T, ts_ns) F(T, group_index) F(T, reserved0) F(T, key) F(T, reserved)

int main(void)
{
    EMIT(pico_seg_header, SEG_HEADER_FIELDS);
    EMIT(pico_flow_desc, FLOW_DESC_FIELDS);
    EMIT(pico_flow_counters, FLOW_COUNTERS_FIELDS);
    EMIT(pico_client, CLIENT_FIELDS);
    EMIT(pico_stripe, STRIPE_FIELDS);
    EMIT(pico_flow_key, FLOW_KEY_FIELDS);
    EMIT(pico_flow_slot, FLOW_SLOT_FIELDS);
    EMIT(pico_pkt_desc, PKT_DESC_FIELDS);
    EMIT(pico_pkt_counters, PKT_COUNTERS_FIELDS);
    EMIT(pico_group, GROUP_FIELDS);
    EMIT(pico_ring_header, RING_HEADER_FIELDS);
    EMIT(pico_pkt_meta, PKT_META_FIELDS);

    printf(",\n  \"constants\": {");
    int first = 1;
#define CONST(name)                                                             \
    printf("%s\"%s\": %llu", first ? "" : ", ", #name, (unsigned long long)(name)); \
    first = 0;
    CONST(PICO_ABI_MAJOR)
    CONST(PICO_ABI_MINOR)
    CONST(PICO_MAGIC)
    CONST(PICO_READY)
    CONST(PICO_CLOSED)
    CONST(PICO_SEG_FLOWS)
    CONST(PICO_SEG_PACKETS)
    CONST(PICO_SEG_GROUPS)
    CONST(PICO_STATUS_FREE)
    CONST(PICO_STATUS_ACTIVE)
    CONST(PICO_STATUS_STANDBY)
    CONST(PICO_STATUS_TOMBSTONE)
    CONST(PICO_GROUP_DEFAULT)
    CONST(PICO_MAX_CLIENTS)
    CONST(PICO_SLOT_HEADER)
    CONST(PICO_SLOT_ALIGN)
    CONST(PICO_SEM_PREFIX_LEN)
    CONST(PICO_FLOW_DESC_OFFSET)
    CONST(PICO_FLOW_COUNTERS_OFFSET)
    CONST(PICO_CLIENTS_OFFSET)
    CONST(PICO_PKT_DESC_OFFSET)
    CONST(PICO_PKT_COUNTERS_OFFSET)
    CONST(PICO_GROUPS_OFFSET)
    CONST(PICO_PKT_META_SIZE)
    CONST(PICO_RING_HEADER_SIZE)
    CONST(PICO_PKT_NEW)
    CONST(PICO_PKT_MODIFIED)
    CONST(PICO_PKT_DIRECT)
    CONST(PICO_PKT_DROP)
    CONST(PICO_PKT_CREATED)
    CONST(PICO_PKT_IPV6)
    CONST(PICO_PKT_NOFLOW)
    printf("}\n}\n");
    return 0;
}
