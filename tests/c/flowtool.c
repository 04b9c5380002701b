/*
 * flowtool - a small CLI over libpico, used by the tests (C <-> Python round trips, dead-client
 * recovery, ABI agreement, benchmarks).
 *
 *   flowtool SEGMENT attach                                   print "ok"; else the error (stdout
 *                                                             and stderr), exit |code|
 *   flowtool SEGMENT get  PROTO SRC SPORT DST DPORT           state as hex on stdout (all
 *                                                             state_size bytes); exit 3 if absent
 *   flowtool SEGMENT put  PROTO SRC SPORT DST DPORT HEX [GROUP]
 *                                                             get_flow(create=1, GROUP or 0),
 *                                                             copy HEX to the start of the state,
 *                                                             put_flow(modified=1); prints "ok"
 *   flowtool SEGMENT del  PROTO SRC SPORT DST DPORT           del_flow; exit 3 if absent
 *   flowtool SEGMENT hold-stripe PROTO SRC SPORT DST DPORT [GROUP]
 *                                                             get_flow(create=1), print "held",
 *                                                             then abort() without put_flow: a
 *                                                             client dead mid-transaction
 *   flowtool SEGMENT die-locked PROTO SRC SPORT DST DPORT [nopid]
 *                                                             take the key's stripe semaphore,
 *                                                             record holder_pid (unless nopid),
 *                                                             print "locked STRIPE", abort(): a
 *                                                             process dead holding a stripe lock
 *   flowtool -       key  PROTO SRC SPORT DST DPORT           "<40-byte key hex> <hash, 16 hex>"
 *   flowtool -       bench-key I                              the same for fill/bench key I
 *   flowtool -       sem-bench N                              N x (sem_wait + sem_post) on a
 *                                                             private named semaphore: the
 *                                                             baseline of the bench command;
 *                                                             same JSON line as bench
 *   flowtool SEGMENT fill N [GROUP]                           create keys 0..N-1 (below) and
 *                                                             put_flow(modified=1) each;
 *                                                             prints {"filled":N}
 *   flowtool SEGMENT bench N [M]                              N x (get_flow(create=0) +
 *                                                             put_flow(modified=1)) on key i % M
 *                                                             (M defaults to N; keys must exist:
 *                                                             run fill first); prints one JSON
 *                                                             line {"n":N,"p50_ns":..,"p99_ns":..,
 *                                                             "mean_ns":..} (CLOCK_MONOTONIC per
 *                                                             get+put pair)
 *
 * PROTO is tcp, udp, icmp, icmp6 or a number; SRC/DST are IPv4 or IPv6 text (both the same
 * family). SEGMENT is e.g. /pico.demo.r1.flows; the attach timeout is PICO_ATTACH_TIMEOUT_MS
 * (default 2000).
 *
 * Exit codes: 0 ok; 3 flow not found; 2 usage error; otherwise |error code| + 10 (e.g. 17 = the
 * stripe is full, 19 = lock timeout) with pico_last_error() on stderr. Exception: `attach` exits
 * with |error code| itself (1 missing, 2 ABI, 3 not ready, 4 corrupt, 5 stale, ...).
 *
 * Key derivation of fill/bench, index i in [0, 2^24):
 *     tcp  10.((i >> 16) & 255).((i >> 8) & 255).(i & 255) : 1000 + i % 50000
 *      ->  192.168.0.1 : 80
 * In Python:
 *     make_key(f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", 1000 + i % 50000,
 *              "192.168.0.1", 80, 6)
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <semaphore.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "pico.h"

#define EXIT_NOTFOUND 3

static const char *prog = "flowtool";

#include "toolutil.h"

static void usage(void)
{
    fprintf(stderr,
            "usage: %s SEGMENT attach\n"
            "       %s SEGMENT get|del PROTO SRC SPORT DST DPORT\n"
            "       %s SEGMENT put PROTO SRC SPORT DST DPORT HEX [GROUP]\n"
            "       %s SEGMENT hold-stripe PROTO SRC SPORT DST DPORT [GROUP]\n"
            "       %s SEGMENT die-locked PROTO SRC SPORT DST DPORT [nopid]\n"
            "       %s - key PROTO SRC SPORT DST DPORT\n"
            "       %s - bench-key I\n"
            "       %s - sem-bench N\n"
            "       %s SEGMENT fill N [GROUP]\n"
            "       %s SEGMENT bench N [M]\n",
            prog, prog, prog, prog, prog, prog, prog, prog, prog, prog);
    exit(EXIT_USAGE);
}

static void die_usage(const char *fmt, const char *arg)
{
    fprintf(stderr, "%s: ", prog);
    fprintf(stderr, fmt, arg);
    fputc('\n', stderr);
    exit(EXIT_USAGE);
}

/* Exit for a libpico error code (not attach). */
static int fail_exit(int rc)
{
    if (rc == PICO_E_NOTFOUND) {
        fprintf(stderr, "%s: %s\n", prog, pico_last_error());
        return EXIT_NOTFOUND;
    }
    fprintf(stderr, "%s: %s: %s\n", prog, pico_strerror(rc), pico_last_error());
    return -rc + 10;
}

