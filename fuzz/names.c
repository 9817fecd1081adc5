/* Version and target names (runtime/util.c), as every entry point checks
 * them (manifests, the CLI, the Lua API, the config): a C string. What is
 * accepted must be exactly what util.h promises, because a version lands
 * in paths and argv, and a target name in HAProxy server names. */
#include "fuzz.h"

#include "util.h"

static int allowed(const char *s, const char *extra) {
  for (; *s; s++) {
    unsigned char c = (unsigned char)*s;
    int alnum = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
    if (!alnum && !strchr(extra, c))
      return 0;
  }
  return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char *s = fuzz_cstr(data, size);
  size_t n = strlen(s);
  char err[DC_ERR_MAX] = "";

  /* A version lands in paths and argv: it starts with a letter or digit
   * (never ".", ".." or "-v"). */
  int version_ok = n >= 1 && n <= 128 && allowed(s, "._+-") && allowed((char[]){s[0], '\0'}, "");
  int v = dc_validate_version(s, "field 'version'", err);
  if (v == 0)
    FUZZ_CHECK(version_ok);
  else
    FUZZ_CHECK(strncmp(err, "deploy: field 'version' ", 24) == 0);
  /* Accepting is not a matter of luck: any string of the alphabet fits. */
  if (version_ok)
    FUZZ_CHECK(v == 0);

  err[0] = '\0';
  int t = dc_validate_target_name(s, err);
  if (t == 0)
    FUZZ_CHECK(n >= 1 && n <= 63 && allowed(s, "_-"));
  else
    FUZZ_CHECK(strncmp(err, "deploy: target name ", 20) == 0);
  if (n >= 1 && n <= 63 && allowed(s, "_-"))
    FUZZ_CHECK(t == 0);
  free(s);
  return 0;
}
