/*
 * pico_abi.h - the Pico shared-memory ABI, version 1.3 (1.0, plus the packet segment in 1.1,
 * plus in 1.2: the stripes' dirty hints, the membership view in the packet descriptor, the
 * standby-hold counters, and the group entry's discard word; plus in 1.3: the RM's doorbell
 * and its rm_waiting word).
 *
 * This header is THE layout specification. The Python binding (shared/abi.py) mirrors every
 * struct below as a numpy dtype with explicit offsets, and tests/test_abi_offsets.py compiles a
 * program that prints offsetof/sizeof of each field and checks both sides agree. The
 * _Static_asserts at the bottom pin the same facts for C compilers.
 *
 * Platform: x86-64 Linux, little-endian. Aligned 8-byte stores are atomic and x86 TSO keeps
 * store->store and load->load order, which the publish-last protocol below relies on. Porting
 * to a weakly ordered CPU means adding release/acquire fences at the marked publish points.
 *
 * ---------------------------------------------------------------------------------------------
 * Naming. Every replica has one flow-state segment and one set of lock stripes:
 *     segment    /<shm_prefix>.<cluster>.<replica>.flows          (POSIX shm, /dev/shm/...)
 *     stripe k   /<shm_prefix>.<cluster>.<replica>.s<k>           (named POSIX semaphore)
 *     registry   /<shm_prefix>.<cluster>.<replica>.reg            (named POSIX semaphore)
 * The segment's own header repeats the semaphore prefix (sem_prefix), so an attacher needs
 * only the segment name.
 *
 * ---------------------------------------------------------------------------------------------
 * Every segment starts with the same 128-byte header (pico_seg_header):
 *
 *   0                   8         12        16        20        24
 *   +-------------------+---------+---------+---------+---------+-------------------+
 *   | magic "PICOSEG1"  |abi_major|abi_minor|  kind   |hdr_size | segment_size      |
 *   +-------------------+---------+---------+---------+---------+-------------------+
 *   32                  40                  48                  56        60
 *   +-------------------+-------------------+-------------------+---------+---------+
 *   | owner_pid         | owner_start_time  | created_ns        | replica | rsvd    |
 *   +-------------------+-------------------+-------------------+---------+---------+
 *   64 ..................................................... 120       124       128
 *   | reserved (7 x u64, zero)                                | ready   | rsvd    |
 *   +---------------------------------------------------------+---------+---------+
 *
 * Creation protocol (the owner): ftruncate, write everything, THEN write ready = PICO_READY
 * (publish last). On orderly shutdown the owner writes ready = PICO_CLOSED before unlinking.
 * Attach protocol (everyone else): open by name (missing -> SegmentMissing); check size >=
 * 128; check magic (-> SegmentCorrupt); poll ready until PICO_READY or a deadline
 * (-> SegmentNotReady; PICO_CLOSED -> StaleOwner); check abi_major == ours (-> AbiMismatch,
 * naming both versions; a larger minor is fine: minors only use reserved space); check kind
 * and sizes (-> SegmentCorrupt); check the owner is alive: /proc/<owner_pid>/stat exists and
 * its field 22 equals owner_start_time (-> StaleOwner).
 *
 * ---------------------------------------------------------------------------------------------
 * The flow-state segment (kind PICO_SEG_FLOWS), owned and created by the SMM:
 *
 *   0      +----------------------------------+
 *          | pico_seg_header     (128 B)      |
 *   128    +----------------------------------+
 *          | pico_flow_desc      (128 B)      |  geometry + offsets, written before ready
 *   256    +----------------------------------+
 *          | pico_flow_counters  (128 B)      |  table-wide counters (SMM writes)
 *   384    +----------------------------------+  <- clients_offset
 *          | pico_client[PICO_MAX_CLIENTS]    |  attached processes, 64 B each
 *          +----------------------------------+  <- stripes_offset (64-aligned)
 *          | pico_stripe[n_stripes]           |  one cache line per lock stripe
 *          +----------------------------------+  <- slots_offset (4096-aligned)
 *          | slot 0 | slot 1 | ... | slot n-1 |  n_slots x slot_size
 *          +----------------------------------+  <- segment_size
 *
 * Hash table. Open addressing, linear probing, SEGMENTED BY STRIPE: the n_slots slots are cut
 * into n_stripes runs of slots_per_stripe (a power of two) consecutive slots. A key's 64-bit hash
 * h (pico_hash_key below) picks its stripe s = h & (n_stripes-1) and its home slot inside the
 * run, ((h >> 32) & (slots_per_stripe-1)). Probing wraps inside the run, so every slot of run s
 * is only ever touched while holding semaphore s: one stripe = one lock = one run of slots.
 * Lookup walks from home, skipping TOMBSTONE slots and slots of other keys, and stops at a FREE
 * slot or after slots_per_stripe steps. Insert takes the first reusable slot on the walk
 * (FREE, or a TOMBSTONE that is not pending: see below), after checking the key is absent.
 * A stripe holding max_per_stripe live (ACTIVE+STANDBY) entries is full: TableFull.
 *
 * Slot status: FREE 0, ACTIVE 1 (visible to get_flow), STANDBY 2 (a backup copy, invisible to
 * get_flow until the SMM activates it), TOMBSTONE 3 (deleted). A TOMBSTONE with modified=1 is a
 * delete the RM has not yet checkpointed; it is not reused for another key until the RM clears
 * modified (except in group 0, the default unprotected group, which is never checkpointed).
 *
 * Transactions. A transaction holds its flow's stripe semaphore from get_flow to put_flow
 * (or del_flow), so two processes or threads updating one flow serialise and lose no update.
 * Stripes are re-entrant per thread (the binding counts holds per thread), so a thread may hold
 * several flows at once, even flows of one stripe; two threads taking two flows in opposite
 * orders can deadlock, which the lock timeout turns into an error. Keep transactions short.
 * get_flow (stripe taken) finds or creates the ACTIVE slot, refcount += 1, txn_pid = caller,
 * and hands back a pointer to state[]; the stripe stays taken. put_flow: if modified:
 * modified = 1, version += 1 (and the dirty hint); then, last, refcount -= 1 (an RM that sees
 * refcount 0 must also see modified); stripe released. del_flow: status = TOMBSTONE,
 * refcount = 0, modified = 1, version += 1; ends the caller's transaction on that key if one is
 * open, else takes and releases the stripe itself. The RM copies a group's states only after
 * suspending the group's input and seeing refcount == 0 on its flows.
 * Dirty hints (ABI 1.2). A run is cut into PICO_DIRTY_BLOCKS (16) blocks of slots_per_stripe/16
 * slots; slot i of run s is in block (i * 16) / slots_per_stripe. Whoever sets a slot's
 * modified = 1 for an ACTIVE or TOMBSTONE slot (insert, put_flow with modified, del_flow,
 * activation, a move between groups) then stores 1 into its block's byte stripes[s].dirty[b],
 * still holding the stripe, so the RM need not read the whole table per checkpoint. The RM,
 * for a set S of suspended, quiescent groups: for each byte that is 1, stores 0; issues a full
 * fence; then reads those blocks; every modified slot of a group outside S makes it store 1
 * into that slot's byte again. (A writer's 1 either lands after the RM's 0, so the hint stays,
 * or before it, and then its modified = 1 is visible to the RM's read.) Every store is a
 * whole byte, so nobody read-modify-writes a word another process writes. Open transactions
 * hold their stripe, so the RM looks for refcount > 0 only in runs whose holder_pid is set
 * (refcount is raised after holder_pid).
 * Matching: a key has at most one slot. The lookup walk stops at the first slot whose key
 * equals ours, whatever its status; if that slot is a TOMBSTONE, an insert of the key reuses
 * exactly that slot (never an earlier reusable one), so an upsert never coexists with a pending
 * delete of the same key.
 *
 * Lock stripes and dead holders. A holder writes holder_pid right after sem_wait succeeds and
 * clears it right before sem_post; it also bumps acquisitions. The SMM's watchdog posts the
 * semaphore of any stripe whose holder_pid is dead (and counts it in recoveries), and of any
 * stripe whose semaphore is 0 with holder_pid 0 and acquisitions unchanged for a whole watchdog
 * deadline (a holder that died between sem_wait and writing holder_pid). Clients take stripes
 * with sem_timedwait(lock_timeout_ms) and report a timeout instead of hanging.
 *
 * Attached clients. A process that attaches claims a pico_client entry (under the registry
 * semaphore): pid and start time, pid written last. A transaction holds its stripe, so every
 * open transaction of a dead process lies in a stripe it still holds: when the watchdog posts a
 * dead holder's stripe it first sets refcount = 0 on every slot of that run (counted in
 * txn_recoveries). It then frees the dead process's client entry. So a middlebox killed
 * mid-transaction blocks neither its flows nor checkpoints. The registry semaphore itself is
 * posted by the watchdog if it stays taken for a whole deadline.
 *
 * Flow key (pico_flow_key, 40 B), canonical and bidirectional: both directions of a connection
 * give the same key. Addresses are 16 bytes in network order; IPv4 is stored IPv4-mapped
 * (::ffff:a.b.c.d). Endpoint A is the smaller of (addr, port) and (addr', port') compared as
 * (addr bytes, port) lexicographically; ports are stored in host (little-endian) order; family is
 * 4 or 6; pad bytes are zero. For ICMP echo, port_a and port_b both carry the echo id, so the
 * request and its reply give one key.
 *
 * Hash (pico_hash_key): the key as five little-endian u64 words w0..w4;
 *     h = 0x9E3779B97F4A7C15
 *     for each w: h ^= w; h *= 0xFF51AFD7ED558CCD; h ^= h >> 33
 *     h ^= h >> 29; h *= 0xC4CEB9FE1A85EC53; h ^= h >> 32            (all mod 2^64)
 *
 * ---------------------------------------------------------------------------------------------
 * =============================================================================================
 * The packet segment (kind PICO_SEG_PACKETS, ABI 1.1), owned and created by the PMM:
 *     segment    /<shm_prefix>.<cluster>.<replica>.pkts
 *     doorbells  <sem_prefix>.in   posted by the PMM after it queues input, and by the RM when
 *                                  it resumes a group; the middlebox waits on it when idle
 *                <sem_prefix>.out  posted by the middlebox after each write, and by the RM when
 *                                  it advances a committed epoch; the PMM waits on it
 *                <sem_prefix>.rm   (ABI 1.3) posted by the PMM after it queues input for a
 *                                  protected group while rm_waiting is 1; an RM whose groups
 *                                  are all idle waits on it instead of polling every period
 *
 *   0      +----------------------------------+
 *          | pico_seg_header     (128 B)      |
 *   128    +----------------------------------+
 *          | pico_pkt_desc       (128 B)      |  geometry + offsets
 *   256    +----------------------------------+
 *          | pico_pkt_counters   (128 B)      |  PMM-wide counters (PMM writes)
 *   384    +----------------------------------+  <- groups_offset
 *          | pico_group[max_groups] (256 B)   |  the group table
 *          +----------------------------------+  <- rings_offset (4096-aligned)
 *          | ring 0 | ring 1 | ... | ring n-1 |  n_rings x ring_bytes
 *          +----------------------------------+
 *
 * Rings: group table entry g (index, not id) has input ring 2g (PMM -> middlebox) and output
 * ring 2g+1 (middlebox -> PMM); ring 2*max_groups is the direct ring (middlebox -> PMM) for
 * pkt_write_direct and pkt_drop, which bypass output commit. Every ring is single-producer,
 * single-consumer: a pico_ring_header (tail and head on their own cache lines, free-running
 * u64 counters) then ring_slots (a power of two) slots of slot_size bytes: a 128-byte
 * pico_pkt_meta, then the packet bytes (up to mtu). Slot of counter c: c & (ring_slots-1).
 * Produce: if tail - head == ring_slots the ring is full (count full_drops, drop the packet);
 * else write the packet bytes, then the meta, then tail += 1 (publish last). Consume: if head ==
 * tail it is empty; else copy the slot out, then head += 1.
 *
 * Group table. Entry 0 is always the default group (id 0): unprotected, never suspended, output
 * never held. An entry's control line (id, state, frequency, target, buffering, suspended,
 * protected, epoch, committed) is written by the RM (by the PMM only while creating the segment,
 * from the config); its state word is written last when an entry is added, first when removed,
 * and the writer bumps groups_generation after either, and after it moves flows from one group
 * to another (readers then drop any flow -> group cache they keep). Line 1 is written by the PMM, line 2 by
 * the middlebox (the single consumer of input rings).
 * Output commit: the PMM releases a group's output ring in order, each packet whose epoch tag is
 * <= committed, or at once if buffering is 0; a packet with a larger tag stops the ring. The
 * middlebox tags a written packet with the group's epoch as it reads it at write time. The RM
 * checkpoints epoch e only after suspending the group's input, seeing pkts_done == pkts_read
 * (every packet read before the suspension is finished) and refcount 0 on the group's flows, so
 * every output tagged e depends only on state in checkpoint e. The read side closes the race
 * with the suspension: the middlebox bumps pkts_read, issues a full fence, and reads suspended
 * again before taking the packet (if it is now set, it bumps pkts_done and leaves the packet);
 * the RM stores suspended, fences, then compares the counts. Either the RM sees the read or
 * the middlebox sees the suspension. The default group (entry 0) is never suspended and its
 * output never held.
 *
 * Doorbells are rung only for a sleeper, so a busy path makes no system calls: a consumer
 * about to sleep sets its waiting word (in_waiting / out_waiting), issues a full fence, scans
 * its rings once more, and only then waits on the semaphore, clearing the word when it wakes; a
 * producer publishes its packet, issues a full fence, and posts the doorbell only if the
 * waiting word is set. (Either the producer sees the word, or the consumer's rescan sees the
 * packet.) The RM follows the same rule for the resumes and commits of its epochs (once per
 * pass, after a fence); it posts unconditionally only for rare operator changes.
 *
 * Packet metadata flags (pico_pkt_meta.flags):
 *   PICO_PKT_NEW       the PMM had not seen the flow before (classified by policy)
 *   PICO_PKT_MODIFIED  output: the bytes differ from the input (PMM recomputes checksums)
 *   PICO_PKT_DIRECT    direct ring: release at once (pkt_write_direct)
 *   PICO_PKT_DROP      direct ring: verdict drop for packet_id (pkt_drop); no bytes
 *   PICO_PKT_CREATED   made by the middlebox: no NFQUEUE id; sent through a raw socket
 *   PICO_PKT_IPV6      an IPv6 packet
 *   PICO_PKT_NOFLOW    not a parsable IP flow (malformed, fragment, other protocol): key zero,
 *                      default group
 *
 * New fields of an existing segment go into reserved space and bump abi_minor; anything that
 * moves an existing field bumps abi_major. Kind 3 (PICO_SEG_GROUPS) stays reserved: the group
 * table lives in the packet segment.
 */