static uint8_t parse_proto(const char *s)
{
    if (!strcmp(s, "tcp"))
        return 6;
    if (!strcmp(s, "udp"))
        return 17;
    if (!strcmp(s, "icmp"))
        return 1;
    if (!strcmp(s, "icmp6"))
        return 58;
    return (uint8_t)parse_ulong(s, 255, "protocol");
}

static int parse_addr(const char *s, uint8_t out[16])
{
    char buf[64];
    size_t n = strlen(s);
    if (n >= 2 && s[0] == '[' && s[n - 1] == ']' && n - 2 < sizeof buf) { /* [v6] */
        memcpy(buf, s + 1, n - 2);
        buf[n - 2] = '\0';
        s = buf;
    }
    if (inet_pton(AF_INET, s, out) == 1)
        return 4;
    if (inet_pton(AF_INET6, s, out) == 1)
        return 6;
    die_usage("bad address '%s' (IPv4 or IPv6 text)", s);
    return 0;
}

/* argv[0..4] = PROTO SRC SPORT DST DPORT */
static void parse_key(char **a, pico_flow_key *key)
{
    uint8_t src[16], dst[16];
    uint8_t proto = parse_proto(a[0]);
    int fs = parse_addr(a[1], src);
    uint16_t sport = (uint16_t)parse_ulong(a[2], 65535, "port");
    int fd = parse_addr(a[3], dst);
    uint16_t dport = (uint16_t)parse_ulong(a[4], 65535, "port");
    if (fs != fd) {
        fprintf(stderr, "%s: mixed address families: %s is IPv%d, %s is IPv%d\n", prog, a[1], fs,
                a[3], fd);
        exit(EXIT_USAGE);
    }
    if (pico_flow_key_make(key, fs, proto, src, sport, dst, dport) != PICO_OK) {
        fprintf(stderr, "%s: %s\n", prog, pico_last_error());
        exit(EXIT_USAGE);
    }
}

/* The fill/bench key of index i (see the header comment). */
static void bench_key(uint32_t i, pico_flow_key *key)
{
    uint8_t src[4] = {10, (uint8_t)(i >> 16), (uint8_t)(i >> 8), (uint8_t)i};
    uint8_t dst[4] = {192, 168, 0, 1};
    pico_flow_key_make(key, 4, 6, src, (uint16_t)(1000 + i % 50000), dst, 80);
}

static void print_hex(const void *p, size_t n)
{
    const uint8_t *b = p;
    for (size_t i = 0; i < n; i++)
        printf("%02x", b[i]);
}

