/*
 * tcptracker - a minimal stateful Pico middlebox in C (the twin of examples/tcptracker.py): it
 * forwards only TCP segments of connections it has state for.
 *
 *     tcptracker SEGMENT_PKTS FLOWS_SEGMENT [--reset]
 *     e.g. tcptracker /pico.demo.r1.pkts /pico.demo.r1.flows --reset
 *
 * A SYN (without ACK) creates the flow's state; any other TCP segment of a flow with no state is
 * dropped, like a stateful firewall that lost its table, so a failover without replicated state
 * breaks connections. With --reset it also answers such a segment with a TCP RST to its sender
 * (IPv4, made with pico_pkt_create), as a firewall rejecting INVALID packets with tcp-reset does.
 * State (four little-endian u64s, the layout of the Python tracker): packets, bytes, SYN seen,
 * FIN/RST seen. Non-TCP packets pass unchanged. Prints "ready" once attached; on SIGTERM or
 * SIGINT it finishes the packet in hand, detaches and prints one JSON line of counts
 * {"packets", "dropped_no_state", "created", "errors", "resets"}. Build: make -C examples.
 *
 * In the Procfile: PICO_MIDDLEBOX=examples/build/tcptracker (the segment names are appended;
 * "--reset" may come anywhere on the command line).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "pico.h"

#define SYN 0x02
#define ACK 0x10
#define FIN 0x01
#define RST 0x04

#define STATE_WORDS 4
#define RST_LEN 40

static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
    (void)sig;
    stop = 1;
}

static uint64_t get_le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static void put_le64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++, v >>= 8)
        p[i] = (uint8_t)v;
}

static uint32_t get_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void put_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

/* The TCP flags of an IPv4 or IPv6 packet, or -1 if it is not TCP (or too short to tell). */
static int tcp_flags(const uint8_t *d, uint32_t len)
{
    uint32_t off;
    if (len == 0)
        return -1;
    if (d[0] >> 4 == 4) {
        if (len < 20 || d[9] != 6)
            return -1;
        off = (uint32_t)(d[0] & 0x0F) * 4;
    } else if (d[0] >> 4 == 6) {
        if (len < 40 || d[6] != 6)
            return -1;
        off = 40;
    } else {
        return -1;
    }
    return len > off + 13 ? d[off + 13] : -1;
}

/* A TCP RST (IPv4) answering segment d to its sender (RFC 793, "Reset Generation"), written to
 * out[RST_LEN]; checksums are left 0: the PMM computes them before sending. 0 if d is not an
 * IPv4 TCP segment. */
static int reset_for(const uint8_t *d, uint32_t len, uint8_t out[RST_LEN])
{
    if (len < 20 || d[0] >> 4 != 4 || d[9] != 6)
        return 0;
    uint32_t ihl = (uint32_t)(d[0] & 0x0F) * 4;
    if (ihl > len || len - ihl < 20)
        return 0;
    const uint8_t *tcp = d + ihl;
    uint32_t seq = get_be32(tcp + 4), ack = get_be32(tcp + 8);
    uint8_t flags = tcp[13];
    uint32_t seg_len = len - ihl - (uint32_t)(tcp[12] >> 4) * 4 + ((flags & SYN) ? 1 : 0) +
                       ((flags & FIN) ? 1 : 0);
    uint32_t r_seq, r_ack;
    uint8_t r_flags;
    if (flags & ACK) {
        r_seq = ack;
        r_ack = 0;
        r_flags = RST;
    } else {
        r_seq = 0;
        r_ack = seq + seg_len; /* mod 2^32 */
        r_flags = RST | ACK;
    }
    memset(out, 0, RST_LEN);
    out[0] = 0x45;
    out[3] = RST_LEN;          /* total length (big endian, < 256) */
    out[6] = 0x40;             /* DF */
    out[8] = 64;               /* TTL */
    out[9] = 6;                /* TCP */
    memcpy(out + 12, d + 16, 4); /* from the segment's destination */
    memcpy(out + 16, d + 12, 4); /* to its source */
    uint8_t *th = out + 20;
    memcpy(th, tcp + 2, 2);    /* sport = its dport */
    memcpy(th + 2, tcp, 2);    /* dport = its sport */
    put_be32(th + 4, r_seq);
    put_be32(th + 8, r_ack);
    th[12] = 5 << 4;
    th[13] = r_flags;
    return 1;
}

/* Attach with retries: the tracker starts beside the SMM and the PMM (honcho starts a
 * replica's processes together), so wait up to 30 s for their segments. */
