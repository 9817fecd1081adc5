/* Placeholders, ${NAME} and redaction (runtime/util.c), the way a command,
 * a health URL and an error pass through them. An input is a template,
 * then (after a NUL) the version that fills {version}: a version from a
 * manifest or the CLI, which the fuzzer does not restrict further.
 *   - dc_expand_placeholders into buffers of several sizes must agree with
 *     dc_expand_placeholders_dup, or refuse exactly when it does not fit;
 *   - dc_expand_env must expand from the environment or refuse;
 *   - dc_redact must leave none of the registered secrets in any text. */
#include "fuzz.h"

#include "util.h"

/* Registered as the config registers the values its ${NAME}s expand to;
 * one is inside another, one is too short to be redacted. */
static const char *const secrets[] = {"s3cr3t-app-token", "s3cr3t", "hunter22", "xy", NULL};

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  setenv("APP_TOKEN", "s3cr3t-app-token", 1);
  setenv("DB_URL", "postgres://app:hunter22@db.internal/app", 1);
  setenv("EMPTY", "", 1);
  setenv("BRACES", "{port}${APP_TOKEN}", 1);
  for (const char *const *s = secrets; *s; s++)
    if (dc_secret_add(*s) != 0)
      abort();
  return 0;
}

/* ${NAME} as util.h documents it, written plainly. NULL when refused. */
static char *env_reference(const char *src) {
  dc_buf b = {0};
  for (const char *p = src; *p;) {
    if (p[0] == '$' && p[1] == '{') {
      const char *close = strchr(p + 2, '}');
      size_t n = close ? (size_t)(close - p - 2) : 0;
      char name[128];
      if (!close || n == 0 || n >= sizeof name) {
        dc_buf_free(&b);
        return NULL;
      }
      memcpy(name, p + 2, n);
      name[n] = '\0';
      const char *value = getenv(name);
      if (!value) {
        dc_buf_free(&b);
        return NULL;
      }
      dc_buf_puts(&b, value);
      p = close + 1;
    } else {
      dc_buf_add(&b, p++, 1);
    }
  }
  return dc_buf_take(&b);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char *parts[2];
  fuzz_split(data, size, parts, 2);
  const char *tmpl = parts[0];
  const char *pairs[] = {"port",     "20001",   "version", parts[1], "target", "production",
                         "instance", "0",       "host",    "127.0.0.1", NULL};
  char *full = dc_expand_placeholders_dup(tmpl, pairs);
  FUZZ_CHECK(full != NULL);
  static const size_t sizes[] = {1, 2, 16, 64, 4096};
  char *dst = malloc(4096);
  char err[DC_ERR_MAX];
  if (!dst)
    abort();
  for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
    int rc = dc_expand_placeholders(dst, sizes[i], tmpl, pairs);
    if (strlen(full) < sizes[i])
      FUZZ_CHECK(rc == 0 && strcmp(dst, full) == 0);
    else
      FUZZ_CHECK(rc == -1);
  }

  char *want = env_reference(full);
  for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
    err[0] = '\0';
    int rc = dc_expand_env(dst, sizes[i], full, err);
    if (want && strlen(want) < sizes[i]) {
      FUZZ_CHECK(rc == 0 && strcmp(dst, want) == 0);
    } else {
      FUZZ_CHECK(rc == -1);
      FUZZ_CHECK(strncmp(err, "deploy: ", 8) == 0);
    }
  }
  free(want);

  /* Redaction, in place, of the raw input and of both expansions. */
  const char *texts[] = {tmpl, full, parts[1]};
  for (size_t i = 0; i < 3; i++) {
    char *t = strdup(texts[i]);
    FUZZ_CHECK(t != NULL);
    size_t before = strlen(t);
    dc_redact(t);
    FUZZ_CHECK(strlen(t) <= before);
    for (const char *const *s = secrets; *s; s++)
      if (strlen(*s) >= 4)
        FUZZ_CHECK(strstr(t, *s) == NULL);
    free(t);
  }
  free(dst);
  free(full);
  fuzz_free_parts(parts, 2);
  return 0;
}
