/* fetch_start in the HTTP module (deploy-http.so): GETs on the engine's
 * libcurl multi that keep their answers, for analysis (Prometheus, HTTP
 * checks, probes). Same shape as healthcheck.c: every request in flight at
 * once, one callback when the last has ended. */
#include "fetch.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "http.h"
#include "util.h"

#define FETCH_DEFAULT_TIMEOUT 5.0

typedef struct batch batch;

typedef struct request {
  batch *b;
  CURL *easy;
  dc_buf body;
  int capped;               /* the body passed FETCH_BODY_MAX: cut */
  char errbuf[CURL_ERROR_SIZE];
} request;

struct batch {
  size_t n, pending;
  int cancelled;            /* a start failed midway: end without calling back */
  double timeout;
  fetch_cb cb;
  void *payload;
  char **urls;
  request *reqs;
  fetch_result *results;
  uv_timer_t timer;         /* n == 0: answers from the loop */
};

static void batch_free(batch *b) {
  for (size_t i = 0; i < b->n; i++) {
    curl_easy_cleanup(b->reqs[i].easy);
    dc_buf_free(&b->reqs[i].body);
    free(b->urls[i]);
  }
  free(b->urls);
  free(b->reqs);
  free(b->results);
  free(b);
}

static size_t keep_body(char *data, size_t size, size_t nmemb, void *userp) {
  request *r = userp;
  size_t len = size * nmemb;
  if (r->body.len + len > FETCH_BODY_MAX) {
    r->capped = 1;
    return 0; /* curl stops the transfer with CURLE_WRITE_ERROR */
  }
  dc_buf_add(&r->body, data, len);
  return r->body.oom ? 0 : len;
}

static void record(request *r, size_t i, CURLcode rc) {
  batch *b = r->b;
  fetch_result *res = &b->results[i];
  double total = 0;
  long os_errno = 0;
  curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &res->status);
  curl_easy_getinfo(r->easy, CURLINFO_TOTAL_TIME, &total);
  res->latency = total;
  res->url = b->urls[i];
  res->body = r->body.data ? r->body.data : "";
  res->len = r->body.len;
  if (rc == CURLE_OK) {
    res->ok = 1;
    return;
  }
  if (rc == CURLE_WRITE_ERROR && r->capped)
    dc_fmt(res->error, sizeof res->error, "the answer is larger than %u bytes", FETCH_BODY_MAX);
  else if (rc == CURLE_OPERATION_TIMEDOUT)
    dc_fmt(res->error, sizeof res->error, "no answer within %g s", b->timeout);
  else if (rc == CURLE_COULDNT_CONNECT &&
           curl_easy_getinfo(r->easy, CURLINFO_OS_ERRNO, &os_errno) == CURLE_OK && os_errno == ECONNREFUSED)
    dc_strlcpy(res->error, "connection refused", sizeof res->error);
  else if (r->errbuf[0])
    dc_fmt(res->error, sizeof res->error, "%s (%s)", curl_easy_strerror(rc), r->errbuf);
  else
    dc_strlcpy(res->error, curl_easy_strerror(rc), sizeof res->error);
  res->status = 0;
}

static void on_done(CURL *easy, CURLcode rc, void *payload) {
  (void)easy;
  request *r = payload;
  batch *b = r->b;
  if (!b->cancelled)
    record(r, (size_t)(r - b->reqs), rc);
  if (--b->pending > 0)
    return;
  if (!b->cancelled)
    b->cb(b->payload, b->results, b->n);
  batch_free(b);
}

static int url_ok(const char *url) {
  CURLU *u = curl_url();
  char *scheme = NULL;
  int ok = u && curl_url_set(u, CURLUPART_URL, url, 0) == CURLUE_OK &&
           curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) == CURLUE_OK &&
           (strcmp(scheme, "http") == 0 || strcmp(scheme, "https") == 0);
  curl_free(scheme);
  curl_url_cleanup(u);
  return ok;
}