#ifndef PICO_ABI_H
#define PICO_ABI_H

#include <stdint.h>
#include <stddef.h>

#if defined(__cplusplus) && !defined(_Static_assert)
#define _Static_assert static_assert /* C++11 spelling */
#endif

#define PICO_ABI_MAJOR 1
#define PICO_ABI_MINOR 3

/* "PICOSEG1" read as a little-endian u64 */
#define PICO_MAGIC 0x314745534F434950ULL

#define PICO_READY 0x59444552u  /* "REDY" little-endian: the segment is complete */
#define PICO_CLOSED 0x44534C43u /* "CLSD": the owner shut down in order */

#define PICO_SEG_FLOWS 1u
#define PICO_SEG_PACKETS 2u /* PMM: packet rings and the group table */
#define PICO_SEG_GROUPS 3u  /* reserved */

#define PICO_STATUS_FREE 0u
#define PICO_STATUS_ACTIVE 1u
#define PICO_STATUS_STANDBY 2u
#define PICO_STATUS_TOMBSTONE 3u

#define PICO_GROUP_DEFAULT 0u /* the default, unprotected group (never checkpointed) */
#define PICO_MAX_CLIENTS 64u
#define PICO_SLOT_HEADER 96u  /* state[] starts here inside a slot */
#define PICO_SLOT_ALIGN 32u
#define PICO_DIRTY_BLOCKS 16u /* dirty-hint blocks per run (pico_stripe.dirty) */   /* slot_size = round_up(PICO_SLOT_HEADER + state_size, 32) */
#define PICO_SEM_PREFIX_LEN 48u

