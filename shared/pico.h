/*
 * pico.h - the public C API of libpico, the C binding of the Pico flow table (pico_abi.h).
 *
 * A middlebox attaches to its replica's flow-state segment by name, then runs transactions:
 *
 *     pico_ctx *ctx;
 *     if (pico_attach("/pico.demo.r1.flows", 2000, &ctx) != PICO_OK) {
 *         fprintf(stderr, "%s\n", pico_last_error());
 *         exit(1);
 *     }
 *     pico_flow_key key;
 *     pico_flow_key_make(&key, 4, 6, &ip->saddr, sport, &ip->daddr, dport);
 *     void *state;
 *     if (pico_get_flow(ctx, &key, 1, 0, &state) == PICO_OK) {   // create if absent, group 0
 *         ... mutate up to pico_state_size(ctx) bytes at state (the flow's stripe is held) ...
 *         pico_put_flow(ctx, &key, 1);                           // 1 = state was modified
 *     }
 *     pico_detach(ctx);
 *
 * Every function returns PICO_OK (0) or a negative PICO_E_* code; on failure, pico_last_error()
 * gives a thread-local message saying what failed, where, and what to do about it.
 *
 * The packet API (pico_pkt_*, below) moves packets between the PMM and the middlebox: see its
 * own introduction further down.
 *
 * Thread safety: a pico_ctx may be shared by the threads of one process (each stripe is a
 * process-shared semaphore). Each flow must have a single writer between get_flow and put_flow.
 * Link with -lpthread -lrt.
 */
#ifndef PICO_H
#define PICO_H

#include <stdint.h>

#include "pico_abi.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct pico_ctx pico_ctx;

enum {
    PICO_OK = 0,
    PICO_E_MISSING = -1,      /* no segment (or semaphore) under that name: is the SMM running? */
    PICO_E_ABI = -2,          /* the segment's ABI major differs from this library's */
    PICO_E_NOTREADY = -3,     /* the owner did not publish the ready word before the deadline */
    PICO_E_CORRUPT = -4,      /* bad magic, kind, sizes or geometry; truncated segment */
    PICO_E_STALE = -5,        /* the segment's owner is dead or shut down (ready = CLOSED) */
    PICO_E_NOTFOUND = -6,     /* no ACTIVE flow with that key */
    PICO_E_FULL = -7,         /* the key's lock stripe has no room left */
    PICO_E_STANDBY = -8,      /* create=1 on a key held as a standby copy */
    PICO_E_LOCK_TIMEOUT = -9, /* a stripe (or the client registry) was not locked in time */
    PICO_E_INVAL = -10,       /* bad argument */
    PICO_E_SYS = -11,         /* a system call failed (errno in the message) */
    PICO_E_NOCLIENT = -12,    /* every client registry entry is taken */
    PICO_E_NOTXN = -13,       /* put_flow without an open get_flow on that key in this thread */
    PICO_E_TIMEOUT = -14,     /* pico_pkt_read: no packet before the deadline */
    PICO_E_BUSY = -15         /* the packet segment already has a live middlebox attached */
};

/* Attach to a flow-state segment, e.g. "/pico.demo.r1.flows", following the attach protocol of
 * pico_abi.h; waits up to timeout_ms for the owner to publish the segment (<= 0: look once).
 * Registers this process in the segment's client table (lang 2 = C). */
int pico_attach(const char *segment_name, int timeout_ms, pico_ctx **out);

/* Free the client entry, close the semaphores, unmap. Accepts NULL. Any state pointer obtained
 * through ctx is invalid afterwards. */
void pico_detach(pico_ctx *ctx);

/* A short constant description of a PICO_* code ("flow not found"). */
const char *pico_strerror(int err);

/* Thread-local detailed message of this thread's last failure; "" if none yet. */
const char *pico_last_error(void);

/* Build the canonical bidirectional key (pico_abi.h "Flow key"). family 4: src_addr/dst_addr
 * point to 4 bytes (network order); family 6: 16 bytes. Ports in host order. For ICMP pass the
 * echo id as both ports, so request and reply share a key. Returns PICO_OK or PICO_E_INVAL. */
int pico_flow_key_make(pico_flow_key *out, int family, uint8_t proto, const void *src_addr,
                       uint16_t src_port, const void *dst_addr, uint16_t dst_port);

/* pico_abi.h "Hash": the 64-bit table hash of a key (identical to shared/flowkey.hash_key). */
uint64_t pico_hash_key(const pico_flow_key *key);

/* Begin a transaction on the ACTIVE flow with this key: refcount += 1, *state_out = its state
 * (pico_state_size(ctx) bytes, zeroed when created). create=1 inserts the flow in `group` if it
 * is absent. Errors: PICO_E_NOTFOUND (create=0: absent or standby), PICO_E_STANDBY (create=1 on a
 * standby copy), PICO_E_FULL, PICO_E_LOCK_TIMEOUT, PICO_E_INVAL. */
int pico_get_flow(pico_ctx *ctx, const pico_flow_key *key, int create, uint32_t group,
                  void **state_out);

