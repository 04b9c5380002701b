/*
 * pkttool - a small middlebox CLI over the libpico packet API, used by tests/test_c_packets.py.
 *
 *   pkttool SEGMENT read N [TIMEOUT_MS]        read N packets; for each print one JSON line
 *                                              {"id":..,"group":..,"len":..,"flags":..,
 *                                               "hash":"<16 hex>","key":"<80 hex>"}
 *                                              and write it back unchanged (pico_pkt_write)
 *   pkttool SEGMENT echo N MODE [TIMEOUT_MS]   the same, finishing each packet by MODE:
 *                                                write   pico_pkt_write(data NULL)
 *                                                copy    pico_pkt_write with an identical copy
 *                                                        of the bytes (not flagged modified)
 *                                                modify  flip the last byte in place in
 *                                                        pkt.data, pico_pkt_write those bytes
 *                                                direct  pico_pkt_write_direct
 *                                                drop    pico_pkt_drop
 *   pkttool SEGMENT create GROUP HEX           pico_pkt_create(GROUP, bytes of HEX); prints "ok"
 *   pkttool SEGMENT attach                     attach, print "ok", detach
 *
 * SEGMENT is e.g. /pico.demo.r1.pkts; TIMEOUT_MS (default 5000) is the pico_pkt_read timeout of
 * each packet; the attach timeout is PICO_ATTACH_TIMEOUT_MS (default 2000).
 *
 * Exit codes (like flowtool): 0 ok; 2 usage error; otherwise |error code| + 10 with
 * pico_last_error() on stderr (e.g. 24 = PICO_E_TIMEOUT: no packet in time, 25 = PICO_E_BUSY:
 * another middlebox is attached, 17 = PICO_E_FULL).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pico.h"


static const char *prog = "pkttool";

#include "toolutil.h"

static void usage(void)
{
    fprintf(stderr,
            "usage: %s SEGMENT read N [TIMEOUT_MS]\n"
            "       %s SEGMENT echo N write|copy|modify|direct|drop [TIMEOUT_MS]\n"
            "       %s SEGMENT create GROUP HEX\n"
            "       %s SEGMENT attach\n",
            prog, prog, prog, prog);
    exit(EXIT_USAGE);
}

static int fail_exit(int rc)
{
    fprintf(stderr, "%s: %s: %s\n", prog, pico_strerror(rc), pico_last_error());
    return -rc + 10;
}

static void print_packet(const pico_packet *p)
{
    printf("{\"id\":%u,\"group\":%u,\"len\":%u,\"flags\":%u,\"hash\":\"%016llx\",\"key\":\"",
           p->meta.packet_id, p->meta.group, p->len, p->meta.flags,
           (unsigned long long)p->meta.flow_hash);
    const uint8_t *k = (const uint8_t *)&p->meta.key;
    for (size_t i = 0; i < sizeof p->meta.key; i++)
        printf("%02x", k[i]);
    printf("\"}\n");
    fflush(stdout);
}

enum mode { M_WRITE, M_COPY, M_MODIFY, M_DIRECT, M_DROP };

static int run(pico_pkt_io *io, unsigned long n, enum mode mode, int timeout_ms)
{
    uint8_t *copy = malloc(pico_pkt_mtu(io) + 64);
    if (!copy)
        return 1;
    int rc = PICO_OK;
    for (unsigned long i = 0; i < n && rc == PICO_OK; i++) {
        pico_packet pkt;
        if ((rc = pico_pkt_read(io, &pkt, timeout_ms)) != PICO_OK)
            break;
        print_packet(&pkt);
        switch (mode) {
        case M_WRITE:
            rc = pico_pkt_write(io, &pkt, NULL, 0);
            break;
        case M_COPY:
            memcpy(copy, pkt.data, pkt.len);
            rc = pico_pkt_write(io, &pkt, copy, pkt.len);
            break;
        case M_MODIFY:
            if (pkt.len)
                pkt.data[pkt.len - 1] ^= 0xff; /* in place: libpico compares with the input */
            rc = pico_pkt_write(io, &pkt, pkt.data, pkt.len);
            break;
        case M_DIRECT:
            rc = pico_pkt_write_direct(io, &pkt, NULL, 0);
            break;
        case M_DROP:
            rc = pico_pkt_drop(io, &pkt);
            break;
        }
    }
    free(copy);
    return rc == PICO_OK ? 0 : fail_exit(rc);
}

int main(int argc, char **argv)
{
    if (argc < 3)
        usage();
    const char *seg = argv[1], *cmd = argv[2];
    char **a = argv + 3;
    int na = argc - 3;

    unsigned long n = 0, group = 0;
    enum mode mode = M_WRITE;
    int timeout_ms = 5000;
    uint8_t *bytes = NULL;
    uint32_t blen = 0;
    if (!strcmp(cmd, "read")) {
        if (na < 1 || na > 2)
            usage();
        n = parse_ulong(a[0], 1ul << 30, "N");
        if (na == 2)
            timeout_ms = (int)parse_ulong(a[1], 1ul << 30, "TIMEOUT_MS");
    } else if (!strcmp(cmd, "echo")) {
        if (na < 2 || na > 3)
            usage();
        n = parse_ulong(a[0], 1ul << 30, "N");
        if (!strcmp(a[1], "write"))
            mode = M_WRITE;
        else if (!strcmp(a[1], "copy"))
            mode = M_COPY;
        else if (!strcmp(a[1], "modify"))
            mode = M_MODIFY;
        else if (!strcmp(a[1], "direct"))
            mode = M_DIRECT;
        else if (!strcmp(a[1], "drop"))
            mode = M_DROP;
        else
            usage();
        if (na == 3)
            timeout_ms = (int)parse_ulong(a[2], 1ul << 30, "TIMEOUT_MS");
    } else if (!strcmp(cmd, "create")) {
        if (na != 2)
            usage();
        group = parse_ulong(a[0], 0xfffffffful, "GROUP");
        bytes = parse_hex(a[1], &blen);
    } else if (!strcmp(cmd, "attach")) {
        if (na != 0)
            usage();
    } else {
        usage();
    }

    int attach_timeout = 2000;
    const char *t = getenv("PICO_ATTACH_TIMEOUT_MS");
    if (t && *t)
        attach_timeout = atoi(t);
    pico_pkt_io *io = NULL;
    int rc = pico_pkt_attach(seg, attach_timeout, &io);
    if (rc != PICO_OK)
        return fail_exit(rc);

    int ex = 0;
    if (!strcmp(cmd, "create")) {
        rc = pico_pkt_create(io, (uint32_t)group, bytes, blen);
        if (rc == PICO_OK)
            printf("ok\n");
        ex = rc == PICO_OK ? 0 : fail_exit(rc);
    } else if (!strcmp(cmd, "attach")) {
        printf("ok\n");
    } else {
        ex = run(io, n, mode, timeout_ms);
    }
    free(bytes);
    pico_pkt_detach(io);
    return ex;
}
