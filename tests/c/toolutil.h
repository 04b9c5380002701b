/*
 * toolutil.h - argument parsing shared by the test CLIs (flowtool, pkttool).
 * Include it after defining `static const char *prog` (the tool's name for messages).
 */
#ifndef PICO_TOOLUTIL_H
#define PICO_TOOLUTIL_H

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define EXIT_USAGE 2

/* An unsigned number in 0..max (decimal, 0x hex or 0 octal); exits EXIT_USAGE otherwise. */
static unsigned long parse_ulong(const char *s, unsigned long max, const char *what)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 0);
    if (errno || end == s || *end || v > max || s[0] == '-') {
        fprintf(stderr, "%s: bad %s '%s' (0..%lu)\n", prog, what, s, max);
        exit(EXIT_USAGE);
    }
    return v;
}

static int hexval(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Decodes HEX into a malloc'd buffer (*len bytes); exits EXIT_USAGE on bad input. */
static uint8_t *parse_hex(const char *s, uint32_t *len)
{
    size_t n = strlen(s);
    if (n % 2) {
        fprintf(stderr, "%s: odd-length hex '%s'\n", prog, s);
        exit(EXIT_USAGE);
    }
    uint8_t *b = malloc(n / 2 + 1);
    if (!b)
        exit(1);
    for (size_t i = 0; i < n / 2; i++) {
        int hi = hexval(s[2 * i]), lo = hexval(s[2 * i + 1]);
        if (hi < 0 || lo < 0) {
            fprintf(stderr, "%s: bad hex '%s'\n", prog, s);
            exit(EXIT_USAGE);
        }
        b[i] = (uint8_t)(hi << 4 | lo);
    }
    *len = (uint32_t)(n / 2);
    return b;
}

#endif /* PICO_TOOLUTIL_H */
