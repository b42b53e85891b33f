/*
 * fuzz.h - what the libFuzzer targets share: an invariant check that
 * crashes with a message, exact-size heap copies (so ASan sees a read past
 * any length we hand a parser) and an input-derived cut point.
 *
 * Each target first includes ../../apm-ext.h (apm-ext.c, built with
 * -DAPM_EXT_TEST and the same flags, is linked beside it: the targets call
 * only the parsers apm-ext.h declares),
 * then this file.
 */
#ifndef FUZZ_H
#define FUZZ_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifndef MIN
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#endif

#define FUZZ_ASSERT(c)                                                        \
	do {                                                                  \
		if (!(c)) {                                                   \
			fprintf(stderr, "%s:%d: invariant failed: %s\n",      \
			    __FILE__, __LINE__, #c);                          \
			abort();                                              \
		}                                                             \
	} while (0)

/* A heap copy of p[0..n), exactly n bytes long; free() it. */
static char *
fuzz_dup(const void *p, size_t n)
{
	char *d = malloc(n);
	if (!d && n == 0)
		d = malloc(1);
	FUZZ_ASSERT(d != NULL);
	if (n)
		memcpy(d, p, n);
	return d;
}

/* A position in [0, n] that depends on every byte of p[0..n). */
static size_t
fuzz_cut(const uint8_t *p, size_t n)
{
	uint32_t h = 2166136261u;
	for (size_t i = 0; i < n; i++)
		h = (h ^ p[i]) * 16777619u;
	return n ? h % (n + 1) : 0;
}

#endif