static pico_ctx *attach_or_exit(const char *seg, int attach_cmd)
{
    int timeout = 2000;
    const char *t = getenv("PICO_ATTACH_TIMEOUT_MS");
    if (t && *t)
        timeout = atoi(t);
    pico_ctx *ctx = NULL;
    int rc = pico_attach(seg, timeout, &ctx);
    if (rc != PICO_OK) {
        if (attach_cmd) {
            printf("%s\n", pico_last_error());
            fflush(stdout);
            fprintf(stderr, "%s: %s\n", prog, pico_last_error());
            exit(-rc);
        }
        exit(fail_exit(rc));
    }
    return ctx;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Sorts lat and prints {"n","p50_ns","p99_ns","mean_ns"} (nearest-rank percentiles). */
static void print_latencies(uint64_t *lat, unsigned long n, double sum)
{
    qsort(lat, n, sizeof *lat, cmp_u64);
    unsigned long i50 = n ? (n * 50 + 99) / 100 - 1 : 0;
    unsigned long i99 = n ? (n * 99 + 99) / 100 - 1 : 0;
    printf("{\"n\":%lu,\"p50_ns\":%llu,\"p99_ns\":%llu,\"mean_ns\":%.1f}\n", n,
           n ? (unsigned long long)lat[i50] : 0ull, n ? (unsigned long long)lat[i99] : 0ull,
           n ? sum / (double)n : 0.0);
}

static int cmd_bench(pico_ctx *ctx, unsigned long n, unsigned long m)
{
    pico_flow_key *keys = malloc(m * sizeof *keys);
    uint64_t *lat = malloc((n ? n : 1) * sizeof *lat);
    if (!keys || !lat) {
        fprintf(stderr, "%s: out of memory\n", prog);
        return 1;
    }
    for (unsigned long i = 0; i < m; i++)
        bench_key((uint32_t)i, &keys[i]);
    double sum = 0;
    for (unsigned long i = 0; i < n; i++) {
        void *state;
        const pico_flow_key *k = &keys[i % m];
        uint64_t t0 = mono_ns();
        int rc = pico_get_flow(ctx, k, 0, 0, &state);
        if (rc == PICO_OK)
            rc = pico_put_flow(ctx, k, 1);
        uint64_t t1 = mono_ns();
        if (rc != PICO_OK) {
            if (rc == PICO_E_NOTFOUND)
                fprintf(stderr, "%s: bench key %lu missing: run '%s SEGMENT fill %lu' first\n",
                        prog, i % m, prog, m);
            free(keys);
            free(lat);
            return fail_exit(rc);
        }
        lat[i] = t1 - t0;
        sum += (double)lat[i];
    }
    print_latencies(lat, n, sum);
    free(keys);
    free(lat);
    return 0;
}

/* The raw cost of one uncontended sem_wait + sem_post pair, timed like cmd_bench. */
static int cmd_sem_bench(unsigned long n)
{
    char name[64];
    snprintf(name, sizeof name, "/pico-sem-bench-%d", (int)getpid());
    sem_t *sem = sem_open(name, O_CREAT | O_EXCL, 0600, 1);
    if (sem == SEM_FAILED) {
        fprintf(stderr, "%s: sem_open %s: %s\n", prog, name, strerror(errno));
        return 1;
    }
    sem_unlink(name);
    uint64_t *lat = malloc((n ? n : 1) * sizeof *lat);
    if (!lat)
        return 1;
    double sum = 0;
    for (unsigned long i = 0; i < n; i++) {
        uint64_t t0 = mono_ns();
        sem_wait(sem);
        sem_post(sem);
        lat[i] = mono_ns() - t0;
        sum += (double)lat[i];
    }
    print_latencies(lat, n, sum);
    free(lat);
    sem_close(sem);
    return 0;
}

/* Die holding the stripe lock of `key`, bypassing libpico (which never returns holding one). */
static int cmd_die_locked(const char *seg, const pico_flow_key *key, int record_pid)
{
    int fd = shm_open(seg, O_RDWR, 0);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        fprintf(stderr, "%s: %s: %s\n", prog, seg, strerror(errno));
        return 1;
    }
    uint8_t *base = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        fprintf(stderr, "%s: mmap %s: %s\n", prog, seg, strerror(errno));
        return 1;
    }
    const pico_flow_desc *d = (const pico_flow_desc *)(base + PICO_FLOW_DESC_OFFSET);
    pico_stripe *stripes = (pico_stripe *)(base + d->stripes_offset);
    uint32_t s = (uint32_t)pico_hash_key(key) & (d->n_stripes - 1);
    char name[PICO_SEM_PREFIX_LEN + 32];
    snprintf(name, sizeof name, "%.*s.s%u", (int)PICO_SEM_PREFIX_LEN, d->sem_prefix, s);
    sem_t *sem = sem_open(name, 0);
    if (sem == SEM_FAILED) {
        fprintf(stderr, "%s: sem_open %s: %s\n", prog, name, strerror(errno));
        return 1;
    }
    while (sem_wait(sem) != 0 && errno == EINTR) {
    }
    if (record_pid) {
        __atomic_store_n(&stripes[s].holder_pid, (int64_t)getpid(), __ATOMIC_RELAXED);
        stripes[s].acquisitions++;
    }
    printf("locked %u\n", s);
    fflush(stdout);
    abort();
}

