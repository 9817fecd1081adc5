/* GETs that keep their answer: what analysis asks of Prometheus, of an
 * HTTP check's URL, and of instances it probes. Each request runs on the
 * engine's libcurl multi (the HTTP module, deploy-http.so, loaded on
 * first use, as health checks are: see module.h), all at once, and one
 * callback reports them all; nothing blocks the loop. */
#ifndef DEPLOY_FETCH_H
#define DEPLOY_FETCH_H

#include <stddef.h>

#include "engine.h"

/* An answer's body is cut (and the request failed) beyond this. */
#define FETCH_BODY_MAX (1u << 20)

typedef struct fetch_result {
  const char *url;     /* fetch's copy; valid during the callback */
  long status;         /* HTTP status, 0 when there was no answer */
  double latency;      /* seconds, the whole transfer */
  const char *body;    /* NUL-terminated; "" when there was none; valid during the callback */
  size_t len;
  int ok;              /* an answer arrived whole (any status) */
  char error[256];     /* why not ok */
} fetch_result;

typedef void (*fetch_cb)(void *payload, const fetch_result *results, size_t n);

typedef struct fetch_opts {
  double timeout;      /* seconds per request; default 5 */
  int fresh;           /* a new connection per request, closed after (probes measure what a client sees) */
} fetch_opts;

/* GET every url concurrently; cb runs once, from the loop, when all have
 * ended (results in the order of urls). Returns 0, or -1 with err (a URL
 * that is not http(s), no memory, no HTTP module). */
int fetch_start(engine *e, const char *const *urls, size_t n, const fetch_opts *o, fetch_cb cb, void *payload,
                char *err);

#define FETCH_API_VERSION 1
typedef struct fetch_api {
  int version;
  int (*start)(engine *e, const char *const *urls, size_t n, const fetch_opts *o, fetch_cb cb, void *payload,
               char *err);
} fetch_api;

#endif
