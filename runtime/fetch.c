/* fetch_start as the core sees it: a call into the HTTP module
 * (httpfetch.c in deploy-http.so), loaded the first time it is needed. */
#include "fetch.h"

#include "module.h"
#include "util.h"

static const fetch_api *module;

int fetch_start(engine *e, const char *const *urls, size_t n, const fetch_opts *o, fetch_cb cb, void *payload,
                char *err) {
  if (!module && !(module = dc_module_api("http", "deploy_http_fetch_api", FETCH_API_VERSION, err)))
    return -1;
  return module->start(e, urls, n, o, cb, payload, err);
}