static int prepare(batch *b, size_t i, const char *url, int fresh, char *err) {
  request *r = &b->reqs[i];
  r->b = b;
  if (!url || !url_ok(url)) {
    dc_fmt(err, DC_ERR_MAX, "fetch: '%.300s' is not an http(s) URL", url ? url : "(null)");
    return -1;
  }
  b->urls[i] = strdup(url);
  r->easy = curl_easy_init();
  if (!b->urls[i] || !r->easy) {
    dc_fmt(err, DC_ERR_MAX, "fetch: out of memory");
    return -1;
  }
  long ms = (long)(b->timeout * 1000 + 0.5);
  CURL *e = r->easy;
  curl_easy_setopt(e, CURLOPT_URL, url);
  curl_easy_setopt(e, CURLOPT_HTTPGET, 1L);
  curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, ms > 0 ? ms : 1L);
  curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, ms > 0 ? ms : 1L);
  curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, keep_body);
  curl_easy_setopt(e, CURLOPT_WRITEDATA, r);
  curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 0L);
  curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(e, CURLOPT_USERAGENT, "deployctl-analysis/1");
  curl_easy_setopt(e, CURLOPT_ERRORBUFFER, r->errbuf);
  if (fresh) {
    curl_easy_setopt(e, CURLOPT_FRESH_CONNECT, 1L);
    curl_easy_setopt(e, CURLOPT_FORBID_REUSE, 1L);
  }
  return 0;
}

static void on_empty_closed(uv_handle_t *handle) { batch_free(handle->data); }

static void on_empty(uv_timer_t *t) {
  batch *b = t->data;
  b->cb(b->payload, NULL, 0);
  uv_close((uv_handle_t *)t, on_empty_closed);
}

static int start(engine *e, const char *const *urls, size_t n, const fetch_opts *o, fetch_cb cb, void *payload,
                 char *err) {
  if (!e || !e->loop || !cb || (n > 0 && !urls)) {
    dc_fmt(err, DC_ERR_MAX, "fetch: needs an engine, a callback and the URLs");
    return -1;
  }
  batch *b = calloc(1, sizeof *b);
  if (b) {
    b->urls = calloc(n ? n : 1, sizeof *b->urls);
    b->reqs = calloc(n ? n : 1, sizeof *b->reqs);
    b->results = calloc(n ? n : 1, sizeof *b->results);
  }
  if (!b || !b->urls || !b->reqs || !b->results) {
    if (b) {
      free(b->urls);
      free(b->reqs);
      free(b->results);
    }
    free(b);
    dc_fmt(err, DC_ERR_MAX, "fetch: out of memory");
    return -1;
  }
  b->n = n;
  b->cb = cb;
  b->payload = payload;
  b->timeout = o && o->timeout > 0 ? o->timeout : FETCH_DEFAULT_TIMEOUT;
  if (n == 0) {
    uv_timer_init(e->loop, &b->timer);
    b->timer.data = b;
    uv_timer_start(&b->timer, on_empty, 0, 0);
    return 0;
  }
  for (size_t i = 0; i < n; i++)
    if (prepare(b, i, urls[i], o && o->fresh, err) != 0) {
      batch_free(b);
      return -1;
    }
  http *h = http_engine_client(e);
  if (!h) {
    dc_fmt(err, DC_ERR_MAX, "fetch: the engine has no HTTP client (libcurl multi could not be made)");
    batch_free(b);
    return -1;
  }
  /* http never ends a transfer inside http_add, so pending counts as we go;
   * when an add fails, those already running end without a callback. */
  for (size_t i = 0; i < n; i++) {
    if (http_add(h, b->reqs[i].easy, on_done, &b->reqs[i]) == 0) {
      b->pending++;
      continue;
    }
    dc_fmt(err, DC_ERR_MAX, "fetch: could not start a request (out of memory, or the engine is shutting down)");
    if (b->pending == 0)
      batch_free(b);
    else
      b->cancelled = 1;
    return -1;
  }
  return 0;
}

__attribute__((visibility("default"))) const fetch_api deploy_http_fetch_api = {
    .version = FETCH_API_VERSION,
    .start = start,
};
