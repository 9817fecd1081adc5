/* Health as the core sees it: how a set of results is classified, and the
 * checks themselves, which live in the HTTP module (deploy-http.so, loaded
 * on first use: see module.h). */
#include "health.h"

#include "http_module.h"
#include "util.h"

int health_check_start(engine *e, const char *const *urls, size_t n, const health_opts *opts, health_cb cb,
                       void *payload, char *err) {
  const http_module_api *m = http_module(err);
  if (!m)
    return -1;
  return m->check_start(e, urls, n, opts, cb, payload, err);
}

health_state health_classify(const health_result *r, size_t n) {
  size_t ok = 0;
  for (size_t i = 0; i < n; i++)
    ok += r[i].ok ? 1 : 0;
  if (n > 0 && ok == n)
    return HEALTH_HEALTHY;
  if (ok == 0)
    return HEALTH_UNHEALTHY;
  return HEALTH_DEGRADED;
}

const char *health_state_name(health_state s) {
  switch (s) {
  case HEALTH_HEALTHY:
    return "healthy";
  case HEALTH_DEGRADED:
    return "degraded";
  case HEALTH_UNHEALTHY:
    return "unhealthy";
  }
  return "unhealthy";
}
