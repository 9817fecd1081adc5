/* Health checks: GET every URL concurrently through libcurl multi, compare
 * the status with the expected one, and classify the set. */
#ifndef DEPLOY_HEALTH_H
#define DEPLOY_HEALTH_H

#include <stddef.h>
#include "engine.h"

typedef struct health_result {
  const char *url;     /* health's copy of the URL; valid during the callback */
  int ok;              /* status == expect_status, within the timeout */
  long status;         /* HTTP status, 0 when no answer */
  double latency;      /* seconds */
  char error[256];     /* why not ok: "timeout after 2.0 s", "status 500 (expected 200)", curl's text */
} health_result;

typedef enum { HEALTH_HEALTHY = 0, HEALTH_DEGRADED = 1, HEALTH_UNHEALTHY = 2 } health_state;

/* results has n entries, in the order of the urls; valid during the call. */
typedef void (*health_cb)(void *payload, const health_result *results, size_t n);

typedef struct health_opts {
  double timeout;      /* seconds per check; default 2 */
  long expect_status;  /* default 200 */
} health_opts;

/* Check all urls at once on the engine's loop; cb runs once when every check
 * has finished (n == 0 calls cb at once from the loop). The urls are copied.
 * Returns 0 or -1 with err filled. */
int health_check_start(engine *e, const char *const *urls, size_t n,
                       const health_opts *opts, health_cb cb, void *payload,
                       char *err);

/* health_check_start lives in the HTTP module (deploy-http.so, libcurl),
 * loaded on first use: see http_module.h. */

/* healthy when all ok, unhealthy when none is (or n == 0), else degraded. */
health_state health_classify(const health_result *r, size_t n);
const char *health_state_name(health_state s);

#endif
