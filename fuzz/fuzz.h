/* What every libFuzzer target of fuzz/ shares. A target feeds bytes to one
 * parser of outside input the way the runtime feeds it, and checks what
 * the parser promises on top of what the sanitizers check: an invariant
 * broken is a crash like any other (abort, reproducer kept). */
#ifndef DEPLOY_FUZZ_H
#define DEPLOY_FUZZ_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

#define FUZZ_CHECK(cond)                                                                         \
  do {                                                                                           \
    if (!(cond)) {                                                                               \
      fprintf(stderr, "fuzz: invariant broken at %s:%d: %s\n", __FILE__, __LINE__, #cond);       \
      abort();                                                                                   \
    }                                                                                            \
  } while (0)

/* The bytes as a C string, cut at the first NUL as every C reader of a
 * string would cut them. Caller frees; aborts when out of memory (an
 * allocation failure is not what is being fuzzed). */
static inline char *fuzz_cstr(const uint8_t *data, size_t size) {
  char *s = malloc(size + 1);
  if (!s)
    abort();
  if (size)
    memcpy(s, data, size);
  s[size] = '\0';
  return s;
}

/* Splits data at NUL bytes into max parts, each a heap C string (missing
 * parts are "", bytes after the last part are ignored). Inputs made of
 * several texts (an answer per command) are written this way: a NUL never
 * survives inside a C string anyway. */
static inline void fuzz_split(const uint8_t *data, size_t size, char **parts, size_t max) {
  size_t at = 0;
  for (size_t i = 0; i < max; i++) {
    size_t n = 0;
    while (at + n < size && data[at + n] != 0)
      n++;
    parts[i] = fuzz_cstr(data + at, n);
    at += n;
    if (at < size)
      at++; /* the NUL */
  }
}

static inline void fuzz_free_parts(char **parts, size_t n) {
  for (size_t i = 0; i < n; i++)
    free(parts[i]);
}

#endif
