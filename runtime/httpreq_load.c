/* The core's side of the HTTP module (deploy-http.so, see module.h and
 * http_module.h): loaded on first use, and httpreq_* forwarded to it. A
 * request in flight is real work: it holds the virtual clock, as a health
 * check does, so a simulated rollout never jumps past an answer. */
#include "httpreq.h"

#include <stdlib.h>

#include "http_module.h"
#include "module.h"
#include "util.h"

static const http_module_api *loaded;

const http_module_api *http_module(char *err) {
  if (!loaded)
    loaded = dc_module_api("http", "deploy_http_api", HTTP_MODULE_API_VERSION, err);
  return loaded;
}

struct httpreq {
  engine *e;
  void *inner;          /* the module's request */
  httpreq_cb cb;
  void *payload;
};

static void answered(void *payload, const httpreq_response *res) {
  httpreq *r = payload;
  engine_release(r->e);
  r->cb(r->payload, res);
  free(r);
}

int httpreq_start(httpreq **out, engine *e, const httpreq_opts *o, httpreq_cb cb, void *payload, char *err) {
  if (out)
    *out = NULL;
  const http_module_api *m = http_module(err);
  if (!m)
    return HTTPREQ_FAILED;
  httpreq *r = calloc(1, sizeof *r);
  if (!r) {
    dc_fmt(err, DC_ERR_MAX, "http: out of memory");
    return HTTPREQ_FAILED;
  }
  r->e = e;
  r->cb = cb;
  r->payload = payload;
  int rc = m->request_start(&r->inner, e, o, answered, r, err);
  if (rc != 0) {
    free(r);
    return rc;
  }
  engine_hold(e);
  if (out)
    *out = r;
  return 0;
}

void httpreq_cancel(httpreq *r) {
  if (!r)
    return;
  loaded->request_cancel(r->inner);
  engine_release(r->e);
  free(r);
}

const char *httpreq_error_name(httpreq_error e) {
  switch (e) {
  case HTTPREQ_OK:
    return "ok";
  case HTTPREQ_BAD_URL:
    return "bad_url";
  case HTTPREQ_TIMEOUT:
    return "timeout";
  case HTTPREQ_REFUSED:
    return "refused";
  case HTTPREQ_TOO_LARGE:
    return "too_large";
  case HTTPREQ_FAILED:
    return "failed";
  case HTTPREQ_BAD_REQUEST:
    return "bad_request";
  }
  return "failed";
}