int main(int argc, char **argv)
{
    if (argc < 3)
        usage();
    const char *seg = argv[1], *cmd = argv[2];
    char **a = argv + 3;
    int na = argc - 3;

    if (!strcmp(cmd, "key")) {
        if (na != 5)
            usage();
        pico_flow_key key;
        parse_key(a, &key);
        print_hex(&key, sizeof key);
        printf(" %016llx\n", (unsigned long long)pico_hash_key(&key));
        return 0;
    }
    if (!strcmp(cmd, "bench-key")) {
        if (na != 1)
            usage();
        pico_flow_key key;
        bench_key((uint32_t)parse_ulong(a[0], (1ul << 24) - 1, "I"), &key);
        print_hex(&key, sizeof key);
        printf(" %016llx\n", (unsigned long long)pico_hash_key(&key));
        return 0;
    }
    if (!strcmp(cmd, "sem-bench")) {
        if (na != 1)
            usage();
        return cmd_sem_bench(parse_ulong(a[0], 1ul << 30, "N"));
    }
    if (!strcmp(cmd, "attach")) {
        if (na != 0)
            usage();
        pico_ctx *ctx = attach_or_exit(seg, 1);
        printf("ok\n");
        pico_detach(ctx);
        return 0;
    }
    if (!strcmp(cmd, "get") || !strcmp(cmd, "del")) {
        if (na != 5)
            usage();
        pico_flow_key key;
        parse_key(a, &key);
        pico_ctx *ctx = attach_or_exit(seg, 0);
        int rc;
        if (cmd[0] == 'g') {
            void *state;
            rc = pico_get_flow(ctx, &key, 0, 0, &state);
            if (rc == PICO_OK) {
                print_hex(state, pico_state_size(ctx));
                printf("\n");
                rc = pico_put_flow(ctx, &key, 0);
            }
        } else {
            rc = pico_del_flow(ctx, &key);
            if (rc == PICO_OK)
                printf("ok\n");
        }
        int ex = rc == PICO_OK ? 0 : fail_exit(rc);
        pico_detach(ctx);
        return ex;
    }
    if (!strcmp(cmd, "put")) {
        if (na != 6 && na != 7)
            usage();
        pico_flow_key key;
        parse_key(a, &key);
        uint32_t nb;
        uint8_t *bytes = parse_hex(a[5], &nb);
        uint32_t group = na == 7 ? (uint32_t)parse_ulong(a[6], 0xFFFFFFFFul, "group") : 0;
        pico_ctx *ctx = attach_or_exit(seg, 0);
        if (nb > pico_state_size(ctx)) {
            fprintf(stderr, "%s: HEX is %u bytes but the segment's state_size is %u\n", prog, nb,
                    pico_state_size(ctx));
            pico_detach(ctx);
            free(bytes);
            return -PICO_E_INVAL + 10;
        }
        void *state;
        int rc = pico_get_flow(ctx, &key, 1, group, &state);
        if (rc == PICO_OK) {
            memcpy(state, bytes, nb);
            rc = pico_put_flow(ctx, &key, 1);
        }
        int ex = rc == PICO_OK ? 0 : fail_exit(rc);
        if (!ex)
            printf("ok\n");
        pico_detach(ctx);
        free(bytes);
        return ex;
    }
    if (!strcmp(cmd, "hold-stripe")) {
        if (na != 5 && na != 6)
            usage();
        pico_flow_key key;
        parse_key(a, &key);
        uint32_t group = na == 6 ? (uint32_t)parse_ulong(a[5], 0xFFFFFFFFul, "group") : 0;
        pico_ctx *ctx = attach_or_exit(seg, 0);
        void *state;
        int rc = pico_get_flow(ctx, &key, 1, group, &state);
        if (rc != PICO_OK)
            return fail_exit(rc);
        printf("held\n");
        fflush(stdout);
        abort(); /* no put_flow, no detach: the SMM must recover refcount and client entry */
    }
    if (!strcmp(cmd, "die-locked")) {
        if (na != 5 && na != 6)
            usage();
        if (na == 6 && strcmp(a[5], "nopid"))
            usage();
        pico_flow_key key;
        parse_key(a, &key);
        pico_detach(attach_or_exit(seg, 0)); /* validates the segment; no client entry left */
        return cmd_die_locked(seg, &key, na == 5);
    }
    if (!strcmp(cmd, "fill")) {
        if (na != 1 && na != 2)
            usage();
        unsigned long n = parse_ulong(a[0], 1ul << 24, "N");
        uint32_t group = na == 2 ? (uint32_t)parse_ulong(a[1], 0xFFFFFFFFul, "group") : 0;
        pico_ctx *ctx = attach_or_exit(seg, 0);
        for (unsigned long i = 0; i < n; i++) {
            pico_flow_key key;
            void *state;
            bench_key((uint32_t)i, &key);
            int rc = pico_get_flow(ctx, &key, 1, group, &state);
            if (rc == PICO_OK)
                rc = pico_put_flow(ctx, &key, 1);
            if (rc != PICO_OK) {
                fprintf(stderr, "%s: fill stopped at key %lu of %lu\n", prog, i, n);
                int ex = fail_exit(rc);
                pico_detach(ctx);
                return ex;
            }
        }
        printf("{\"filled\":%lu}\n", n);
        pico_detach(ctx);
        return 0;
    }
    if (!strcmp(cmd, "bench")) {
        if (na != 1 && na != 2)
            usage();
        unsigned long n = parse_ulong(a[0], 1ul << 30, "N");
        unsigned long m = na == 2 ? parse_ulong(a[1], 1ul << 24, "M") : n;
        if (m == 0)
            m = 1;
        pico_ctx *ctx = attach_or_exit(seg, 0);
        int ex = cmd_bench(ctx, n, m);
        pico_detach(ctx);
        return ex;
    }
    fprintf(stderr, "%s: unknown command '%s'\n", prog, cmd);
    usage();
    return EXIT_USAGE;
}
