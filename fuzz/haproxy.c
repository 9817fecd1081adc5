/* HAProxy's runtime-API answers as the router reads them (runtime/haproxy.c
 * through its DEPLOY_FUZZ entry point): an input is up to four texts
 * separated by NUL bytes,
 *   1. the answer to "show servers state app" (what an apply plans from),
 *   2. the answer to "show stat app 4 -1" (what the drain step counts, and
 *      the counters the haproxy analysis source reads),
 *   3. the answer to some other command (checked as each kind of success),
 *   4. the servers the apply wants, one "name host port weight" a line
 *      (absent: dc_1 and dc_2 as a canary would want them).
 * The plan must only ever touch servers of ours, and each of its commands
 * must be one command: a name read from an answer is sent back to HAProxy,
 * whose CLI would run "a;b" as two. */
#include "fuzz.h"

#include "router.h"
#include "util.h"

#define PREFIX "dc_"

static void on_step(void *payload, const char *server, const char *command) {
  size_t *n = payload;
  (*n)++;
  FUZZ_CHECK(server[0] == '\0' || strncmp(server, PREFIX, strlen(PREFIX)) == 0);
  for (const char *c = command; *c; c++)
    FUZZ_CHECK(*c != ';' && (unsigned char)*c >= 0x20 && *c != 0x7f);
}

static size_t read_want(char *text, router_server *want, size_t max) {
  size_t n = 0;
  for (char *line = strtok(text, "\n"); line && n < max; line = strtok(NULL, "\n")) {
    router_server s;
    memset(&s, 0, sizeof s);
    if (sscanf(line, "%63s %63s %d %d", s.name, s.host, &s.port, &s.weight) == 4)
      want[n++] = s;
  }
  return n;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char *parts[4];
  fuzz_split(data, size, parts, 4);
  router_server want[16] = {{"dc_1", "127.0.0.1", 20001, 9}, {"dc_2", "127.0.0.1", 20002, 1}};
  size_t nwant = parts[3][0] ? read_want(parts[3], want, 16) : 2;
  haproxy_fuzz_result r;
  size_t steps = 0;
  char err[DC_ERR_MAX] = "";
  int rc = haproxy_fuzz_answers("app", PREFIX, want, nwant, parts[0], parts[1], parts[2], on_step, &steps, &r, err);
  if (rc != 0) {
    FUZZ_CHECK(err[0] != '\0');
  } else {
    FUZZ_CHECK(steps == r.nsteps);
    FUZZ_CHECK(r.busy >= -2);
    FUZZ_CHECK(strncmp(err, "haproxy: ", 9) == 0);
    /* Success answers are exclusive: an empty line is never a sentence. */
    FUZZ_CHECK(r.ok_empty + r.ok_add + r.ok_addr <= 1);
    /* Analysis counts only our servers' rows, within its buffer. */
    FUZZ_CHECK(r.stats_rc == 0 || r.nstats == 0);
    FUZZ_CHECK(r.nstats <= 16);
    for (size_t i = 0; i < r.nstats; i++)
      FUZZ_CHECK(strncmp(r.stats[i].name, PREFIX, strlen(PREFIX)) == 0);
  }
  fuzz_free_parts(parts, 4);
  return 0;
}
