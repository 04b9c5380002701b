/*
 * passthrough - a minimal Pico middlebox in C: every packet goes out unchanged, and (with a
 * flow segment) each flow counts its packets in the first 8 bytes of its state.
 *
 *     passthrough SEGMENT_PKTS [FLOWS_SEGMENT]
 *     e.g. passthrough /pico.demo.r1.pkts /pico.demo.r1.flows
 *
 * Prints "ready" once attached; on SIGTERM or SIGINT it finishes the packet in hand, detaches
 * and prints one JSON line {"packets": N, "writes_failed": M}. Build: make -C examples.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "pico.h"

static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
    (void)sig;
    stop = 1;
}

int main(int argc, char **argv)
{
    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: %s SEGMENT_PKTS [FLOWS_SEGMENT]\n", argv[0]);
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
    /* Started beside the SMM and the PMM (honcho starts a replica's processes together): wait
     * up to 30 s for their segments to appear. */
    int rc = PICO_E_MISSING;
    for (int tries = 0; tries < 300 && !stop; tries++) {
        rc = pico_pkt_attach(argv[1], 2000, &io);
        if (rc == PICO_OK || (rc != PICO_E_MISSING && rc != PICO_E_STALE))
            break;
        usleep(100000);
    }
    for (int tries = 0; rc == PICO_OK && argc == 3 && tries < 300 && !stop; tries++) {
        rc = pico_attach(argv[2], 2000, &flows);
        if (rc == PICO_OK || (rc != PICO_E_MISSING && rc != PICO_E_STALE))
            break;
        usleep(100000);
    }
    if (rc != PICO_OK) {
        fprintf(stderr, "passthrough: %s\n", pico_last_error());
        return 1;
    }
    if (argc == 3 && !flows) {
        fprintf(stderr, "passthrough: no flow segment %s\n", argv[2]);
        pico_pkt_detach(io);
        return 1;
    }
    size_t counted = flows && pico_state_size(flows) < 8 ? pico_state_size(flows) : 8;
    printf("ready\n");
    fflush(stdout);

    unsigned long long packets = 0, writes_failed = 0, flow_errors = 0;
    while (!stop) {
        pico_packet pkt;
        rc = pico_pkt_read(io, &pkt, 1000);
        if (rc == PICO_E_TIMEOUT)
            continue;
        if (rc != PICO_OK) {
            fprintf(stderr, "passthrough: %s\n", pico_last_error());
            break;
        }
        packets++;
        void *state = NULL;
        int in_txn = 0;
        if (flows && !(pkt.meta.flags & PICO_PKT_NOFLOW)) {
            /* The flow's transaction spans the write: its output is tagged with the epoch
             * whose checkpoint carries this update (pico_abi.h, "Output commit"). */
            if (pico_get_flow(flows, &pkt.meta.key, 1, pkt.meta.group, &state) == PICO_OK) {
                uint64_t n = 0;
                memcpy(&n, state, counted);
                n++;
                memcpy(state, &n, counted);
                in_txn = 1;
            } else if (flow_errors++ < 10) {
                fprintf(stderr, "passthrough: flow state not updated: %s\n", pico_last_error());
            }
        }
        if (pico_pkt_write(io, &pkt, NULL, 0) != PICO_OK) {
            writes_failed++;
            if (writes_failed <= 10)
                fprintf(stderr, "passthrough: %s\n", pico_last_error());
        }
        if (in_txn)
            pico_put_flow(flows, &pkt.meta.key, 1);
    }
    pico_detach(flows);
    pico_pkt_detach(io);
    printf("{\"packets\": %llu, \"writes_failed\": %llu}\n", packets, writes_failed);
    fflush(stdout);
    return 0;
}