/* End the transaction get_flow opened in this thread and release its stripe: refcount -= 1;
 * modified != 0 marks the flow for the next checkpoint (modified = 1, version += 1).
 * PICO_E_NOTXN if no transaction is open on the key in this thread. */
int pico_put_flow(pico_ctx *ctx, const pico_flow_key *key, int modified);

/* Delete the ACTIVE flow (it becomes a TOMBSTONE until the delete is checkpointed). If this
 * thread has a transaction open on the key, the delete ends it (no pico_put_flow after). */
int pico_del_flow(pico_ctx *ctx, const pico_flow_key *key);

/* Bytes of state per flow in this segment (0 for NULL). */
uint32_t pico_state_size(const pico_ctx *ctx);

/* ---------------------------------------------------------------------------------------------
 * The packet API (pico_abi.h, "The packet segment"): the middlebox is the single consumer of
 * its replica's input rings and the producer of the output rings.
 *
 *     pico_pkt_io *io;
 *     if (pico_pkt_attach("/pico.demo.r1.pkts", 2000, &io) != PICO_OK) { ...pico_last_error()... }
 *     pico_packet pkt;
 *     for (;;) {
 *         int rc = pico_pkt_read(io, &pkt, 1000);    // round robin over non-suspended groups
 *         if (rc == PICO_E_TIMEOUT)
 *             continue;                              // idle: check your stop flag here
 *         ... pkt.meta.key / pkt.meta.group: the flow; pkt.data[0..pkt.len): the bytes ...
 *         pico_pkt_write(io, &pkt, NULL, 0);         // or new bytes, or pico_pkt_drop(io, &pkt)
 *     }
 *     pico_pkt_detach(io);
 *
 * Every packet read must be finished exactly once, by pico_pkt_write, pico_pkt_write_direct or
 * pico_pkt_drop: the RM checkpoints a group only when every packet read from it is finished.
 * A pico_pkt_io is not thread safe: use it from one thread at a time (input rings have a single
 * consumer). Only one middlebox process may be attached to a packet segment.
 */
typedef struct pico_pkt_io pico_pkt_io;

typedef struct pico_packet {
    pico_pkt_meta meta;   /* as the PMM queued it (key, flow_hash, group, packet_id, flags ...) */
    uint32_t len;         /* bytes at data */
    uint8_t *data;        /* io-owned buffer of (at least) mtu bytes; valid until the next
                           * pico_pkt_read. It may be modified in place and passed back as the
                           * data of pico_pkt_write: the io keeps the original bytes to compare */
} pico_packet;

/* Attach to a packet segment, e.g. "/pico.demo.r1.pkts" (attach protocol of pico_abi.h, kind
 * PICO_SEG_PACKETS); waits up to timeout_ms for the PMM to publish it. Claims the segment's
 * consumer_pid: PICO_E_BUSY if another live process holds it. Opens the doorbells. Marks the
 * packets a previous middlebox read but never finished as finished (pkts_done = pkts_read). */
int pico_pkt_attach(const char *segment_name, int timeout_ms, pico_pkt_io **out);

/* Release consumer_pid (if still ours), close the doorbells, unmap. Accepts NULL. */
void pico_pkt_detach(pico_pkt_io *io);

/* The segment's MTU: the largest packet a ring slot holds (0 for NULL). */
uint32_t pico_pkt_mtu(const pico_pkt_io *io);

/* The next packet of an active group that is not suspended, round robin over groups so none
 * starves another. Blocks on the input doorbell (no spinning) up to timeout_ms: < 0 waits
 * forever, 0 polls. PICO_E_TIMEOUT if no packet came in time. */
int pico_pkt_read(pico_pkt_io *io, pico_packet *pkt, int timeout_ms);

/* Queue pkt for release once the checkpoint of its group's current epoch is acknowledged
 * (output commit); data/len are its new bytes (data NULL: pkt->data as it is). Flags
 * PICO_PKT_MODIFIED when the bytes differ from the input. PICO_E_FULL if the output ring was
 * full: the packet is dropped and counted (output_full), and is finished all the same. */
int pico_pkt_write(pico_pkt_io *io, const pico_packet *pkt, const void *data, uint32_t len);

/* The same, but released at once, bypassing output commit (direct ring, PICO_PKT_DIRECT). */
int pico_pkt_write_direct(pico_pkt_io *io, const pico_packet *pkt, const void *data,
                          uint32_t len);

/* Drop pkt now: a zero-length PICO_PKT_DROP record in the direct ring (the NFQUEUE verdict is
 * given at once). PICO_E_FULL if the direct ring was full (the PMM then drops it on timeout). */
int pico_pkt_drop(pico_pkt_io *io, const pico_packet *pkt);

/* Emit a packet the middlebox made (a full IP packet of len <= mtu) into `group`'s output ring
 * (PICO_PKT_CREATED, packet_id 0, tagged with the group's epoch): the PMM sends it through a raw
 * socket once released. PICO_E_INVAL for an unknown group, PICO_E_FULL if the ring was full. */
int pico_pkt_create(pico_pkt_io *io, uint32_t group, const void *data, uint32_t len);

#ifdef __cplusplus
}
#endif

#endif /* PICO_H */