typedef struct pico_seg_header {
    uint64_t magic;            /*   0 PICO_MAGIC */
    uint32_t abi_major;        /*   8 */
    uint32_t abi_minor;        /*  12 */
    uint32_t kind;             /*  16 PICO_SEG_* */
    uint32_t header_size;      /*  20 sizeof(pico_seg_header) */
    uint64_t segment_size;     /*  24 bytes, whole segment */
    int64_t owner_pid;         /*  32 pid of the creating process */
    uint64_t owner_start_time; /*  40 field 22 of /proc/<pid>/stat (clock ticks after boot) */
    uint64_t created_ns;       /*  48 CLOCK_REALTIME at creation */
    uint32_t owner_replica;    /*  56 replica id (config) */
    uint32_t reserved0;        /*  60 */
    uint64_t reserved[7];      /*  64 zero */
    uint32_t ready;            /* 120 PICO_READY, written LAST (publish point) */
    uint32_t reserved1;        /* 124 */
} pico_seg_header;

typedef struct pico_flow_desc {
    uint64_t n_slots;          /* 128 power of two = n_stripes * slots_per_stripe */
    uint64_t capacity;         /* 136 configured flow capacity */
    uint32_t slot_size;        /* 144 bytes per slot */
    uint32_t state_size;       /* 148 bytes of state[] per flow */
    uint32_t n_stripes;        /* 152 power of two */
    uint32_t slots_per_stripe; /* 156 power of two */
    uint32_t max_per_stripe;   /* 160 live entries allowed per stripe */
    uint32_t lock_timeout_ms;  /* 164 what clients should use for sem_timedwait */
    uint64_t clients_offset;   /* 168 */
    uint64_t stripes_offset;   /* 176 */
    uint64_t slots_offset;     /* 184 */
    char sem_prefix[PICO_SEM_PREFIX_LEN]; /* 192 e.g. "/pico.demo.r1" (NUL-terminated) */
    uint64_t reserved[2];      /* 240 */
} pico_flow_desc;