static int attach_both(const char *pkts, const char *flows_name, pico_pkt_io **io,
                       pico_ctx **flows)
{
    int rc = PICO_E_MISSING;
    for (int tries = 0; tries < 300 && !stop; tries++) {
        rc = pico_pkt_attach(pkts, 2000, io);
        if (rc == PICO_OK || (rc != PICO_E_MISSING && rc != PICO_E_STALE))
            break;
        usleep(100000);
    }
    for (int tries = 0; rc == PICO_OK && tries < 300 && !stop; tries++) {
        rc = pico_attach(flows_name, 2000, flows);
        if (rc == PICO_OK || (rc != PICO_E_MISSING && rc != PICO_E_STALE))
            break;
        usleep(100000);
    }
    return rc;
}

int main(int argc, char **argv)
{
    const char *names[2];
    int n_names = 0, reset = 0, bad = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--reset"))
            reset = 1;
        else if (n_names < 2)
            names[n_names++] = argv[i];
        else
            bad = 1;
    }
    if (bad || n_names != 2) {
        fprintf(stderr, "usage: %s SEGMENT_PKTS FLOWS_SEGMENT [--reset]\n", argv[0]);
        return 2;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    pico_pkt_io *io = NULL;
    pico_ctx *flows = NULL;
    int rc = attach_both(names[0], names[1], &io, &flows);
    if (rc != PICO_OK || !flows) {
        if (rc != PICO_OK)
            fprintf(stderr, "tcptracker: %s\n", pico_last_error());
        else /* a signal came while it waited for the segments */
            fprintf(stderr, "tcptracker: stopped before %s was attached\n", names[1]);
        pico_pkt_detach(io);
        return 1;
    }
    if (pico_state_size(flows) < STATE_WORDS * 8) {
        fprintf(stderr, "tcptracker: %s has %u bytes of state per flow; the tracker needs %d: "
                "raise flow_table.state_size in the config\n", names[1],
                pico_state_size(flows), STATE_WORDS * 8);
        pico_detach(flows);
        pico_pkt_detach(io);
        return 1;
    }
    printf("ready\n");
    fflush(stdout);

    unsigned long long packets = 0, dropped_no_state = 0, created = 0, errors = 0, resets = 0;
    unsigned long long write_failures = 0;
    while (!stop) {
        pico_packet pkt;
        rc = pico_pkt_read(io, &pkt, 1000);
        if (rc == PICO_E_TIMEOUT)
            continue;
        if (rc != PICO_OK) {
            fprintf(stderr, "tcptracker: %s\n", pico_last_error());
            break;
        }
        packets++;
        int flags = (pkt.meta.flags & PICO_PKT_NOFLOW) ? -1 : tcp_flags(pkt.data, pkt.len);
        if (flags < 0) { /* not TCP: passes unchanged */
            if (pico_pkt_write(io, &pkt, NULL, 0) != PICO_OK && write_failures++ < 10)
                fprintf(stderr, "tcptracker: %s\n", pico_last_error());
            continue;
        }
        int opening = (flags & SYN) && !(flags & ACK);
        void *state = NULL;
        rc = pico_get_flow(flows, &pkt.meta.key, opening, pkt.meta.group, &state);
        if (rc == PICO_E_NOTFOUND) { /* no state, not an opening SYN: a broken connection */
            dropped_no_state++;
            uint8_t rst[RST_LEN];
            if (reset && !(flags & RST) && reset_for(pkt.data, pkt.len, rst) &&
                pico_pkt_create(io, pkt.meta.group, rst, RST_LEN) == PICO_OK)
                resets++;
            pico_pkt_drop(io, &pkt);
            continue;
        }
        if (rc != PICO_OK) {
            errors++;
            fprintf(stderr, "tcptracker: %s\n", pico_last_error());
            pico_pkt_drop(io, &pkt);
            continue;
        }
        uint8_t *s = state;
        uint64_t n[STATE_WORDS];
        for (int i = 0; i < STATE_WORDS; i++)
            n[i] = get_le64(s + 8 * i);
        if (opening && n[0] == 0)
            created++;
        n[0] += 1;
        n[1] += pkt.len;
        n[2] |= (flags & SYN) ? 1 : 0;
        n[3] |= (flags & (FIN | RST)) ? 1 : 0;
        for (int i = 0; i < STATE_WORDS; i++)
            put_le64(s + 8 * i, n[i]);
        /* The flow's transaction spans the write: its output is tagged with the epoch whose
         * checkpoint carries this update (docs/abi.md, "Output commit"). */
        if (pico_pkt_write(io, &pkt, NULL, 0) != PICO_OK && write_failures++ < 10)
            fprintf(stderr, "tcptracker: %s\n", pico_last_error());
        pico_put_flow(flows, &pkt.meta.key, 1);
    }
    pico_detach(flows);
    pico_pkt_detach(io);
    printf("{\"packets\": %llu, \"dropped_no_state\": %llu, \"created\": %llu, \"errors\": %llu, "
           "\"resets\": %llu}\n", packets, dropped_no_state, created, errors, resets);
    fflush(stdout);
    return 0;
}
