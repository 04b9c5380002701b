/*
 * libpico.c - the C binding of the Pico flow table and packet rings. pico_abi.h is the
 * specification of every byte touched here; shared/flowtable.py and shared/packets.py are the
 * Python bindings of the same protocols.
 *
 * Memory ordering: x86-64 TSO (see pico_abi.h). Publish points use __atomic release stores and
 * the ready word an acquire load, which also keeps the compiler from reordering around them;
 * ring counters are read with acquire loads (the other side's) and published with release
 * stores (ours).
 */
#include "pico.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PICO_DEFAULT_LOCK_TIMEOUT_MS 1000u /* used when the segment says 0 */
#define PICO_NAME_MAX 256

struct pico_ctx {
    char name[PICO_NAME_MAX];               /* segment name, for messages */
    char sem_prefix[PICO_SEM_PREFIX_LEN + 1];
    uint8_t *base;
    size_t size;
    pico_seg_header *hdr;
    pico_flow_desc *desc;
    pico_client *clients;
    pico_stripe *stripes;
    uint8_t *slots;
    uint32_t n_stripes, sps, slot_size, state_size, max_per_stripe, lock_timeout_ms;
    uint16_t owner;
    sem_t **sems;    /* n_stripes */
    sem_t *reg;
    int client_idx;  /* -1 if none */
    int64_t client_pid;
};

/* ---------------------------------------------------------------------------------------------
 * Errors */

static _Thread_local char last_error[768];

__attribute__((format(printf, 2, 3))) static int fail(int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return code;
}

const char *pico_last_error(void) { return last_error; }

const char *pico_strerror(int err)
{
    switch (err) {
    case PICO_OK: return "ok";
    case PICO_E_MISSING: return "segment missing";
    case PICO_E_ABI: return "ABI mismatch";
    case PICO_E_NOTREADY: return "segment not ready";
    case PICO_E_CORRUPT: return "segment corrupt";
    case PICO_E_STALE: return "stale segment owner";
    case PICO_E_NOTFOUND: return "flow not found";
    case PICO_E_FULL: return "flow table stripe full";
    case PICO_E_STANDBY: return "flow is a standby copy";
    case PICO_E_LOCK_TIMEOUT: return "lock timeout";
    case PICO_E_INVAL: return "invalid argument";
    case PICO_E_SYS: return "system call failed";
    case PICO_E_NOCLIENT: return "client registry full";
    case PICO_E_NOTXN: return "no open transaction on that flow";
    case PICO_E_TIMEOUT: return "no packet before the deadline";
    case PICO_E_BUSY: return "another middlebox is attached";
    default: return "unknown pico error";
    }
}

/* ---------------------------------------------------------------------------------------------
 * Process identity. getpid() is a real syscall on modern glibc; cache it, reset on fork. */

static pid_t cached_pid;
static pthread_once_t pid_once = PTHREAD_ONCE_INIT;

static void pid_reset(void) { __atomic_store_n(&cached_pid, 0, __ATOMIC_RELAXED); }
static void pid_init(void) { pthread_atfork(NULL, NULL, pid_reset); }

static pid_t self_pid(void)
{
    pid_t p = __atomic_load_n(&cached_pid, __ATOMIC_RELAXED);
    if (p == 0) {
        pthread_once(&pid_once, pid_init);
        p = getpid();
        __atomic_store_n(&cached_pid, p, __ATOMIC_RELAXED);
    }
    return p;
}

/* Field 22 (starttime) of /proc/<pid>/stat. Field 2 (comm) may hold spaces and parentheses, so
 * fields are counted from the LAST ')'. Returns 0 and sets *out, or -1 (errno set). */
static int proc_start_time(long long pid, uint64_t *out)
{
    char path[64], buf[1024];
    if (pid > 0)
        snprintf(path, sizeof path, "/proc/%lld/stat", pid);
    else
        snprintf(path, sizeof path, "/proc/self/stat");
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    int saved = errno;
    close(fd);
    if (n <= 0) {
        errno = n < 0 ? saved : EIO;
        return -1;
    }
    buf[n] = '\0';
    char *p = strrchr(buf, ')');
    if (!p) {
        errno = EPROTO;
        return -1;
    }
    p++;
    /* after ')' come fields 3, 4, ...: field 22 is the 20th token */
    for (int field = 3; field < 22; field++) {
        while (*p == ' ')
            p++;
        while (*p && *p != ' ')
            p++;
    }
    while (*p == ' ')
        p++;
    if (*p < '0' || *p > '9') {
        errno = EPROTO;
        return -1;
    }
    *out = strtoull(p, NULL, 10);
    return 0;
}