typedef struct pico_flow_counters { /* written by the SMM only */
    uint64_t standby_installed;   /* 256 standby records installed, updated or deleted */
    uint64_t activated;           /* 264 standby -> active */
    uint64_t lock_recoveries;     /* 272 stripes posted by the watchdog */
    uint64_t txn_recoveries;      /* 280 refcounts reset for dead clients */
    uint64_t client_recoveries;   /* 288 client entries freed for dead processes */
    uint64_t heartbeat_ns;        /* 296 SMM liveness: CLOCK_MONOTONIC, bumped by the watchdog */
    uint64_t reserved[10];        /* 304 */
} pico_flow_counters;

typedef struct pico_client { /* 64 B; claimed and freed under the registry semaphore */
    int64_t pid;               /*  0 0 = free entry */
    uint64_t start_time;       /*  8 /proc/<pid>/stat field 22 */
    uint64_t attached_ns;      /* 16 CLOCK_REALTIME */
    uint32_t lang;             /* 24 1 = Python, 2 = C, other = free for other bindings */
    uint32_t reserved0;        /* 28 */
    char name[32];             /* 32 free text, NUL-terminated */
} pico_client;

typedef struct pico_stripe { /* one cache line; written by the stripe's current holder, and
                              * by the SMM watchdog when it recovers a dead holder's stripe */
    int64_t holder_pid;        /*  0 pid holding the semaphore, 0 if none */
    uint64_t acquisitions;     /*  8 bumped by each holder */
    uint32_t live;             /* 16 ACTIVE + STANDBY slots in this stripe's run */
    uint32_t tombstones;       /* 20 TOMBSTONE slots in this run */
    uint64_t recoveries;       /* 24 watchdog recoveries (SMM, while the holder is dead) */
    uint8_t dirty[16];         /* 32 (ABI 1.2) dirty[b] = 1: some slot of block b of this run
                                *     (slots_per_stripe / 16 consecutive slots) may have
                                *     modified = 1. Set by every writer that sets a slot's
                                *     modified (after it, holding the stripe); cleared only
                                *     by the RM (see "Dirty hints" above). Bytes, so every
                                *     store is a whole word: nobody read-modify-writes. */
    uint8_t pad[16];           /* 48 */
} pico_stripe;

typedef struct pico_flow_key {
    uint8_t addr_a[16];        /*  0 network order, IPv4-mapped for IPv4 */
    uint8_t addr_b[16];        /* 16 */
    uint16_t port_a;           /* 32 host order */
    uint16_t port_b;           /* 34 */
    uint8_t proto;             /* 36 IP protocol number */
    uint8_t family;            /* 37 4 or 6 */
    uint8_t pad[2];            /* 38 zero */
} pico_flow_key;

typedef struct pico_flow_slot { /* header; state[state_size] follows at PICO_SLOT_HEADER */
    pico_flow_key key;         /*  0 */
    uint32_t status;           /* 40 PICO_STATUS_* */
    uint16_t owner;            /* 44 replica id owning the active copy */
    uint16_t flags;            /* 46 reserved, zero */
    uint32_t group;            /* 48 replication group id */
    uint32_t refcount;         /* 52 transactions in flight */
    uint64_t version;          /* 56 bumped by each modifying put_flow / delete */
    uint64_t ckpt_epoch;       /* 64 epoch of the last checkpoint that carried this flow */
    uint32_t modified;         /* 72 1 = changed since the last checkpoint */
    int32_t txn_pid;           /* 76 pid of the last get_flow caller */
    uint64_t hash;             /* 80 pico_hash_key(key), cached */
    uint64_t reserved;         /* 88 */
    /* uint8_t state[state_size];   96 */
} pico_flow_slot;