static uint64_t now_ns(clockid_t clk)
{
    struct timespec ts;
    clock_gettime(clk, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static int is_pow2(uint64_t x) { return x && !(x & (x - 1)); }

/* sem_timedwait with an absolute CLOCK_REALTIME deadline of now + ms; retries on EINTR.
 * Returns 0, ETIMEDOUT, or another errno. */
static int sem_wait_ms(sem_t *sem, uint32_t ms)
{
    if (sem_trywait(sem) == 0)
        return 0;
    if (errno != EAGAIN && errno != EINTR)
        return errno;
    struct timespec dl;
    clock_gettime(CLOCK_REALTIME, &dl);
    dl.tv_sec += ms / 1000;
    dl.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (dl.tv_nsec >= 1000000000L) {
        dl.tv_sec++;
        dl.tv_nsec -= 1000000000L;
    }
    for (;;) {
        if (sem_timedwait(sem, &dl) == 0)
            return 0;
        if (errno != EINTR)
            return errno;
    }
}

/* ---------------------------------------------------------------------------------------------
 * Keys and hash */

int pico_flow_key_make(pico_flow_key *out, int family, uint8_t proto, const void *src_addr,
                       uint16_t src_port, const void *dst_addr, uint16_t dst_port)
{
    if (!out || !src_addr || !dst_addr)
        return fail(PICO_E_INVAL, "pico_flow_key_make: NULL argument (out, src_addr and dst_addr "
                                  "are required)");
    uint8_t a[16], b[16];
    if (family == 4) {
        static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
        memcpy(a, mapped, 12);
        memcpy(a + 12, src_addr, 4);
        memcpy(b, mapped, 12);
        memcpy(b + 12, dst_addr, 4);
    } else if (family == 6) {
        memcpy(a, src_addr, 16);
        memcpy(b, dst_addr, 16);
    } else {
        return fail(PICO_E_INVAL, "pico_flow_key_make: family must be 4 or 6, got %d", family);
    }
    uint16_t pa = src_port, pb = dst_port;
    int c = memcmp(b, a, 16);
    if (c < 0 || (c == 0 && pb < pa)) { /* endpoint A = the smaller (addr, port) */
        uint8_t t[16];
        memcpy(t, a, 16);
        memcpy(a, b, 16);
        memcpy(b, t, 16);
        uint16_t tp = pa;
        pa = pb;
        pb = tp;
    }
    memset(out, 0, sizeof *out);
    memcpy(out->addr_a, a, 16);
    memcpy(out->addr_b, b, 16);
    out->port_a = pa;
    out->port_b = pb;
    out->proto = proto;
    out->family = (uint8_t)family;
    return PICO_OK;
}

uint64_t pico_hash_key(const pico_flow_key *key)
{
    uint64_t w[5];
    memcpy(w, key, sizeof w); /* x86-64: little-endian words */
    uint64_t h = 0x9E3779B97F4A7C15ull;
    for (int i = 0; i < 5; i++) {
        h ^= w[i];
        h *= 0xFF51AFD7ED558CCDull;
        h ^= h >> 33;
    }
    h ^= h >> 29;
    h *= 0xC4CEB9FE1A85EC53ull;
    h ^= h >> 32;
    return h;
}

/* ---------------------------------------------------------------------------------------------
 * Attach / detach */

static void ctx_free(pico_ctx *c)
{
    if (!c)
        return;
    if (c->sems) {
        for (uint32_t k = 0; k < c->n_stripes; k++)
            if (c->sems[k])
                sem_close(c->sems[k]);
        free(c->sems);
    }
    if (c->reg)
        sem_close(c->reg);
    if (c->base)
        munmap(c->base, c->size);
    free(c);
}

/* Checks of the header, the descriptor and the geometry. Returns PICO_OK or PICO_E_CORRUPT. */
static int check_geometry(pico_ctx *c)
{
    const pico_flow_desc *d = c->desc;
    const char *n = c->name;
    uint64_t size = c->size;
    if (d->n_stripes == 0 || !is_pow2(d->n_stripes) || !is_pow2(d->slots_per_stripe))
        return fail(PICO_E_CORRUPT, "segment %s is corrupt: n_stripes=%u and slots_per_stripe=%u "
                    "must be powers of two: recreate it (restart the SMM)", n, d->n_stripes,
                    d->slots_per_stripe);
    if (d->n_slots != (uint64_t)d->n_stripes * d->slots_per_stripe)
        return fail(PICO_E_CORRUPT, "segment %s is corrupt: n_slots=%llu != n_stripes %u x "
                    "slots_per_stripe %u: recreate it (restart the SMM)", n,
                    (unsigned long long)d->n_slots, d->n_stripes, d->slots_per_stripe);
    if (d->slot_size < PICO_SLOT_HEADER + (uint64_t)d->state_size || d->slot_size % 8)
        return fail(PICO_E_CORRUPT, "segment %s is corrupt: slot_size=%u cannot hold the %u-byte "
                    "header and state_size=%u: recreate it (restart the SMM)", n, d->slot_size,
                    PICO_SLOT_HEADER, d->state_size);
    if (d->clients_offset < PICO_CLIENTS_OFFSET || d->clients_offset % 8 ||
        d->clients_offset + (uint64_t)PICO_MAX_CLIENTS * sizeof(pico_client) > size ||
        d->stripes_offset % 8 ||
        d->stripes_offset + (uint64_t)d->n_stripes * sizeof(pico_stripe) > size ||
        d->slots_offset % 8 || d->slots_offset > size ||
        d->n_slots > (size - d->slots_offset) / d->slot_size)
        return fail(PICO_E_CORRUPT, "segment %s is corrupt: offsets (clients %llu, stripes %llu, "
                    "slots %llu + %llu x %u) do not fit in %llu bytes: recreate it (restart the "
                    "SMM)", n, (unsigned long long)d->clients_offset,
                    (unsigned long long)d->stripes_offset, (unsigned long long)d->slots_offset,
                    (unsigned long long)d->n_slots, d->slot_size, (unsigned long long)size);
    if (memchr(d->sem_prefix, '\0', PICO_SEM_PREFIX_LEN) == NULL || d->sem_prefix[0] != '/')
        return fail(PICO_E_CORRUPT, "segment %s is corrupt: sem_prefix is not a NUL-terminated "
                    "name starting with '/': recreate it (restart the SMM)", n);
    return PICO_OK;
}

/* Open the stripe and registry semaphores. */
static int open_sems(pico_ctx *c)
{
    char sname[PICO_SEM_PREFIX_LEN + 32];
    c->sems = calloc(c->n_stripes, sizeof *c->sems);
    if (!c->sems)
        return fail(PICO_E_SYS, "attach %s: out of memory for %u semaphores", c->name,
                    c->n_stripes);
    for (uint32_t k = 0; k <= c->n_stripes; k++) {
        if (k < c->n_stripes)
            snprintf(sname, sizeof sname, "%s.s%u", c->sem_prefix, k);
        else
            snprintf(sname, sizeof sname, "%s.reg", c->sem_prefix);
        sem_t *s = sem_open(sname, 0);
        if (s == SEM_FAILED) {
            int e = errno;
            if (e == ENOENT)
                return fail(PICO_E_MISSING, "attach %s: semaphore %s does not exist "
                            "(/dev/shm/sem.%s): the segment's owner removed it or never created "
                            "it; restart the SMM of this replica", c->name, sname, sname + 1);
            return fail(PICO_E_SYS, "attach %s: sem_open(%s): %s", c->name, sname, strerror(e));
        }
        if (k < c->n_stripes)
            c->sems[k] = s;
        else
            c->reg = s;
    }
    return PICO_OK;
}

static int register_client(pico_ctx *c)
{
    int e = sem_wait_ms(c->reg, c->lock_timeout_ms);
    if (e == ETIMEDOUT)
        return fail(PICO_E_LOCK_TIMEOUT, "attach %s: the client registry semaphore %s.reg was not "
                    "acquired within %u ms: a process may have died holding it; restart the SMM "
                    "of this replica", c->name, c->sem_prefix, c->lock_timeout_ms);
    if (e)
        return fail(PICO_E_SYS, "attach %s: sem_timedwait(%s.reg): %s", c->name, c->sem_prefix,
                    strerror(e));
    int idx = -1;
    for (uint32_t i = 0; i < PICO_MAX_CLIENTS; i++) {
        if (__atomic_load_n(&c->clients[i].pid, __ATOMIC_ACQUIRE) == 0) {
            idx = (int)i;
            break;
        }
    }
    if (idx >= 0) {
        pico_client *cl = &c->clients[idx];
        uint64_t st = 0;
        (void)proc_start_time(0, &st);
        cl->start_time = st;
        cl->attached_ns = now_ns(CLOCK_REALTIME);
        cl->lang = 2; /* C */
        cl->reserved0 = 0;
        memset(cl->name, 0, sizeof cl->name);
        strncpy(cl->name, program_invocation_short_name, sizeof cl->name - 1);
        c->client_pid = self_pid();
        __atomic_store_n(&cl->pid, c->client_pid, __ATOMIC_RELEASE); /* publish last */
        c->client_idx = idx;
    }
    sem_post(c->reg);
    if (idx < 0)
        return fail(PICO_E_NOCLIENT, "attach %s: all %u client entries are taken: detach unused "
                    "middlebox processes, or wait for the SMM to free the entries of dead ones",
                    c->name, PICO_MAX_CLIENTS);
    return PICO_OK;
}

/* The attach protocol of pico_abi.h, common to every segment kind: open by name, poll the
 * ready word until the deadline, check magic, ABI major, kind, sizes and the owner's liveness,
 * then map the whole segment read-write. `who` names the owner in messages ("SMM", "PMM");
 * `what` the kind ("flows", "packets"). On success *base_out / *size_out hold the mapping. */
static int seg_open(const char *n, int timeout_ms, uint32_t kind, uint64_t min_size,
                    const char *who, const char *what, uint8_t **base_out, size_t *size_out)
{
    if (timeout_ms < 0)
        timeout_ms = 0;
    int fd = shm_open(n, O_RDWR, 0);
    if (fd < 0) {
        int e = errno;
        if (e == ENOENT)
            return fail(PICO_E_MISSING, "segment %s does not exist (/dev/shm%s): is the %s of "
                        "this replica running?", n, n, who);
        return fail(PICO_E_SYS, "shm_open(%s): %s%s%s", n, strerror(e),
                    e == EACCES ? ": run the middlebox as the user of the " : "",
                    e == EACCES ? who : "");
    }

    /* Poll until published. A segment still being created may briefly be short or all zero
     * (between the owner's shm_open, ftruncate and header writes), so those are retried too
     * until the deadline, then reported as corrupt. */
    uint64_t deadline = now_ns(CLOCK_MONOTONIC) + (uint64_t)timeout_ms * 1000000ull;
    struct stat st;
    pico_seg_header *hdr = NULL;
    int rc = PICO_OK;
    for (;;) {
        int expired = now_ns(CLOCK_MONOTONIC) >= deadline;
        if (fstat(fd, &st) != 0) {
            rc = fail(PICO_E_SYS, "fstat(%s): %s", n, strerror(errno));
            goto out_fd;
        }
        if (st.st_size < (off_t)sizeof(pico_seg_header)) {
            if (expired) {
                rc = fail(PICO_E_CORRUPT, "segment %s is truncated: %lld bytes, less than the "
                          "%zu-byte header: remove it and restart the %s", n,
                          (long long)st.st_size, sizeof(pico_seg_header), who);
                goto out_fd;
            }
            sleep_ms(1);
            continue;
        }
        if (!hdr) {
            void *m = mmap(NULL, sizeof(pico_seg_header), PROT_READ, MAP_SHARED, fd, 0);
            if (m == MAP_FAILED) {
                rc = fail(PICO_E_SYS, "mmap(%s header): %s", n, strerror(errno));
                goto out_fd;
            }
            hdr = m;
        }
        uint64_t magic = __atomic_load_n(&hdr->magic, __ATOMIC_ACQUIRE);
        uint32_t ready = __atomic_load_n(&hdr->ready, __ATOMIC_ACQUIRE);
        if (magic != PICO_MAGIC && !(magic == 0 && ready == 0 && !expired)) {
            rc = fail(PICO_E_CORRUPT, "segment %s is corrupt: magic 0x%016llx, expected 0x%016llx "
                      "(\"PICOSEG1\"): this is not a Pico segment, or it was never initialised; "
                      "remove it and restart the %s", n, (unsigned long long)magic,
                      (unsigned long long)PICO_MAGIC, who);
            goto out_hdr;
        }
        if (ready == PICO_READY)
            break;
        if (ready == PICO_CLOSED) {
            rc = fail(PICO_E_STALE, "segment %s was closed by its owner (pid %lld, ready = CLOSED): "
                      "the %s shut down; restart it, then re-attach", n,
                      (long long)hdr->owner_pid, who);
            goto out_hdr;
        }
        if (expired) {
            rc = fail(PICO_E_NOTREADY, "segment %s is not ready after %d ms (ready word 0x%08x): "
                      "the owner (pid %lld) has not finished creating it; retry with a longer "
                      "timeout or check the %s's log", n, timeout_ms, ready,
                      (long long)hdr->owner_pid, who);
            goto out_hdr;
        }
        sleep_ms(1);
    }

    if (hdr->abi_major != PICO_ABI_MAJOR) {
        rc = fail(PICO_E_ABI, "ABI mismatch on %s: segment is %u.%u, library is %u.%u: rebuild the "
                  "middlebox against the segment's pico_abi.h", n, hdr->abi_major,
                  hdr->abi_minor, PICO_ABI_MAJOR, PICO_ABI_MINOR);
        goto out_hdr;
    }
    if (hdr->kind != kind) {
        rc = fail(PICO_E_CORRUPT, "segment %s has kind %u, expected %u (%s): attach to the "
                  "replica's .%s segment", n, hdr->kind, kind, what, what);
        goto out_hdr;
    }
    if (hdr->header_size != sizeof(pico_seg_header) || hdr->segment_size != (uint64_t)st.st_size ||
        (uint64_t)st.st_size < min_size) {
        rc = fail(PICO_E_CORRUPT, "segment %s is corrupt: header says header_size %u, "
                  "segment_size %llu, but the header is %zu bytes and the segment %lld bytes "
                  "(at least %llu needed): remove it and restart the %s", n, hdr->header_size,
                  (unsigned long long)hdr->segment_size, sizeof(pico_seg_header),
                  (long long)st.st_size, (unsigned long long)min_size, who);
        goto out_hdr;
    }
    {
        uint64_t start = 0;
        long long opid = (long long)hdr->owner_pid;
        if (opid <= 0 || proc_start_time(opid, &start) != 0) {
            rc = fail(PICO_E_STALE, "segment %s is stale: its owner pid %lld is not running: "
                      "restart the %s of this replica (it recreates the segment)", n, opid, who);
            goto out_hdr;
        }
        if (start != hdr->owner_start_time) {
            rc = fail(PICO_E_STALE, "segment %s is stale: its owner pid %lld died (the pid now "
                      "belongs to a process started at tick %llu, the owner started at %llu): "
                      "restart the %s of this replica", n, opid, (unsigned long long)start,
                      (unsigned long long)hdr->owner_start_time, who);
            goto out_hdr;
        }
    }
    {
        size_t size = (size_t)st.st_size;
        void *m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (m == MAP_FAILED) {
            rc = fail(PICO_E_SYS, "mmap(%s, %zu bytes): %s", n, size, strerror(errno));
            goto out_hdr;
        }
        *base_out = m;
        *size_out = size;
        rc = PICO_OK;
    }
out_hdr:
    if (hdr)
        munmap(hdr, sizeof(pico_seg_header));
out_fd:
    close(fd);
    return rc;
}

int pico_attach(const char *segment_name, int timeout_ms, pico_ctx **out)
{
    if (out)
        *out = NULL;
    if (!segment_name || !out)
        return fail(PICO_E_INVAL, "pico_attach: segment_name and out must not be NULL");
    if (segment_name[0] != '/' || strlen(segment_name) >= PICO_NAME_MAX)
        return fail(PICO_E_INVAL, "pico_attach: segment name '%s' must start with '/' and be "
                    "shorter than %d bytes, e.g. /pico.demo.r1.flows", segment_name,
                    PICO_NAME_MAX);
    const char *n = segment_name;
    uint8_t *base = NULL;
    size_t size = 0;
    int rc = seg_open(n, timeout_ms, PICO_SEG_FLOWS,
                      PICO_CLIENTS_OFFSET + PICO_MAX_CLIENTS * sizeof(pico_client), "SMM", "flows",
                      &base, &size);
    if (rc != PICO_OK)
        return rc;

    pico_ctx *c = calloc(1, sizeof *c);
    if (!c) {
        munmap(base, size);
        return fail(PICO_E_SYS, "attach %s: out of memory", n);
    }
    c->client_idx = -1;
    snprintf(c->name, sizeof c->name, "%s", n);
    c->base = base;
    c->size = size;
    c->hdr = (pico_seg_header *)c->base;
    c->desc = (pico_flow_desc *)(c->base + PICO_FLOW_DESC_OFFSET);
    if ((rc = check_geometry(c)) != PICO_OK) {
        ctx_free(c);
        return rc;
    }
    c->clients = (pico_client *)(c->base + c->desc->clients_offset);
    c->stripes = (pico_stripe *)(c->base + c->desc->stripes_offset);
    c->slots = c->base + c->desc->slots_offset;
    c->n_stripes = c->desc->n_stripes;
    c->sps = c->desc->slots_per_stripe;
    c->slot_size = c->desc->slot_size;
    c->state_size = c->desc->state_size;
    c->max_per_stripe = c->desc->max_per_stripe;
    c->lock_timeout_ms = c->desc->lock_timeout_ms ? c->desc->lock_timeout_ms
                                                  : PICO_DEFAULT_LOCK_TIMEOUT_MS;
    c->owner = (uint16_t)c->hdr->owner_replica;
    memcpy(c->sem_prefix, c->desc->sem_prefix, PICO_SEM_PREFIX_LEN);
    c->sem_prefix[PICO_SEM_PREFIX_LEN] = '\0';

    if ((rc = open_sems(c)) != PICO_OK || (rc = register_client(c)) != PICO_OK) {
        ctx_free(c);
        return rc;
    }
    *out = c;
    return PICO_OK;
}

void pico_detach(pico_ctx *c)
{
    if (!c)
        return;
    if (c->client_idx >= 0 && c->reg) {
        pico_client *cl = &c->clients[c->client_idx];
        int e = sem_wait_ms(c->reg, c->lock_timeout_ms);
        /* Freeing is a single store of our own entry, so even without the semaphore (a dead
         * holder) it is safe: nobody else claims an entry whose pid is non-zero. */
        if (__atomic_load_n(&cl->pid, __ATOMIC_ACQUIRE) == c->client_pid)
            __atomic_store_n(&cl->pid, 0, __ATOMIC_RELEASE);
        if (e == 0)
            sem_post(c->reg);
    }
    ctx_free(c);
}

uint32_t pico_state_size(const pico_ctx *c) { return c ? c->state_size : 0; }

/* ---------------------------------------------------------------------------------------------
 * Stripes and the table */

static int lock_stripe(pico_ctx *c, uint32_t s)
{
    int e = sem_wait_ms(c->sems[s], c->lock_timeout_ms);
    if (e == 0) {
        pico_stripe *st = &c->stripes[s];
        __atomic_store_n(&st->holder_pid, (int64_t)self_pid(), __ATOMIC_RELAXED);
        __atomic_store_n(&st->acquisitions, st->acquisitions + 1, __ATOMIC_RELAXED);
        return PICO_OK;
    }
    if (e == ETIMEDOUT) {
        long long holder = (long long)__atomic_load_n(&c->stripes[s].holder_pid,
                                                      __ATOMIC_RELAXED);
        const char *what;
        if (holder == 0)
            what = "no holder recorded (it may have died between sem_wait and recording its pid)";
        else if (kill((pid_t)holder, 0) == 0 || errno == EPERM)
            what = "the holder is alive: it may be hung; kill it if so";
        else
            what = "the holder is dead";
        return fail(PICO_E_LOCK_TIMEOUT, "lock stripe %u of %s (semaphore %s.s%u) not acquired "
                    "within %u ms: holder_pid %lld, %s; the SMM watchdog releases stripes of dead "
                    "holders, so check that the SMM of this replica is running", s, c->name,
                    c->sem_prefix, s, c->lock_timeout_ms, holder, what);
    }
    return fail(PICO_E_SYS, "lock stripe %u of %s: sem_timedwait(%s.s%u): %s", s, c->name,
                c->sem_prefix, s, strerror(e));
}

static void unlock_stripe(pico_ctx *c, uint32_t s)
{
    __atomic_store_n(&c->stripes[s].holder_pid, 0, __ATOMIC_RELEASE);
    sem_post(c->sems[s]);
}

/* Transactions hold their stripe from pico_get_flow to pico_put_flow / pico_del_flow
 * (pico_abi.h, "Transactions"). Holds are counted per thread, so a thread may hold several
 * flows at once, even of one stripe, without deadlocking on itself. */
#define PICO_MAX_OPEN 64
struct held_stripe { const pico_ctx *c; uint32_t stripe; uint32_t depth; };
struct open_txn { const pico_ctx *c; pico_flow_key key; pico_flow_slot *slot; uint32_t stripe;
                  uint32_t depth; };
static _Thread_local struct held_stripe t_held[PICO_MAX_OPEN];
static _Thread_local int t_nheld;
static _Thread_local struct open_txn t_open[PICO_MAX_OPEN];
static _Thread_local int t_nopen;

static int hold_stripe(pico_ctx *c, uint32_t s)
{
    for (int i = 0; i < t_nheld; i++)
        if (t_held[i].c == c && t_held[i].stripe == s) {
            t_held[i].depth++;
            return PICO_OK;
        }
    if (t_nheld == PICO_MAX_OPEN)
        return fail(PICO_E_INVAL, "this thread already holds %d lock stripes of %s: end "
                    "transactions (pico_put_flow) before opening more", PICO_MAX_OPEN, c->name);
    int rc = lock_stripe(c, s);
    if (rc == PICO_OK)
        t_held[t_nheld++] = (struct held_stripe){c, s, 1};
    return rc;
}

static void unhold_stripe(pico_ctx *c, uint32_t s)
{
    for (int i = 0; i < t_nheld; i++)
        if (t_held[i].c == c && t_held[i].stripe == s) {
            if (--t_held[i].depth == 0) {
                t_held[i] = t_held[--t_nheld];
                unlock_stripe(c, s);
            }
            return;
        }
}

static struct open_txn *find_txn(const pico_ctx *c, const pico_flow_key *key)
{
    for (int i = 0; i < t_nopen; i++)
        if (t_open[i].c == c && memcmp(&t_open[i].key, key, sizeof *key) == 0)
            return &t_open[i];
    return NULL;
}

/* Ends one level of the transaction t; returns its slot and stripe. */
static pico_flow_slot *end_txn(struct open_txn *t, uint32_t *stripe)
{
    pico_flow_slot *sl = t->slot;
    *stripe = t->stripe;
    if (--t->depth == 0)
        *t = t_open[--t_nopen];
    return sl;
}

static inline pico_flow_slot *slot_at(pico_ctx *c, uint64_t idx)
{
    return (pico_flow_slot *)(c->slots + idx * c->slot_size);
}

/* Walk the key's run (stripe locked). A key owns at most one slot of its run: the walk ends at
 * the first slot holding the key (whatever its status) or at a FREE slot. Returns that slot if it
 * is ACTIVE or STANDBY, else NULL. *reuse (if not NULL) gets the slot an insert must use: the
 * key's own TOMBSTONE if there is one (so a re-created flow never coexists with its pending
 * delete; shared/flowtable.py does the same), else the first reusable slot seen: FREE, or a
 * TOMBSTONE that is not a pending delete (modified == 0, or group 0). */
/* The RM's dirty hint for a slot whose modified was just set (pico_abi.h, "Dirty hints"). */
static inline void mark_dirty(pico_ctx *c, const pico_flow_slot *sl, uint32_t s)
{
    uint64_t in_run = ((uint64_t)((const uint8_t *)sl - c->slots) / c->slot_size) & (c->sps - 1);
    __atomic_store_n(&c->stripes[s].dirty[in_run * PICO_DIRTY_BLOCKS / c->sps], 1,
                     __ATOMIC_RELEASE);
}

static pico_flow_slot *walk(pico_ctx *c, const pico_flow_key *key, uint64_t h, uint32_t s,
                            pico_flow_slot **reuse)
{
    uint32_t mask = c->sps - 1;
    uint32_t home = (uint32_t)(h >> 32) & mask;
    uint64_t base = (uint64_t)s * c->sps;
    pico_flow_slot *first = NULL;
    for (uint32_t i = 0; i < c->sps; i++) {
        pico_flow_slot *sl = slot_at(c, base + ((home + i) & mask));
        uint32_t status = __atomic_load_n(&sl->status, __ATOMIC_ACQUIRE);
        if (status == PICO_STATUS_FREE) {
            if (!first)
                first = sl;
            break;
        }
        if (memcmp(&sl->key, key, sizeof *key) == 0) {
            if (status == PICO_STATUS_ACTIVE || status == PICO_STATUS_STANDBY) {
                if (reuse)
                    *reuse = NULL;
                return sl;
            }
            if (status == PICO_STATUS_TOMBSTONE) {
                first = sl;
                break;
            }
            continue; /* unknown status: not usable */
        }
        if (status == PICO_STATUS_TOMBSTONE && !first &&
            (sl->modified == 0 || sl->group == PICO_GROUP_DEFAULT))
            first = sl;
    }
    if (reuse)
        *reuse = first;
    return NULL;
}

static int check_args(pico_ctx *c, const pico_flow_key *key, const char *fn)
{
    if (!c || !key)
        return fail(PICO_E_INVAL, "%s: ctx and key must not be NULL", fn);
    return PICO_OK;
}

/* Keys in messages: the hash identifies the flow (flowkey.hash_key) and its stripe. */
#define KEYFMT "key hash %016llx, stripe %u"

/* Records the transaction get_flow just opened (its stripe stays held). */
static int open_txn(pico_ctx *c, const pico_flow_key *key, pico_flow_slot *sl, uint32_t s)
{
    struct open_txn *t = find_txn(c, key);
    if (t) {
        t->depth++;
        return PICO_OK;
    }
    if (t_nopen == PICO_MAX_OPEN) {
        if (sl->refcount > 0)
            sl->refcount--;
        unhold_stripe(c, s);
        return fail(PICO_E_INVAL, "this thread has %d open transactions on %s: end some with "
                    "pico_put_flow first", PICO_MAX_OPEN, c->name);
    }
    t_open[t_nopen++] = (struct open_txn){c, *key, sl, s, 1};
    return PICO_OK;
}

int pico_get_flow(pico_ctx *c, const pico_flow_key *key, int create, uint32_t group,
                  void **state_out)
{
    int rc = check_args(c, key, "pico_get_flow");
    if (rc)
        return rc;
    if (!state_out)
        return fail(PICO_E_INVAL, "pico_get_flow: state_out must not be NULL");
    *state_out = NULL;
    uint64_t h = pico_hash_key(key);
    uint32_t s = (uint32_t)h & (c->n_stripes - 1);
    if ((rc = hold_stripe(c, s)) != PICO_OK)
        return rc;
    pico_flow_slot *reuse = NULL;
    pico_flow_slot *sl = walk(c, key, h, s, create ? &reuse : NULL);
    pico_stripe *st = &c->stripes[s];
    if (sl && sl->status == PICO_STATUS_ACTIVE) {
        sl->refcount++;
        sl->txn_pid = (int32_t)self_pid();
        *state_out = (uint8_t *)sl + PICO_SLOT_HEADER;
        return open_txn(c, key, sl, s);
    }
    if (sl) { /* STANDBY */
        unhold_stripe(c, s);
        if (!create)
            return fail(PICO_E_NOTFOUND, "flow not found in %s (" KEYFMT "): it is a standby "
                        "copy, not active", c->name, (unsigned long long)h, s);
        return fail(PICO_E_STANDBY, "flow in %s is a standby copy (" KEYFMT "): it becomes usable "
                    "when the SMM activates it after a failover; do not create it here",
                    c->name, (unsigned long long)h, s);
    }
    if (!create) {
        unhold_stripe(c, s);
        return fail(PICO_E_NOTFOUND, "flow not found in %s (" KEYFMT ")", c->name,
                    (unsigned long long)h, s);
    }
    if (st->live >= c->max_per_stripe || !reuse) {
        uint32_t live = st->live, tomb = st->tombstones;
        unhold_stripe(c, s);
        return fail(PICO_E_FULL, "flow table %s is full in stripe %u (key hash %016llx): %u live of "
                    "max_per_stripe %u, %u tombstones, %s: raise the flow capacity in the cluster "
                    "config, or delete idle flows", c->name, s, (unsigned long long)h, live,
                    c->max_per_stripe, tomb,
                    live >= c->max_per_stripe
                        ? "live limit reached"
                        : "no reusable slot (tombstones wait for the next checkpoint)");
    }
    int was_tomb = reuse->status == PICO_STATUS_TOMBSTONE;
    memcpy(&reuse->key, key, sizeof *key);
    reuse->owner = c->owner;
    reuse->flags = 0;
    reuse->group = group;
    reuse->refcount = 1;
    reuse->txn_pid = (int32_t)self_pid();
    reuse->version = 0;
    reuse->ckpt_epoch = 0;
    reuse->modified = 1;
    reuse->hash = h;
    reuse->reserved = 0;
    memset((uint8_t *)reuse + PICO_SLOT_HEADER, 0, c->state_size);
    __atomic_store_n(&reuse->status, PICO_STATUS_ACTIVE, __ATOMIC_RELEASE); /* publish last */
    mark_dirty(c, reuse, s); /* after modified: the RM's hint */
    st->live++;
    if (was_tomb && st->tombstones > 0)
        st->tombstones--;
    *state_out = (uint8_t *)reuse + PICO_SLOT_HEADER;
    return open_txn(c, key, reuse, s);
}

int pico_put_flow(pico_ctx *c, const pico_flow_key *key, int modified)
{
    int rc = check_args(c, key, "pico_put_flow");
    if (rc)
        return rc;
    struct open_txn *t = find_txn(c, key);
    if (!t)
        return fail(PICO_E_NOTXN, "pico_put_flow: no open transaction on this flow of %s in "
                    "this thread (key hash %016llx): call pico_get_flow first, and end each "
                    "transaction once", c->name, (unsigned long long)pico_hash_key(key));
    uint32_t s;
    pico_flow_slot *sl = end_txn(t, &s);
    rc = PICO_OK;
    if (sl->status != PICO_STATUS_ACTIVE) {
        rc = fail(PICO_E_NOTFOUND, "pico_put_flow: the flow was deleted during its "
                  "transaction in %s", c->name);
    } else {
        if (modified) {
            sl->modified = 1;
            sl->version++;
            mark_dirty(c, sl, s);
        }
        /* refcount falls last: an RM that sees 0 also sees modified (pico_abi.h) */
        if (sl->refcount > 0)
            __atomic_store_n(&sl->refcount, sl->refcount - 1, __ATOMIC_RELEASE);
    }
    unhold_stripe(c, s);
    return rc;
}

static void tombstone(pico_ctx *c, pico_flow_slot *sl, uint32_t s)
{
    pico_stripe *st = &c->stripes[s];
    /* modified before status, refcount last: an RM never sees a finished, unmarked delete */
    sl->modified = 1;
    sl->version++;
    mark_dirty(c, sl, s);
    __atomic_store_n(&sl->status, PICO_STATUS_TOMBSTONE, __ATOMIC_RELEASE);
    __atomic_store_n(&sl->refcount, 0, __ATOMIC_RELEASE);
    if (st->live > 0)
        st->live--;
    st->tombstones++;
}

int pico_del_flow(pico_ctx *c, const pico_flow_key *key)
{
    int rc = check_args(c, key, "pico_del_flow");
    if (rc)
        return rc;
    struct open_txn *t = find_txn(c, key);
    if (t) { /* delete inside the transaction: it ends it */
        uint32_t s;
        pico_flow_slot *sl = end_txn(t, &s);
        rc = PICO_OK;
        if (sl->status == PICO_STATUS_ACTIVE)
            tombstone(c, sl, s);
        else
            rc = fail(PICO_E_NOTFOUND, "pico_del_flow: flow already deleted in %s", c->name);
        unhold_stripe(c, s);
        return rc;
    }
    uint64_t h = pico_hash_key(key);
    uint32_t s = (uint32_t)h & (c->n_stripes - 1);
    if ((rc = hold_stripe(c, s)) != PICO_OK)
        return rc;
    pico_flow_slot *sl = walk(c, key, h, s, NULL);
    if (!sl || sl->status != PICO_STATUS_ACTIVE) {
        unhold_stripe(c, s);
        return fail(PICO_E_NOTFOUND, "pico_del_flow: flow not active in %s (" KEYFMT ")",
                    c->name, (unsigned long long)h, s);
    }
    tombstone(c, sl, s);
    unhold_stripe(c, s);
    return PICO_OK;
}

/* ---------------------------------------------------------------------------------------------
 * The packet API (pico_abi.h, "The packet segment"); shared/packets.py is the Python binding of
 * the same protocol (PacketClient), and this code follows it call for call. */

struct pico_pkt_io {
    char name[PICO_NAME_MAX];
    char sem_prefix[PICO_SEM_PREFIX_LEN + 1];
    uint8_t *base;
    size_t size;
    pico_pkt_desc *desc;
    pico_group *groups;
    uint8_t *rings;
    uint32_t max_groups, ring_slots, slot_size, mtu, cap; /* cap: bytes a slot holds */
    uint64_t ring_bytes;
    sem_t *in_bell, *out_bell;
    uint32_t pid;           /* our consumer_pid claim, 0 if none */
    uint64_t generation;    /* of the group table when `order` was built */
    int have_generation;
    uint32_t *order;        /* table indexes of the active groups, ascending */
    uint32_t n_order, rr;   /* round-robin cursor into order */
    uint8_t *buf;           /* cap bytes: pico_packet.data of the last read */
    uint8_t *orig;          /* cap bytes: the last read packet as it came */
    uint32_t orig_len;
    int orig_valid;
    pico_pkt_meta last_meta; /* meta of the last read packet (to recognise it at write time) */
};

static inline pico_ring_header *pkt_ring(pico_pkt_io *io, uint32_t r)
{
    return (pico_ring_header *)(io->rings + (uint64_t)r * io->ring_bytes);
}

static inline uint8_t *pkt_slot(pico_pkt_io *io, pico_ring_header *rh, uint64_t counter)
{
    return (uint8_t *)rh + PICO_RING_HEADER_SIZE +
           (counter & (uint64_t)(io->ring_slots - 1)) * io->slot_size;
}

/* A u64 counter of the group table's line 2 (written by us only): plain bump, atomic store so
 * readers never see a torn word. */
static inline void pkt_bump(uint64_t *field)
{
    __atomic_store_n(field, __atomic_load_n(field, __ATOMIC_RELAXED) + 1, __ATOMIC_RELEASE);
}

/* Live and not a zombie: /proc/<pid>/stat state (the field after the last ')') not Z or X. */
static int pid_alive(long long pid)
{
    char path[64], buf[512];
    if (pid <= 0)
        return 0;
    snprintf(path, sizeof path, "/proc/%lld/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = '\0';
    char *p = strrchr(buf, ')');
    if (!p || p[1] != ' ')
        return 1; /* unreadable format: assume alive (refusing is the safe side) */
    return p[2] != 'Z' && p[2] != 'X';
}

static int check_pkt_geometry(pico_pkt_io *io)
{
    const pico_pkt_desc *d = io->desc;
    const char *n = io->name;
    uint64_t size = io->size;
    if (d->max_groups == 0 || !is_pow2(d->ring_slots) || d->mtu == 0 ||
        d->slot_size < PICO_PKT_META_SIZE + (uint64_t)d->mtu || d->slot_size % 8)
        return fail(PICO_E_CORRUPT, "packet segment %s is corrupt: max_groups=%u, ring_slots=%u "
                    "(a power of two), slot_size=%u, mtu=%u do not fit together (a slot is the "
                    "%u-byte meta plus the mtu): recreate it (restart the PMM)", n,
                    d->max_groups, d->ring_slots, d->slot_size, d->mtu, PICO_PKT_META_SIZE);
    if (d->n_rings != 2ull * d->max_groups + 1 ||
        d->ring_bytes != PICO_RING_HEADER_SIZE + (uint64_t)d->ring_slots * d->slot_size)
        return fail(PICO_E_CORRUPT, "packet segment %s is corrupt: n_rings=%u (expected 2 x "
                    "max_groups %u + 1), ring_bytes=%llu (expected %u + %u x %u): recreate it "
                    "(restart the PMM)", n, d->n_rings, d->max_groups,
                    (unsigned long long)d->ring_bytes, PICO_RING_HEADER_SIZE, d->ring_slots,
                    d->slot_size);
    if (d->groups_offset < PICO_GROUPS_OFFSET || d->groups_offset % 8 || d->rings_offset % 8 ||
        d->groups_offset + (uint64_t)d->max_groups * sizeof(pico_group) > d->rings_offset ||
        d->rings_offset > size || (size - d->rings_offset) / d->ring_bytes < d->n_rings)
        return fail(PICO_E_CORRUPT, "packet segment %s is corrupt: offsets (groups %llu + %u x "
                    "%zu, rings %llu + %u x %llu) do not fit in %llu bytes: recreate it (restart "
                    "the PMM)", n, (unsigned long long)d->groups_offset, d->max_groups,
                    sizeof(pico_group), (unsigned long long)d->rings_offset, d->n_rings,
                    (unsigned long long)d->ring_bytes, (unsigned long long)size);
    if (memchr(d->sem_prefix, '\0', PICO_SEM_PREFIX_LEN) == NULL || d->sem_prefix[0] != '/')
        return fail(PICO_E_CORRUPT, "packet segment %s is corrupt: sem_prefix is not a "
                    "NUL-terminated name starting with '/': recreate it (restart the PMM)", n);
    return PICO_OK;
}

static void pkt_free(pico_pkt_io *io)
{
    if (!io)
        return;
    if (io->in_bell)
        sem_close(io->in_bell);
    if (io->out_bell)
        sem_close(io->out_bell);
    if (io->base)
        munmap(io->base, io->size);
    free(io->order);
    free(io->buf);
    free(io->orig);
    free(io);
}

static int open_bell(pico_pkt_io *io, const char *suffix, sem_t **out)
{
    char sname[PICO_SEM_PREFIX_LEN + 8];
    snprintf(sname, sizeof sname, "%s%s", io->sem_prefix, suffix);
    sem_t *s = sem_open(sname, 0);
    if (s == SEM_FAILED) {
        int e = errno;
        if (e == ENOENT)
            return fail(PICO_E_MISSING, "attach %s: doorbell semaphore %s does not exist "
                        "(/dev/shm/sem.%s): is the PMM running? restart the PMM of this "
                        "replica", io->name, sname, sname + 1);
        return fail(PICO_E_SYS, "attach %s: sem_open(%s): %s", io->name, sname, strerror(e));
    }
    *out = s;
    return PICO_OK;
}

/* Re-scan the active groups when the table's generation changed (pico_abi.h, "Group table"). */
static void pkt_refresh(pico_pkt_io *io)
{
    uint64_t gen = __atomic_load_n(&io->desc->groups_generation, __ATOMIC_ACQUIRE);
    if (io->have_generation && gen == io->generation)
        return;
    io->generation = gen;
    io->have_generation = 1;
    uint32_t n = 0;
    for (uint32_t i = 0; i < io->max_groups; i++)
        if (__atomic_load_n(&io->groups[i].state, __ATOMIC_ACQUIRE) == PICO_GROUP_ACTIVE)
            io->order[n++] = i;
    io->n_order = n;
    io->rr = 0;
}

int pico_pkt_attach(const char *segment_name, int timeout_ms, pico_pkt_io **out)
{
    if (out)
        *out = NULL;
    if (!segment_name || !out)
        return fail(PICO_E_INVAL, "pico_pkt_attach: segment_name and out must not be NULL");
    if (segment_name[0] != '/' || strlen(segment_name) >= PICO_NAME_MAX)
        return fail(PICO_E_INVAL, "pico_pkt_attach: segment name '%s' must start with '/' and "
                    "be shorter than %d bytes, e.g. /pico.demo.r1.pkts", segment_name,
                    PICO_NAME_MAX);
    const char *n = segment_name;
    pico_pkt_io *io = calloc(1, sizeof *io);
    if (!io)
        return fail(PICO_E_SYS, "attach %s: out of memory", n);
    snprintf(io->name, sizeof io->name, "%s", n);
    int rc = seg_open(n, timeout_ms, PICO_SEG_PACKETS, PICO_GROUPS_OFFSET, "PMM", "pkts",
                      &io->base, &io->size);
    if (rc != PICO_OK) {
        pkt_free(io);
        return rc;
    }
    io->desc = (pico_pkt_desc *)(io->base + PICO_PKT_DESC_OFFSET);
    if ((rc = check_pkt_geometry(io)) != PICO_OK) {
        pkt_free(io);
        return rc;
    }
    pico_pkt_desc *d = io->desc;
    io->groups = (pico_group *)(io->base + d->groups_offset);
    io->rings = io->base + d->rings_offset;
    io->max_groups = d->max_groups;
    io->ring_slots = d->ring_slots;
    io->slot_size = d->slot_size;
    io->mtu = d->mtu;
    io->cap = d->slot_size - PICO_PKT_META_SIZE;
    io->ring_bytes = d->ring_bytes;
    memcpy(io->sem_prefix, d->sem_prefix, PICO_SEM_PREFIX_LEN);
    io->sem_prefix[PICO_SEM_PREFIX_LEN] = '\0';
    io->order = calloc(io->max_groups, sizeof *io->order);
    io->buf = malloc(io->cap);
    io->orig = malloc(io->cap);
    if (!io->order || !io->buf || !io->orig) {
        pkt_free(io);
        return fail(PICO_E_SYS, "attach %s: out of memory for %u groups and %u-byte buffers", n,
                    io->max_groups, io->cap);
    }
    if ((rc = open_bell(io, ".in", &io->in_bell)) != PICO_OK ||
        (rc = open_bell(io, ".out", &io->out_bell)) != PICO_OK) {
        pkt_free(io);
        return rc;
    }

    /* Claim the single-consumer role: compare-and-swap, so two attachers cannot both win. */
    uint32_t me = (uint32_t)self_pid();
    uint32_t cur = __atomic_load_n(&d->consumer_pid, __ATOMIC_ACQUIRE);
    for (;;) {
        if (cur != 0 && cur != me && pid_alive(cur)) {
            pkt_free(io);
            return fail(PICO_E_BUSY, "packet segment %s already has a middlebox (pid %u): input "
                        "rings have a single consumer: stop it first", n, cur);
        }
        if (__atomic_compare_exchange_n(&d->consumer_pid, &cur, me, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE))
            break; /* else cur was reloaded: judge the new holder */
    }
    io->pid = me;

    /* Packets a previous middlebox took but never finished are abandoned (the PMM drops them
     * when they time out): start the counts even so checkpoints are not blocked. */
    pkt_refresh(io);
    for (uint32_t k = 0; k < io->n_order; k++) {
        pico_group *g = &io->groups[io->order[k]];
        __atomic_store_n(&g->pkts_done, __atomic_load_n(&g->pkts_read, __ATOMIC_RELAXED),
                         __ATOMIC_RELEASE);
    }
    *out = io;
    return PICO_OK;
}

void pico_pkt_detach(pico_pkt_io *io)
{
    if (!io)
        return;
    if (io->pid && io->desc) {
        uint32_t expect = io->pid;
        __atomic_compare_exchange_n(&io->desc->consumer_pid, &expect, 0, 0, __ATOMIC_ACQ_REL,
                                    __ATOMIC_RELAXED);
    }
    pkt_free(io);
}

uint32_t pico_pkt_mtu(const pico_pkt_io *io) { return io ? io->mtu : 0; }

/* Consume the oldest packet of ring r into pkt (io->buf); 1 if one was there, 0 if empty. */
static int ring_pop(pico_pkt_io *io, uint32_t r, pico_packet *pkt)
{
    pico_ring_header *rh = pkt_ring(io, r);
    uint64_t head = __atomic_load_n(&rh->head, __ATOMIC_RELAXED); /* ours */
    uint64_t tail = __atomic_load_n(&rh->tail, __ATOMIC_ACQUIRE);
    if (head == tail)
        return 0;
    const uint8_t *slot = pkt_slot(io, rh, head);
    memcpy(&pkt->meta, slot, sizeof pkt->meta);
    uint32_t len = pkt->meta.len <= io->cap ? pkt->meta.len : io->cap;
    memcpy(io->buf, slot + PICO_PKT_META_SIZE, len);
    __atomic_store_n(&rh->head, head + 1, __ATOMIC_RELEASE); /* publish last */
    pkt->len = len;
    pkt->data = io->buf;
    return 1;
}

/* Append one record to ring r; 1 if queued, 0 if the ring was full (full_drops += 1). */
static int ring_push(pico_pkt_io *io, uint32_t r, const pico_pkt_meta *m, const void *data)
{
    pico_ring_header *rh = pkt_ring(io, r);
    uint64_t tail = __atomic_load_n(&rh->tail, __ATOMIC_RELAXED); /* ours */
    uint64_t head = __atomic_load_n(&rh->head, __ATOMIC_ACQUIRE);
    if (tail - head >= io->ring_slots) {
        __atomic_store_n(&rh->full_drops, __atomic_load_n(&rh->full_drops, __ATOMIC_RELAXED) + 1,
                         __ATOMIC_RELAXED);
        return 0;
    }
    uint8_t *slot = pkt_slot(io, rh, tail);
    if (m->len)
        memcpy(slot + PICO_PKT_META_SIZE, data, m->len); /* bytes, then meta, then tail */
    memcpy(slot, m, sizeof *m);
    __atomic_store_n(&rh->tail, tail + 1, __ATOMIC_RELEASE); /* publish last */
    return 1;
}

/* One round-robin pass over the active, non-suspended groups; 1 if a packet was read. */
static int pkt_try_read(pico_pkt_io *io, pico_packet *pkt)
{
    pkt_refresh(io);
    uint32_t n = io->n_order;
    for (uint32_t k = 0; k < n; k++) {
        uint32_t i = io->order[(io->rr + k) % n];
        pico_group *g = &io->groups[i];
        if (__atomic_load_n(&g->suspended, __ATOMIC_ACQUIRE))
            continue;
        pico_ring_header *rh = pkt_ring(io, 2 * i);
        if (__atomic_load_n(&rh->head, __ATOMIC_RELAXED) ==
            __atomic_load_n(&rh->tail, __ATOMIC_ACQUIRE))
            continue;
        /* Count the read before taking the packet, then look at `suspended` again: the RM
         * sets suspended, fences, then compares pkts_read with pkts_done, so either it sees
         * this read (and waits for it) or we see the suspension (and back off). */
        pkt_bump(&g->pkts_read);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (__atomic_load_n(&g->suspended, __ATOMIC_ACQUIRE)) {
            pkt_bump(&g->pkts_done); /* the read that did not happen */
            continue;
        }
        if (ring_pop(io, 2 * i, pkt)) {
            io->rr = (io->rr + k + 1) % n;
            pkt->meta.group_index = i; /* the entry it was read from */
            memcpy(io->orig, io->buf, pkt->len);
            io->orig_len = pkt->len;
            io->last_meta = pkt->meta;
            io->orig_valid = 1;
            if (__atomic_load_n(&g->discard, __ATOMIC_ACQUIRE)) {
                pico_pkt_drop(io, pkt); /* handed off elsewhere: never shown to the caller */
                continue;
            }
            return 1;
        }
    }
    return 0;
}

/* Ring a doorbell for a sleeper only (pico_abi.h, "Doorbells"): publish, fence, look. */
static void pkt_ring_bell(sem_t *bell, uint32_t *waiting)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(waiting, __ATOMIC_RELAXED))
        sem_post(bell);
}

int pico_pkt_read(pico_pkt_io *io, pico_packet *pkt, int timeout_ms)
{
    if (!io || !pkt)
        return fail(PICO_E_INVAL, "pico_pkt_read: io and pkt must not be NULL");
    struct timespec dl = {0, 0};
    if (timeout_ms > 0) {
        clock_gettime(CLOCK_REALTIME, &dl);
        dl.tv_sec += timeout_ms / 1000;
        dl.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
        if (dl.tv_nsec >= 1000000000L) {
            dl.tv_sec++;
            dl.tv_nsec -= 1000000000L;
        }
    }
    uint32_t *waiting = &io->desc->in_waiting;
    for (;;) {
        if (pkt_try_read(io, pkt))
            return PICO_OK;
        if (timeout_ms == 0)
            return fail(PICO_E_TIMEOUT, "pico_pkt_read on %s: no packet queued (poll)", io->name);
        /* About to sleep: say so, then look once more (the PMM may have queued a packet before
         * it could see the word), and only then wait on the input doorbell. */
        __atomic_store_n(waiting, 1, __ATOMIC_SEQ_CST);
        if (pkt_try_read(io, pkt)) {
            __atomic_store_n(waiting, 0, __ATOMIC_RELEASE);
            return PICO_OK;
        }
        int r = timeout_ms < 0 ? sem_wait(io->in_bell) : sem_timedwait(io->in_bell, &dl);
        int e = errno;
        __atomic_store_n(waiting, 0, __ATOMIC_RELEASE);
        if (r != 0) {
            if (e == EINTR)
                continue;
            if (e == ETIMEDOUT)
                return fail(PICO_E_TIMEOUT, "pico_pkt_read on %s: no packet within %d ms",
                            io->name, timeout_ms);
            return fail(PICO_E_SYS, "pico_pkt_read on %s: waiting on the doorbell %s.in: %s",
                        io->name, io->sem_prefix, strerror(e));
        }
    }
}

/* Checks a packet handed back to a write call; its group table entry (or fails). */
static int pkt_check(pico_pkt_io *io, const pico_packet *pkt, const char *fn, const void *data,
                     uint32_t len)
{
    if (!io || !pkt)
        return fail(PICO_E_INVAL, "%s: io and pkt must not be NULL", fn);
    if (pkt->meta.group_index >= io->max_groups)
        return fail(PICO_E_INVAL, "%s on %s: packet %u has group_index %u, but the table has %u "
                    "entries: pass a packet from pico_pkt_read", fn, io->name,
                    pkt->meta.packet_id, pkt->meta.group_index, io->max_groups);
    if (!strcmp(fn, "pico_pkt_drop"))
        return PICO_OK; /* no bytes */
    const void *bytes = data ? data : pkt->data;
    uint32_t n = data ? len : pkt->len;
    if (n > io->cap)
        return fail(PICO_E_INVAL, "%s on %s: packet of %u bytes exceeds the ring's MTU %u", fn,
                    io->name, n, io->cap);
    if (n && !bytes)
        return fail(PICO_E_INVAL, "%s on %s: %u bytes at NULL", fn, io->name, n);
    return PICO_OK;
}

/* Do the bytes to write differ from the packet as it was read? The io keeps a copy of the last
 * packet read, so bytes modified in place in pkt->data are seen as changed too. */
static int pkt_modified(pico_pkt_io *io, const pico_packet *pkt, const void *data, uint32_t len)
{
    const void *bytes = data ? data : pkt->data;
    uint32_t n = data ? len : pkt->len;
    const void *orig;
    uint32_t orig_len;
    if (io->orig_valid && memcmp(&pkt->meta, &io->last_meta, sizeof pkt->meta) == 0) {
        orig = io->orig;
        orig_len = io->orig_len;
    } else if (pkt->data != io->buf) { /* the caller's own buffer: its bytes are the input */
        orig = pkt->data;
        orig_len = pkt->len;
    } else { /* an older packet: io->buf was reused since, the input is gone */
        return data != NULL;
    }
    return n != orig_len || (n && memcmp(bytes, orig, n) != 0);
}

/* Finishing a read packet: bump `field`, and pkts_done unless it is one we made. */
static void pkt_finish(pico_pkt_io *io, const pico_packet *pkt, uint64_t *field)
{
    pico_group *g = &io->groups[pkt->meta.group_index];
    pkt_bump(field);
    if (pkt->meta.packet_id || !(pkt->meta.flags & PICO_PKT_CREATED))
        pkt_bump(&g->pkts_done);
}

static void out_meta(pico_pkt_meta *m, const pico_packet *pkt, uint32_t len, uint32_t flags,
                     uint64_t epoch)
{
    memset(m, 0, sizeof *m);
    m->len = len;
    m->flags = flags;
    m->packet_id = pkt->meta.packet_id;
    m->group = pkt->meta.group;
    m->flow_hash = pkt->meta.flow_hash;
    m->epoch = epoch;
    m->ts_ns = now_ns(CLOCK_MONOTONIC);
    m->group_index = pkt->meta.group_index;
    m->key = pkt->meta.key;
}

int pico_pkt_write(pico_pkt_io *io, const pico_packet *pkt, const void *data, uint32_t len)
{
    int rc = pkt_check(io, pkt, "pico_pkt_write", data, len);
    if (rc)
        return rc;
    uint32_t i = pkt->meta.group_index;
    pico_group *g = &io->groups[i];
    uint32_t flags = pkt->meta.flags & ~(PICO_PKT_DIRECT | PICO_PKT_DROP | PICO_PKT_MODIFIED);
    if (pkt_modified(io, pkt, data, len))
        flags |= PICO_PKT_MODIFIED;
    const void *bytes = data ? data : pkt->data;
    uint32_t n = data ? len : pkt->len;
    pico_pkt_meta m;
    /* the tag: the group's epoch as it is now (output commit) */
    out_meta(&m, pkt, n, flags, __atomic_load_n(&g->epoch, __ATOMIC_ACQUIRE));
    int ok = ring_push(io, 2 * i + 1, &m, bytes);
    if (!ok && pkt->meta.packet_id) { /* dropped: ask for the drop verdict now, not at timeout */
        out_meta(&m, pkt, 0, pkt->meta.flags | PICO_PKT_DROP, 0);
        ring_push(io, 2 * io->max_groups, &m, NULL);
    }
    pkt_ring_bell(io->out_bell, &io->desc->out_waiting);
    pkt_finish(io, pkt, ok ? &g->written : &g->output_full);
    if (!ok)
        return fail(PICO_E_FULL, "pico_pkt_write on %s: the output ring of group %u (entry %u) "
                    "is full (%u slots): packet %u dropped; the PMM is not releasing output "
                    "(commits late or not running?)", io->name, pkt->meta.group, i,
                    io->ring_slots, pkt->meta.packet_id);
    return PICO_OK;
}

int pico_pkt_write_direct(pico_pkt_io *io, const pico_packet *pkt, const void *data,
                          uint32_t len)
{
    int rc = pkt_check(io, pkt, "pico_pkt_write_direct", data, len);
    if (rc)
        return rc;
    pico_group *g = &io->groups[pkt->meta.group_index];
    uint32_t flags = (pkt->meta.flags | PICO_PKT_DIRECT) & ~(PICO_PKT_DROP | PICO_PKT_MODIFIED);
    if (pkt_modified(io, pkt, data, len))
        flags |= PICO_PKT_MODIFIED;
    const void *bytes = data ? data : pkt->data;
    uint32_t n = data ? len : pkt->len;
    pico_pkt_meta m;
    out_meta(&m, pkt, n, flags, 0);
    int ok = ring_push(io, 2 * io->max_groups, &m, bytes);
    pkt_ring_bell(io->out_bell, &io->desc->out_waiting);
    pkt_finish(io, pkt, ok ? &g->written_direct : &g->output_full);
    if (!ok)
        return fail(PICO_E_FULL, "pico_pkt_write_direct on %s: the direct ring is full (%u "
                    "slots): packet %u dropped; is the PMM running?", io->name, io->ring_slots,
                    pkt->meta.packet_id);
    return PICO_OK;
}

int pico_pkt_drop(pico_pkt_io *io, const pico_packet *pkt)
{
    int rc = pkt_check(io, pkt, "pico_pkt_drop", NULL, 0);
    if (rc)
        return rc;
    pico_group *g = &io->groups[pkt->meta.group_index];
    int ok = 1;
    if (!(pkt->meta.flags & PICO_PKT_CREATED)) {
        pico_pkt_meta m;
        out_meta(&m, pkt, 0, pkt->meta.flags | PICO_PKT_DROP, 0);
        ok = ring_push(io, 2 * io->max_groups, &m, NULL);
        pkt_ring_bell(io->out_bell, &io->desc->out_waiting);
    }
    pkt_finish(io, pkt, &g->dropped);
    if (!ok)
        return fail(PICO_E_FULL, "pico_pkt_drop on %s: the direct ring is full (%u slots): the "
                    "drop of packet %u was not queued (the PMM drops it when it times out); is "
                    "the PMM running?", io->name, io->ring_slots, pkt->meta.packet_id);
    return PICO_OK;
}

int pico_pkt_create(pico_pkt_io *io, uint32_t group, const void *data, uint32_t len)
{
    if (!io)
        return fail(PICO_E_INVAL, "pico_pkt_create: io must not be NULL");
    if (len > io->cap)
        return fail(PICO_E_INVAL, "pico_pkt_create on %s: packet of %u bytes exceeds the ring's "
                    "MTU %u", io->name, len, io->cap);
    if (len && !data)
        return fail(PICO_E_INVAL, "pico_pkt_create on %s: %u bytes at NULL", io->name, len);
    pkt_refresh(io);
    uint32_t i = UINT32_MAX;
    for (uint32_t k = 0; k < io->n_order; k++)
        if (__atomic_load_n(&io->groups[io->order[k]].id, __ATOMIC_RELAXED) == group) {
            i = io->order[k];
            break;
        }
    if (i == UINT32_MAX) {
        char known[256];
        size_t off = 0;
        known[0] = '\0';
        for (uint32_t k = 0; k < io->n_order && off < sizeof known - 16; k++)
            off += (size_t)snprintf(known + off, sizeof known - off, "%s%u", k ? ", " : "",
                                    io->groups[io->order[k]].id);
        return fail(PICO_E_INVAL, "pico_pkt_create: group %u does not exist in %s; known: [%s]",
                    group, io->name, known);
    }
    pico_group *g = &io->groups[i];
    pico_pkt_meta m;
    memset(&m, 0, sizeof m);
    m.len = len;
    m.flags = PICO_PKT_CREATED;
    m.packet_id = 0;
    m.group = group;
    m.epoch = __atomic_load_n(&g->epoch, __ATOMIC_ACQUIRE);
    m.ts_ns = now_ns(CLOCK_MONOTONIC);
    m.group_index = i;
    int ok = ring_push(io, 2 * i + 1, &m, data);
    pkt_ring_bell(io->out_bell, &io->desc->out_waiting);
    pkt_bump(ok ? &g->created : &g->output_full);
    if (!ok)
        return fail(PICO_E_FULL, "pico_pkt_create on %s: the output ring of group %u (entry %u) "
                    "is full (%u slots): packet dropped; the PMM is not releasing output "
                    "(commits late or not running?)", io->name, group, i, io->ring_slots);
    return PICO_OK;
}