_Static_assert(sizeof(pico_seg_header) == 128, "seg header is 128 B");
_Static_assert(offsetof(pico_seg_header, ready) == 120, "ready word at 120");
_Static_assert(sizeof(pico_flow_desc) == 128, "flow desc is 128 B");
_Static_assert(sizeof(pico_flow_counters) == 128, "flow counters are 128 B");
_Static_assert(sizeof(pico_client) == 64, "client entry is 64 B");
_Static_assert(sizeof(pico_stripe) == 64, "stripe is one cache line");
_Static_assert(sizeof(pico_flow_key) == 40, "flow key is 40 B");
_Static_assert(sizeof(pico_flow_slot) == PICO_SLOT_HEADER, "slot header is 96 B");

#define PICO_FLOW_DESC_OFFSET 128u
#define PICO_FLOW_COUNTERS_OFFSET 256u
#define PICO_CLIENTS_OFFSET 384u

/* ------------------------------------------------------------------ packet segment (ABI 1.1) */
#define PICO_PKT_DESC_OFFSET 128u
#define PICO_PKT_COUNTERS_OFFSET 256u
#define PICO_GROUPS_OFFSET 384u
#define PICO_PKT_META_SIZE 128u
#define PICO_RING_HEADER_SIZE 256u

#define PICO_GROUP_FREE 0u
#define PICO_GROUP_ACTIVE 1u

#define PICO_PKT_NEW 0x01u
#define PICO_PKT_MODIFIED 0x02u
#define PICO_PKT_DIRECT 0x04u
#define PICO_PKT_DROP 0x08u
#define PICO_PKT_CREATED 0x10u
#define PICO_PKT_IPV6 0x20u
#define PICO_PKT_NOFLOW 0x40u

typedef struct pico_pkt_desc {
    uint32_t max_groups;       /* 128 entries in the group table (entry 0 = default group) */
    uint32_t ring_slots;       /* 132 power of two */
    uint32_t slot_size;        /* 136 PICO_PKT_META_SIZE + mtu rounded up to 64 */
    uint32_t mtu;              /* 140 largest packet a slot holds */
    uint64_t groups_offset;    /* 144 */
    uint64_t rings_offset;     /* 152 */
    uint64_t ring_bytes;       /* 160 PICO_RING_HEADER_SIZE + ring_slots * slot_size */
    uint32_t n_rings;          /* 168 2 * max_groups + 1 */
    uint32_t consumer_pid;     /* 172 the attached middlebox (single consumer of input rings),
                                *     0 if none; written by it, cleared by the PMM at its death */
    uint64_t groups_generation;/* 176 bumped by the group table's writer after a change */
    char sem_prefix[PICO_SEM_PREFIX_LEN]; /* 184 doorbells are <sem_prefix>.in / .out */
    uint32_t in_waiting;       /* 232 1 while the middlebox sleeps (or is about to) on .in:
                                *     written by the middlebox, read by the PMM */
    uint32_t out_waiting;      /* 236 1 while the PMM sleeps (or is about to) on .out:
                                *     written by the PMM, read by the middlebox */
    uint64_t view;             /* 240 (ABI 1.2) the cluster membership view this replica acts
                                *     on (chords placement): written by the RM, after
                                *     alive_mask; 0 = none yet (every replica taken as alive) */
    uint64_t alive_mask;       /* 248 (ABI 1.2) bit (id - 1) set = replica id is alive in that
                                *     view; read by the PMM to place new flows (sdn.ring) */
} pico_pkt_desc;

typedef struct pico_pkt_counters { /* written by the PMM only */
    uint64_t rx_packets;       /* 256 packets received from NFQUEUE */
    uint64_t rx_bytes;         /* 264 */
    uint64_t malformed;        /* 272 broken packets (bad header, length, truncated L4);
                                *     fragments and other protocols are default-group traffic */
    uint64_t default_group;    /* 280 packets classified to the default group */
    uint64_t input_drops;      /* 288 dropped on arrival: input ring full, or longer than mtu */
    uint64_t released;         /* 296 accepted (verdict) or sent (raw) */
    uint64_t unwritten_drops;  /* 304 dropped: the middlebox never wrote them in time */
    uint64_t raw_sent;         /* 312 middlebox-made packets sent through the raw socket */
    uint64_t verdict_errors;   /* 320 verdicts or raw sends that failed */
    uint64_t heartbeat_ns;     /* 328 CLOCK_MONOTONIC of the PMM loop's last pass */
    uint64_t pending;          /* 336 NFQUEUE packets awaiting a verdict now */
    uint64_t output_errors;    /* 344 output records the PMM could not use (bad id, length) */
    uint64_t standby_held;     /* 352 packets of a flow STANDBY here, held for its activation */
    uint64_t standby_drops;    /* 360 held packets dropped: not activated within
                                *     packets.standby_hold_ms, or over the hold's bound */
    uint32_t rm_waiting;       /* 368 (ABI 1.3) 1 while the RM sleeps (or is about to) on .rm
                                *     because every group it checkpoints is idle; the RM is
                                *     its only writer (not a counter) */
    uint32_t reserved0;        /* 372 */
    uint64_t reserved1;        /* 376 */
} pico_pkt_counters;

typedef struct pico_group {
    /* line 0: control, written by the RM (by the PMM while creating the segment) */
    uint32_t id;               /*   0 group id (0 = default group) */
    uint32_t state;            /*   4 PICO_GROUP_FREE / PICO_GROUP_ACTIVE */
    uint32_t frequency_hz;     /*   8 checkpoint frequency */
    uint32_t target;           /*  12 backup replica id, 0 = none */
    uint32_t buffering;        /*  16 1 = hold output until committed */
    uint32_t suspended;        /*  20 1 = the middlebox must not read this group's input */
    uint32_t protected_;       /*  24 1 = checkpoints run for this group */
    uint32_t discard;          /*  28 (ABI 1.2) 1 = the middlebox binding drops what it reads
                                *     from this group's input ring instead of returning it
                                *     (packets of flows handed off to another replica) */
    uint64_t epoch;            /*  32 current epoch: the tag of outputs written now */
    uint64_t committed;        /*  40 last epoch acknowledged by the backup */
    uint64_t reserved1[2];     /*  48 */
    /* line 1: written by the PMM */
    uint64_t rx_packets;       /*  64 queued to this group's input ring */
    uint64_t rx_bytes;         /*  72 */
    uint64_t input_drops;      /*  80 input ring full */
    uint64_t released;         /*  88 output released */
    uint64_t held;             /*  96 output waiting for commit, at the last PMM pass */
    uint64_t reserved2[3];     /* 104 */
    /* line 2: written by the middlebox */
    uint64_t pkts_read;        /* 128 taken from the input ring */
    uint64_t pkts_done;        /* 136 read packets finished: written, written direct or dropped */
    uint64_t written;          /* 144 into the output ring */
    uint64_t written_direct;   /* 152 into the direct ring */
    uint64_t dropped;          /* 160 pkt_drop */
    uint64_t output_full;      /* 168 writes lost to a full output ring */
    uint64_t created;          /* 176 packets the middlebox made */
    uint64_t reserved3;        /* 184 */
    uint64_t reserved4[8];     /* 192 line 3 */
} pico_group;

typedef struct pico_ring_header {
    uint64_t tail;             /*   0 producer: slots published */
    uint64_t full_drops;       /*   8 producer: packets lost to a full ring */
    uint8_t pad0[48];          /*  16 */
    uint64_t head;             /*  64 consumer: slots consumed */
    uint8_t pad1[56];          /*  72 */
    uint8_t pad2[128];         /* 128 slots start at 256 */
} pico_ring_header;

typedef struct pico_pkt_meta {
    uint32_t len;              /*   0 packet bytes that follow the meta */
    uint32_t flags;            /*   4 PICO_PKT_* */
    uint32_t packet_id;        /*   8 NFQUEUE packet id; 0 for middlebox-made packets */
    uint32_t group;            /*  12 group id */
    uint64_t flow_hash;        /*  16 pico_hash_key(key) */
    uint64_t epoch;            /*  24 output: epoch tag; input: 0 */
    uint64_t ts_ns;            /*  32 CLOCK_MONOTONIC: input queued / output written */
    uint32_t group_index;      /*  40 entry in the group table */
    uint32_t reserved0;        /*  44 */
    pico_flow_key key;         /*  48 canonical flow key (zero with PICO_PKT_NOFLOW) */
    uint8_t reserved[40];      /*  88 */
} pico_pkt_meta;

_Static_assert(sizeof(pico_pkt_desc) == 128, "packet desc is 128 B");
_Static_assert(sizeof(pico_pkt_counters) == 128, "packet counters are 128 B");
_Static_assert(sizeof(pico_group) == 256, "group entry is 256 B");
_Static_assert(sizeof(pico_ring_header) == PICO_RING_HEADER_SIZE, "ring header is 256 B");
_Static_assert(sizeof(pico_pkt_meta) == PICO_PKT_META_SIZE, "packet meta is 128 B");
_Static_assert(offsetof(pico_ring_header, head) == 64, "head on its own cache line");

#endif /* PICO_ABI_H */
